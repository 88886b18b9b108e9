//! Human approval: a request under a role with `requires_approval` is held
//! until enough admins approve it; then it runs as its agent, under the
//! policy version that held it, and the agent collects the answer it would
//! have had at once.
//!
//! A held request is typed ([`HeldRequest`]) and was checked and settled
//! (digest computed, audience resolved, lifetime capped) before it was
//! held, so an approver sees exactly what will run. Running it is the
//! caller's: the HTTP layer passes a [`RunHeld`] that makes the same call
//! the agent's own request would have made, so an approved request goes
//! through the same code, revocation state and records as any other.

use std::sync::Arc;

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::audit::AuditEvent;
use crate::identity::AgentName;
use crate::policy::{Admin, Caller};
use crate::store::{ApprovalRecord, ApprovalVote, Store, StoreError, VoteOutcome};

/// How long a request waits for its approval.
pub const PENDING_LIFETIME_SECS: i64 = 3600;

/// The longest comment an admin may give with a vote, in bytes.
pub const MAX_COMMENT_BYTES: usize = 1024;

/// A request waiting for approval, as it will run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeldRequest {
    /// `POST /v1/agents/{name}/sign`. `message_b64` is kept when the agent
    /// sent the message itself, so the approver can read what is signed.
    Sign {
        digest: [u8; 32],
        key_id: Option<String>,
        message_b64: Option<String>,
    },
    /// `POST /v1/agents/{name}/messages`, its audience resolved.
    Message {
        audience: String,
        intent: String,
        lifetime_secs: i64,
    },
    /// `POST /v1/agents/{name}/certificates`, its lifetime settled under
    /// the version's caps and its CSR already verified.
    Certificate {
        ttl_seconds: Option<u64>,
        csr_pem: Option<String>,
    },
}

/// The stored forms (column `approvals.request`), in the fields of the
/// HTTP bodies the requests came in, so that an approver reads them as the
/// agent wrote them.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredSign {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    message_b64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    digest_sha256_b64: Option<String>,
    #[serde(default)]
    key_id: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredMessage {
    audience: String,
    intent: String,
    ttl_seconds: i64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredCertificate {
    #[serde(default)]
    ttl_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    csr_pem: Option<String>,
}

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

impl HeldRequest {
    /// The `kind` column: `sign`, `message` or `certificate`.
    pub fn kind(&self) -> &'static str {
        match self {
            HeldRequest::Sign { .. } => "sign",
            HeldRequest::Message { .. } => "message",
            HeldRequest::Certificate { .. } => "certificate",
        }
    }

    fn to_stored(&self) -> Value {
        let stored = match self {
            HeldRequest::Sign {
                digest,
                key_id,
                message_b64,
            } => serde_json::to_value(StoredSign {
                message_b64: message_b64.clone(),
                digest_sha256_b64: Some(B64.encode(digest)),
                key_id: key_id.clone(),
            }),
            HeldRequest::Message {
                audience,
                intent,
                lifetime_secs,
            } => serde_json::to_value(StoredMessage {
                audience: audience.clone(),
                intent: intent.clone(),
                ttl_seconds: *lifetime_secs,
            }),
            HeldRequest::Certificate {
                ttl_seconds,
                csr_pem,
            } => serde_json::to_value(StoredCertificate {
                ttl_seconds: *ttl_seconds,
                csr_pem: csr_pem.clone(),
            }),
        };
        stored.unwrap_or(Value::Null)
    }

    /// Reads a stored request back. Rows held by a version of keyward that
    /// stored bodies unchecked may not read (a message to `to` rather than
    /// an audience): they fail when approved instead of running as
    /// something else.
    fn from_stored(kind: &str, request: &str) -> Result<Self, String> {
        let unreadable = |e: serde_json::Error| format!("held {kind} request: {e}");
        match kind {
            "sign" => {
                let stored: StoredSign = serde_json::from_str(request).map_err(unreadable)?;
                let from_message = match &stored.message_b64 {
                    Some(m) => Some(<[u8; 32]>::from(Sha256::digest(
                        B64.decode(m)
                            .map_err(|e| format!("held message_b64: {e}"))?,
                    ))),
                    None => None,
                };
                let given = match &stored.digest_sha256_b64 {
                    Some(d) => Some(
                        <[u8; 32]>::try_from(
                            B64.decode(d).map_err(|e| format!("held digest: {e}"))?,
                        )
                        .map_err(|_| "held digest is not 32 bytes".to_owned())?,
                    ),
                    None => None,
                };
                let digest = match (from_message, given) {
                    (Some(a), Some(b)) if a != b => {
                        return Err("held message and digest disagree".into())
                    }
                    (Some(d), _) | (None, Some(d)) => d,
                    (None, None) => return Err("held sign request names nothing to sign".into()),
                };
                Ok(HeldRequest::Sign {
                    digest,
                    key_id: stored.key_id,
                    message_b64: stored.message_b64,
                })
            }
            "message" => {
                let stored: StoredMessage = serde_json::from_str(request).map_err(unreadable)?;
                Ok(HeldRequest::Message {
                    audience: stored.audience,
                    intent: stored.intent,
                    lifetime_secs: stored.ttl_seconds,
                })
            }
            "certificate" => {
                let stored: StoredCertificate =
                    serde_json::from_str(request).map_err(unreadable)?;
                Ok(HeldRequest::Certificate {
                    ttl_seconds: stored.ttl_seconds,
                    csr_pem: stored.csr_pem,
                })
            }
            other => Err(format!("unknown kind of held request {other:?}")),
        }
    }
}

