//! The versioned policy in force, and the scope and rate checks it makes on
//! agent requests. Partitioning (an agent acts only for itself) is decided
//! first by [`super::authorize`]; this decides what an agent may do for
//! itself.
//!
//! Every replica holds the version in force in memory: reloaded at once
//! when this replica applies one, and within `REFRESH_INTERVAL` when
//! another does. Until a policy is applied, the built-in one (version 0)
//! lets an agent do everything for itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::document::{Grant, PolicyDocument};
use super::{Caller, PolicyError, BUILTIN_POLICY_VERSION};
use crate::audit::AuditEvent;
use crate::identity::AgentName;
use crate::runtime::supervisor::Supervisor;
pub use crate::store::PolicyRecord;
use crate::store::{Store, StoreError};

/// How often a replica looks for a version applied elsewhere.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// A certificate lifetime already within keyward's own limits, and whether
/// the caller asked for it: a default above the policy's cap is lowered to
/// it, an explicit request above it is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestedTtl {
    pub ttl: Duration,
    pub explicit: bool,
}

/// A request an agent makes for itself, as the policy sees it: everything
/// the decision depends on, so that it is decided whole before the rate is
/// charged (a request refused for what it asks costs the agent nothing).
#[derive(Clone, Copy, Debug)]
pub enum AgentRequest<'a> {
    Sign,
    Message {
        intent: &'a str,
    },
    /// A certificate asked for by `POST /v1/agents/{name}/certificates`.
    IssueCertificate(RequestedTtl),
    /// A client certificate: enrollment, TPM-attested enrollment or
    /// renewal. Granted by every policy, never held for approval, capped
    /// and rate-limited by the agent's roles.
    Renew(RequestedTtl),
}

impl AgentRequest<'_> {
    fn grant(&self) -> Grant {
        match self {
            AgentRequest::Sign => Grant::Sign,
            AgentRequest::Message { .. } => Grant::Message,
            AgentRequest::IssueCertificate(_) => Grant::IssueCert,
            AgentRequest::Renew(_) => Grant::Renew,
        }
    }

    /// The action as the decisions metric names it.
    fn action_name(&self) -> &'static str {
        match self {
            AgentRequest::Sign => "sign",
            AgentRequest::Message { .. } => "message",
            AgentRequest::IssueCertificate(_) => "issue_cert",
            AgentRequest::Renew(_) => "renew",
        }
    }

    fn requested_ttl(&self) -> Option<RequestedTtl> {
        match self {
            AgentRequest::IssueCertificate(ttl) | AgentRequest::Renew(ttl) => Some(*ttl),
            AgentRequest::Sign | AgentRequest::Message { .. } => None,
        }
    }

    /// Renewals draw on a bucket of their own: an agent that spends its
    /// rate on signing must still be able to keep its identity.
    fn bucket(&self) -> BucketKind {
        match self {
            AgentRequest::Renew(_) => BucketKind::Renewals,
            _ => BucketKind::Requests,
        }
    }
}

/// What the policy allowed, under which version, with which limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Permit {
    pub policy_version: i64,
    /// For a certificate request: the lifetime to issue.
    pub certificate_ttl: Option<Duration>,
    /// Admins who must approve before the request runs; 0: none.
    pub approvals_required: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum BucketKind {
    Requests,
    Renewals,
}

/// The longest `Retry-After` a rate limit answers: the slowest rate a
/// policy may set refills a token in a day.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(86_400);

