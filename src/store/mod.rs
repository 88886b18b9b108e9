//! Persistence: one [`Store`] trait, implemented once for SQLite (the
//! embedded default) and once for PostgreSQL (production, several replicas).
//!
//! Every write that changes security state appends its audit event in the
//! same transaction, so there is never a change without its record, nor a
//! record of a change that did not happen.

mod certificate_log;
mod checkpoint;
mod signature_log;
mod sql;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use crate::audit::{AuditEvent, AuditRecord};

pub use certificate_log::CertificateLog;
pub use signature_log::SignatureLog;
pub use sql::{SqlStore, REVOCATION_CHANNEL};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentRecord {
    pub name: String,
    pub spiffe_id: String,
    /// `custodial` (key in keyward's token) or `agent-tpm`.
    pub custody: String,
    pub key_id: Option<String>,
    pub public_key_der: Option<Vec<u8>>,
    /// The custodial key wrapped by the token, when it is kept wrapped
    /// (`keys::KeyStorage::Wrapped`); `None` for a token object.
    pub key_wrapped: Option<Vec<u8>>,
    /// Digest of the key's attestation evidence (custodial keys).
    pub attestation_digest: Option<String>,
    pub scopes: Vec<String>,
    /// `active`, `disabled` or `revoked`.
    pub status: String,
    pub created_at: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateRecord {
    /// Lower-case hex of the serial number's bytes.
    pub serial: String,
    pub agent_name: String,
    pub key_id: Option<String>,
    pub public_key_sha256: String,
    pub not_before: i64,
    pub not_after: i64,
    pub der: Vec<u8>,
    pub attestation_digest: Option<String>,
    pub policy_version: i64,
    pub created_at: i64,
    /// Unix seconds of revocation; `None` while the certificate stands.
    pub revoked_at: Option<i64>,
    /// RFC 5280 reason name, with `revoked_at`.
    pub revocation_reason: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttestationRecord {
    /// Lower-case hex SHA-256 of `evidence`.
    pub digest: String,
    pub format: String,
    pub evidence: Vec<u8>,
    pub created_at: i64,
}

/// An enrollment token created with its agent, in the agent's transaction.
#[derive(Clone, Debug)]
pub struct NewEnrollmentToken {
    pub token_sha256: [u8; 32],
    pub expires_at: i64,
}

/// A TPM attestation challenge: what keyward sent one agent, and what it
/// expects back.
#[derive(Clone, Debug)]
pub struct TpmChallengeRecord {
    /// The qualifying data TPM2_Certify must carry; unique.
    pub nonce: Vec<u8>,
    pub agent_name: String,
    /// SHA-256 of the credential only the EK's TPM can recover.
    pub secret_sha256: [u8; 32],
    /// The AK's `TPMT_PUBLIC`, whose signature the evidence must carry.
    pub ak_public: Vec<u8>,
    /// The EK certificate's SHA-256, or the EK public key's for an EK
    /// admitted by the allow-list.
    pub ek_sha256: [u8; 32],
    /// The TPM as its EK certificate (or the allow-list) describes it.
    pub key_location: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub used_at: Option<i64>,
}

/// What redeeming a TPM challenge did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TpmRedemption {
    Redeemed,
    /// Used or expired in the meantime.
    ChallengeSpent,
    /// The enrollment token is not (or no longer) valid for its agent.
    TokenInvalid,
}

/// keyward's issuing CA: the key on the token and its certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaRecord {
    pub key_id: String,
    pub cert_der: Vec<u8>,
    /// The issuing certificate's chain up to its root, PEM, root last.
    pub chain_pem: String,
    pub created_at: i64,
}

/// A key keyward uses for itself (e.g. `attestation`), with its certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceKeyRecord {
    pub purpose: String,
    pub key_id: String,
    pub cert_der: Vec<u8>,
    pub created_at: i64,
}

/// One signature made for an agent.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SignatureRecord {
    pub request_id: String,
    pub agent_name: String,
    pub key_id: String,
    /// Hex SHA-256 of what was signed.
    pub digest: String,
    /// `sign` (raw digest or message) or `message` (an envelope).
    pub purpose: String,
    /// For an envelope, what it says besides the signer: `{"aud","intent",
    /// "jti","exp"}` as JSON, so the audit trail shows who asked whom for
    /// what. `None` for raw signatures, whose content keyward never sees.
    pub message: Option<String>,
    pub policy_version: i64,
    pub signed_at_ms: i64,
}

