//! Revocation: revoking a certificate, changing an agent's standing (and
//! its certificates' with it), keys reported compromised, and the snapshot
//! every replica's revocation set is built from.
//!
//! Also the locks a revocation takes (the agent's row, the public key's),
//! which recording a certificate (`agents`) takes too, so that whichever
//! commits first, the other sees it; and how a committed revocation is
//! announced to the other replicas.

use async_trait::async_trait;
use sqlx::{Postgres, Sqlite, Transaction};

use super::sql::{now_ms, SqlStore};
use super::StoreError;
use crate::audit::AuditEvent;

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

#[async_trait]
pub trait RevocationStore: Send + Sync {
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

    /// When the key (hex SHA-256 of its SubjectPublicKeyInfo) was reported
    /// compromised, in unix seconds.
    async fn key_compromised_at(&self, public_key_sha256: &str) -> Result<Option<i64>, StoreError>;
}

/// The PostgreSQL channel on which a committed revocation is announced to
/// every replica; the payload is the revocation time in unix milliseconds.
pub const REVOCATION_CHANNEL: &str = "keyward_revocation";

/// The reason a suspension puts on an agent's certificates.
const HOLD: &str = "certificateHold";

impl SqlStore<Sqlite> {
    /// SQLite has one process: its revocation set is updated directly.
    pub(super) async fn announce_revocation(
        _tx: &mut Transaction<'_, Sqlite>,
        _at_ms: i64,
    ) -> Result<(), StoreError> {
        Ok(())
    }

    /// SQLite has one writer: a write transaction holds every lock already.
    pub(super) async fn lock_public_key(
        _tx: &mut Transaction<'_, Sqlite>,
        _public_key_sha256: &str,
    ) -> Result<(), StoreError> {
        Ok(())
    }
}

