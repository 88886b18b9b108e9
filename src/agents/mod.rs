//! The agent registry: registering agents with a custodial key generated on
//! the token, looking them up, and issuing their certificates.

use std::sync::Arc;
use std::time::Duration;

use p256::pkcs8::{DecodePublicKey, EncodePublicKey};
use p256::PublicKey;
use serde::Serialize;

use crate::agents::cache::AgentCache;
use crate::attestation::pkcs11::{attest_custodial_key, from_stored, EvidenceSigner};
use crate::attestation::{AttestationClaims, AttestationError};
use crate::audit::AuditEvent;
use crate::identity::{AgentName, Scope};
use crate::keys::{GeneratedKey, KeyId, KeyRef, KeyStorage};
use crate::pki::crl::RevocationReason;
use crate::pki::csr::VerifiedCsr;
use crate::pki::{AgentCertificateRequest, Authority, CaError, IssuedCertificate};
use crate::pool::{KeyPool, PoolError};
use crate::revocation::RevocationSet;
use crate::store::{AgentTransition, KeyRotation, KeyRotationOutcome, Store, StoreError};
// The registry's answers, as the store records them.
pub use crate::store::{AgentRecord, AgentStatusChange, CertificateRecord, CertificateRevocation};

pub mod cache;
pub mod enrollment;
pub mod envelope;
pub mod orphans;
pub mod requests;
pub mod signing;
pub mod verification;

pub const CUSTODIAL: &str = "custodial";
/// The agent creates its key in its own TPM and gets certificates only by
/// proving that (`/v1/attestation/...`).
pub const AGENT_TPM: &str = "agent-tpm";
pub const ACTIVE: &str = "active";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    #[error("agent {0} not found")]
    NotFound(String),
    #[error("agent {0} already exists")]
    AlreadyExists(String),
    #[error("agent {0} is {1}")]
    NotActive(String, String),
    #[error("agent {0} has no custodial key")]
    NoCustodialKey(String),
    #[error("certificateHold is set by suspending the agent (POST /v1/agents/{{name}}/suspend)")]
    HoldIsForSuspension,
    #[error("key {0} is retired: it signs only during its grace period, when named")]
    KeyRetired(String),
    #[error("key {0} was reported compromised: it signs no more (rotate the agent's key)")]
    KeyCompromised(String),
    #[error("agent {0} has no valid certificate: issue one first")]
    NoCertificate(String),
    #[error("at most {0} scopes per agent")]
    TooManyScopes(usize),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Attestation(#[from] AttestationError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Envelope(#[from] crate::agents::envelope::EnvelopeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored agent record is malformed: {0}")]
    Corrupt(String),
    #[error("agent {0} holds its key in its own TPM: certificates only through TPM attestation")]
    AttestationRequired(String),
    #[error("agent {0} is not an agent-tpm agent")]
    NotTpmCustody(String),
}

pub const MAX_SCOPES: usize = 64;

/// Grace and retention of a rotation the policy schedules.
const SCHEDULED_ROTATION_GRACE: Duration = Duration::from_secs(300);
const SCHEDULED_ROTATION_RETENTION: Duration = Duration::from_secs(86_400);

/// Ten minutes: far past the longest a registration or rotation can hold a
/// generated key before recording it (the pool's key-creation deadline and
/// one transaction).
pub const DEFAULT_ORPHAN_KEY_GRACE: std::time::Duration = std::time::Duration::from_secs(600);

/// An agent as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct AgentView {
    pub name: String,
    pub spiffe_id: String,
    pub custody: String,
    pub key_id: Option<String>,
    pub public_key_pem: Option<String>,
    pub scopes: Vec<String>,
    pub status: String,
    pub attestation_digest: Option<String>,
    pub created_at: String,
}

fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

impl AgentView {
    pub fn from_record(r: AgentRecord) -> Self {
        let public_key_pem = r.public_key_der.as_deref().and_then(|der| {
            PublicKey::from_public_key_der(der)
                .ok()
                .and_then(|k| k.to_public_key_pem(Default::default()).ok())
        });
        Self {
            name: r.name,
            spiffe_id: r.spiffe_id,
            custody: r.custody,
            key_id: r.key_id,
            public_key_pem,
            scopes: r.scopes,
            status: r.status,
            attestation_digest: r.attestation_digest,
            created_at: rfc3339(r.created_at),
        }
    }
}