/// A revoked certificate that has not expired: what the CRL lists and the
/// revocation set holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevokedCertificate {
    pub serial: String,
    pub agent_name: String,
    pub revoked_at: i64,
    /// RFC 5280 reason name, e.g. `keyCompromise`.
    pub reason: String,
    pub not_after: i64,
}

/// Everything the in-memory revocation set is built from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RevocationSnapshot {
    pub certificates: Vec<RevokedCertificate>,
    /// Agents whose status is not `active`, with that status.
    pub inactive_agents: Vec<(String, String)>,
    /// Keys retired by a rotation and still on the token: never an
    /// agent's current key, whatever a cache says.
    pub retired_keys: Vec<String>,
    /// Custodial keys (key ids) reported compromised: they sign nothing.
    pub compromised_keys: Vec<String>,
}

/// What recording an issued certificate did. The checks are made in the
/// transaction that writes the row, under the locks a revocation takes, so
/// no certificate is recorded (and none handed out) for an agent revoked or
/// a key reported compromised before the row is written.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
pub enum CertificateInsert {
    Inserted,
    /// The agent is no longer active (revoked or suspended meanwhile).
    AgentNotActive {
        status: String,
    },
    /// A keyCompromise revocation reported the certificate's key.
    KeyCompromised,
}

/// An issued certificate to record: its row, the evidence it points at
/// when that is new, and its audit event.
#[derive(Clone, Debug)]
pub struct NewCertificate {
    pub record: CertificateRecord,
    pub evidence: Option<AttestationRecord>,
    pub audit: AuditEvent,
}

/// What each certificate of a batch comes to, from its agent's status and
/// the keys barred as read under the write locks (`None`: no such agent),
/// and the certificates to write, in order. Both databases' writers decide
/// with it.
pub(crate) fn admit_certificates<'a>(
    certificates: &'a [NewCertificate],
    status: &std::collections::BTreeMap<&str, Option<String>>,
    compromised: &std::collections::BTreeSet<&str>,
) -> (Vec<CertificateInsert>, Vec<&'a NewCertificate>) {
    let mut outcomes = Vec::with_capacity(certificates.len());
    let mut accepted = Vec::with_capacity(certificates.len());
    for certificate in certificates {
        let cert = &certificate.record;
        match status.get(cert.agent_name.as_str()).cloned().flatten() {
            Some(status) if status == "active" => {}
            other => {
                let status = other.unwrap_or_else(|| "absent".to_owned());
                outcomes.push(CertificateInsert::AgentNotActive { status });
                continue;
            }
        }
        if compromised.contains(cert.public_key_sha256.as_str()) {
            outcomes.push(CertificateInsert::KeyCompromised);
            continue;
        }
        accepted.push(certificate);
        outcomes.push(CertificateInsert::Inserted);
    }
    (outcomes, accepted)
}

/// Hex SHA-256 of a DER SubjectPublicKeyInfo: how `certificates` and
/// `compromised_keys` name a key.
pub fn public_key_sha256(spki_der: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(spki_der))
}

/// The RFC 5280 reason that bars a key for good.
pub const KEY_COMPROMISE: &str = "keyCompromise";

/// What revoking one certificate did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertificateRevocation {
    NotFound,
    /// `serials`: this certificate and, for keyCompromise, every other
    /// unexpired certificate for the same key.
    Revoked {
        serials: Vec<String>,
    },
    /// It was revoked before (for a reason other than certificateHold):
    /// nothing was written.
    AlreadyRevoked {
        revoked_at: i64,
        reason: String,
    },
}

/// A change of an agent's standing, with what it does to its certificates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentTransition<'a> {
    /// Permanently: every unexpired certificate is revoked for `reason`.
    Revoke { reason: &'a str },
    /// Reversibly: unexpired certificates are put on certificateHold.
    Suspend,
    /// Lifts a suspension: the holds are removed.
    Resume,
}

/// What an agent transition did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentStatusChange {
    NotFound,
    /// Already in the target state: nothing was written.
    Unchanged,
    /// The serials whose revocation state changed.
    Changed {
        serials: Vec<String>,
    },
    /// Not allowed from the current status (e.g. resuming a revoked agent).
    Refused {
        status: String,
    },
}