/// A held request as the agent and the admins see it.
#[derive(Clone, Debug, Serialize)]
pub struct Approval {
    pub id: String,
    pub agent: String,
    pub kind: String,
    /// `pending`, `expired`, `approved`, `denied`, `completed`, `failed`.
    pub status: String,
    pub approvals_required: i64,
    pub policy_version: i64,
    pub created_at: i64,
    pub expires_at: i64,
    /// What will run (or ran), in the fields of the request's HTTP body.
    pub request: Value,
    /// Once it has run: the answer the agent would have had at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
}

impl Approval {
    fn from_record(record: ApprovalRecord, now: i64) -> Self {
        let status = if record.status == "pending" && now >= record.expires_at {
            "expired".to_owned()
        } else {
            record.status
        };
        Approval {
            id: record.id,
            agent: record.agent_name,
            kind: record.kind,
            status,
            approvals_required: record.approvals_required,
            policy_version: record.policy_version,
            created_at: record.created_at,
            expires_at: record.expires_at,
            request: serde_json::from_str(&record.request).unwrap_or(Value::Null),
            result: record
                .result
                .as_deref()
                .and_then(|r| serde_json::from_str(r).ok()),
        }
    }
}

/// Why running an approved request did not give the agent its answer: the
/// error the agent would have had, kept as its result.
#[derive(Clone, Debug)]
pub struct Refusal {
    pub code: String,
    pub message: String,
}

/// Runs an approved request as its agent would have, under the policy
/// version that held it, and gives the answer the agent collects.
#[async_trait::async_trait]
pub trait RunHeld: Send + Sync {
    async fn run(
        &self,
        agent: &AgentName,
        request: &HeldRequest,
        policy_version: i64,
    ) -> Result<Value, Refusal>;
}

