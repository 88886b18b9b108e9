//! An agent's own client credential: enrollment tokens, the first
//! certificate (paid for by a token), the next ones (renewal over mTLS),
//! and TPM-attested enrollment for agents that hold their key in their own
//! TPM (a challenge, then its redemption).
//!
//! What pays for a certificate (a token, a challenge) is spent only after
//! the request has been checked, the agent found active and the policy has
//! decided: a refused request leaves the agent both.

use std::time::SystemTime;

use super::requests::{AgentRequests, Certified, RequestError};
use super::{AgentError, CertificateKey, ACTIVE, AGENT_TPM};
use crate::attestation::tpm::csr::certify_evidence_from_csr;
use crate::attestation::tpm::evidence::CertifyEvidence;
use crate::attestation::tpm::{ChallengeRequest, IssuedChallenge, TpmAttestationError};
use crate::audit::AuditEvent;
use crate::identity::{enrollment_token_hash, new_enrollment_token, AgentName};
use crate::pki::csr::VerifiedCsr;
use crate::store::{AgentRecord, TpmRedemption};

/// Enrollment tokens live this long unless asked otherwise.
pub const DEFAULT_TOKEN_TTL_SECS: u64 = 900;
pub const MAX_TOKEN_TTL_SECS: u64 = 86_400;

/// Unused, unexpired challenges one agent may hold: an enrollment needs
/// one, a retry or two more. The bound keeps a token holder from filling
/// the database.
pub const MAX_OPEN_CHALLENGES: i64 = 8;

/// An enrollment token's lifetime in seconds, default or asked for.
pub fn token_ttl(requested: Option<u64>) -> Result<u64, RequestError> {
    let ttl = requested.unwrap_or(DEFAULT_TOKEN_TTL_SECS);
    if !(1..=MAX_TOKEN_TTL_SECS).contains(&ttl) {
        return Err(RequestError::TokenTtlOutOfRange {
            max: MAX_TOKEN_TTL_SECS,
        });
    }
    Ok(ttl)
}

/// A new enrollment token, shown once.
pub struct EnrollmentToken {
    pub token: String,
    pub expires_at: i64,
}

/// An agent-tpm agent, authenticated by its unspent enrollment token.
pub struct TpmEnrollee {
    pub name: AgentName,
    token_sha256: [u8; 32],
}

/// How a TPM-held key's certification comes: as TPM2_Certify's three
/// outputs, or in a CSR's attestation attribute (signed by the key).
pub enum TpmEvidence {
    Certify(CertifyEvidence),
    Csr(VerifiedCsr),
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

impl AgentRequests {
    /// A new enrollment token for an active agent.
    pub async fn create_enrollment_token(
        &self,
        actor: &str,
        agent: &AgentName,
        ttl_seconds: Option<u64>,
    ) -> Result<EnrollmentToken, RequestError> {
        let ttl = token_ttl(ttl_seconds)?;
        let record = self.registry().get(agent).await?;
        if record.status != ACTIVE {
            return Err(AgentError::NotActive(record.name, record.status).into());
        }
        let token = new_enrollment_token();
        let expires_at = now() + ttl as i64;
        let audit = AuditEvent::new(actor, "enrollment_token.create", agent.as_str())
            .agent(agent.as_str())
            .with("expires_at", expires_at);
        self.store()
            .insert_enrollment_token(
                &enrollment_token_hash(&token),
                agent.as_str(),
                expires_at,
                &audit,
            )
            .await?;
        Ok(EnrollmentToken { token, expires_at })
    }

    /// The agent an unspent enrollment token is for, and its record.
    /// Spends nothing.
    async fn token_agent(&self, token: &str) -> Result<(AgentName, AgentRecord), RequestError> {
        let agent = self
            .store()
            .enrollment_token_agent(&enrollment_token_hash(token), now())
            .await?
            .ok_or(RequestError::InvalidEnrollmentToken)?;
        let name = AgentName::parse(&agent)
            .map_err(|e| AgentError::Corrupt(format!("enrollment token's agent: {e}")))?;
        let record = self.registry().get(&name).await?;
        Ok((name, record))
    }

    /// The first client certificate, for the key in the CSR. The token is
    /// the only credential.
    pub async fn enroll(
        &self,
        token: &str,
        csr_pem: &str,
        ttl_seconds: Option<u64>,
    ) -> Result<Certified, RequestError> {
        let csr = VerifiedCsr::from_pem(csr_pem)?;
        let requested = self.requested_ttl(ttl_seconds)?;
        let (name, agent) = self.token_agent(token).await?;
        // An agent-tpm agent's token pays for attested enrollment only; a
        // CSR must not spend it.
        if agent.custody == AGENT_TPM {
            return Err(AgentError::AttestationRequired(agent.name).into());
        }
        let token_sha256 = enrollment_token_hash(token);
        self.client_certificate(&name, requested, CertificateKey::Csr(csr), || async {
            let audit = AuditEvent::new("enrollment", "enrollment_token.redeem", "token")
                .agent(name.as_str());
            let redeemed = self
                .store()
                .redeem_enrollment_token(&token_sha256, now(), &audit)
                .await?;
            // Used or expired since it was looked up: the same answer as
            // unknown.
            if redeemed.as_deref() != Some(name.as_str()) {
                return Err(RequestError::InvalidEnrollmentToken);
            }
            Ok(())
        })
        .await
    }