/// A rotation of an agent's custodial key, as the store records it.
#[derive(Clone, Debug)]
pub struct KeyRotation<'a> {
    pub new_key_id: &'a str,
    pub new_public_key_der: &'a [u8],
    /// The new key's blob when it is kept wrapped.
    pub new_key_wrapped: Option<&'a [u8]>,
    pub new_evidence: &'a AttestationRecord,
    /// RFC 5280 reason for the old key's certificates.
    pub reason: &'a str,
    pub at: i64,
    pub sign_until: i64,
    pub destroy_after: i64,
    /// Rotate only if this is still the current key (a scheduled rotation
    /// must not rotate twice when two replicas see it due).
    pub expected_old_key: Option<&'a str>,
}

/// An active agent's custodial key and since when it has been current.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CustodialKeyAge {
    pub agent_name: String,
    pub scopes: Vec<String>,
    pub key_id: String,
    pub current_since: i64,
}

/// What a rotation did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyRotationOutcome {
    NotFound,
    /// Only an active agent with a custodial key can rotate it.
    Refused {
        status: String,
    },
    Rotated {
        old_key_id: String,
        revoked_serials: Vec<String>,
    },
}

/// A key retired by a rotation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetiredKey {
    pub key_id: String,
    pub agent_name: String,
    pub public_key_der: Vec<u8>,
    /// Its blob while it is kept wrapped and not destroyed.
    pub key_wrapped: Option<Vec<u8>>,
    pub reason: String,
    pub retired_at: i64,
    pub sign_until: i64,
    pub destroy_after: i64,
    pub destroyed_at: Option<i64>,
}

/// One version of the policy.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PolicyRecord {
    pub version: i64,
    pub content: String,
    pub content_sha256: String,
    pub author: String,
    pub source: String,
    pub created_at: i64,
}

/// A request waiting for (or decided by) human approval.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ApprovalRecord {
    pub id: String,
    pub agent_name: String,
    /// `sign` or `message`.
    pub kind: String,
    /// The agent's request body, JSON, as it was made.
    pub request: String,
    pub approvals_required: i64,
    pub policy_version: i64,
    pub status: String,
    /// The answer the agent gets once the request has run (JSON).
    pub result: Option<String>,
    pub created_at: i64,
    pub expires_at: i64,
    pub decided_at: Option<i64>,
}

/// What a vote did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VoteOutcome {
    NotFound,
    /// Already decided or expired; nothing was written.
    NotPending {
        status: String,
    },
    /// This admin has voted on it before; nothing was written.
    AlreadyVoted,
    /// Recorded; the request's status now (`pending`, `approved`, `denied`).
    Recorded {
        status: String,
        approvals: i64,
    },
}

/// A registered revocation hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookRecord {
    pub id: i64,
    pub url: String,
    /// The HMAC key receivers verify with. Never logged or audited.
    pub secret: String,
    pub active: bool,
    pub created_at: i64,
}

/// One event due for one hook, leased to this replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookDelivery {
    pub id: i64,
    pub hook_id: i64,
    pub event: String,
    pub attempts: i64,
}

