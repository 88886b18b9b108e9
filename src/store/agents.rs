//! Agents and what they hold: their records and scopes, their
//! certificates and the evidence those point at, rotations of their
//! custodial keys (and the retired keys kept until destroyed), and the
//! signatures made for them.
//!
//! A rotation revokes the old key's certificates, but it is a change of
//! the agent's key first: it lives here, with the revocation area's locks
//! and its compromise handling (`revocation`).

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use sqlx::{Postgres, QueryBuilder, Sqlite, Transaction};

use super::enrollment::NewEnrollmentToken;
use super::revocation::{public_key_sha256, CompromisedKey, KEY_COMPROMISE};
use super::sql::{now_ms, unique_violation, SqlStore};
use super::StoreError;
use crate::audit::AuditEvent;

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

#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
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

#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct AttestationRecord {
    /// Lower-case hex SHA-256 of `evidence`.
    pub digest: String,
    pub format: String,
    pub evidence: Vec<u8>,
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
pub(super) fn admit_certificates<'a>(
    certificates: &'a [NewCertificate],
    status: &BTreeMap<&str, Option<String>>,
    compromised: &BTreeSet<&str>,
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
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
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

/// The audit event that covers one batch of signature records: the SHA-256
/// of the batch (as JSON) ties every row to the hash chain.
pub fn signature_batch_event(records: &[SignatureRecord]) -> AuditEvent {
    use sha2::{Digest, Sha256};
    let rows = serde_json::to_vec(records).expect("plain data serializes");
    AuditEvent::new("keyward", "signature.batch", "signatures")
        .with("count", records.len())
        .with("rows_sha256", hex::encode(Sha256::digest(&rows)))
}

#[async_trait]
pub trait AgentStore: Send + Sync {
    /// Registers an agent, with its evidence and, for agents that enroll
    /// themselves, their first enrollment token, and the audit event: one
    /// transaction.
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
    /// The agent's certificates, newest first (by issuance, then serial),
    /// after the `(created_at, serial)` given, at most `limit`.
    async fn certificates_of_agent_page(
        &self,
        agent: &str,
        after: Option<(i64, &str)>,
        limit: i64,
    ) -> Result<Vec<CertificateRecord>, StoreError>;
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
}

/// The scopes column holds the list as JSON text.
#[derive(sqlx::FromRow)]
struct AgentRow {
    name: String,
    spiffe_id: String,
    custody: String,
    key_id: Option<String>,
    public_key_der: Option<Vec<u8>>,
    key_wrapped: Option<Vec<u8>>,
    attestation_digest: Option<String>,
    scopes: String,
    status: String,
    created_at: i64,
}

/// An agent's scopes, kept as a JSON array of strings.
fn scopes_from_json(json: &str) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("agent scopes: {e}")))
}

impl TryFrom<AgentRow> for AgentRecord {
    type Error = StoreError;

    fn try_from(row: AgentRow) -> Result<Self, StoreError> {
        Ok(AgentRecord {
            name: row.name,
            spiffe_id: row.spiffe_id,
            custody: row.custody,
            key_id: row.key_id,
            public_key_der: row.public_key_der,
            key_wrapped: row.key_wrapped,
            attestation_digest: row.attestation_digest,
            scopes: scopes_from_json(&row.scopes)?,
            status: row.status,
            created_at: row.created_at,
        })
    }
}

#[derive(sqlx::FromRow)]
struct CustodialKeyAgeRow {
    name: String,
    scopes: String,
    key_id: String,
    current_since: i64,
}

impl TryFrom<CustodialKeyAgeRow> for CustodialKeyAge {
    type Error = StoreError;

    fn try_from(row: CustodialKeyAgeRow) -> Result<Self, StoreError> {
        Ok(CustodialKeyAge {
            agent_name: row.name,
            scopes: scopes_from_json(&row.scopes)?,
            key_id: row.key_id,
            current_since: row.current_since,
        })
    }
}

/// The agent's standing and current key, read under its row lock.
#[derive(sqlx::FromRow)]
struct CurrentKey {
    status: String,
    key_id: Option<String>,
    public_key_der: Option<Vec<u8>>,
    key_wrapped: Option<Vec<u8>>,
}

fn scopes_json(scopes: &[String]) -> String {
    serde_json::to_string(scopes).expect("strings serialize")
}

