//! The request an audit event comes from: its id, trace, source address
//! and the credential it presented.
//!
//! The HTTP layer opens a context per request ([`RequestContext::scope`])
//! and the caller check fills in the credential;
//! [`AuditEvent::new`](super::AuditEvent::new) copies it. A task-local, like a tracing span,
//! rather than one more argument through every domain call between the
//! handler and the store: the domain decides *what* is recorded, and the
//! request's provenance is the same for everything it records. Work a
//! request hands to another task (a pool worker, a store writer thread)
//! builds its events before the hand-off, in the request's task.

use std::cell::RefCell;
use std::future::Future;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestContext {
    /// The id in the response's `x-request-id` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The W3C trace id: the one the request carried, or with traces on
    /// (`telemetry::traces`) that of its server span.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// The client's address and port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// What the caller authenticated with: `token:<id>` (an admin token's
    /// id, never the token) or `cert:<serial>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

tokio::task_local! {
    static CURRENT: RefCell<RequestContext>;
}

impl RequestContext {
    /// The context of the request this task serves; empty outside one.
    pub fn current() -> Self {
        CURRENT.try_with(|c| c.borrow().clone()).unwrap_or_default()
    }

    /// The credential the caller of this task's request authenticated
    /// with, once the caller check has run.
    pub fn current_credential() -> Option<String> {
        CURRENT
            .try_with(|c| c.borrow().credential.clone())
            .ok()
            .flatten()
    }

    /// Runs `work` as the request this context describes.
    pub async fn scope<F: Future>(self, work: F) -> F::Output {
        CURRENT.scope(RefCell::new(self), work).await
    }

    /// Records the credential the caller authenticated with, once it is
    /// known; outside a request, nothing.
    pub fn set_credential(credential: String) {
        let _ = CURRENT.try_with(|c| c.borrow_mut().credential = Some(credential));
    }

    /// Records the trace the request's server span belongs to; outside a
    /// request, nothing.
    pub fn set_trace_id(trace_id: String) {
        let _ = CURRENT.try_with(|c| c.borrow_mut().trace_id = Some(trace_id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditEvent;

    #[tokio::test]
    async fn an_event_takes_the_context_of_the_request_it_is_built_in() {
        let context = RequestContext {
            request_id: Some("r1".into()),
            source: Some("192.0.2.1:5000".into()),
            ..Default::default()
        };
        let event = context
            .scope(async {
                RequestContext::set_credential("cert:01".into());
                AuditEvent::new("agent:alpha", "x", "y")
            })
            .await;
        assert_eq!(event.context.request_id.as_deref(), Some("r1"));
        assert_eq!(event.context.credential.as_deref(), Some("cert:01"));
        assert_eq!(
            AuditEvent::new("keyward", "x", "y").context,
            RequestContext::default()
        );
    }
}