/// The audit event that covers one batch of signature records: the SHA-256
/// of the batch (as JSON) ties every row to the hash chain.
pub fn signature_batch_event(records: &[SignatureRecord]) -> AuditEvent {
    use sha2::{Digest, Sha256};
    let rows = serde_json::to_vec(records).expect("plain data serializes");
    AuditEvent::new("keyward", "signature.batch", "signatures")
        .with("count", records.len())
        .with("rows_sha256", hex::encode(Sha256::digest(&rows)))
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("{0} already exists")]
    Conflict(&'static str),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migrating the database: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is malformed: {0}")]
    Corrupt(String),
    #[error("unsupported database URL (expected sqlite:// or postgres://)")]
    UnsupportedUrl,
    /// A group commit failed; every request in the batch sees this.
    #[error("writing a batch failed: {0}")]
    BatchFailed(String),
    #[error("the signature log has stopped")]
    LogStopped,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `sqlite` or `postgres`.
    fn backend_name(&self) -> &'static str;

    async fn ping(&self) -> Result<(), StoreError>;

    /// Stores a new agent, and the evidence for its key, with the audit event.
    /// Registers an agent, with its evidence and, for agents that enroll
    /// themselves, their first enrollment token: one transaction.
    async fn insert_agent(
        &self,
        agent: &AgentRecord,
        evidence: Option<&AttestationRecord>,
        enrollment_token: Option<&NewEnrollmentToken>,
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;
    async fn agent(&self, name: &str) -> Result<Option<AgentRecord>, StoreError>;
    /// Replaces an agent's scopes (its roles), with the audit event; false
    /// when there is no such agent.
    async fn set_agent_scopes(
        &self,
        name: &str,
        scopes: &[String],
        audit: &AuditEvent,
    ) -> Result<bool, StoreError>;
    /// Agents by name, after `after`, at most `limit`.
    async fn agents_page(
        &self,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<AgentRecord>, StoreError>;
    /// The agent's certificates, newest first (by issuance, then serial),
    /// after the `(created_at, serial)` given, at most `limit`.
    async fn certificates_of_agent_page(
        &self,
        agent: &str,
        after: Option<(i64, &str)>,
        limit: i64,
    ) -> Result<Vec<CertificateRecord>, StoreError>;

    /// Stores issued certificates (and the evidence they point at), each
    /// with its audit event, in one transaction: each one if its agent is
    /// still active and its key has not been reported compromised (see
    /// [`CertificateInsert`]), in the order given; the outcomes in that
    /// order.
    async fn insert_certificates(
        &self,
        certificates: &[NewCertificate],
    ) -> Result<Vec<CertificateInsert>, StoreError>;
    async fn certificate(&self, serial: &str) -> Result<Option<CertificateRecord>, StoreError>;
    async fn attestation(&self, digest: &str) -> Result<Option<AttestationRecord>, StoreError>;

    async fn active_ca(&self) -> Result<Option<CaRecord>, StoreError>;
    /// Issuing CAs that stopped being active at or after `retired_since`
    /// (unix seconds), newest first.
    async fn previous_cas(&self, retired_since: i64) -> Result<Vec<CaRecord>, StoreError>;
    /// Makes `ca` the active issuing CA. Fails with `Conflict` when another
    /// replica installed one first and `replace` is false.
    async fn install_ca(
        &self,
        ca: &CaRecord,
        replace: bool,
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;

    async fn service_key(&self, purpose: &str) -> Result<Option<ServiceKeyRecord>, StoreError>;
    async fn insert_service_key(
        &self,
        key: &ServiceKeyRecord,
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;

    /// Stores the hash of an admin token that belongs to the admin `name`.
    async fn insert_admin_token(
        &self,
        token_sha256: &[u8; 32],
        name: &str,
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;
    /// Every admin token's hash with the name of the admin it belongs to.
    async fn admin_tokens(&self) -> Result<Vec<([u8; 32], String)>, StoreError>;

    /// The newest unexpired, unrevoked certificate of the agent's key: its
    /// serial and notAfter (unix seconds).
    async fn newest_certificate_for_key(
        &self,
        agent: &str,
        key_id: &str,
        now: i64,
    ) -> Result<Option<(String, i64)>, StoreError>;

    /// The agent's certificates that were within their validity at `at`
    /// (unix seconds), newest first, at most `limit`. Revoked ones are
    /// included: the caller decides what revocation means for it.
    async fn certificates_of_agent_at(
        &self,
        agent: &str,
        at: i64,
        limit: i64,
    ) -> Result<Vec<CertificateRecord>, StoreError>;

    /// Revokes one certificate at `at` (unix seconds) with its audit event,
    /// in one transaction that also tells other replicas. A certificate on
    /// certificateHold is revoked for good by this. `keyCompromise` also
    /// bars the certificate's key and revokes every other certificate for
    /// it, whatever they were revoked for before.
    async fn revoke_certificate(
        &self,
        serial: &str,
        reason: &str,
        at: i64,
        audit: &AuditEvent,
    ) -> Result<CertificateRevocation, StoreError>;

    /// Moves an agent to revoked, suspended or (back to) active, with its
    /// certificates, in one transaction with its audit event (to which the
    /// affected serials are added). Revoking for `keyCompromise` bars the
    /// keys of the agent's unexpired certificates as `revoke_certificate`
    /// does.
    async fn change_agent_status(
        &self,
        name: &str,
        transition: AgentTransition<'_>,
        at: i64,
        audit: &AuditEvent,
    ) -> Result<AgentStatusChange, StoreError>;

    /// Revoked, unexpired certificates (at `now`) and inactive agents.
    async fn revocation_snapshot(&self, now: i64) -> Result<RevocationSnapshot, StoreError>;

    /// Makes a new key the agent's custodial key, retires the old one and
    /// revokes the old key's unexpired certificates, with the new key's
    /// evidence and the audit event, in one transaction. A `keyCompromise`
    /// rotation bars the old key.
    async fn rotate_agent_key(
        &self,
        name: &str,
        rotation: &KeyRotation<'_>,
        audit: &AuditEvent,
    ) -> Result<KeyRotationOutcome, StoreError>;
    /// Every active agent's custodial key with the time it became current.
    async fn custodial_key_ages(&self) -> Result<Vec<CustodialKeyAge>, StoreError>;
    async fn retired_key(&self, key_id: &str) -> Result<Option<RetiredKey>, StoreError>;
    /// Every custodial key id an agent owns: current keys and retired keys
    /// not yet destroyed.
    async fn custodial_key_ids(&self) -> Result<Vec<String>, StoreError>;
    /// Retired keys past their retention and not yet destroyed.
    async fn retired_keys_due(&self, now: i64) -> Result<Vec<RetiredKey>, StoreError>;
    async fn mark_key_destroyed(
        &self,
        key_id: &str,
        at: i64,
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;

    /// Stores `content` as the next policy version (the highest so far plus
    /// one) with its audit event; `Conflict` if another writer took that
    /// number first.
    async fn insert_policy(
        &self,
        content: &str,
        author: &str,
        source: &str,
        audit: &AuditEvent,
    ) -> Result<PolicyRecord, StoreError>;
    /// The version in force: 0 when none was ever applied.
    async fn latest_policy_version(&self) -> Result<i64, StoreError>;
    async fn policy(&self, version: i64) -> Result<Option<PolicyRecord>, StoreError>;
    /// Versions, oldest first, after `after`, at most `limit`.
    async fn policies_page(
        &self,
        after: Option<i64>,
        limit: i64,
    ) -> Result<Vec<PolicyRecord>, StoreError>;

    async fn insert_approval(
        &self,
        approval: &ApprovalRecord,
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;
    async fn approval(&self, id: &str) -> Result<Option<ApprovalRecord>, StoreError>;
    /// Pending requests not expired at `now`, oldest first (by creation,
    /// then id), after the `(created_at, id)` given, at most `limit`.
    async fn pending_approvals_page(
        &self,
        now: i64,
        after: Option<(i64, &str)>,
        limit: i64,
    ) -> Result<Vec<ApprovalRecord>, StoreError>;
    /// Casts `admin`'s vote: a denial decides at once; enough approvals
    /// approve. One transaction with its audit event.
    async fn vote_on_approval(
        &self,
        id: &str,
        admin: &str,
        approve: bool,
        comment: Option<&str>,
        now: i64,
        audit: &AuditEvent,
    ) -> Result<VoteOutcome, StoreError>;
    /// Records what running an approved request produced.
    async fn finish_approval(&self, id: &str, status: &str, result: &str)
        -> Result<(), StoreError>;

    /// Stores an enrollment token's hash for `agent`, with its audit event.
    async fn insert_enrollment_token(
        &self,
        token_sha256: &[u8; 32],
        agent: &str,
        expires_at: i64,
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;
    /// Spends a token: the agent it was for, if it exists, is unused and
    /// has not expired at `now`. Atomic: of two concurrent redemptions at
    /// most one gets the agent.
    async fn redeem_enrollment_token(
        &self,
        token_sha256: &[u8; 32],
        now: i64,
        audit: &AuditEvent,
    ) -> Result<Option<String>, StoreError>;

    /// The agent an enrollment token is for, if the token exists, is
    /// unused and has not expired at `now`. Spends nothing.
    async fn enrollment_token_agent(
        &self,
        token_sha256: &[u8; 32],
        now: i64,
    ) -> Result<Option<String>, StoreError>;

    /// Records a TPM attestation challenge with its audit event.
    async fn insert_tpm_challenge(
        &self,
        challenge: &TpmChallengeRecord,
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;
    async fn tpm_challenge(&self, nonce: &[u8]) -> Result<Option<TpmChallengeRecord>, StoreError>;
    /// Deletes challenges, used or not, that expired before `before`.
    /// Evidence naming one is refused either way: as expired or replayed
    /// while the row exists, as stale after. Returns how many went.
    async fn delete_expired_tpm_challenges(&self, before: i64) -> Result<u64, StoreError>;
    /// Challenges issued to `agent` that are neither used nor expired.
    async fn open_tpm_challenges(&self, agent: &str, now: i64) -> Result<i64, StoreError>;
    /// Spends a challenge and the enrollment token that pays for it, in
    /// one transaction with `audit`: both or neither. Of two concurrent
    /// redemptions at most one succeeds.
    async fn redeem_tpm_challenge(
        &self,
        nonce: &[u8],
        token_sha256: &[u8; 32],
        now: i64,
        audit: &AuditEvent,
    ) -> Result<TpmRedemption, StoreError>;

    /// Registers a hook; `Conflict` when the URL is registered already.
    async fn insert_hook(
        &self,
        url: &str,
        secret: &str,
        audit: &AuditEvent,
    ) -> Result<HookRecord, StoreError>;
    /// Every active hook (what the deliverer sends to).
    async fn hooks(&self) -> Result<Vec<HookRecord>, StoreError>;
    /// Active hooks by id, after `after`, at most `limit`.
    async fn hooks_page(
        &self,
        after: Option<i64>,
        limit: i64,
    ) -> Result<Vec<HookRecord>, StoreError>;
    /// Stops deliveries to a hook; false when there is no such active hook.
    async fn deactivate_hook(&self, id: i64, audit: &AuditEvent) -> Result<bool, StoreError>;
    /// Leases, until `now + lease_secs`, the oldest undelivered event of
    /// each active hook that is due and not leased: one per hook, so each
    /// hook receives its events in order.
    async fn lease_hook_deliveries(
        &self,
        now: i64,
        lease_secs: i64,
    ) -> Result<Vec<HookDelivery>, StoreError>;
    async fn hook_delivered(&self, id: i64, at: i64) -> Result<(), StoreError>;
    /// Records a failed attempt and when to try again.
    async fn hook_failed(
        &self,
        id: i64,
        next_attempt_at: i64,
        error: &str,
    ) -> Result<(), StoreError>;
    /// Undelivered events (all hooks).
    async fn pending_hook_deliveries(&self) -> Result<i64, StoreError>;

    /// The next CRL number: monotonic across replicas.
    async fn next_crl_number(&self) -> Result<i64, StoreError>;

    /// Writes a batch of signature records and one audit event covering
    /// them (its details hold the SHA-256 of the batch), in one transaction.
    async fn insert_signatures(&self, records: &[SignatureRecord]) -> Result<(), StoreError>;

    /// Whether keyward recorded a signature by `key_id` over `digest`
    /// (lower-case hex), for `purpose` if given, made within `made_ms`
    /// (unix milliseconds). The window is what makes this cheap: the
    /// lookup walks the key's signatures of that window only.
    async fn signature_made(
        &self,
        key_id: &str,
        digest: &str,
        purpose: Option<&str>,
        made_ms: std::ops::Range<i64>,
    ) -> Result<bool, StoreError>;

    /// When the key (hex SHA-256 of its SubjectPublicKeyInfo) was reported
    /// compromised, in unix seconds.
    async fn key_compromised_at(&self, public_key_sha256: &str) -> Result<Option<i64>, StoreError>;

    /// Appends an event that records no other change (e.g. a failing hook).
    async fn append_audit_event(&self, event: &AuditEvent) -> Result<(), StoreError>;

    /// The audit trail from `after_seq` on, oldest first, at most `limit` rows.
    async fn audit_records(
        &self,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<AuditRecord>, StoreError>;
}

/// Opens the database named by `url` and applies its migrations.
pub async fn connect(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    open(url, 16, true).await
}

/// Opens the database with at most `connections` connections, migrating it
/// first when `migrate` is set.
pub async fn open(
    url: &str,
    connections: u32,
    migrate: bool,
) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("sqlite:") {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10))
            .pragma("wal_autocheckpoint", "0");
        let path = options.get_filename().to_owned();
        let pool = SqlitePoolOptions::new()
            .max_connections(connections.min(8))
            .connect_with(options)
            .await?;
        if migrate {
            sqlx::migrate!("migrations/sqlite").run(&pool).await?;
        }
        let checkpoints = checkpoint::Checkpointer::start(path)?;
        Ok(Arc::new(
            SqlStore::new(pool, "sqlite").with_checkpoints(checkpoints),
        ))
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        let pool = PgPoolOptions::new()
            .max_connections(connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await?;
        if migrate {
            sqlx::migrate!("migrations/postgres").run(&pool).await?;
        }
        Ok(Arc::new(SqlStore::new(pool, "postgres")))
    } else {
        Err(StoreError::UnsupportedUrl)
    }
}
