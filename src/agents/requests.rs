//! The requests an agent makes for itself: a signature, a signed message,
//! a certificate. Each goes through one sequence, whoever asks (the agent
//! over mTLS, an admin for it, or an approval running it later):
//!
//! 1. what the request says is checked (lifetimes, the CSR's signature);
//! 2. the agent's view is loaded once and checked against the revocation
//!    set, so a revoked or suspended agent is refused before anything is
//!    charged to it;
//! 3. the policy decides on the roles in that view, and charges the rate;
//! 4. the work runs with that view, or the request is held for approval.
//!
//! An approved request re-enters at step 2 (`run_held`): the revocation
//! state is the one in force when it runs, not when it was held.

use std::sync::Arc;
use std::time::Duration;

use super::signing::{AgentSignature, AgentSigner, MessageRequest, SignedMessage};
use super::{AgentError, CertificateKey, Registry};
use crate::approvals::{Approval, ApprovalError, Approvals, HeldRequest};
use crate::attestation::tpm::{TpmAttestationError, TpmVerifier};
use crate::identity::AgentName;
use crate::pki::{CaError, IssuedCertificate};
use crate::policy::engine::{decision_of, AgentRequest, Permit, PolicyEngine, RequestedTtl};
use crate::policy::{Caller, PolicyError};
use crate::store::{Store, StoreError};
use crate::telemetry::traces;
use tracing::Instrument as _;

/// The policy's answer to a request it grants.
enum Decided {
    Run(Permit),
    Held(Approval),
}

/// What became of a request: done now, or waiting for approvers.
pub enum Outcome<T> {
    Done(T),
    Held(Approval),
}

/// A certificate keyward issued, and the digest of the key's attestation
/// evidence (none for a CSR key keyward cannot vouch for).
pub struct Certified {
    pub certificate: IssuedCertificate,
    pub attestation: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Approval(#[from] ApprovalError),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Tpm(#[from] TpmAttestationError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("token lifetime must be 1 to {max} seconds")]
    TokenTtlOutOfRange { max: u64 },
    /// Unknown, used or expired: the same answer for all three.
    #[error("the enrollment token is not valid")]
    InvalidEnrollmentToken,
    #[error("agent {agent} holds {max} unused challenges; use one or let them expire")]
    TooManyChallenges { agent: AgentName, max: i64 },
    #[error("the CSR's key is not the certified key")]
    CsrKeyMismatch,
}

/// A signature an agent asks for.
pub struct SignRequest {
    pub digest: [u8; 32],
    /// A retired key within its grace period; `None`: the current key.
    pub key_id: Option<String>,
    /// The message the digest is of, when the agent sent it: an approver
    /// reads it.
    pub message_b64: Option<String>,
}

/// An envelope an agent asks for, its audience resolved and its lifetime
/// checked.
pub struct MessageAsk {
    pub audience: String,
    pub intent: String,
    pub lifetime_secs: i64,
}

pub struct AgentRequests {
    registry: Arc<Registry>,
    signer: Arc<AgentSigner>,
    policy: Arc<PolicyEngine>,
    approvals: Arc<Approvals>,
    /// Enrollment tokens and TPM challenges (`enrollment`).
    store: Arc<dyn Store>,
    /// Verifies evidence from agents that hold their keys in their own TPM.
    tpm: Arc<TpmVerifier>,
}

impl AgentRequests {
    pub fn new(
        registry: Arc<Registry>,
        signer: Arc<AgentSigner>,
        policy: Arc<PolicyEngine>,
        approvals: Arc<Approvals>,
        store: Arc<dyn Store>,
        tpm: Arc<TpmVerifier>,
    ) -> Self {
        Self {
            registry,
            signer,
            policy,
            approvals,
            store,
            tpm,
        }
    }

    pub(super) fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    pub(super) fn tpm(&self) -> &TpmVerifier {
        &self.tpm
    }