/// How the key of a new certificate is chosen.
pub enum CertificateKey {
    /// The agent's custodial key on the token.
    Custodial,
    /// A key the agent holds, presented in a verified CSR.
    Csr(VerifiedCsr),
    /// A key in the agent's own TPM, proven there by TPM2_Certify.
    TpmAttested(crate::attestation::Verified<crate::attestation::tpm::TpmAttestedKey>),
}

impl CertificateKey {
    /// The key a certificate request names: the CSR's, verified, or else
    /// the agent's custodial key.
    pub fn from_csr_pem(csr_pem: Option<&str>) -> Result<Self, CaError> {
        Ok(match csr_pem {
            Some(pem) => CertificateKey::Csr(VerifiedCsr::from_pem(pem)?),
            None => CertificateKey::Custodial,
        })
    }
}

pub struct Registry {
    pool: KeyPool,
    store: Arc<dyn Store>,
    authority: Arc<Authority>,
    evidence_signer: EvidenceSigner,
    cache: Arc<AgentCache>,
    revocations: Arc<RevocationSet>,
    /// Where new custodial keys are kept.
    storage: KeyStorage,
    /// How long a key must have been found unowned before it is destroyed
    /// (`orphans`).
    orphan_grace: std::time::Duration,
    orphans: std::sync::Mutex<orphans::OrphanSuspects>,
}

/// The pool's reference to a custodial key, from its stored record: a
/// token object, or a blob the token unwraps (with the public key it must
/// sign for).
pub fn custodial_key_ref(
    key_id: &str,
    public_key_der: Option<&[u8]>,
    wrapped: Option<&[u8]>,
) -> Result<KeyRef, AgentError> {
    let id = KeyId::parse(key_id).map_err(|e| AgentError::Corrupt(e.to_string()))?;
    let Some(blob) = wrapped else {
        return Ok(KeyRef::Token(id));
    };
    let public_key = public_key_der
        .map(PublicKey::from_public_key_der)
        .transpose()
        .map_err(|e| AgentError::Corrupt(e.to_string()))?
        .ok_or_else(|| AgentError::Corrupt(format!("wrapped key {id} has no public key")))?;
    Ok(KeyRef::Wrapped {
        id,
        blob: Arc::from(blob),
        public_key,
    })
}

/// How to rotate an agent's key.
#[derive(Clone, Debug)]
pub struct Rotation {
    pub reason: RevocationReason,
    /// How long the old key may still sign, when named.
    pub grace: Duration,
    /// When the old key is destroyed on the token.
    pub retention: Duration,
    /// Lifetime of the certificate issued for the new key.
    pub certificate_ttl: Duration,
    /// Rotate only if this is still the current key.
    pub expected_old_key: Option<KeyId>,
}

/// What a rotation produced.
pub struct RotatedKey {
    pub old_key_id: String,
    pub new_key_id: String,
    pub certificate: IssuedCertificate,
}

/// What to do to an agent's standing.
#[derive(Clone, Copy, Debug)]
pub enum StatusChange {
    Revoke(RevocationReason),
    Suspend,
    Resume,
}

impl Registry {
    pub fn new(
        pool: KeyPool,
        store: Arc<dyn Store>,
        authority: Arc<Authority>,
        evidence_signer: EvidenceSigner,
        cache: Arc<AgentCache>,
        revocations: Arc<RevocationSet>,
        storage: KeyStorage,
    ) -> Self {
        Self {
            pool,
            store,
            authority,
            evidence_signer,
            cache,
            revocations,
            storage,
            orphan_grace: DEFAULT_ORPHAN_KEY_GRACE,
            orphans: std::sync::Mutex::new(orphans::OrphanSuspects::new(DEFAULT_ORPHAN_KEY_GRACE)),
        }
    }