    /// The next client certificate, for an agent that proved itself with
    /// its current, valid one.
    pub async fn renew(
        &self,
        agent: &AgentName,
        csr_pem: &str,
        ttl_seconds: Option<u64>,
    ) -> Result<Certified, RequestError> {
        let csr = VerifiedCsr::from_pem(csr_pem)?;
        let requested = self.requested_ttl(ttl_seconds)?;
        self.client_certificate(agent, requested, CertificateKey::Csr(csr), || async {
            Ok(())
        })
        .await
    }

    /// The active agent-tpm agent an unspent enrollment token is for: the
    /// token authenticates both steps of TPM enrollment, and is checked
    /// before anything the request carries is read.
    pub async fn tpm_enrollee(&self, token: &str) -> Result<TpmEnrollee, RequestError> {
        let (name, record) = self.token_agent(token).await?;
        if record.custody != AGENT_TPM {
            return Err(AgentError::NotTpmCustody(record.name).into());
        }
        if record.status != ACTIVE {
            return Err(AgentError::NotActive(record.name, record.status).into());
        }
        Ok(TpmEnrollee {
            name,
            token_sha256: enrollment_token_hash(token),
        })
    }

    /// A credential-activation challenge for the AK the agent names, bound
    /// to its EK. The token is the credential; nothing is spent.
    pub async fn tpm_challenge(
        &self,
        enrollee: &TpmEnrollee,
        request: &ChallengeRequest,
    ) -> Result<IssuedChallenge, RequestError> {
        let name = &enrollee.name;
        if self
            .store()
            .open_tpm_challenges(name.as_str(), now())
            .await?
            >= MAX_OPEN_CHALLENGES
        {
            return Err(RequestError::TooManyChallenges {
                agent: name.clone(),
                max: MAX_OPEN_CHALLENGES,
            });
        }
        let issued = self
            .tpm()
            .challenge(name.as_str(), request, SystemTime::now())?;
        let audit = AuditEvent::new(
            format!("agent:{name}"),
            "attestation.challenge",
            name.as_str(),
        )
        .agent(name.as_str())
        .with("ek_sha256", hex::encode(issued.record.ek_sha256))
        .with("key_location", issued.record.key_location.clone())
        .with("expires_at", issued.record.expires_at);
        self.store()
            .insert_tpm_challenge(&issued.record, &audit)
            .await?;
        Ok(issued)
    }

    /// Verifies the evidence against the challenge its qualifying data
    /// names, spends that challenge and the enrollment token together, and
    /// issues the certificate with the attestation extension.
    pub async fn tpm_certificate(
        &self,
        enrollee: &TpmEnrollee,
        evidence: TpmEvidence,
        activated_secret: &[u8],
        ttl_seconds: Option<u64>,
    ) -> Result<Certified, RequestError> {
        let name = &enrollee.name;
        let (evidence, csr) = match evidence {
            TpmEvidence::Certify(evidence) => (evidence, None),
            TpmEvidence::Csr(csr) => (certify_evidence_from_csr(&csr)?, Some(csr)),
        };
        let requested = self.requested_ttl(ttl_seconds)?;
        let parsed = evidence.parse()?;
        let challenge = self
            .store()
            .tpm_challenge(parsed.qualifying_data())
            .await?
            .ok_or(TpmAttestationError::StaleNonce)?;
        let verified = self.tpm().verify(
            name.as_str(),
            &challenge,
            activated_secret,
            &parsed,
            SystemTime::now(),
        )?;
        if csr
            .as_ref()
            .is_some_and(|csr| csr.public_key() != &verified.public_key)
        {
            return Err(RequestError::CsrKeyMismatch);
        }
        let audit = AuditEvent::new(format!("agent:{name}"), "attestation.redeem", name.as_str())
            .agent(name.as_str())
            .with("evidence_digest", verified.attested.evidence.digest.clone())
            .with("route", if csr.is_some() { "csr" } else { "json" });
        let nonce = challenge.nonce.clone();
        self.client_certificate(
            name,
            requested,
            CertificateKey::TpmAttested(verified),
            || async {
                match self
                    .store()
                    .redeem_tpm_challenge(&nonce, &enrollee.token_sha256, now(), &audit)
                    .await?
                {
                    TpmRedemption::Redeemed => Ok(()),
                    TpmRedemption::ChallengeSpent => Err(TpmAttestationError::NonceReplayed.into()),
                    TpmRedemption::TokenInvalid => Err(RequestError::InvalidEnrollmentToken),
                }
            },
        )
        .await
    }
}