#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    #[error("only an admin decides approvals")]
    AdminOnly,
    #[error("no such approval request")]
    NotFound,
    #[error("the request is {status}")]
    NotPending { status: String },
    #[error(
        "this admin has already voted on this request (with this or another of their \
         credentials): another admin must"
    )]
    AlreadyVoted,
    #[error("a comment is at most {MAX_COMMENT_BYTES} bytes")]
    InvalidComment,
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct Approvals {
    store: Arc<dyn Store>,
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn admin_of(caller: &Caller) -> Result<&Admin, ApprovalError> {
    match caller {
        Caller::Admin(admin) => Ok(admin),
        Caller::Agent(_) => Err(ApprovalError::AdminOnly),
    }
}

impl Approvals {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    /// Holds `request` of `agent` for `approvals_required` admins, with its
    /// audit event.
    pub async fn hold(
        &self,
        caller: &Caller,
        agent: &AgentName,
        request: &HeldRequest,
        approvals_required: u8,
        policy_version: i64,
    ) -> Result<Approval, ApprovalError> {
        let now = now();
        let record = ApprovalRecord {
            id: hex::encode(rand::random::<[u8; 16]>()),
            agent_name: agent.to_string(),
            kind: request.kind().to_owned(),
            request: request.to_stored().to_string(),
            approvals_required: i64::from(approvals_required),
            policy_version,
            status: "pending".into(),
            result: None,
            created_at: now,
            expires_at: now + PENDING_LIFETIME_SECS,
            decided_at: None,
        };
        let audit = AuditEvent::new(caller.audit_name(), "approval.request", &record.id)
            .agent(agent.as_str())
            .decided(policy_version, "hold", Some("the policy requires approval"))
            .with("kind", request.kind())
            .with("approvals_required", i64::from(approvals_required));
        self.store.insert_approval(&record, &audit).await?;
        Ok(Approval::from_record(record, now))
    }

    /// Pending requests, oldest first, after the `(created_at, id)` given:
    /// for admins only.
    pub async fn pending_page(
        &self,
        caller: &Caller,
        after: Option<(i64, &str)>,
        limit: i64,
    ) -> Result<Vec<Approval>, ApprovalError> {
        admin_of(caller)?;
        let now = now();
        let records = self.store.pending_approvals_page(now, after, limit).await?;
        Ok(records
            .into_iter()
            .map(|r| Approval::from_record(r, now))
            .collect())
    }

    /// Requests made at or after `since` (Unix seconds), decided or not,
    /// newest first: for admins only (the console's queue).
    pub async fn recent(
        &self,
        caller: &Caller,
        since: i64,
        limit: i64,
    ) -> Result<Vec<Approval>, ApprovalError> {
        admin_of(caller)?;
        let now = now();
        let records = self.store.recent_approvals(since, limit).await?;
        Ok(records
            .into_iter()
            .map(|r| Approval::from_record(r, now))
            .collect())
    }

    /// `recent`, each request with its votes (two reads in all).
    pub async fn recent_with_votes(
        &self,
        caller: &Caller,
        since: i64,
        limit: i64,
    ) -> Result<Vec<(Approval, Vec<ApprovalVote>)>, ApprovalError> {
        let approvals = self.recent(caller, since, limit).await?;
        let mut votes: std::collections::HashMap<String, Vec<ApprovalVote>> =
            std::collections::HashMap::new();
        for (id, vote) in self.store.recent_approval_votes(since).await? {
            votes.entry(id).or_default().push(vote);
        }
        Ok(approvals
            .into_iter()
            .map(|a| {
                let cast = votes.remove(&a.id).unwrap_or_default();
                (a, cast)
            })
            .collect())
    }

    /// One request: an admin sees any, an agent only its own (another's is
    /// as good as absent).
    pub async fn get(&self, caller: &Caller, id: &str) -> Result<Approval, ApprovalError> {
        let record = self.store.approval(id).await?;
        match (record, caller) {
            (Some(r), Caller::Admin(_)) => Ok(Approval::from_record(r, now())),
            (Some(r), Caller::Agent(me)) if r.agent_name == me.as_str() => {
                Ok(Approval::from_record(r, now()))
            }
            _ => Err(ApprovalError::NotFound),
        }
    }

    /// An admin's vote. Votes are counted by name: one person's token and
    /// certificate are one vote between them. The vote that approves runs
    /// the request through `runner` and keeps its answer (or the error the
    /// agent would have had) for the agent to collect.
    pub async fn vote(
        &self,
        caller: &Caller,
        id: &str,
        approve: bool,
        comment: Option<&str>,
        runner: &dyn RunHeld,
    ) -> Result<Approval, ApprovalError> {
        let admin = admin_of(caller)?;
        if comment.is_some_and(|c| c.len() > MAX_COMMENT_BYTES) {
            return Err(ApprovalError::InvalidComment);
        }
        let action = if approve {
            "approval.approve"
        } else {
            "approval.deny"
        };
        let mut audit = AuditEvent::new(caller.audit_name(), action, id)
            .with("credential", admin.credential.clone());
        if let Some(comment) = comment {
            audit = audit.with("comment", comment.to_owned());
        }
        let outcome = self
            .store
            .vote_on_approval(id, admin.name.as_str(), approve, comment, now(), &audit)
            .await?;
        match outcome {
            VoteOutcome::NotFound => Err(ApprovalError::NotFound),
            VoteOutcome::NotPending { status } => Err(ApprovalError::NotPending { status }),
            VoteOutcome::AlreadyVoted => Err(ApprovalError::AlreadyVoted),
            VoteOutcome::Recorded { status, .. } => {
                if status == "approved" {
                    let record = self
                        .store
                        .approval(id)
                        .await?
                        .ok_or(ApprovalError::NotFound)?;
                    self.run(record, runner).await?;
                }
                self.get(caller, id).await
            }
        }
    }

    async fn run(&self, record: ApprovalRecord, runner: &dyn RunHeld) -> Result<(), ApprovalError> {
        let held = HeldRequest::from_stored(&record.kind, &record.request).and_then(|held| {
            let agent = AgentName::parse(&record.agent_name).map_err(|e| e.to_string())?;
            Ok((agent, held))
        });
        let result = match held {
            Ok((agent, held)) => runner.run(&agent, &held, record.policy_version).await,
            Err(message) => Err(Refusal {
                code: "held_request_unreadable".into(),
                message,
            }),
        };
        let (status, value) = match result {
            Ok(value) => ("completed", value),
            Err(refusal) => (
                "failed",
                serde_json::json!({"error": {"code": refusal.code, "message": refusal.message}}),
            ),
        };
        self.store
            .finish_approval(&record.id, status, &value.to_string())
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_request_reads_back_as_it_was_held() {
        let requests = [
            HeldRequest::Sign {
                digest: [7; 32],
                key_id: Some("agent-1".into()),
                message_b64: None,
            },
            HeldRequest::Sign {
                digest: Sha256::digest(b"pay 10 EUR").into(),
                key_id: None,
                message_b64: Some(B64.encode(b"pay 10 EUR")),
            },
            HeldRequest::Message {
                audience: "spiffe://keyward.local/agent/beta".into(),
                intent: "payments.approve".into(),
                lifetime_secs: 60,
            },
            HeldRequest::Certificate {
                ttl_seconds: Some(120),
                csr_pem: None,
            },
        ];
        for request in requests {
            let stored = request.to_stored().to_string();
            assert_eq!(
                HeldRequest::from_stored(request.kind(), &stored),
                Ok(request)
            );
        }
    }

    #[test]
    fn a_sign_request_held_as_sent_before_typing_still_reads() {
        let held = HeldRequest::from_stored("sign", r#"{"message_b64":"aGk="}"#).unwrap();
        assert_eq!(
            held,
            HeldRequest::Sign {
                digest: Sha256::digest(b"hi").into(),
                key_id: None,
                message_b64: Some("aGk=".into()),
            }
        );
    }

    #[test]
    fn a_stored_request_that_contradicts_itself_does_not_run() {
        let other = B64.encode([0u8; 32]);
        let stored = format!(r#"{{"message_b64":"aGk=","digest_sha256_b64":"{other}"}}"#);
        assert!(HeldRequest::from_stored("sign", &stored).is_err());
        // A message held before audiences were resolved names no audience.
        let old = r#"{"to":"beta","intent":"x"}"#;
        assert!(HeldRequest::from_stored("message", old).is_err());
        assert!(HeldRequest::from_stored("transfer", "{}").is_err());
    }
}