struct InForce {
    version: i64,
    /// `None` for the built-in policy.
    document: Option<PolicyDocument>,
    /// The document's `[anomaly]` (the defaults under the built-in
    /// policy), shared: the detectors read it on every request.
    anomaly: Arc<super::document::AnomalyPolicy>,
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

pub struct PolicyEngine {
    store: Arc<dyn Store>,
    metrics: crate::telemetry::PolicyMetrics,
    in_force: RwLock<Arc<InForce>>,
    buckets: Mutex<HashMap<(AgentName, BucketKind), Bucket>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Invalid(#[from] super::document::DocumentError),
    #[error("no policy version {0}")]
    NoSuchVersion(i64),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A decision as metrics and traces name it: `allow` (reason `granted`),
/// `held` (`approval_required`) or `deny` (the refusal's reason).
pub fn decision_of(decided: &Result<Permit, PolicyError>) -> (&'static str, &'static str) {
    match decided {
        Ok(permit) if permit.approvals_required > 0 => ("held", "approval_required"),
        Ok(_) => ("allow", "granted"),
        Err(PolicyError::Denied { reason, .. }) | Err(PolicyError::Forbidden { reason }) => {
            ("deny", *reason)
        }
        Err(PolicyError::TtlAboveLimit { .. }) => ("deny", "ttl_above_policy"),
        Err(PolicyError::RateLimited { .. }) => ("deny", "rate_limited"),
    }
}

impl PolicyEngine {
    pub async fn load(
        store: Arc<dyn Store>,
        metrics: crate::telemetry::PolicyMetrics,
    ) -> Result<Arc<Self>, StoreError> {
        let engine = Arc::new(Self {
            store,
            metrics,
            in_force: RwLock::new(Arc::new(InForce {
                version: BUILTIN_POLICY_VERSION,
                document: None,
                anomaly: Arc::default(),
            })),
            buckets: Mutex::new(HashMap::new()),
        });
        engine.refresh().await?;
        Ok(engine)
    }

    fn in_force(&self) -> Arc<InForce> {
        self.in_force
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn version(&self) -> i64 {
        self.in_force().version
    }

    /// Loads the newest version if it is not the one in force.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let latest = self.store.latest_policy_version().await?;
        if latest == self.version() {
            return Ok(());
        }
        let Some(record) = self.store.policy(latest).await? else {
            return Ok(());
        };
        // Stored versions were checked when applied; one that no longer
        // parses (a newer keyward's format) keeps the current one in force.
        match PolicyDocument::parse(&record.content) {
            Ok(document) => {
                *self.in_force.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(InForce {
                    version: record.version,
                    anomaly: Arc::new(document.anomaly.clone()),
                    document: Some(document),
                });
                // Limits may have changed: start every bucket afresh.
                self.buckets
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clear();
            }
            Err(e) => {
                tracing::error!(version = record.version, error = %e, "stored policy does not parse")
            }
        }
        Ok(())
    }

    /// Keeps the version in force current for the life of the runtime.
    pub fn watch(self: &Arc<Self>, tasks: &Supervisor) {
        tasks.every(
            "refreshing the policy",
            REFRESH_INTERVAL,
            self,
            |engine| async move { engine.refresh().await },
        );
    }

    /// Checks `content` and makes it the next version, in force here at once.
    pub async fn apply(
        &self,
        author: &str,
        content: &str,
        source: &str,
    ) -> Result<PolicyRecord, ApplyError> {
        PolicyDocument::parse(content)?;
        let audit = AuditEvent::new(author, "policy.apply", "policy").with("source", source);
        let record = self
            .store
            .insert_policy(content, author, source, &audit)
            .await?;
        self.refresh().await?;
        Ok(record)
    }

    /// Applied versions, newest first, after `after`, at most `limit`.
    pub async fn history_page(
        &self,
        after: Option<i64>,
        limit: i64,
    ) -> Result<Vec<PolicyRecord>, StoreError> {
        self.store.policies_page(after, limit).await
    }

    /// One applied version.
    pub async fn applied_version(&self, version: i64) -> Result<Option<PolicyRecord>, StoreError> {
        self.store.policy(version).await
    }

    /// Makes an earlier version's content the next version.
    pub async fn rollback(&self, author: &str, version: i64) -> Result<PolicyRecord, ApplyError> {
        let old = self
            .store
            .policy(version)
            .await?
            .ok_or(ApplyError::NoSuchVersion(version))?;
        self.apply(author, &old.content, &format!("rollback:{version}"))
            .await
    }

    /// Whether `caller` may make `request` for `agent`, whose roles
    /// (scopes) are `roles`, under the policy in force. Admins may do
    /// anything; an agent needs a role that grants the request, within its
    /// limits and its rate. The caller loads the agent and checks its
    /// revocation state first: this decides on what it is given, and a
    /// request that reaches it may be charged to the agent's rate.
    pub async fn permit(
        &self,
        caller: &Caller,
        agent: &AgentName,
        roles: &[String],
        request: AgentRequest<'_>,
    ) -> Result<Permit, PolicyError> {
        let action = request.action_name();
        let decided = self.decide(caller, agent, roles, request).await;
        let (decision, reason) = decision_of(&decided);
        self.metrics.decided(action, decision, reason);
        decided
    }

    async fn decide(
        &self,
        caller: &Caller,
        agent: &AgentName,
        roles: &[String],
        request: AgentRequest<'_>,
    ) -> Result<Permit, PolicyError> {
        let in_force = self.in_force();
        let requested_ttl = request.requested_ttl();
        let (Caller::Agent(_), Some(document)) = (caller, &in_force.document) else {
            return Ok(Permit {
                policy_version: in_force.version,
                certificate_ttl: requested_ttl.map(|r| r.ttl),
                approvals_required: 0,
            });
        };
        let intent = match request {
            AgentRequest::Message { intent } => Some(intent),
            _ => None,
        };
        let Some(allowance) = document.allowance(roles, request.grant(), intent) else {
            let reason = match request {
                AgentRequest::Message { .. }
                    if document.allowance(roles, Grant::Message, None).is_some() =>
                {
                    "intent_not_allowed"
                }
                _ => "not_in_scope",
            };
            self.record_denial(caller, agent, &request, reason, in_force.version)
                .await;
            return Err(PolicyError::Denied {
                reason,
                policy_version: in_force.version,
            });
        };
        let certificate_ttl = match (requested_ttl, allowance.max_ttl) {
            (Some(asked), Some(max)) if asked.explicit && asked.ttl > max => {
                self.record_denial(
                    caller,
                    agent,
                    &request,
                    "ttl_above_policy",
                    in_force.version,
                )
                .await;
                return Err(PolicyError::TtlAboveLimit {
                    max,
                    policy_version: in_force.version,
                });
            }
            (Some(asked), Some(max)) => Some(asked.ttl.min(max)),
            (Some(asked), None) => Some(asked.ttl),
            (None, _) => None,
        };
        if let Some((rate, burst)) = allowance.rate {
            self.take(agent, request.bucket(), rate, burst)?;
        }
        Ok(Permit {
            policy_version: in_force.version,
            certificate_ttl,
            approvals_required: allowance.approvals,
        })
    }

    /// A denial is a decision too: on the record, with its version.
    async fn record_denial(
        &self,
        caller: &Caller,
        agent: &AgentName,
        request: &AgentRequest<'_>,
        reason: &str,
        policy_version: i64,
    ) {
        let audit = AuditEvent::new(caller.audit_name(), "policy.deny", agent.as_str())
            .agent(agent.as_str())
            .decided(policy_version, "deny", Some(reason))
            .with("request", format!("{:?}", request.grant()));
        if let Err(e) = self.store.append_audit_event(&audit).await {
            tracing::warn!(error = %e, "recording a policy denial failed");
        }
    }

    /// Whether some role of `roles` requires renewal of the client
    /// certificate at half its lifetime, under the policy in force.
    pub fn renew_at_half_life(&self, roles: &[String]) -> bool {
        self.in_force()
            .document
            .as_ref()
            .is_some_and(|d| d.renew_at_half_life(roles))
    }

    /// Whether a policy other than the built-in one is in force.
    pub fn is_applied(&self) -> bool {
        self.in_force().document.is_some()
    }

    /// What the detectors do, under the policy in force (the defaults
    /// under the built-in policy).
    pub fn anomaly_policy(&self) -> Arc<super::document::AnomalyPolicy> {
        self.in_force().anomaly.clone()
    }

    /// How old `roles`' custodial keys may get, under the policy in force.
    pub fn rotate_after(&self, roles: &[String]) -> Option<Duration> {
        self.in_force().document.as_ref()?.rotate_after(roles)
    }

    /// One token from the agent's bucket, or how long until there is one.
    fn take(
        &self,
        agent: &AgentName,
        kind: BucketKind,
        rate: f64,
        burst: u32,
    ) -> Result<(), PolicyError> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let bucket = buckets.entry((agent.clone(), kind)).or_insert(Bucket {
            tokens: f64::from(burst),
            last: now,
        });
        let refill = now.duration_since(bucket.last).as_secs_f64() * rate;
        bucket.tokens = (bucket.tokens + refill).min(f64::from(burst));
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(PolicyError::RateLimited {
                retry_after: retry_after((1.0 - bucket.tokens) / rate),
            })
        }
    }
}

/// `seconds` as a `Retry-After`, whatever arithmetic produced it: the
/// document bounds rates, and this bounds the answer should that ever
/// change (an unbounded one once panicked in `Duration::from_secs_f64`).
fn retry_after(seconds: f64) -> Duration {
    Duration::try_from_secs_f64(seconds)
        .unwrap_or(MAX_RETRY_AFTER)
        .min(MAX_RETRY_AFTER)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_after_is_bounded_whatever_the_arithmetic() {
        assert_eq!(retry_after(0.5), Duration::from_millis(500));
        for bad in [1e300, f64::INFINITY, f64::NAN, -1.0, f64::MAX] {
            let d = retry_after(bad);
            assert!(d <= MAX_RETRY_AFTER, "{bad}: {d:?}");
        }
    }
}