    /// Sets how long a token key must have been found unowned before the
    /// janitor destroys it (`destroy_orphan_keys`).
    pub fn with_orphan_key_grace(mut self, grace: std::time::Duration) -> Self {
        self.orphan_grace = grace;
        self.orphans = std::sync::Mutex::new(orphans::OrphanSuspects::new(grace));
        self
    }

    /// A generated custodial key as the pool refers to it, to let go of it
    /// when it is not recorded after all.
    fn generated_ref(key: &KeyId, generated: &GeneratedKey) -> KeyRef {
        match &generated.wrapped {
            Some(blob) => KeyRef::Wrapped {
                id: key.clone(),
                blob: Arc::from(blob.as_slice()),
                public_key: generated.public_key,
            },
            None => KeyRef::Token(key.clone()),
        }
    }

    pub fn revocations(&self) -> &RevocationSet {
        &self.revocations
    }

    /// Revokes one certificate. `certificateHold` is not a reason here:
    /// holds belong to an agent's suspension, which can be lifted.
    pub async fn revoke_certificate(
        &self,
        actor: &str,
        serial: &str,
        reason: RevocationReason,
    ) -> Result<CertificateRevocation, AgentError> {
        if reason == RevocationReason::CertificateHold {
            return Err(AgentError::HoldIsForSuspension);
        }
        let at = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut audit =
            AuditEvent::new(actor, "certificate.revoke", serial).with("reason", reason.as_str());
        if let Some(certificate) = self.store.certificate(serial).await? {
            audit = audit.agent(certificate.agent_name);
        }
        let outcome = self
            .store
            .revoke_certificate(serial, reason.as_str(), at, &audit)
            .await?;
        if let CertificateRevocation::Revoked { .. } = outcome {
            self.revocations.changed_here().await?;
        }
        Ok(outcome)
    }

    /// Revokes, suspends or resumes an agent with all its certificates.
    /// When this returns, this replica refuses (or again accepts) the agent.
    pub async fn change_status(
        &self,
        actor: &str,
        name: &AgentName,
        change: StatusChange,
    ) -> Result<AgentStatusChange, AgentError> {
        let (transition, action, reason) = match change {
            StatusChange::Revoke(reason) => (
                AgentTransition::Revoke {
                    reason: reason.as_str(),
                },
                "agent.revoke",
                Some(reason.as_str()),
            ),
            StatusChange::Suspend => (AgentTransition::Suspend, "agent.suspend", None),
            StatusChange::Resume => (AgentTransition::Resume, "agent.resume", None),
        };
        let mut audit = AuditEvent::new(actor, action, name.as_str()).agent(name.as_str());
        if let Some(reason) = reason {
            audit = audit.with("reason", reason);
        }
        let at = time::OffsetDateTime::now_utc().unix_timestamp();
        let outcome = self
            .store
            .change_agent_status(name.as_str(), transition, at, &audit)
            .await?;
        if let AgentStatusChange::Changed { .. } = outcome {
            self.revocations.changed_here().await?;
            self.cache.invalidate(name);
        }
        Ok(outcome)
    }

    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// Replaces the agent's custodial key: a new key generated and attested
    /// on the token becomes current, the old key's certificates are revoked
    /// for `rotation.reason`, the old key may still sign (when named) until
    /// the grace period ends and is destroyed on the token after the
    /// retention window. Then a certificate is issued for the new key.
    pub async fn rotate_key(
        &self,
        actor: &str,
        name: &AgentName,
        rotation: Rotation,
        policy_version: i64,
    ) -> Result<RotatedKey, AgentError> {
        let key = KeyId::random("agent");
        let generated = self.pool.generate_custodial(&key, self.storage).await?;
        let outcome = self
            .record_rotation(actor, name, &key, &generated, &rotation)
            .await;
        let old_key_id = match outcome {
            Ok(KeyRotationOutcome::Rotated { old_key_id, .. }) => old_key_id,
            other => {
                let unrecorded = Self::generated_ref(&key, &generated);
                if let Err(e) = self.pool.destroy_custodial(&unrecorded).await {
                    tracing::error!(key = %key, error = %e, "could not remove the key of a rotation that did not happen");
                }
                return Err(match other {
                    Ok(KeyRotationOutcome::Refused { status }) => {
                        AgentError::NotActive(name.to_string(), status)
                    }
                    Ok(_) => AgentError::NotFound(name.to_string()),
                    Err(e) => e,
                });
            }
        };
        self.revocations.changed_here().await?;
        self.cache.invalidate(name);
        let rotation_ttl = rotation.certificate_ttl;
        let agent = self.active_agent(name).await?;
        let (certificate, _) = self
            .issue_certificate(
                actor,
                name,
                &agent,
                CertificateKey::Custodial,
                rotation_ttl,
                policy_version,
            )
            .await?;
        Ok(RotatedKey {
            old_key_id,
            new_key_id: key.to_string(),
            certificate,
        })
    }