    pub(super) fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The policy's decision on `request` by `caller` for `agent`, whose
    /// roles are `roles`: run it under the permit, or (when the policy asks
    /// for approvers) the request `held` describes is held, and its
    /// approval is the answer.
    async fn decide(
        &self,
        caller: &Caller,
        agent: &AgentName,
        roles: &[String],
        request: AgentRequest<'_>,
        held: impl FnOnce(&Permit) -> HeldRequest,
    ) -> Result<Decided, RequestError> {
        let span = tracing::debug_span!(
            target: traces::TARGET,
            "policy decision",
            keyward.policy_version = tracing::field::Empty,
            keyward.decision = tracing::field::Empty,
        );
        let decided = self
            .policy
            .permit(caller, agent, roles, request)
            .instrument(span.clone())
            .await;
        let version = match &decided {
            Ok(permit) => Some(permit.policy_version),
            Err(
                PolicyError::Denied { policy_version, .. }
                | PolicyError::TtlAboveLimit { policy_version, .. },
            ) => Some(*policy_version),
            Err(_) => None,
        };
        span.record("keyward.decision", decision_of(&decided).0);
        if let Some(version) = version {
            span.record("keyward.policy_version", version);
            traces::record_policy_version(version);
        }
        let permit = decided?;
        if permit.approvals_required == 0 {
            return Ok(Decided::Run(permit));
        }
        let approval = self
            .approvals
            .hold(
                caller,
                agent,
                &held(&permit),
                permit.approvals_required,
                permit.policy_version,
            )
            .await?;
        Ok(Decided::Held(approval))
    }

    pub async fn sign(
        &self,
        caller: &Caller,
        agent: &AgentName,
        request: SignRequest,
        request_id: &str,
    ) -> Result<Outcome<AgentSignature>, RequestError> {
        let signing = self.signer.signing_agent(agent).await?;
        let held = |_: &Permit| HeldRequest::Sign {
            digest: request.digest,
            key_id: request.key_id.clone(),
            message_b64: request.message_b64.clone(),
        };
        let roles = signing.roles();
        let permit = match self
            .decide(caller, agent, roles, AgentRequest::Sign, held)
            .await?
        {
            Decided::Run(permit) => permit,
            Decided::Held(approval) => return Ok(Outcome::Held(approval)),
        };
        let signature = self
            .signer
            .sign(
                &signing,
                request.digest,
                request_id,
                permit.policy_version,
                request.key_id.as_deref(),
            )
            .await?;
        Ok(Outcome::Done(signature))
    }

    pub async fn message(
        &self,
        caller: &Caller,
        agent: &AgentName,
        ask: MessageAsk,
        request_id: &str,
    ) -> Result<Outcome<SignedMessage>, RequestError> {
        let signing = self.signer.signing_agent(agent).await?;
        let request = AgentRequest::Message {
            intent: &ask.intent,
        };
        let held = |_: &Permit| HeldRequest::Message {
            audience: ask.audience.clone(),
            intent: ask.intent.clone(),
            lifetime_secs: ask.lifetime_secs,
        };
        let permit = match self
            .decide(caller, agent, signing.roles(), request, held)
            .await?
        {
            Decided::Run(permit) => permit,
            Decided::Held(approval) => return Ok(Outcome::Held(approval)),
        };
        let message = MessageRequest {
            audience: &ask.audience,
            intent: &ask.intent,
            lifetime_secs: ask.lifetime_secs,
        };
        let signed = self
            .signer
            .sign_message(&signing, message, request_id, permit.policy_version)
            .await?;
        Ok(Outcome::Done(signed))
    }

    /// A lifetime asked for (or the default), within keyward's own limits;
    /// the policy caps it further.
    pub fn requested_ttl(&self, ttl_seconds: Option<u64>) -> Result<RequestedTtl, CaError> {
        Ok(RequestedTtl {
            ttl: self
                .registry
                .authority()
                .ttl_limits()
                .resolve(ttl_seconds)?,
            explicit: ttl_seconds.is_some(),
        })
    }

    /// `POST /v1/agents/{name}/certificates`: for the agent's custodial key,
    /// or for the key of `csr_pem`, verified once here.
    pub async fn certificate(
        &self,
        caller: &Caller,
        agent: &AgentName,
        ttl_seconds: Option<u64>,
        csr_pem: Option<String>,
    ) -> Result<Outcome<Certified>, RequestError> {
        // Everything the request says is checked before the policy charges
        // the agent's rate, and so before an admin could be asked to
        // approve it.
        let requested = self.requested_ttl(ttl_seconds)?;
        let key = CertificateKey::from_csr_pem(csr_pem.as_deref())?;
        let record = self.registry.active_agent(agent).await?;
        // Held with the lifetime decided now, under this version's caps; the
        // PEM is verified again when it runs.
        let held = |permit: &Permit| HeldRequest::Certificate {
            ttl_seconds: permit.certificate_ttl.map(|ttl| ttl.as_secs()),
            csr_pem: csr_pem.clone(),
        };
        let request = AgentRequest::IssueCertificate(requested);
        let permit = match self
            .decide(caller, agent, &record.scopes, request, held)
            .await?
        {
            Decided::Run(permit) => permit,
            Decided::Held(approval) => return Ok(Outcome::Held(approval)),
        };
        let ttl = permit_ttl(&permit)?;
        let (certificate, attestation) = self
            .registry
            .issue_certificate(
                &caller.audit_name(),
                agent,
                &record,
                key,
                ttl,
                permit.policy_version,
            )
            .await?;
        Ok(Outcome::Done(Certified {
            certificate,
            attestation,
        }))
    }