// Statements read often (each signing view, every revocation reload on
// every replica) or inside a write transaction that holds up every other
// writer, over tables that grow with agents and certificates. Each must be
// answered from an index (`sql::tests::frequent_reads_use_their_indexes`;
// the revocation set's are in `revocation`).

/// One page of an agent's certificates, newest first, after a cursor,
/// read in index order (certificates_by_agent_created) rather than sorted:
/// sorting all of an agent's certificates took 0.4-0.6 s a page at 125,000.
pub(super) const CERTIFICATES_OF_AGENT_PAGE: &str =
    "SELECT * FROM certificates WHERE agent_name = $1
       AND ($2 IS NULL OR created_at < $2 OR (created_at = $2 AND serial < $3))
     ORDER BY created_at DESC, serial DESC LIMIT $4";

/// By agent first: certificates_by_agent (agent_name, not_after) then holds
/// only the agent's live certificates, newest first. There is no index by
/// key; by key alone this scanned the whole table (140 ms at 270,000
/// certificates), and a signing view is reloaded every few seconds.
pub(super) const NEWEST_CERTIFICATE_OF_KEY: &str = "SELECT serial, not_after FROM certificates
     WHERE agent_name = $1 AND not_after > $2 AND key_id = $3 AND revoked_at IS NULL
     ORDER BY not_after DESC LIMIT 1";

/// By agent, as above: by key alone a rotation scanned every certificate
/// inside its write transaction.
pub(super) const REVOKE_CERTIFICATES_OF_KEY: &str =
    "UPDATE certificates SET revoked_at = $1, revocation_reason = $2
     WHERE agent_name = $3 AND not_after > $1 AND key_id = $4 AND revoked_at IS NULL
     RETURNING serial";