impl SqlStore<Postgres> {
    /// Queued in the transaction: delivered to listeners at commit, never
    /// for a revocation that rolled back.
    pub(super) async fn announce_revocation(
        tx: &mut Transaction<'_, Postgres>,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(REVOCATION_CHANNEL)
            .bind(at_ms.to_string())
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// Serializes, until the transaction ends, everything done for one
    /// public key: recording a certificate for it and reporting it
    /// compromised. (The agent's row lock does not cover a key certified
    /// for two agents.)
    pub(super) async fn lock_public_key(
        tx: &mut Transaction<'_, Postgres>,
        public_key_sha256: &str,
    ) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(public_key_sha256)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

/// A key reported compromised: its SubjectPublicKeyInfo's SHA-256 (as the
/// certificates table holds it) and, for a custodial key, its id.
#[derive(sqlx::FromRow)]
pub(super) struct CompromisedKey {
    pub(super) public_key_sha256: String,
    pub(super) key_id: Option<String>,
}

/// The certificate a revocation names, as it stands.
#[derive(sqlx::FromRow)]
struct RevocationTarget {
    agent_name: String,
    key_id: Option<String>,
    public_key_sha256: String,
    revoked_at: Option<i64>,
    revocation_reason: Option<String>,
}

#[derive(sqlx::FromRow)]
struct RevokedRow {
    serial: String,
    agent_name: String,
    revoked_at: i64,
    revocation_reason: Option<String>,
    not_after: i64,
}

impl From<RevokedRow> for RevokedCertificate {
    fn from(row: RevokedRow) -> Self {
        RevokedCertificate {
            serial: row.serial,
            agent_name: row.agent_name,
            revoked_at: row.revoked_at,
            reason: row
                .revocation_reason
                .unwrap_or_else(|| "unspecified".into()),
            not_after: row.not_after,
        }
    }
}

// The revocation set's lists are sorted by the caller, not by ORDER BY:
// given one, SQLite walked the whole table in that order (the certificates
// by serial: 1.1 s at 300,000 certificates, every second, and a read
// transaction that long kept the write-ahead log from being restarted)
// instead of reading the few rows the partial indexes hold. Each must be
// answered from an index (`sql::tests::frequent_reads_use_their_indexes`).
pub(super) const REVOKED_CERTIFICATES: &str =
    "SELECT serial, agent_name, revoked_at, revocation_reason, not_after
     FROM certificates WHERE revoked_at IS NOT NULL AND not_after > $1";
pub(super) const INACTIVE_AGENTS: &str = "SELECT name, status FROM agents WHERE status <> 'active'";
pub(super) const LIVE_RETIRED_KEYS: &str =
    "SELECT key_id FROM retired_keys WHERE destroyed_at IS NULL";

macro_rules! impl_revocation_store {
    ($db:ty) => {
        impl SqlStore<$db> {
            /// Takes the agent's row lock (the one every change of its
            /// standing takes) and returns its status; `None` if there is
            /// no such agent.
            pub(super) async fn lock_agent(
                tx: &mut Transaction<'_, $db>,
                name: &str,
            ) -> Result<Option<String>, StoreError> {
                Ok(sqlx::query_scalar("UPDATE agents SET status = status WHERE name = $1 RETURNING status")
                    .bind(name)
                    .fetch_optional(&mut **tx)
                    .await?)
            }

            /// Records keys as compromised at `at` and revokes every
            /// unexpired certificate for them for keyCompromise: those
            /// standing or on hold from `at`, those revoked for another
            /// reason keep their time and take this reason (RFC 5280 lets a
            /// reason become keyCompromise). Returns the serials changed.
            pub(super) async fn bar_compromised_keys(
                tx: &mut Transaction<'_, $db>,
                keys: &[CompromisedKey],
                reported_by: &str,
                at: i64,
            ) -> Result<Vec<String>, StoreError> {
                let mut changed = Vec::new();
                for key in keys {
                    Self::lock_public_key(tx, &key.public_key_sha256).await?;
                    sqlx::query(
                        "INSERT INTO compromised_keys (public_key_sha256, key_id, compromised_at, reported_by)
                         VALUES ($1, $2, $3, $4) ON CONFLICT (public_key_sha256) DO NOTHING",
                    )
                    .bind(&key.public_key_sha256)
                    .bind(&key.key_id)
                    .bind(at)
                    .bind(reported_by)
                    .execute(&mut **tx)
                    .await?;
                    let serials: Vec<String> = sqlx::query_scalar(
                        "UPDATE certificates
                         SET revoked_at = CASE WHEN revoked_at IS NULL OR revocation_reason = $2
                                               THEN $1 ELSE revoked_at END,
                             revocation_reason = $3
                         WHERE public_key_sha256 = $4 AND not_after > $1
                           AND (revocation_reason IS NULL OR revocation_reason <> $3)
                         RETURNING serial",
                    )
                    .bind(at)
                    .bind(HOLD)
                    .bind(KEY_COMPROMISE)
                    .bind(&key.public_key_sha256)
                    .fetch_all(&mut **tx)
                    .await?;
                    changed.extend(serials);
                }
                Ok(changed)
            }

            /// The agent's custodial key and the keys of its certificates
            /// still unexpired at `at`: what its compromise reports.
            async fn agent_keys(
                tx: &mut Transaction<'_, $db>,
                name: &str,
                at: i64,
            ) -> Result<Vec<CompromisedKey>, StoreError> {
                let mut keys: Vec<CompromisedKey> = Vec::new();
                let custodial: (Option<String>, Option<Vec<u8>>) =
                    sqlx::query_as("SELECT key_id, public_key_der FROM agents WHERE name = $1")
                        .bind(name)
                        .fetch_one(&mut **tx)
                        .await?;
                if let (Some(key_id), Some(der)) = custodial {
                    keys.push(CompromisedKey {
                        public_key_sha256: public_key_sha256(&der),
                        key_id: Some(key_id),
                    });
                }
                let certified: Vec<CompromisedKey> = sqlx::query_as(
                    "SELECT DISTINCT public_key_sha256, key_id FROM certificates
                     WHERE agent_name = $1 AND not_after > $2",
                )
                .bind(name)
                .bind(at)
                .fetch_all(&mut **tx)
                .await?;
                for key in certified {
                    if !keys.iter().any(|k| k.public_key_sha256 == key.public_key_sha256) {
                        keys.push(key);
                    }
                }
                Ok(keys)
            }
        }

        #[async_trait]
        impl RevocationStore for SqlStore<$db> {
            async fn revoke_certificate(
                &self,
                serial: &str,
                reason: &str,
                at: i64,
                audit: &AuditEvent,
            ) -> Result<CertificateRevocation, StoreError> {
                let mut tx = self.begin_write().await?;
                let target: Option<RevocationTarget> = sqlx::query_as(
                    "SELECT agent_name, key_id, public_key_sha256, revoked_at, revocation_reason
                     FROM certificates WHERE serial = $1",
                )
                .bind(serial)
                .fetch_optional(&mut *tx)
                .await?;
                let Some(target) = target else {
                    return Ok(CertificateRevocation::NotFound);
                };
                let compromise = reason == KEY_COMPROMISE;
                if let (Some(revoked_at), Some(previous)) = (target.revoked_at, &target.revocation_reason) {
                    // A compromise report bars the key even when this one
                    // certificate was revoked for something else before.
                    if previous != HOLD && (previous == KEY_COMPROMISE || !compromise) {
                        return Ok(CertificateRevocation::AlreadyRevoked {
                            revoked_at,
                            reason: previous.clone(),
                        });
                    }
                }
                let agent = target.agent_name;
                // Serialized with issuance for this agent (see insert_certificates).
                Self::lock_agent(&mut tx, &agent).await?;
                let serials = if compromise {
                    let key = CompromisedKey {
                        public_key_sha256: target.public_key_sha256,
                        key_id: target.key_id,
                    };
                    Self::bar_compromised_keys(&mut tx, &[key], &format!("certificate:{serial}"), at)
                        .await?
                } else {
                    sqlx::query(
                        "UPDATE certificates SET revoked_at = $1, revocation_reason = $2 WHERE serial = $3",
                    )
                    .bind(at)
                    .bind(reason)
                    .bind(serial)
                    .execute(&mut *tx)
                    .await?;
                    vec![serial.to_owned()]
                };
                let event = if serials.len() > 1 {
                    audit.clone().with("serials", serials.clone())
                } else {
                    audit.clone()
                };
                Self::append_audit(&mut tx, &[&event]).await?;
                Self::enqueue_hook_event(&mut tx, &event, &agent, at).await?;
                Self::announce_revocation(&mut tx, now_ms()).await?;
                tx.commit().await?;
                Ok(CertificateRevocation::Revoked { serials })
            }

            async fn change_agent_status(
                &self,
                name: &str,
                transition: AgentTransition<'_>,
                at: i64,
                audit: &AuditEvent,
            ) -> Result<AgentStatusChange, StoreError> {
                let mut tx = self.begin_write().await?;
                // The row lock serializes concurrent changes to one agent,
                // and this change with the agent's certificate issuance.
                let Some(status) = Self::lock_agent(&mut tx, name).await? else {
                    return Ok(AgentStatusChange::NotFound);
                };
                let (target, mut serials): (&str, Vec<String>) = match (transition, status.as_str()) {
                    (AgentTransition::Revoke { .. }, "revoked")
                    | (AgentTransition::Suspend, "suspended")
                    | (AgentTransition::Resume, "active") => {
                        return Ok(AgentStatusChange::Unchanged)
                    }
                    (AgentTransition::Suspend | AgentTransition::Resume, "revoked")
                    | (AgentTransition::Resume, _) if status != "suspended" => {
                        return Ok(AgentStatusChange::Refused { status })
                    }
                    (AgentTransition::Revoke { reason }, _) => (
                        "revoked",
                        sqlx::query_scalar(
                            "UPDATE certificates SET revoked_at = $1, revocation_reason = $2
                             WHERE agent_name = $3 AND not_after > $1
                               AND (revoked_at IS NULL OR revocation_reason = $4)
                             RETURNING serial",
                        )
                        .bind(at)
                        .bind(reason)
                        .bind(name)
                        .bind(HOLD)
                        .fetch_all(&mut *tx)
                        .await?,
                    ),
                    (AgentTransition::Suspend, _) => (
                        "suspended",
                        sqlx::query_scalar(
                            "UPDATE certificates SET revoked_at = $1, revocation_reason = $2
                             WHERE agent_name = $3 AND not_after > $1 AND revoked_at IS NULL
                             RETURNING serial",
                        )
                        .bind(at)
                        .bind(HOLD)
                        .bind(name)
                        .fetch_all(&mut *tx)
                        .await?,
                    ),
                    (AgentTransition::Resume, _) => (
                        "active",
                        sqlx::query_scalar(
                            "UPDATE certificates SET revoked_at = NULL, revocation_reason = NULL
                             WHERE agent_name = $1 AND revocation_reason = $2
                             RETURNING serial",
                        )
                        .bind(name)
                        .bind(HOLD)
                        .fetch_all(&mut *tx)
                        .await?,
                    ),
                };
                if transition == (AgentTransition::Revoke { reason: KEY_COMPROMISE }) {
                    let keys = Self::agent_keys(&mut tx, name, at).await?;
                    for serial in Self::bar_compromised_keys(&mut tx, &keys, &format!("agent:{name}"), at).await? {
                        if !serials.contains(&serial) {
                            serials.push(serial);
                        }
                    }
                }
                let event = audit.clone().with("serials", serials.clone());
                Self::append_audit(&mut tx, &[&event]).await?;
                Self::enqueue_hook_event(&mut tx, &event, name, at).await?;
                sqlx::query("UPDATE agents SET status = $1 WHERE name = $2")
                    .bind(target)
                    .bind(name)
                    .execute(&mut *tx)
                    .await?;
                Self::announce_revocation(&mut tx, now_ms()).await?;
                tx.commit().await?;
                Ok(AgentStatusChange::Changed { serials })
            }

            async fn revocation_snapshot(&self, now: i64) -> Result<RevocationSnapshot, StoreError> {
                let mut certificates: Vec<RevokedCertificate> =
                    sqlx::query_as::<_, RevokedRow>(REVOKED_CERTIFICATES)
                        .bind(now)
                        .fetch_all(&self.pool)
                        .await?
                        .into_iter()
                        .map(RevokedCertificate::from)
                        .collect();
                certificates.sort_unstable_by(|a, b| a.serial.cmp(&b.serial));
                let mut inactive_agents: Vec<(String, String)> = sqlx::query_as(INACTIVE_AGENTS)
                    .fetch_all(&self.pool)
                    .await?;
                inactive_agents.sort_unstable();
                let mut retired_keys: Vec<String> = sqlx::query_scalar(LIVE_RETIRED_KEYS)
                    .fetch_all(&self.pool)
                    .await?;
                retired_keys.sort_unstable();
                let mut compromised_keys: Vec<String> = sqlx::query_scalar(
                    "SELECT key_id FROM compromised_keys WHERE key_id IS NOT NULL",
                )
                .fetch_all(&self.pool)
                .await?;
                compromised_keys.sort_unstable();
                Ok(RevocationSnapshot {
                    certificates,
                    inactive_agents,
                    retired_keys,
                    compromised_keys,
                })
            }

            async fn key_compromised_at(&self, public_key_sha256: &str) -> Result<Option<i64>, StoreError> {
                Ok(sqlx::query_scalar("SELECT compromised_at FROM compromised_keys WHERE public_key_sha256 = $1")
                    .bind(public_key_sha256)
                    .fetch_optional(&self.pool)
                    .await?)
            }
        }
    };
}

impl_revocation_store!(Sqlite);
impl_revocation_store!(Postgres);