    /// A client certificate the agent asks for itself (enrollment, TPM
    /// enrollment, renewal): granted by every policy, never held, capped
    /// and rate-limited by its roles. `before_issue` runs between the
    /// decision and the issuance, to spend what pays for it (a token, a
    /// challenge) only once nothing can refuse the request any more but
    /// the issuance itself.
    pub(super) async fn client_certificate<F, Fut>(
        &self,
        agent: &AgentName,
        requested: RequestedTtl,
        key: CertificateKey,
        before_issue: F,
    ) -> Result<Certified, RequestError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<(), RequestError>>,
    {
        let record = self.registry.active_agent(agent).await?;
        let caller = Caller::Agent(agent.clone());
        let permit = self
            .policy
            .permit(
                &caller,
                agent,
                &record.scopes,
                AgentRequest::Renew(requested),
            )
            .await?;
        let ttl = permit_ttl(&permit)?;
        before_issue().await?;
        let (certificate, attestation) = self
            .registry
            .issue_certificate(
                &caller.audit_name(),
                agent,
                &record,
                key,
                ttl,
                permit.policy_version,
            )
            .await?;
        Ok(Certified {
            certificate,
            attestation,
        })
    }

    /// Runs an approved request as its agent's own request would have run,
    /// under the version that held it.
    pub async fn run_held(
        &self,
        agent: &AgentName,
        held: &HeldRequest,
        policy_version: i64,
        request_id: &str,
    ) -> Result<HeldResult, RequestError> {
        match held {
            HeldRequest::Sign { digest, key_id, .. } => {
                let signing = self.signer.signing_agent(agent).await?;
                let signature = self
                    .signer
                    .sign(
                        &signing,
                        *digest,
                        request_id,
                        policy_version,
                        key_id.as_deref(),
                    )
                    .await?;
                Ok(HeldResult::Signature(signature))
            }
            HeldRequest::Message {
                audience,
                intent,
                lifetime_secs,
            } => {
                let signing = self.signer.signing_agent(agent).await?;
                let signed = self
                    .signer
                    .sign_message(
                        &signing,
                        MessageRequest {
                            audience,
                            intent,
                            lifetime_secs: *lifetime_secs,
                        },
                        request_id,
                        policy_version,
                    )
                    .await?;
                Ok(HeldResult::Message(signed))
            }
            HeldRequest::Certificate {
                ttl_seconds,
                csr_pem,
            } => {
                let key = CertificateKey::from_csr_pem(csr_pem.as_deref())?;
                let ttl = self
                    .registry
                    .authority()
                    .ttl_limits()
                    .resolve(*ttl_seconds)?;
                let record = self.registry.active_agent(agent).await?;
                let (certificate, attestation) = self
                    .registry
                    .issue_certificate(
                        &format!("agent:{agent}"),
                        agent,
                        &record,
                        key,
                        ttl,
                        policy_version,
                    )
                    .await?;
                Ok(HeldResult::Certificate(Certified {
                    certificate,
                    attestation,
                }))
            }
        }
    }

    /// Whether the policy requires `agent` to renew its client certificate
    /// at half its lifetime, under the roles it has now.
    pub async fn must_renew_at_half_life(&self, agent: &AgentName) -> bool {
        match self.signer.signing_agent_view(agent).await {
            Ok(view) => self.policy.renew_at_half_life(&view.scopes),
            Err(_) => false,
        }
    }
}

/// What an approved request produced.
pub enum HeldResult {
    Signature(AgentSignature),
    Message(SignedMessage),
    Certificate(Certified),
}

fn permit_ttl(permit: &Permit) -> Result<Duration, RequestError> {
    permit.certificate_ttl.ok_or_else(|| {
        RequestError::Agent(AgentError::Corrupt(
            "a certificate permit without a lifetime".into(),
        ))
    })
}