macro_rules! impl_agent_store {
    ($db:ty) => {
        impl SqlStore<$db> {
            async fn insert_evidence(
                tx: &mut Transaction<'_, $db>,
                evidence: Option<&AttestationRecord>,
            ) -> Result<(), StoreError> {
                if let Some(ev) = evidence {
                    // The digest names the content, so an identical row may
                    // already be there.
                    sqlx::query(
                        "INSERT INTO attestations (digest, format, evidence, created_at)
                         VALUES ($1, $2, $3, $4) ON CONFLICT (digest) DO NOTHING",
                    )
                    .bind(&ev.digest)
                    .bind(&ev.format)
                    .bind(&ev.evidence)
                    .bind(ev.created_at)
                    .execute(&mut **tx)
                    .await?;
                }
                Ok(())
            }
        }

        #[async_trait]
        impl AgentStore for SqlStore<$db> {
            async fn insert_agent(
                &self,
                agent: &AgentRecord,
                evidence: Option<&AttestationRecord>,
                enrollment_token: Option<&NewEnrollmentToken>,
                audit: &AuditEvent,
            ) -> Result<(), StoreError> {
                let mut tx = self.begin_write().await?;
                Self::append_audit(&mut tx, &[audit]).await?;
                Self::insert_evidence(&mut tx, evidence).await?;
                sqlx::query(
                    "INSERT INTO agents (name, spiffe_id, custody, key_id, public_key_der, attestation_digest,
                        scopes, status, created_at, key_wrapped)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                )
                .bind(&agent.name)
                .bind(&agent.spiffe_id)
                .bind(&agent.custody)
                .bind(&agent.key_id)
                .bind(&agent.public_key_der)
                .bind(&agent.attestation_digest)
                .bind(scopes_json(&agent.scopes))
                .bind(&agent.status)
                .bind(agent.created_at)
                .bind(&agent.key_wrapped)
                .execute(&mut *tx)
                .await
                .map_err(|e| unique_violation(e, "agent"))?;
                if let Some(token) = enrollment_token {
                    sqlx::query(
                        "INSERT INTO enrollment_tokens (token_sha256, agent_name, created_at, expires_at)
                         VALUES ($1, $2, $3, $4)",
                    )
                    .bind(token.token_sha256.to_vec())
                    .bind(&agent.name)
                    .bind(agent.created_at)
                    .bind(token.expires_at)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn agent(&self, name: &str) -> Result<Option<AgentRecord>, StoreError> {
                sqlx::query_as::<_, AgentRow>("SELECT * FROM agents WHERE name = $1")
                    .bind(name)
                    .fetch_optional(&self.pool)
                    .await?
                    .map(AgentRecord::try_from)
                    .transpose()
            }

            async fn set_agent_scopes(
                &self,
                name: &str,
                scopes: &[String],
                audit: &AuditEvent,
            ) -> Result<bool, StoreError> {
                let mut tx = self.begin_write().await?;
                let changed = sqlx::query("UPDATE agents SET scopes = $1 WHERE name = $2")
                    .bind(scopes_json(scopes))
                    .bind(name)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if changed == 0 {
                    return Ok(false);
                }
                Self::append_audit(&mut tx, &[audit]).await?;
                tx.commit().await?;
                Ok(true)
            }

            async fn agents_page(&self, after: Option<&str>, limit: i64) -> Result<Vec<AgentRecord>, StoreError> {
                sqlx::query_as::<_, AgentRow>(
                    "SELECT * FROM agents WHERE ($1 IS NULL OR name > $1) ORDER BY name LIMIT $2",
                )
                .bind(after)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
                .into_iter()
                .map(AgentRecord::try_from)
                .collect()
            }

            async fn insert_certificates(
                &self,
                certificates: &[NewCertificate],
            ) -> Result<Vec<CertificateInsert>, StoreError> {
                let mut tx = self.begin_write().await?;
                // The locks a revocation of an agent, or a compromise report
                // for a key, takes: whichever commits first, the other sees
                // it. Agents first, then keys, each in one order, as those
                // take them, so that no two transactions wait on each other.
                let mut status = BTreeMap::new();
                for certificate in certificates {
                    status.entry(certificate.record.agent_name.as_str()).or_insert(None);
                }
                for (agent, found) in status.iter_mut() {
                    *found = Self::lock_agent(&mut tx, agent).await?;
                }
                let keys: BTreeSet<&str> = certificates
                    .iter()
                    .map(|c| c.record.public_key_sha256.as_str())
                    .collect();
                let mut compromised = BTreeSet::new();
                for key in keys {
                    Self::lock_public_key(&mut tx, key).await?;
                    let barred = sqlx::query("SELECT 1 FROM compromised_keys WHERE public_key_sha256 = $1")
                        .bind(key)
                        .fetch_optional(&mut *tx)
                        .await?;
                    if barred.is_some() {
                        compromised.insert(key);
                    }
                }
                let (outcomes, accepted) = admit_certificates(certificates, &status, &compromised);
                for certificate in &accepted {
                    Self::insert_evidence(&mut tx, certificate.evidence.as_ref()).await?;
                }
                let events: Vec<&AuditEvent> = accepted.iter().map(|c| &c.audit).collect();
                Self::append_audit(&mut tx, &events).await?;
                // 10 binds a row.
                for chunk in accepted.chunks(1000) {
                    let mut insert = QueryBuilder::<$db>::new(
                        "INSERT INTO certificates (serial, agent_name, key_id, public_key_sha256, not_before, \
                         not_after, der, attestation_digest, policy_version, created_at) ",
                    );
                    insert.push_values(chunk, |mut row, c| {
                        let cert = &c.record;
                        row.push_bind(&cert.serial)
                            .push_bind(&cert.agent_name)
                            .push_bind(&cert.key_id)
                            .push_bind(&cert.public_key_sha256)
                            .push_bind(cert.not_before)
                            .push_bind(cert.not_after)
                            .push_bind(&cert.der)
                            .push_bind(&cert.attestation_digest)
                            .push_bind(cert.policy_version)
                            .push_bind(cert.created_at);
                    });
                    insert
                        .build()
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| unique_violation(e, "certificate serial"))?;
                }
                tx.commit().await?;
                Ok(outcomes)
            }

            async fn certificate(&self, serial: &str) -> Result<Option<CertificateRecord>, StoreError> {
                Ok(sqlx::query_as("SELECT * FROM certificates WHERE serial = $1")
                    .bind(serial)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn attestation(&self, digest: &str) -> Result<Option<AttestationRecord>, StoreError> {
                Ok(sqlx::query_as("SELECT * FROM attestations WHERE digest = $1")
                    .bind(digest)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn certificates_of_agent_page(
                &self,
                agent: &str,
                after: Option<(i64, &str)>,
                limit: i64,
            ) -> Result<Vec<CertificateRecord>, StoreError> {
                let (created_at, serial) = after.unzip();
                Ok(sqlx::query_as(CERTIFICATES_OF_AGENT_PAGE)
                    .bind(agent)
                    .bind(created_at)
                    .bind(serial)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?)
            }

            async fn newest_certificate_for_key(
                &self,
                agent: &str,
                key_id: &str,
                now: i64,
            ) -> Result<Option<(String, i64)>, StoreError> {
                Ok(sqlx::query_as(NEWEST_CERTIFICATE_OF_KEY)
                    .bind(agent)
                    .bind(now)
                    .bind(key_id)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn certificates_of_agent_at(
                &self,
                agent: &str,
                at: i64,
                limit: i64,
            ) -> Result<Vec<CertificateRecord>, StoreError> {
                Ok(sqlx::query_as(
                    "SELECT * FROM certificates
                     WHERE agent_name = $1 AND not_before <= $2 AND not_after >= $2
                     ORDER BY not_after DESC LIMIT $3",
                )
                .bind(agent)
                .bind(at)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn rotate_agent_key(
                &self,
                name: &str,
                rotation: &KeyRotation<'_>,
                audit: &AuditEvent,
            ) -> Result<KeyRotationOutcome, StoreError> {
                let mut tx = self.begin_write().await?;
                let current: Option<CurrentKey> = sqlx::query_as(
                    "UPDATE agents SET status = status WHERE name = $1
                     RETURNING status, key_id, public_key_der, key_wrapped",
                )
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
                let Some(current) = current else {
                    return Ok(KeyRotationOutcome::NotFound);
                };
                let CurrentKey {
                    status,
                    key_id: old_key,
                    public_key_der: old_public,
                    key_wrapped: old_wrapped,
                } = current;
                let (Some(old_key), Some(old_public), "active") =
                    (old_key, old_public, status.as_str())
                else {
                    return Ok(KeyRotationOutcome::Refused { status });
                };
                if rotation.expected_old_key.is_some_and(|expected| expected != old_key) {
                    return Ok(KeyRotationOutcome::Refused {
                        status: "rotated meanwhile".into(),
                    });
                }
                let revoked = if rotation.reason == KEY_COMPROMISE {
                    let key = CompromisedKey {
                        public_key_sha256: public_key_sha256(&old_public),
                        key_id: Some(old_key.clone()),
                    };
                    Self::bar_compromised_keys(&mut tx, &[key], &format!("rotation:{name}"), rotation.at)
                        .await?
                } else {
                    sqlx::query_scalar(REVOKE_CERTIFICATES_OF_KEY)
                        .bind(rotation.at)
                        .bind(rotation.reason)
                        .bind(name)
                        .bind(&old_key)
                        .fetch_all(&mut *tx)
                        .await?
                };
                let event = audit
                    .clone()
                    .with("old_key_id", old_key.clone())
                    .with("revoked_serials", revoked.clone());
                Self::append_audit(&mut tx, &[&event]).await?;
                Self::insert_evidence(&mut tx, Some(rotation.new_evidence)).await?;
                sqlx::query(
                    "INSERT INTO retired_keys (key_id, agent_name, public_key_der, reason, retired_at,
                         sign_until, destroy_after, key_wrapped)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(&old_key)
                .bind(name)
                .bind(&old_public)
                .bind(rotation.reason)
                .bind(rotation.at)
                .bind(rotation.sign_until)
                .bind(rotation.destroy_after)
                .bind(&old_wrapped)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "UPDATE agents SET key_id = $1, public_key_der = $2, attestation_digest = $3,
                         key_wrapped = $4
                     WHERE name = $5",
                )
                .bind(rotation.new_key_id)
                .bind(rotation.new_public_key_der)
                .bind(&rotation.new_evidence.digest)
                .bind(rotation.new_key_wrapped)
                .bind(name)
                .execute(&mut *tx)
                .await?;
                Self::enqueue_hook_event(&mut tx, &event, name, rotation.at).await?;
                Self::announce_revocation(&mut tx, now_ms()).await?;
                tx.commit().await?;
                Ok(KeyRotationOutcome::Rotated {
                    old_key_id: old_key,
                    revoked_serials: revoked,
                })
            }

            async fn custodial_key_ages(&self) -> Result<Vec<CustodialKeyAge>, StoreError> {
                sqlx::query_as::<_, CustodialKeyAgeRow>(
                    "SELECT a.name, a.scopes, a.key_id,
                         COALESCE((SELECT MAX(r.retired_at) FROM retired_keys r
                                   WHERE r.agent_name = a.name), a.created_at) AS current_since
                     FROM agents a WHERE a.status = 'active' AND a.key_id IS NOT NULL
                     ORDER BY a.name",
                )
                .fetch_all(&self.pool)
                .await?
                .into_iter()
                .map(CustodialKeyAge::try_from)
                .collect()
            }

            async fn retired_key(&self, key_id: &str) -> Result<Option<RetiredKey>, StoreError> {
                Ok(sqlx::query_as("SELECT * FROM retired_keys WHERE key_id = $1")
                    .bind(key_id)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn custodial_key_ids(&self) -> Result<Vec<String>, StoreError> {
                Ok(sqlx::query_scalar(
                    "SELECT key_id FROM agents WHERE key_id IS NOT NULL
                     UNION SELECT key_id FROM retired_keys WHERE destroyed_at IS NULL",
                )
                .fetch_all(&self.pool)
                .await?)
            }

            async fn retired_keys_due(&self, now: i64) -> Result<Vec<RetiredKey>, StoreError> {
                Ok(sqlx::query_as(
                    "SELECT * FROM retired_keys WHERE destroyed_at IS NULL AND destroy_after <= $1
                     ORDER BY destroy_after LIMIT 100",
                )
                .bind(now)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn mark_key_destroyed(
                &self,
                key_id: &str,
                at: i64,
                audit: &AuditEvent,
            ) -> Result<(), StoreError> {
                let mut tx = self.begin_write().await?;
                let changed = sqlx::query(
                    "UPDATE retired_keys SET destroyed_at = $1, key_wrapped = NULL
                     WHERE key_id = $2 AND destroyed_at IS NULL",
                )
                .bind(at)
                .bind(key_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                // Another replica recorded it first: one audit event only.
                if changed == 1 {
                    Self::append_audit(&mut tx, &[audit]).await?;
                    tx.commit().await?;
                }
                Ok(())
            }

            async fn insert_signatures(&self, records: &[SignatureRecord]) -> Result<(), StoreError> {
                if records.is_empty() {
                    return Ok(());
                }
                let event = signature_batch_event(records);
                let mut tx = self.begin_write().await?;
                let seq = Self::append_audit(&mut tx, &[&event]).await?.start;
                // One statement per chunk; 9 binds a row stays far below
                // PostgreSQL's 65535-parameter limit.
                for chunk in records.chunks(1000) {
                    let mut insert = QueryBuilder::<$db>::new(
                        "INSERT INTO signatures (request_id, agent_name, key_id, digest, purpose, \
                         message, policy_version, signed_at_ms, audit_index) ",
                    );
                    insert.push_values(chunk, |mut row, r| {
                        row.push_bind(&r.request_id)
                            .push_bind(&r.agent_name)
                            .push_bind(&r.key_id)
                            .push_bind(&r.digest)
                            .push_bind(&r.purpose)
                            .push_bind(&r.message)
                            .push_bind(r.policy_version)
                            .push_bind(r.signed_at_ms)
                            .push_bind(seq);
                    });
                    insert.build().execute(&mut *tx).await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn signature_made(
                &self,
                key_id: &str,
                digest: &str,
                purpose: Option<&str>,
                made_ms: std::ops::Range<i64>,
            ) -> Result<bool, StoreError> {
                let row = sqlx::query(
                    "SELECT 1 FROM signatures
                     WHERE key_id = $1 AND signed_at_ms >= $2 AND signed_at_ms < $3
                       AND digest = $4 AND ($5 IS NULL OR purpose = $5)
                     LIMIT 1",
                )
                .bind(key_id)
                .bind(made_ms.start)
                .bind(made_ms.end)
                .bind(digest)
                .bind(purpose)
                .fetch_optional(&self.pool)
                .await?;
                Ok(row.is_some())
            }
        }
    };
}

impl_agent_store!(Sqlite);
impl_agent_store!(Postgres);