    async fn record_rotation(
        &self,
        actor: &str,
        name: &AgentName,
        key: &KeyId,
        generated: &GeneratedKey,
        rotation: &Rotation,
    ) -> Result<KeyRotationOutcome, AgentError> {
        let attested =
            attest_custodial_key(&self.pool, &self.evidence_signer, key, generated).await?;
        let public_key_der = generated
            .public_key
            .to_public_key_der()
            .map_err(|e| AgentError::Corrupt(e.to_string()))?
            .into_vec();
        let at = time::OffsetDateTime::now_utc().unix_timestamp();
        let grace = rotation.grace.as_secs() as i64;
        let retention = rotation.retention.as_secs() as i64;
        let audit = AuditEvent::new(actor, "agent.rotate_key", name.as_str())
            .agent(name.as_str())
            .with("new_key_id", key.to_string())
            .with("reason", rotation.reason.as_str())
            .with("grace_seconds", grace)
            .with("retention_seconds", retention);
        Ok(self
            .store
            .rotate_agent_key(
                name.as_str(),
                &KeyRotation {
                    new_key_id: key.as_str(),
                    new_public_key_der: &public_key_der,
                    new_key_wrapped: generated.wrapped.as_deref(),
                    new_evidence: &attested.evidence,
                    reason: rotation.reason.as_str(),
                    at,
                    sign_until: at + grace,
                    destroy_after: at + retention,
                    expected_old_key: rotation.expected_old_key.as_ref().map(KeyId::as_str),
                },
                &audit,
            )
            .await?)
    }

