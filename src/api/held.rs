//! Runs an approved request as its agent's own request would have run
//! (`crate::approvals::RunHeld`): the same handler code after the policy
//! decision, so the same revocation state, records and answers.

use serde_json::Value;

use super::error::ApiError;
use super::AppState;
use crate::agents::CertificateKey;
use crate::approvals::{HeldRequest, Refusal, RunHeld};
use crate::identity::AgentName;

pub(super) struct HeldRunner<'a> {
    state: &'a AppState,
    /// The approving vote's request, which the run's records name.
    request_id: &'a str,
}

impl<'a> HeldRunner<'a> {
    pub(super) fn new(state: &'a AppState, request_id: &'a str) -> Self {
        Self { state, request_id }
    }
}

fn answer<T: serde::Serialize>(result: Result<T, ApiError>) -> Result<Value, Refusal> {
    match result {
        Ok(answer) => Ok(serde_json::to_value(answer).unwrap_or(Value::Null)),
        Err(e) => Err(Refusal {
            code: e.code.to_string(),
            message: e.message,
        }),
    }
}

#[async_trait::async_trait]
impl RunHeld for HeldRunner<'_> {
    async fn run(
        &self,
        agent: &AgentName,
        request: &HeldRequest,
        policy_version: i64,
    ) -> Result<Value, Refusal> {
        let state = self.state;
        match request {
            HeldRequest::Sign { digest, key_id, .. } => answer(
                super::signing::execute(
                    state,
                    agent,
                    key_id.as_deref(),
                    *digest,
                    self.request_id,
                    policy_version,
                )
                .await,
            ),
            HeldRequest::Message {
                audience,
                intent,
                lifetime_secs,
            } => answer(
                super::messages::execute(
                    state,
                    agent,
                    intent,
                    audience,
                    *lifetime_secs,
                    self.request_id,
                    policy_version,
                )
                .await,
            ),
            HeldRequest::Certificate {
                ttl_seconds,
                csr_pem,
            } => {
                let key = match CertificateKey::from_csr_pem(csr_pem.as_deref()) {
                    Ok(key) => key,
                    Err(e) => return answer::<Value>(Err(e.into())),
                };
                answer(
                    super::agents::execute(
                        state,
                        &format!("agent:{agent}"),
                        agent,
                        *ttl_seconds,
                        key,
                        policy_version,
                    )
                    .await,
                )
            }
        }
    }
}