    /// Destroys, on the token, retired keys whose retention has ended.
    /// Every replica runs this; the first to destroy a key records it.
    pub async fn destroy_retired_keys(&self) -> Result<usize, AgentError> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let due = self.store.retired_keys_due(now).await?;
        let mut destroyed = 0;
        for retired in due {
            let key = custodial_key_ref(
                &retired.key_id,
                Some(&retired.public_key_der),
                retired.key_wrapped.as_deref(),
            )?;
            match self.pool.destroy_custodial(&key).await {
                Ok(()) => {}
                // Another replica destroyed it between our query and now.
                Err(e) if e.is_not_found() => {}
                Err(e) => {
                    tracing::warn!(key = %key.id(), error = %e, "destroying a retired key failed");
                    continue;
                }
            }
            let audit = AuditEvent::new("keyward", "key.destroy", &retired.key_id)
                .agent(retired.agent_name.clone())
                .with("retired_at", retired.retired_at);
            self.store
                .mark_key_destroyed(&retired.key_id, now, &audit)
                .await?;
            destroyed += 1;
        }
        Ok(destroyed)
    }

    /// Registers an agent and generates its custodial key on the token. The
    /// key is destroyed again if the agent cannot be recorded, so a failed
    /// request leaves neither a row nor a key behind.
    pub async fn create(
        &self,
        actor: &str,
        name: &AgentName,
        scopes: Vec<Scope>,
        policy_version: i64,
    ) -> Result<AgentView, AgentError> {
        if scopes.len() > MAX_SCOPES {
            return Err(AgentError::TooManyScopes(MAX_SCOPES));
        }
        if self.store.agent(name.as_str()).await?.is_some() {
            return Err(AgentError::AlreadyExists(name.to_string()));
        }
        let key = KeyId::random("agent");
        let generated = self.pool.generate_custodial(&key, self.storage).await?;
        let result = self
            .record_new_agent(actor, name, scopes, &key, &generated, policy_version)
            .await;
        if result.is_err() {
            let unrecorded = Self::generated_ref(&key, &generated);
            if let Err(e) = self.pool.destroy_custodial(&unrecorded).await {
                tracing::error!(key = %key, error = %e, "could not remove the key of an agent that was not created");
            }
        }
        result
    }

    async fn record_new_agent(
        &self,
        actor: &str,
        name: &AgentName,
        scopes: Vec<Scope>,
        key: &KeyId,
        generated: &GeneratedKey,
        policy_version: i64,
    ) -> Result<AgentView, AgentError> {
        let attested =
            attest_custodial_key(&self.pool, &self.evidence_signer, key, generated).await?;
        let evidence = &attested.evidence;
        let public_key_der = generated
            .public_key
            .to_public_key_der()
            .map_err(|e| AgentError::Corrupt(e.to_string()))?
            .into_vec();
        let record = AgentRecord {
            name: name.to_string(),
            spiffe_id: self.authority.trust_domain().agent_spiffe_id(name),
            custody: CUSTODIAL.into(),
            key_id: Some(key.to_string()),
            public_key_der: Some(public_key_der),
            key_wrapped: generated.wrapped.clone(),
            attestation_digest: Some(evidence.digest.clone()),
            scopes: scopes.into_iter().map(String::from).collect(),
            status: ACTIVE.into(),
            created_at: time::OffsetDateTime::now_utc().unix_timestamp(),
        };
        let audit = AuditEvent::new(actor, "agent.create", name.as_str())
            .agent(name.as_str())
            .under_policy(policy_version)
            .with("key_id", key.to_string())
            .with("custody", CUSTODIAL)
            .with("scopes", record.scopes.clone())
            .with("attestation_digest", evidence.digest.clone());
        match self
            .store
            .insert_agent(&record, Some(evidence), None, &audit)
            .await
        {
            Ok(()) => Ok(AgentView::from_record(record)),
            Err(StoreError::Conflict(_)) => Err(AgentError::AlreadyExists(name.to_string())),
            Err(e) => Err(e.into()),
        }
    }

    /// Registers an agent that will create its key in its own TPM. No key
    /// is made here; the returned enrollment token (kept only as a hash)
    /// pays for exactly one attested enrollment, before `token_expires_at`.
    pub async fn create_agent_tpm(
        &self,
        actor: &str,
        name: &AgentName,
        scopes: Vec<Scope>,
        policy_version: i64,
        token_expires_at: i64,
    ) -> Result<(AgentView, String), AgentError> {
        if scopes.len() > MAX_SCOPES {
            return Err(AgentError::TooManyScopes(MAX_SCOPES));
        }
        let token = crate::identity::new_enrollment_token();
        let record = AgentRecord {
            name: name.to_string(),
            spiffe_id: self.authority.trust_domain().agent_spiffe_id(name),
            custody: AGENT_TPM.into(),
            key_id: None,
            public_key_der: None,
            key_wrapped: None,
            attestation_digest: None,
            scopes: scopes.into_iter().map(String::from).collect(),
            status: ACTIVE.into(),
            created_at: time::OffsetDateTime::now_utc().unix_timestamp(),
        };
        let audit = AuditEvent::new(actor, "agent.create", name.as_str())
            .agent(name.as_str())
            .under_policy(policy_version)
            .with("custody", AGENT_TPM)
            .with("scopes", record.scopes.clone())
            .with("enrollment_token_expires_at", token_expires_at);
        let enrollment = crate::store::NewEnrollmentToken {
            token_sha256: crate::identity::enrollment_token_hash(&token),
            expires_at: token_expires_at,
        };
        match self
            .store
            .insert_agent(&record, None, Some(&enrollment), &audit)
            .await
        {
            Ok(()) => Ok((AgentView::from_record(record), token)),
            Err(StoreError::Conflict(_)) => Err(AgentError::AlreadyExists(name.to_string())),
            Err(e) => Err(e.into()),
        }
    }

    /// Replaces the agent's scopes: its roles under the policy, from its
    /// next request on this replica (within the cache's second on others).
    pub async fn set_scopes(
        &self,
        actor: &str,
        name: &AgentName,
        scopes: Vec<Scope>,
    ) -> Result<AgentRecord, AgentError> {
        if scopes.len() > MAX_SCOPES {
            return Err(AgentError::TooManyScopes(MAX_SCOPES));
        }
        let scopes: Vec<String> = scopes.into_iter().map(String::from).collect();
        let audit = AuditEvent::new(actor, "agent.scopes", name.as_str())
            .agent(name.as_str())
            .with("scopes", scopes.clone());
        if !self
            .store
            .set_agent_scopes(name.as_str(), &scopes, &audit)
            .await?
        {
            return Err(AgentError::NotFound(name.to_string()));
        }
        self.cache.invalidate(name);
        self.get(name).await
    }

    /// Agents by name, after `after`, at most `limit`.
    pub async fn agents_page(
        &self,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<AgentRecord>, AgentError> {
        Ok(self.store.agents_page(after, limit).await?)
    }

    /// The agent's certificates, newest first, after the `(created_at,
    /// serial)` given, at most `limit`.
    pub async fn certificates_page(
        &self,
        name: &AgentName,
        after: Option<(i64, &str)>,
        limit: i64,
    ) -> Result<Vec<CertificateRecord>, AgentError> {
        self.get(name).await?;
        Ok(self
            .store
            .certificates_of_agent_page(name.as_str(), after, limit)
            .await?)
    }

    /// Attestation evidence by its digest, as stored (JSON).
    pub async fn evidence(&self, digest: &str) -> Result<Option<Vec<u8>>, AgentError> {
        Ok(self.store.attestation(digest).await?.map(|r| r.evidence))
    }

    /// Whether the database answers.
    pub async fn ping_database(&self) -> Result<(), AgentError> {
        Ok(self.store.ping().await?)
    }

    pub async fn get(&self, name: &AgentName) -> Result<AgentRecord, AgentError> {
        self.store
            .agent(name.as_str())
            .await?
            .ok_or_else(|| AgentError::NotFound(name.to_string()))
    }

    /// Rotates, as the policy in force requires (`rotate_after_seconds`),
    /// every custodial key that has been current for too long. Returns how
    /// many. The janitor calls this; the policy only says how old a key of
    /// some roles may get.
    pub async fn rotate_due_keys(
        &self,
        policy: &crate::policy::engine::PolicyEngine,
    ) -> Result<usize, AgentError> {
        if !policy.is_applied() {
            return Ok(0);
        }
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut rotated = 0;
        for key in self.store.custodial_key_ages().await? {
            let Some(after) = policy.rotate_after(&key.scopes) else {
                continue;
            };
            if now - key.current_since < after.as_secs() as i64 {
                continue;
            }
            let (Ok(name), Ok(expected)) =
                (AgentName::parse(&key.agent_name), KeyId::parse(&key.key_id))
            else {
                continue;
            };
            let rotation = Rotation {
                reason: RevocationReason::Superseded,
                grace: SCHEDULED_ROTATION_GRACE,
                retention: SCHEDULED_ROTATION_RETENTION,
                certificate_ttl: self.authority.ttl_limits().default,
                expected_old_key: Some(expected),
            };
            match self
                .rotate_key("policy", &name, rotation, policy.version())
                .await
            {
                Ok(_) => rotated += 1,
                // Another replica rotated it first, or the agent changed.
                Err(AgentError::NotActive(..)) => {}
                Err(e) => {
                    tracing::warn!(agent = %name, error = %e, "scheduled key rotation failed")
                }
            }
        }
        Ok(rotated)
    }

    /// The agent's record (from the short-lived cache), if the agent may
    /// act now: active in its record and in the revocation set, which is
    /// current within a second on every replica where the cached record
    /// may be a second old.
    pub async fn active_agent(&self, name: &AgentName) -> Result<Arc<AgentRecord>, AgentError> {
        if let Some(status) = self.revocations.current().inactive_status(name.as_str()) {
            return Err(AgentError::NotActive(name.to_string(), status.to_owned()));
        }
        let agent = match self.cache.record(name) {
            Some(agent) => agent,
            None => self.cache.put_record(name, self.get(name).await?),
        };
        if agent.status != ACTIVE {
            return Err(AgentError::NotActive(
                agent.name.clone(),
                agent.status.clone(),
            ));
        }
        Ok(agent)
    }

    /// Issues a certificate to `agent` (as [`Self::active_agent`] found it)
    /// for its custodial key (with attestation claims) or for a CSR key
    /// (without: keyward has no evidence for it).
    pub async fn issue_certificate(
        &self,
        actor: &str,
        name: &AgentName,
        agent: &AgentRecord,
        key: CertificateKey,
        ttl: Duration,
        policy_version: i64,
    ) -> Result<(IssuedCertificate, Option<String>), AgentError> {
        let tpm_custody = agent.custody == AGENT_TPM;
        match (&key, tpm_custody) {
            (CertificateKey::TpmAttested(_), false) => {
                return Err(AgentError::NotTpmCustody(agent.name.clone()))
            }
            (CertificateKey::Custodial | CertificateKey::Csr(_), true) => {
                return Err(AgentError::AttestationRequired(agent.name.clone()))
            }
            _ => {}
        }
        // The signing path shows the newest certificate: let it see this one.
        self.cache.certificate_issued(name);
        // What each kind of key brings: the custodial key's id, the subject
        // key, and the attested key with whether its evidence is new.
        let (key_id, public_key, attested, evidence_is_new) = match key {
            CertificateKey::Custodial => {
                let key_id = agent
                    .key_id
                    .as_deref()
                    .map(KeyId::parse)
                    .transpose()
                    .map_err(|e| AgentError::Corrupt(e.to_string()))?
                    .ok_or_else(|| AgentError::Corrupt("agent has no custodial key".into()))?;
                let public_key = agent
                    .public_key_der
                    .as_deref()
                    .map(PublicKey::from_public_key_der)
                    .transpose()
                    .map_err(|e| AgentError::Corrupt(e.to_string()))?
                    .ok_or_else(|| AgentError::Corrupt("agent has no public key".into()))?;
                let digest = agent
                    .attestation_digest
                    .as_deref()
                    .ok_or_else(|| AgentError::Corrupt("custodial key without evidence".into()))?;
                let attested = match self.cache.evidence(digest) {
                    Some(attested) => attested,
                    None => {
                        let evidence = self.store.attestation(digest).await?.ok_or_else(|| {
                            AgentError::Corrupt("attestation evidence missing".into())
                        })?;
                        self.cache.put_evidence(from_stored(evidence)?.into_inner())
                    }
                };
                (Some(key_id), public_key, Some((*attested).clone()), false)
            }
            CertificateKey::TpmAttested(attested) => {
                let attested = attested.into_inner();
                (None, attested.public_key, Some(attested.attested), true)
            }
            CertificateKey::Csr(csr) => (None, *csr.public_key(), None, false),
        };
        let claims = attested
            .as_ref()
            .map(|a| {
                AttestationClaims::for_key(a, policy_version as u64, agent.scopes.clone())?
                    .to_extension_value()
            })
            .transpose()?;
        let digest = attested.as_ref().map(|a| a.evidence.digest.clone());
        let request = AgentCertificateRequest {
            agent: name,
            key_id: key_id.as_ref(),
            subject_key: &public_key,
            ttl,
            claims,
            attestation_digest: digest.clone(),
            new_evidence: attested
                .as_ref()
                .filter(|_| evidence_is_new)
                .map(|a| &a.evidence),
            policy_version,
        };
        let issued = self
            .authority
            .issue_agent_certificate(actor, request)
            .await?;
        Ok((issued, digest))
    }
}
