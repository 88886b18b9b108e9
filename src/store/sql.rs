//! The one SQL implementation of [`Store`], compiled for SQLite and for
//! PostgreSQL. The statements are portable (`$n` placeholders, `RETURNING`,
//! integers as 64-bit, blobs as bytes); only the migrations differ.

use async_trait::async_trait;
use sqlx::{Pool, Postgres, QueryBuilder, Row, Sqlite, Transaction};

use super::public_key_sha256;
use super::{
    AgentRecord, AgentStatusChange, AgentTransition, ApprovalRecord, AttestationRecord, CaRecord,
    CertificateInsert, CertificateRecord, CertificateRevocation, CustodialKeyAge, HookDelivery,
    HookRecord, KeyRotation, KeyRotationOutcome, NewCertificate, NewEnrollmentToken, PolicyRecord,
    RetiredKey, RevocationSnapshot, RevokedCertificate, ServiceKeyRecord, SignatureRecord, Store,
    StoreError, TpmChallengeRecord, TpmRedemption, VoteOutcome, KEY_COMPROMISE,
};
use crate::audit::{chain_hash, AuditEvent, AuditRecord};

pub struct SqlStore<DB: sqlx::Database> {
    pool: Pool<DB>,
    name: &'static str,
    /// SQLite's log checkpoints, for as long as the store is open.
    _checkpoints: Option<super::checkpoint::Checkpointer>,
}

impl<DB: sqlx::Database> SqlStore<DB> {
    pub fn new(pool: Pool<DB>, name: &'static str) -> Self {
        Self {
            pool,
            name,
            _checkpoints: None,
        }
    }

    pub fn with_checkpoints(mut self, checkpoints: super::checkpoint::Checkpointer) -> Self {
        self._checkpoints = Some(checkpoints);
        self
    }

    pub fn pool(&self) -> &Pool<DB> {
        &self.pool
    }
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn unique_violation(e: sqlx::Error, what: &'static str) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict(what),
        _ => StoreError::Database(e),
    }
}

fn hash32(bytes: Vec<u8>, what: &str) -> Result<[u8; 32], StoreError> {
    bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("{what} is not 32 bytes")))
}

/// The PostgreSQL channel on which a committed revocation is announced to
/// every replica; the payload is the revocation time in unix milliseconds.
pub const REVOCATION_CHANNEL: &str = "keyward_revocation";

/// The reason a suspension puts on an agent's certificates.
const HOLD: &str = "certificateHold";

impl SqlStore<Sqlite> {
    /// SQLite has one process: its revocation set is updated directly.
    async fn announce_revocation(
        _tx: &mut Transaction<'_, Sqlite>,
        _at_ms: i64,
    ) -> Result<(), StoreError> {
        Ok(())
    }

    /// A transaction that holds SQLite's one write lock from its first
    /// statement, so that what it reads is what it writes against: a
    /// deferred one reads a snapshot that another writer may commit past
    /// before this one upgrades.
    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// SQLite has one writer: a write transaction holds every lock already.
    async fn lock_public_key(
        _tx: &mut Transaction<'_, Sqlite>,
        _public_key_sha256: &str,
    ) -> Result<(), StoreError> {
        Ok(())
    }
}

impl SqlStore<Postgres> {
    /// Queued in the transaction: delivered to listeners at commit, never
    /// for a revocation that rolled back.
    async fn announce_revocation(
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

    async fn begin_write(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        Ok(self.pool.begin().await?)
    }

    /// Serializes, until the transaction ends, everything done for one
    /// public key: recording a certificate for it and reporting it
    /// compromised. (The agent's row lock does not cover a key certified
    /// for two agents.)
    async fn lock_public_key(
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
struct CompromisedKey {
    public_key_sha256: String,
    key_id: Option<String>,
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// What hooks receive: the audit event of the change, with an id receivers
/// can deduplicate on (delivery is at least once).
fn hook_event(event: &AuditEvent, agent: &str, at: i64) -> String {
    serde_json::json!({
        "event_id": hex::encode(rand::random::<[u8; 16]>()),
        "type": event.action,
        "agent": agent,
        "subject": event.subject,
        "at": at,
        "details": event.details,
    })
    .to_string()
}

// Statements read often (each signing view, every revocation reload on
// every replica) or inside a write transaction that holds up every other
// writer, over tables that grow with agents and certificates. Each must be
// answered from an index (`tests::frequent_reads_use_their_indexes`).

/// One page of an agent's certificates, newest first, after a cursor,
/// read in index order (certificates_by_agent_created) rather than sorted:
/// sorting all of an agent's certificates took 0.4-0.6 s a page at 125,000.
const CERTIFICATES_OF_AGENT_PAGE: &str = "SELECT * FROM certificates WHERE agent_name = $1
       AND ($2 IS NULL OR created_at < $2 OR (created_at = $2 AND serial < $3))
     ORDER BY created_at DESC, serial DESC LIMIT $4";

/// By agent first: certificates_by_agent (agent_name, not_after) then holds
/// only the agent's live certificates, newest first. There is no index by
/// key; by key alone this scanned the whole table (140 ms at 270,000
/// certificates), and a signing view is reloaded every few seconds.
const NEWEST_CERTIFICATE_OF_KEY: &str = "SELECT serial, not_after FROM certificates
     WHERE agent_name = $1 AND not_after > $2 AND key_id = $3 AND revoked_at IS NULL
     ORDER BY not_after DESC LIMIT 1";

/// By agent, as above: by key alone a rotation scanned every certificate
/// inside its write transaction.
const REVOKE_CERTIFICATES_OF_KEY: &str =
    "UPDATE certificates SET revoked_at = $1, revocation_reason = $2
     WHERE agent_name = $3 AND not_after > $1 AND key_id = $4 AND revoked_at IS NULL
     RETURNING serial";

// The revocation set's lists are sorted by the caller, not by ORDER BY:
// given one, SQLite walked the whole table in that order (the certificates
// by serial: 1.1 s at 300,000 certificates, every second, and a read
// transaction that long kept the write-ahead log from being restarted)
// instead of reading the few rows the partial indexes hold.
const REVOKED_CERTIFICATES: &str =
    "SELECT serial, agent_name, revoked_at, revocation_reason, not_after
     FROM certificates WHERE revoked_at IS NOT NULL AND not_after > $1";
const INACTIVE_AGENTS: &str = "SELECT name, status FROM agents WHERE status <> 'active'";
const LIVE_RETIRED_KEYS: &str = "SELECT key_id FROM retired_keys WHERE destroyed_at IS NULL";

macro_rules! impl_store {
    ($db:ty) => {
        impl SqlStore<$db> {
            /// Puts the event in every active hook's outbox, in the
            /// transaction of the change itself.
            async fn enqueue_hook_event(
                tx: &mut Transaction<'_, $db>,
                event: &AuditEvent,
                agent: &str,
                at: i64,
            ) -> Result<(), StoreError> {
                sqlx::query(
                    "INSERT INTO hook_deliveries (hook_id, agent_name, event, created_at, next_attempt_at)
                     SELECT id, $1, $2, $3, $3 FROM hooks WHERE active = 1",
                )
                .bind(agent)
                .bind(hook_event(event, agent, at))
                .bind(at)
                .execute(&mut **tx)
                .await?;
                Ok(())
            }

            fn ca_from_row(row: &<$db as sqlx::Database>::Row) -> Result<CaRecord, StoreError> {
                Ok(CaRecord {
                    key_id: row.try_get("key_id")?,
                    cert_der: row.try_get("cert_der")?,
                    chain_pem: row.try_get("chain_pem")?,
                    created_at: row.try_get("created_at")?,
                })
            }

            fn retired_key_from_row(row: &<$db as sqlx::Database>::Row) -> Result<RetiredKey, StoreError> {
                Ok(RetiredKey {
                    key_id: row.try_get("key_id")?,
                    agent_name: row.try_get("agent_name")?,
                    public_key_der: row.try_get("public_key_der")?,
                    key_wrapped: row.try_get("key_wrapped")?,
                    reason: row.try_get("reason")?,
                    retired_at: row.try_get("retired_at")?,
                    sign_until: row.try_get("sign_until")?,
                    destroy_after: row.try_get("destroy_after")?,
                    destroyed_at: row.try_get("destroyed_at")?,
                })
            }

            fn policy_from_row(row: &<$db as sqlx::Database>::Row) -> Result<PolicyRecord, StoreError> {
                Ok(PolicyRecord {
                    version: row.try_get("version")?,
                    content: row.try_get("content")?,
                    content_sha256: row.try_get("content_sha256")?,
                    author: row.try_get("author")?,
                    source: row.try_get("source")?,
                    created_at: row.try_get("created_at")?,
                })
            }

            fn approval_from_row(row: &<$db as sqlx::Database>::Row) -> Result<ApprovalRecord, StoreError> {
                Ok(ApprovalRecord {
                    id: row.try_get("id")?,
                    agent_name: row.try_get("agent_name")?,
                    kind: row.try_get("kind")?,
                    request: row.try_get("request")?,
                    approvals_required: row.try_get("approvals_required")?,
                    policy_version: row.try_get("policy_version")?,
                    status: row.try_get("status")?,
                    result: row.try_get("result")?,
                    created_at: row.try_get("created_at")?,
                    expires_at: row.try_get("expires_at")?,
                    decided_at: row.try_get("decided_at")?,
                })
            }

            fn hook_from_row(row: &<$db as sqlx::Database>::Row) -> Result<HookRecord, StoreError> {
                Ok(HookRecord {
                    id: row.try_get("id")?,
                    url: row.try_get("url")?,
                    secret: row.try_get("secret")?,
                    active: row.try_get::<i64, _>("active")? == 1,
                    created_at: row.try_get("created_at")?,
                })
            }

            /// Appends `event` to the audit chain inside `tx`. Updating the
            /// head row first takes its write lock, which serializes appends
            /// across connections and replicas.
            async fn append_audit(
                tx: &mut Transaction<'_, $db>,
                event: &AuditEvent,
            ) -> Result<i64, StoreError> {
                let head = sqlx::query("UPDATE audit_head SET seq = seq + 1 WHERE id = 1 RETURNING seq, hash")
                    .fetch_one(&mut **tx)
                    .await?;
                let seq: i64 = head.try_get("seq")?;
                let prev = hash32(head.try_get("hash")?, "audit head hash")?;
                let at = now();
                let hash = chain_hash(&prev, seq, at, event);
                sqlx::query(
                    "INSERT INTO audit_events (seq, at, actor, action, subject, details, prev_hash, hash)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(seq)
                .bind(at)
                .bind(&event.actor)
                .bind(&event.action)
                .bind(&event.subject)
                .bind(event.details.to_string())
                .bind(prev.to_vec())
                .bind(hash.to_vec())
                .execute(&mut **tx)
                .await?;
                sqlx::query("UPDATE audit_head SET hash = $1 WHERE id = 1")
                    .bind(hash.to_vec())
                    .execute(&mut **tx)
                    .await?;
                Ok(seq)
            }

            /// Appends `events` to the chain in this order, in three
            /// statements however many there are: one write transaction's
            /// worth of certificates costs the database a few round trips,
            /// not a few per certificate.
            async fn append_audit_many(
                tx: &mut Transaction<'_, $db>,
                events: &[&AuditEvent],
            ) -> Result<(), StoreError> {
                let Ok(count) = i64::try_from(events.len()) else {
                    return Err(StoreError::Corrupt("too many audit events".into()));
                };
                if count == 0 {
                    return Ok(());
                }
                let head = sqlx::query("UPDATE audit_head SET seq = seq + $1 WHERE id = 1 RETURNING seq, hash")
                    .bind(count)
                    .fetch_one(&mut **tx)
                    .await?;
                let last: i64 = head.try_get("seq")?;
                let mut prev = hash32(head.try_get("hash")?, "audit head hash")?;
                let at = now();
                let mut rows = Vec::with_capacity(events.len());
                for (seq, event) in (last - count + 1..).zip(events) {
                    let hash = chain_hash(&prev, seq, at, event);
                    rows.push((seq, *event, prev, hash));
                    prev = hash;
                }
                // 8 binds a row: far below either database's limit.
                for chunk in rows.chunks(1000) {
                    let mut insert = QueryBuilder::<$db>::new(
                        "INSERT INTO audit_events (seq, at, actor, action, subject, details, prev_hash, hash) ",
                    );
                    insert.push_values(chunk, |mut row, (seq, event, prev, hash)| {
                        row.push_bind(*seq)
                            .push_bind(at)
                            .push_bind(&event.actor)
                            .push_bind(&event.action)
                            .push_bind(&event.subject)
                            .push_bind(event.details.to_string())
                            .push_bind(prev.to_vec())
                            .push_bind(hash.to_vec());
                    });
                    insert.build().execute(&mut **tx).await?;
                }
                sqlx::query("UPDATE audit_head SET hash = $1 WHERE id = 1")
                    .bind(prev.to_vec())
                    .execute(&mut **tx)
                    .await?;
                Ok(())
            }

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

            /// Takes the agent's row lock (the one every change of its
            /// standing takes) and returns its status; `None` if there is
            /// no such agent.
            async fn lock_agent(
                tx: &mut Transaction<'_, $db>,
                name: &str,
            ) -> Result<Option<String>, StoreError> {
                let row = sqlx::query("UPDATE agents SET status = status WHERE name = $1 RETURNING status")
                    .bind(name)
                    .fetch_optional(&mut **tx)
                    .await?;
                Ok(row.map(|r| r.try_get("status")).transpose()?)
            }

            /// Records keys as compromised at `at` and revokes every
            /// unexpired certificate for them for keyCompromise: those
            /// standing or on hold from `at`, those revoked for another
            /// reason keep their time and take this reason (RFC 5280 lets a
            /// reason become keyCompromise). Returns the serials changed.
            async fn bar_compromised_keys(
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
                    let rows = sqlx::query(
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
                    for row in rows {
                        changed.push(row.try_get::<String, _>("serial")?);
                    }
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
                let agent = sqlx::query("SELECT key_id, public_key_der FROM agents WHERE name = $1")
                    .bind(name)
                    .fetch_one(&mut **tx)
                    .await?;
                let custodial: (Option<String>, Option<Vec<u8>>) =
                    (agent.try_get("key_id")?, agent.try_get("public_key_der")?);
                if let (Some(key_id), Some(der)) = custodial {
                    keys.push(CompromisedKey {
                        public_key_sha256: public_key_sha256(&der),
                        key_id: Some(key_id),
                    });
                }
                let certified = sqlx::query(
                    "SELECT DISTINCT public_key_sha256, key_id FROM certificates
                     WHERE agent_name = $1 AND not_after > $2",
                )
                .bind(name)
                .bind(at)
                .fetch_all(&mut **tx)
                .await?;
                for row in certified {
                    let key = CompromisedKey {
                        public_key_sha256: row.try_get("public_key_sha256")?,
                        key_id: row.try_get("key_id")?,
                    };
                    if !keys.iter().any(|k| k.public_key_sha256 == key.public_key_sha256) {
                        keys.push(key);
                    }
                }
                Ok(keys)
            }

            fn agent_from_row(row: &<$db as sqlx::Database>::Row) -> Result<AgentRecord, StoreError> {
                let scopes: String = row.try_get("scopes")?;
                Ok(AgentRecord {
                    name: row.try_get("name")?,
                    spiffe_id: row.try_get("spiffe_id")?,
                    custody: row.try_get("custody")?,
                    key_id: row.try_get("key_id")?,
                    public_key_der: row.try_get("public_key_der")?,
                    key_wrapped: row.try_get("key_wrapped")?,
                    attestation_digest: row.try_get("attestation_digest")?,
                    scopes: serde_json::from_str(&scopes)
                        .map_err(|e| StoreError::Corrupt(format!("agent scopes: {e}")))?,
                    status: row.try_get("status")?,
                    created_at: row.try_get("created_at")?,
                })
            }

            fn certificate_from_row(
                row: &<$db as sqlx::Database>::Row,
            ) -> Result<CertificateRecord, StoreError> {
                Ok(CertificateRecord {
                    serial: row.try_get("serial")?,
                    agent_name: row.try_get("agent_name")?,
                    key_id: row.try_get("key_id")?,
                    public_key_sha256: row.try_get("public_key_sha256")?,
                    not_before: row.try_get("not_before")?,
                    not_after: row.try_get("not_after")?,
                    der: row.try_get("der")?,
                    attestation_digest: row.try_get("attestation_digest")?,
                    policy_version: row.try_get("policy_version")?,
                    created_at: row.try_get("created_at")?,
                    revoked_at: row.try_get("revoked_at")?,
                    revocation_reason: row.try_get("revocation_reason")?,
                })
            }
        }

        #[async_trait]
        impl Store for SqlStore<$db> {
            fn backend_name(&self) -> &'static str {
                self.name
            }

            async fn ping(&self) -> Result<(), StoreError> {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
            }

            async fn insert_agent(
                &self,
                agent: &AgentRecord,
                evidence: Option<&AttestationRecord>,
                enrollment_token: Option<&NewEnrollmentToken>,
                audit: &AuditEvent,
            ) -> Result<(), StoreError> {
                let mut tx = self.pool.begin().await?;
                Self::append_audit(&mut tx, audit).await?;
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
                .bind(serde_json::to_string(&agent.scopes).expect("strings serialize"))
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
                let row = sqlx::query("SELECT * FROM agents WHERE name = $1")
                    .bind(name)
                    .fetch_optional(&self.pool)
                    .await?;
                row.as_ref().map(Self::agent_from_row).transpose()
            }

            async fn set_agent_scopes(
                &self,
                name: &str,
                scopes: &[String],
                audit: &AuditEvent,
            ) -> Result<bool, StoreError> {
                let mut tx = self.pool.begin().await?;
                let changed = sqlx::query("UPDATE agents SET scopes = $1 WHERE name = $2")
                    .bind(serde_json::to_string(scopes).expect("strings serialize"))
                    .bind(name)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if changed == 0 {
                    return Ok(false);
                }
                Self::append_audit(&mut tx, audit).await?;
                tx.commit().await?;
                Ok(true)
            }

            async fn agents_page(&self, after: Option<&str>, limit: i64) -> Result<Vec<AgentRecord>, StoreError> {
                let rows = sqlx::query(
                    "SELECT * FROM agents WHERE ($1 IS NULL OR name > $1) ORDER BY name LIMIT $2",
                )
                .bind(after)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(Self::agent_from_row).collect()
            }

            async fn certificates_of_agent_page(
                &self,
                agent: &str,
                after: Option<(i64, &str)>,
                limit: i64,
            ) -> Result<Vec<CertificateRecord>, StoreError> {
                let (created_at, serial) = after.unzip();
                let rows = sqlx::query(CERTIFICATES_OF_AGENT_PAGE)
                .bind(agent)
                .bind(created_at)
                .bind(serial)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(Self::certificate_from_row).collect()
            }

            async fn insert_certificates(
                &self,
                certificates: &[NewCertificate],
            ) -> Result<Vec<CertificateInsert>, StoreError> {
                use std::collections::{BTreeMap, BTreeSet};
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
                let (outcomes, accepted) =
                    super::admit_certificates(certificates, &status, &compromised);
                for certificate in &accepted {
                    Self::insert_evidence(&mut tx, certificate.evidence.as_ref()).await?;
                }
                let events: Vec<&AuditEvent> = accepted.iter().map(|c| &c.audit).collect();
                Self::append_audit_many(&mut tx, &events).await?;
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
                let row = sqlx::query("SELECT * FROM certificates WHERE serial = $1")
                    .bind(serial)
                    .fetch_optional(&self.pool)
                    .await?;
                row.as_ref().map(Self::certificate_from_row).transpose()
            }

            async fn attestation(&self, digest: &str) -> Result<Option<AttestationRecord>, StoreError> {
                let row = sqlx::query("SELECT * FROM attestations WHERE digest = $1")
                    .bind(digest)
                    .fetch_optional(&self.pool)
                    .await?;
                row.map(|r| -> Result<_, StoreError> {
                    Ok(AttestationRecord {
                        digest: r.try_get("digest")?,
                        format: r.try_get("format")?,
                        evidence: r.try_get("evidence")?,
                        created_at: r.try_get("created_at")?,
                    })
                })
                .transpose()
            }

            async fn active_ca(&self) -> Result<Option<CaRecord>, StoreError> {
                let row = sqlx::query("SELECT * FROM ca_certificates WHERE active = 1")
                    .fetch_optional(&self.pool)
                    .await?;
                row.as_ref().map(Self::ca_from_row).transpose()
            }

            async fn previous_cas(&self, retired_since: i64) -> Result<Vec<CaRecord>, StoreError> {
                let rows = sqlx::query(
                    "SELECT * FROM ca_certificates WHERE active = 0 AND retired_at >= $1
                     ORDER BY retired_at DESC",
                )
                .bind(retired_since)
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(Self::ca_from_row).collect()
            }

            async fn install_ca(&self, ca: &CaRecord, replace: bool, audit: &AuditEvent) -> Result<(), StoreError> {
                let mut tx = self.pool.begin().await?;
                Self::append_audit(&mut tx, audit).await?;
                if replace {
                    sqlx::query("UPDATE ca_certificates SET active = 0, retired_at = $1 WHERE active = 1")
                        .bind(now())
                        .execute(&mut *tx)
                        .await?;
                }
                sqlx::query(
                    "INSERT INTO ca_certificates (key_id, cert_der, chain_pem, active, created_at)
                     VALUES ($1, $2, $3, 1, $4)",
                )
                .bind(&ca.key_id)
                .bind(&ca.cert_der)
                .bind(&ca.chain_pem)
                .bind(ca.created_at)
                .execute(&mut *tx)
                .await
                .map_err(|e| unique_violation(e, "active CA"))?;
                tx.commit().await?;
                Ok(())
            }

            async fn service_key(&self, purpose: &str) -> Result<Option<ServiceKeyRecord>, StoreError> {
                let row = sqlx::query("SELECT * FROM service_keys WHERE purpose = $1")
                    .bind(purpose)
                    .fetch_optional(&self.pool)
                    .await?;
                row.map(|r| -> Result<_, StoreError> {
                    Ok(ServiceKeyRecord {
                        purpose: r.try_get("purpose")?,
                        key_id: r.try_get("key_id")?,
                        cert_der: r.try_get("cert_der")?,
                        created_at: r.try_get("created_at")?,
                    })
                })
                .transpose()
            }

            async fn insert_service_key(&self, key: &ServiceKeyRecord, audit: &AuditEvent) -> Result<(), StoreError> {
                let mut tx = self.pool.begin().await?;
                Self::append_audit(&mut tx, audit).await?;
                sqlx::query(
                    "INSERT INTO service_keys (purpose, key_id, cert_der, created_at) VALUES ($1, $2, $3, $4)",
                )
                .bind(&key.purpose)
                .bind(&key.key_id)
                .bind(&key.cert_der)
                .bind(key.created_at)
                .execute(&mut *tx)
                .await
                .map_err(|e| unique_violation(e, "service key"))?;
                tx.commit().await?;
                Ok(())
            }

            async fn insert_admin_token(
                &self,
                token_sha256: &[u8; 32],
                name: &str,
                audit: &AuditEvent,
            ) -> Result<(), StoreError> {
                let mut tx = self.pool.begin().await?;
                Self::append_audit(&mut tx, audit).await?;
                sqlx::query("INSERT INTO admin_tokens (token_sha256, name, created_at) VALUES ($1, $2, $3)")
                    .bind(token_sha256.to_vec())
                    .bind(name)
                    .bind(now())
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| unique_violation(e, "admin token"))?;
                tx.commit().await?;
                Ok(())
            }

            async fn admin_tokens(&self) -> Result<Vec<([u8; 32], String)>, StoreError> {
                let rows = sqlx::query("SELECT token_sha256, name FROM admin_tokens")
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter()
                    .map(|r| Ok((hash32(r.try_get("token_sha256")?, "admin token hash")?, r.try_get("name")?)))
                    .collect()
            }

            async fn newest_certificate_for_key(
                &self,
                agent: &str,
                key_id: &str,
                now: i64,
            ) -> Result<Option<(String, i64)>, StoreError> {
                let row = sqlx::query(NEWEST_CERTIFICATE_OF_KEY)
                .bind(agent)
                .bind(now)
                .bind(key_id)
                .fetch_optional(&self.pool)
                .await?;
                Ok(row
                    .map(|r| -> Result<_, sqlx::Error> { Ok((r.try_get("serial")?, r.try_get("not_after")?)) })
                    .transpose()?)
            }

            async fn certificates_of_agent_at(
                &self,
                agent: &str,
                at: i64,
                limit: i64,
            ) -> Result<Vec<CertificateRecord>, StoreError> {
                let rows = sqlx::query(
                    "SELECT * FROM certificates
                     WHERE agent_name = $1 AND not_before <= $2 AND not_after >= $2
                     ORDER BY not_after DESC LIMIT $3",
                )
                .bind(agent)
                .bind(at)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(Self::certificate_from_row).collect()
            }

            async fn revoke_certificate(
                &self,
                serial: &str,
                reason: &str,
                at: i64,
                audit: &AuditEvent,
            ) -> Result<CertificateRevocation, StoreError> {
                let mut tx = self.begin_write().await?;
                let row = sqlx::query(
                    "SELECT agent_name, key_id, public_key_sha256, revoked_at, revocation_reason
                     FROM certificates WHERE serial = $1",
                )
                .bind(serial)
                .fetch_optional(&mut *tx)
                .await?;
                let Some(row) = row else {
                    return Ok(CertificateRevocation::NotFound);
                };
                let agent: String = row.try_get("agent_name")?;
                let revoked_at: Option<i64> = row.try_get("revoked_at")?;
                let previous: Option<String> = row.try_get("revocation_reason")?;
                let compromise = reason == KEY_COMPROMISE;
                if let (Some(revoked_at), Some(previous)) = (revoked_at, &previous) {
                    // A compromise report bars the key even when this one
                    // certificate was revoked for something else before.
                    if previous != HOLD && (previous == KEY_COMPROMISE || !compromise) {
                        return Ok(CertificateRevocation::AlreadyRevoked {
                            revoked_at,
                            reason: previous.clone(),
                        });
                    }
                }
                // Serialized with issuance for this agent (see insert_certificates).
                Self::lock_agent(&mut tx, &agent).await?;
                let serials = if compromise {
                    let key = CompromisedKey {
                        public_key_sha256: row.try_get("public_key_sha256")?,
                        key_id: row.try_get("key_id")?,
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
                Self::append_audit(&mut tx, &event).await?;
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
                let (target, certificates) = match (transition, status.as_str()) {
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
                        sqlx::query(
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
                        sqlx::query(
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
                        sqlx::query(
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
                let mut serials = certificates
                    .iter()
                    .map(|r| r.try_get::<String, _>("serial"))
                    .collect::<Result<Vec<_>, _>>()?;
                if transition == (AgentTransition::Revoke { reason: KEY_COMPROMISE }) {
                    let keys = Self::agent_keys(&mut tx, name, at).await?;
                    for serial in Self::bar_compromised_keys(&mut tx, &keys, &format!("agent:{name}"), at).await? {
                        if !serials.contains(&serial) {
                            serials.push(serial);
                        }
                    }
                }
                let event = audit.clone().with("serials", serials.clone());
                Self::append_audit(&mut tx, &event).await?;
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
                let mut certificates = sqlx::query(REVOKED_CERTIFICATES)
                .bind(now)
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|r| -> Result<_, StoreError> {
                    Ok(RevokedCertificate {
                        serial: r.try_get("serial")?,
                        agent_name: r.try_get("agent_name")?,
                        revoked_at: r.try_get("revoked_at")?,
                        reason: r.try_get::<Option<String>, _>("revocation_reason")?
                            .unwrap_or_else(|| "unspecified".into()),
                        not_after: r.try_get("not_after")?,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
                certificates.sort_unstable_by(|a, b| a.serial.cmp(&b.serial));
                let mut inactive_agents = sqlx::query(INACTIVE_AGENTS)
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|r| -> Result<_, StoreError> { Ok((r.try_get("name")?, r.try_get("status")?)) })
                .collect::<Result<Vec<_>, _>>()?;
                inactive_agents.sort_unstable();
                let mut retired_keys = sqlx::query(LIVE_RETIRED_KEYS)
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|r| r.try_get::<String, _>("key_id"))
                .collect::<Result<Vec<_>, _>>()?;
                retired_keys.sort_unstable();
                let mut compromised_keys = sqlx::query(
                    "SELECT key_id FROM compromised_keys WHERE key_id IS NOT NULL",
                )
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|r| r.try_get::<String, _>("key_id"))
                .collect::<Result<Vec<_>, _>>()?;
                compromised_keys.sort_unstable();
                Ok(RevocationSnapshot {
                    certificates,
                    inactive_agents,
                    retired_keys,
                    compromised_keys,
                })
            }

            async fn rotate_agent_key(
                &self,
                name: &str,
                rotation: &KeyRotation<'_>,
                audit: &AuditEvent,
            ) -> Result<KeyRotationOutcome, StoreError> {
                let mut tx = self.begin_write().await?;
                let row = sqlx::query(
                    "UPDATE agents SET status = status WHERE name = $1
                     RETURNING status, key_id, public_key_der, key_wrapped",
                )
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
                let Some(row) = row else {
                    return Ok(KeyRotationOutcome::NotFound);
                };
                let status: String = row.try_get("status")?;
                let old_key: Option<String> = row.try_get("key_id")?;
                let old_public: Option<Vec<u8>> = row.try_get("public_key_der")?;
                let old_wrapped: Option<Vec<u8>> = row.try_get("key_wrapped")?;
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
                    sqlx::query(REVOKE_CERTIFICATES_OF_KEY)
                    .bind(rotation.at)
                    .bind(rotation.reason)
                    .bind(name)
                    .bind(&old_key)
                    .fetch_all(&mut *tx)
                    .await?
                    .iter()
                    .map(|r| r.try_get::<String, _>("serial"))
                    .collect::<Result<Vec<_>, _>>()?
                };
                let event = audit
                    .clone()
                    .with("old_key_id", old_key.clone())
                    .with("revoked_serials", revoked.clone());
                Self::append_audit(&mut tx, &event).await?;
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
                sqlx::query(
                    "SELECT a.name, a.scopes, a.key_id,
                         COALESCE((SELECT MAX(r.retired_at) FROM retired_keys r
                                   WHERE r.agent_name = a.name), a.created_at) AS current_since
                     FROM agents a WHERE a.status = 'active' AND a.key_id IS NOT NULL
                     ORDER BY a.name",
                )
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|r| -> Result<_, StoreError> {
                    let scopes: String = r.try_get("scopes")?;
                    Ok(CustodialKeyAge {
                        agent_name: r.try_get("name")?,
                        scopes: serde_json::from_str(&scopes)
                            .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                        key_id: r.try_get("key_id")?,
                        current_since: r.try_get("current_since")?,
                    })
                })
                .collect()
            }

            async fn retired_key(&self, key_id: &str) -> Result<Option<RetiredKey>, StoreError> {
                sqlx::query("SELECT * FROM retired_keys WHERE key_id = $1")
                    .bind(key_id)
                    .fetch_optional(&self.pool)
                    .await?
                    .as_ref()
                    .map(Self::retired_key_from_row)
                    .transpose()
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
                sqlx::query(
                    "SELECT * FROM retired_keys WHERE destroyed_at IS NULL AND destroy_after <= $1
                     ORDER BY destroy_after LIMIT 100",
                )
                .bind(now)
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(Self::retired_key_from_row)
                .collect()
            }

            async fn mark_key_destroyed(
                &self,
                key_id: &str,
                at: i64,
                audit: &AuditEvent,
            ) -> Result<(), StoreError> {
                let mut tx = self.pool.begin().await?;
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
                    Self::append_audit(&mut tx, audit).await?;
                    tx.commit().await?;
                }
                Ok(())
            }

            async fn insert_policy(
                &self,
                content: &str,
                author: &str,
                source: &str,
                audit: &AuditEvent,
            ) -> Result<PolicyRecord, StoreError> {
                use sha2::Digest;
                let mut tx = self.pool.begin().await?;
                let latest: Option<i64> = sqlx::query("SELECT MAX(version) AS latest FROM policies")
                    .fetch_one(&mut *tx)
                    .await?
                    .try_get("latest")?;
                let record = PolicyRecord {
                    version: latest.unwrap_or(0) + 1,
                    content: content.to_owned(),
                    content_sha256: hex::encode(sha2::Sha256::digest(content.as_bytes())),
                    author: author.to_owned(),
                    source: source.to_owned(),
                    created_at: now(),
                };
                let event = audit
                    .clone()
                    .with("version", record.version)
                    .with("content_sha256", record.content_sha256.clone());
                Self::append_audit(&mut tx, &event).await?;
                sqlx::query(
                    "INSERT INTO policies (version, content, content_sha256, author, source, created_at)
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(record.version)
                .bind(&record.content)
                .bind(&record.content_sha256)
                .bind(&record.author)
                .bind(&record.source)
                .bind(record.created_at)
                .execute(&mut *tx)
                .await
                .map_err(|e| unique_violation(e, "policy version"))?;
                tx.commit().await?;
                Ok(record)
            }

            async fn latest_policy_version(&self) -> Result<i64, StoreError> {
                let latest: Option<i64> = sqlx::query("SELECT MAX(version) AS latest FROM policies")
                    .fetch_one(&self.pool)
                    .await?
                    .try_get("latest")?;
                Ok(latest.unwrap_or(0))
            }

            async fn policy(&self, version: i64) -> Result<Option<PolicyRecord>, StoreError> {
                sqlx::query("SELECT * FROM policies WHERE version = $1")
                    .bind(version)
                    .fetch_optional(&self.pool)
                    .await?
                    .as_ref()
                    .map(Self::policy_from_row)
                    .transpose()
            }

            async fn policies_page(&self, after: Option<i64>, limit: i64) -> Result<Vec<PolicyRecord>, StoreError> {
                sqlx::query("SELECT * FROM policies WHERE ($1 IS NULL OR version > $1) ORDER BY version LIMIT $2")
                    .bind(after)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?
                    .iter()
                    .map(Self::policy_from_row)
                    .collect()
            }

            async fn insert_approval(
                &self,
                a: &ApprovalRecord,
                audit: &AuditEvent,
            ) -> Result<(), StoreError> {
                let mut tx = self.pool.begin().await?;
                Self::append_audit(&mut tx, audit).await?;
                sqlx::query(
                    "INSERT INTO approvals (id, agent_name, kind, request, approvals_required,
                         policy_version, status, created_at, expires_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                )
                .bind(&a.id)
                .bind(&a.agent_name)
                .bind(&a.kind)
                .bind(&a.request)
                .bind(a.approvals_required)
                .bind(a.policy_version)
                .bind(&a.status)
                .bind(a.created_at)
                .bind(a.expires_at)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn approval(&self, id: &str) -> Result<Option<ApprovalRecord>, StoreError> {
                sqlx::query("SELECT * FROM approvals WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?
                    .as_ref()
                    .map(Self::approval_from_row)
                    .transpose()
            }

            async fn pending_approvals_page(
                &self,
                now: i64,
                after: Option<(i64, &str)>,
                limit: i64,
            ) -> Result<Vec<ApprovalRecord>, StoreError> {
                let (created_at, id) = after.unzip();
                sqlx::query(
                    "SELECT * FROM approvals WHERE status = 'pending' AND expires_at > $1
                       AND ($2 IS NULL OR created_at > $2 OR (created_at = $2 AND id > $3))
                     ORDER BY created_at, id LIMIT $4",
                )
                .bind(now)
                .bind(created_at)
                .bind(id)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(Self::approval_from_row)
                .collect()
            }

            async fn vote_on_approval(
                &self,
                id: &str,
                admin: &str,
                approve: bool,
                comment: Option<&str>,
                now: i64,
                audit: &AuditEvent,
            ) -> Result<VoteOutcome, StoreError> {
                let mut tx = self.pool.begin().await?;
                // Locks the row: concurrent votes are counted one at a time.
                let row = sqlx::query(
                    "UPDATE approvals SET status = status WHERE id = $1
                     RETURNING status, expires_at, approvals_required",
                )
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
                let Some(row) = row else {
                    return Ok(VoteOutcome::NotFound);
                };
                let status: String = row.try_get("status")?;
                let expires_at: i64 = row.try_get("expires_at")?;
                let required: i64 = row.try_get("approvals_required")?;
                if status != "pending" {
                    return Ok(VoteOutcome::NotPending { status });
                }
                if now >= expires_at {
                    sqlx::query("UPDATE approvals SET status = 'expired' WHERE id = $1")
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await?;
                    return Ok(VoteOutcome::NotPending {
                        status: "expired".into(),
                    });
                }
                let inserted = sqlx::query(
                    "INSERT INTO approval_votes (approval_id, admin, approve, comment, at)
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(id)
                .bind(admin)
                .bind(i64::from(approve))
                .bind(comment)
                .bind(now)
                .execute(&mut *tx)
                .await;
                match inserted {
                    Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                        return Ok(VoteOutcome::AlreadyVoted)
                    }
                    other => {
                        other?;
                    }
                }
                let approvals: i64 = sqlx::query(
                    "SELECT COUNT(*) AS n FROM approval_votes WHERE approval_id = $1 AND approve = 1",
                )
                .bind(id)
                .fetch_one(&mut *tx)
                .await?
                .try_get("n")?;
                let new_status = if !approve {
                    "denied"
                } else if approvals >= required {
                    "approved"
                } else {
                    "pending"
                };
                if new_status != "pending" {
                    sqlx::query("UPDATE approvals SET status = $1, decided_at = $2 WHERE id = $3")
                        .bind(new_status)
                        .bind(now)
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                }
                let event = audit
                    .clone()
                    .with("approve", approve)
                    .with("approvals", approvals)
                    .with("status", new_status);
                Self::append_audit(&mut tx, &event).await?;
                tx.commit().await?;
                Ok(VoteOutcome::Recorded {
                    status: new_status.to_owned(),
                    approvals,
                })
            }

            async fn finish_approval(
                &self,
                id: &str,
                status: &str,
                result: &str,
            ) -> Result<(), StoreError> {
                sqlx::query("UPDATE approvals SET status = $1, result = $2 WHERE id = $3")
                    .bind(status)
                    .bind(result)
                    .bind(id)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn insert_enrollment_token(
                &self,
                token_sha256: &[u8; 32],
                agent: &str,
                expires_at: i64,
                audit: &AuditEvent,
            ) -> Result<(), StoreError> {
                let mut tx = self.pool.begin().await?;
                Self::append_audit(&mut tx, audit).await?;
                sqlx::query(
                    "INSERT INTO enrollment_tokens (token_sha256, agent_name, created_at, expires_at)
                     VALUES ($1, $2, $3, $4)",
                )
                .bind(token_sha256.to_vec())
                .bind(agent)
                .bind(now())
                .bind(expires_at)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn redeem_enrollment_token(
                &self,
                token_sha256: &[u8; 32],
                now: i64,
                audit: &AuditEvent,
            ) -> Result<Option<String>, StoreError> {
                let mut tx = self.pool.begin().await?;
                let row = sqlx::query(
                    "UPDATE enrollment_tokens SET used_at = $1
                     WHERE token_sha256 = $2 AND used_at IS NULL AND expires_at > $1
                     RETURNING agent_name",
                )
                .bind(now)
                .bind(token_sha256.to_vec())
                .fetch_optional(&mut *tx)
                .await?;
                let Some(row) = row else {
                    return Ok(None);
                };
                let agent: String = row.try_get("agent_name")?;
                Self::append_audit(&mut tx, &audit.clone().with("agent", agent.clone())).await?;
                tx.commit().await?;
                Ok(Some(agent))
            }

            async fn enrollment_token_agent(
                &self,
                token_sha256: &[u8; 32],
                now: i64,
            ) -> Result<Option<String>, StoreError> {
                let row = sqlx::query(
                    "SELECT agent_name FROM enrollment_tokens
                     WHERE token_sha256 = $1 AND used_at IS NULL AND expires_at > $2",
                )
                .bind(token_sha256.to_vec())
                .bind(now)
                .fetch_optional(&self.pool)
                .await?;
                Ok(row.map(|r| r.try_get("agent_name")).transpose()?)
            }

            async fn insert_tpm_challenge(
                &self,
                challenge: &TpmChallengeRecord,
                audit: &AuditEvent,
            ) -> Result<(), StoreError> {
                let mut tx = self.pool.begin().await?;
                Self::append_audit(&mut tx, audit).await?;
                sqlx::query(
                    "INSERT INTO tpm_challenges (nonce, agent_name, secret_sha256, ak_public,
                        ek_sha256, key_location, created_at, expires_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(&challenge.nonce)
                .bind(&challenge.agent_name)
                .bind(challenge.secret_sha256.to_vec())
                .bind(&challenge.ak_public)
                .bind(challenge.ek_sha256.to_vec())
                .bind(&challenge.key_location)
                .bind(challenge.created_at)
                .bind(challenge.expires_at)
                .execute(&mut *tx)
                .await
                .map_err(|e| unique_violation(e, "challenge"))?;
                tx.commit().await?;
                Ok(())
            }

            async fn tpm_challenge(
                &self,
                nonce: &[u8],
            ) -> Result<Option<TpmChallengeRecord>, StoreError> {
                let row = sqlx::query("SELECT * FROM tpm_challenges WHERE nonce = $1")
                    .bind(nonce)
                    .fetch_optional(&self.pool)
                    .await?;
                let Some(row) = row else {
                    return Ok(None);
                };
                Ok(Some(TpmChallengeRecord {
                    nonce: row.try_get("nonce")?,
                    agent_name: row.try_get("agent_name")?,
                    secret_sha256: hash32(row.try_get("secret_sha256")?, "challenge secret hash")?,
                    ak_public: row.try_get("ak_public")?,
                    ek_sha256: hash32(
                        row.try_get("ek_sha256")?,
                        "EK certificate hash",
                    )?,
                    key_location: row.try_get("key_location")?,
                    created_at: row.try_get("created_at")?,
                    expires_at: row.try_get("expires_at")?,
                    used_at: row.try_get("used_at")?,
                }))
            }

            async fn delete_expired_tpm_challenges(&self, before: i64) -> Result<u64, StoreError> {
                let done = sqlx::query("DELETE FROM tpm_challenges WHERE expires_at < $1")
                    .bind(before)
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected())
            }

            async fn open_tpm_challenges(&self, agent: &str, now: i64) -> Result<i64, StoreError> {
                let row = sqlx::query(
                    "SELECT COUNT(*) AS open FROM tpm_challenges
                     WHERE agent_name = $1 AND used_at IS NULL AND expires_at > $2",
                )
                .bind(agent)
                .bind(now)
                .fetch_one(&self.pool)
                .await?;
                Ok(row.try_get("open")?)
            }

            async fn redeem_tpm_challenge(
                &self,
                nonce: &[u8],
                token_sha256: &[u8; 32],
                now: i64,
                audit: &AuditEvent,
            ) -> Result<TpmRedemption, StoreError> {
                let mut tx = self.pool.begin().await?;
                let challenge = sqlx::query(
                    "UPDATE tpm_challenges SET used_at = $1
                     WHERE nonce = $2 AND used_at IS NULL AND expires_at > $1
                     RETURNING agent_name",
                )
                .bind(now)
                .bind(nonce)
                .fetch_optional(&mut *tx)
                .await?;
                let Some(challenge) = challenge else {
                    return Ok(TpmRedemption::ChallengeSpent);
                };
                let agent: String = challenge.try_get("agent_name")?;
                let token = sqlx::query(
                    "UPDATE enrollment_tokens SET used_at = $1
                     WHERE token_sha256 = $2 AND agent_name = $3
                       AND used_at IS NULL AND expires_at > $1",
                )
                .bind(now)
                .bind(token_sha256.to_vec())
                .bind(&agent)
                .execute(&mut *tx)
                .await?;
                if token.rows_affected() != 1 {
                    return Ok(TpmRedemption::TokenInvalid);
                }
                Self::append_audit(&mut tx, audit).await?;
                tx.commit().await?;
                Ok(TpmRedemption::Redeemed)
            }

            async fn insert_hook(
                &self,
                url: &str,
                secret: &str,
                audit: &AuditEvent,
            ) -> Result<HookRecord, StoreError> {
                let mut tx = self.pool.begin().await?;
                Self::append_audit(&mut tx, audit).await?;
                let row = sqlx::query(
                    "INSERT INTO hooks (url, secret, active, created_at) VALUES ($1, $2, 1, $3)
                     RETURNING *",
                )
                .bind(url)
                .bind(secret)
                .bind(now())
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| unique_violation(e, "hook"))?;
                let hook = Self::hook_from_row(&row)?;
                tx.commit().await?;
                Ok(hook)
            }

            async fn hooks(&self) -> Result<Vec<HookRecord>, StoreError> {
                sqlx::query("SELECT * FROM hooks WHERE active = 1 ORDER BY id")
                    .fetch_all(&self.pool)
                    .await?
                    .iter()
                    .map(Self::hook_from_row)
                    .collect()
            }

            async fn hooks_page(&self, after: Option<i64>, limit: i64) -> Result<Vec<HookRecord>, StoreError> {
                sqlx::query("SELECT * FROM hooks WHERE active = 1 AND ($1 IS NULL OR id > $1) ORDER BY id LIMIT $2")
                    .bind(after)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?
                    .iter()
                    .map(Self::hook_from_row)
                    .collect()
            }

            async fn deactivate_hook(&self, id: i64, audit: &AuditEvent) -> Result<bool, StoreError> {
                let mut tx = self.pool.begin().await?;
                let changed = sqlx::query("UPDATE hooks SET active = 0 WHERE id = $1 AND active = 1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if changed == 0 {
                    return Ok(false);
                }
                Self::append_audit(&mut tx, audit).await?;
                tx.commit().await?;
                Ok(true)
            }

            async fn lease_hook_deliveries(
                &self,
                now: i64,
                lease_secs: i64,
            ) -> Result<Vec<HookDelivery>, StoreError> {
                // The oldest undelivered row per hook, and only if it is
                // due and free: a later event never overtakes an earlier
                // one that is waiting for a retry.
                let rows = sqlx::query(
                    "UPDATE hook_deliveries SET lease_until = $1 + $2
                     WHERE id IN (
                         SELECT MIN(d.id) FROM hook_deliveries d JOIN hooks h ON h.id = d.hook_id
                         WHERE d.delivered_at IS NULL AND h.active = 1
                         GROUP BY d.hook_id)
                       AND next_attempt_at <= $1
                       AND (lease_until IS NULL OR lease_until < $1)
                     RETURNING id, hook_id, event, attempts",
                )
                .bind(now)
                .bind(lease_secs)
                .fetch_all(&self.pool)
                .await?;
                rows.iter()
                    .map(|r| -> Result<_, StoreError> {
                        Ok(HookDelivery {
                            id: r.try_get("id")?,
                            hook_id: r.try_get("hook_id")?,
                            event: r.try_get("event")?,
                            attempts: r.try_get("attempts")?,
                        })
                    })
                    .collect()
            }

            async fn hook_delivered(&self, id: i64, at: i64) -> Result<(), StoreError> {
                sqlx::query(
                    "UPDATE hook_deliveries SET delivered_at = $1, attempts = attempts + 1,
                         lease_until = NULL, last_error = NULL
                     WHERE id = $2",
                )
                .bind(at)
                .bind(id)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn hook_failed(
                &self,
                id: i64,
                next_attempt_at: i64,
                error: &str,
            ) -> Result<(), StoreError> {
                sqlx::query(
                    "UPDATE hook_deliveries SET attempts = attempts + 1, next_attempt_at = $1,
                         lease_until = NULL, last_error = $2
                     WHERE id = $3",
                )
                .bind(next_attempt_at)
                .bind(error)
                .bind(id)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn pending_hook_deliveries(&self) -> Result<i64, StoreError> {
                let row = sqlx::query(
                    "SELECT COUNT(*) AS pending FROM hook_deliveries WHERE delivered_at IS NULL",
                )
                .fetch_one(&self.pool)
                .await?;
                Ok(row.try_get("pending")?)
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

            async fn key_compromised_at(&self, public_key_sha256: &str) -> Result<Option<i64>, StoreError> {
                let row = sqlx::query("SELECT compromised_at FROM compromised_keys WHERE public_key_sha256 = $1")
                    .bind(public_key_sha256)
                    .fetch_optional(&self.pool)
                    .await?;
                Ok(row.map(|r| r.try_get("compromised_at")).transpose()?)
            }

            async fn append_audit_event(&self, event: &AuditEvent) -> Result<(), StoreError> {
                let mut tx = self.pool.begin().await?;
                Self::append_audit(&mut tx, event).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn next_crl_number(&self) -> Result<i64, StoreError> {
                let row = sqlx::query("UPDATE crl_state SET number = number + 1 WHERE id = 1 RETURNING number")
                    .fetch_one(&self.pool)
                    .await?;
                Ok(row.try_get("number")?)
            }

            async fn insert_signatures(&self, records: &[SignatureRecord]) -> Result<(), StoreError> {
                if records.is_empty() {
                    return Ok(());
                }
                let event = super::signature_batch_event(records);
                let mut tx = self.pool.begin().await?;
                let seq = Self::append_audit(&mut tx, &event).await?;
                // One statement per chunk; 9 binds a row stays far below
                // PostgreSQL's 65535-parameter limit.
                for chunk in records.chunks(1000) {
                    let mut insert = QueryBuilder::<$db>::new(
                        "INSERT INTO signatures (request_id, agent_name, key_id, digest, purpose, \
                         message, policy_version, signed_at_ms, audit_seq) ",
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

            async fn audit_records(&self, after_seq: i64, limit: i64) -> Result<Vec<AuditRecord>, StoreError> {
                let rows = sqlx::query(
                    "SELECT * FROM audit_events WHERE seq > $1 ORDER BY seq LIMIT $2",
                )
                .bind(after_seq)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
                rows.iter()
                    .map(|r| -> Result<_, StoreError> {
                        let details: String = r.try_get("details")?;
                        Ok(AuditRecord {
                            seq: r.try_get("seq")?,
                            at: r.try_get("at")?,
                            event: AuditEvent {
                                actor: r.try_get("actor")?,
                                action: r.try_get("action")?,
                                subject: r.try_get("subject")?,
                                details: serde_json::from_str(&details)
                                    .map_err(|e| StoreError::Corrupt(format!("audit details: {e}")))?,
                            },
                            prev_hash: hash32(r.try_get("prev_hash")?, "audit prev_hash")?,
                            hash: hash32(r.try_get("hash")?, "audit hash")?,
                        })
                    })
                    .collect()
            }
        }
    };
}

impl_store!(Sqlite);
impl_store!(Postgres);

#[cfg(test)]
mod tests {
    use super::*;

    /// SQLite's plan for each frequent statement names the index it reads.
    /// Without statistics (keyward runs no ANALYZE) the plan on an empty
    /// database is the plan on a large one.
    #[tokio::test]
    async fn frequent_reads_use_their_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("plans.db").display());
        let store = crate::store::open(&url, 1, true).await.unwrap();
        drop(store);
        let conn = rusqlite::Connection::open(dir.path().join("plans.db")).unwrap();
        for (statement, index) in [
            (NEWEST_CERTIFICATE_OF_KEY, "certificates_by_agent"),
            (REVOKE_CERTIFICATES_OF_KEY, "certificates_by_agent"),
            (REVOKED_CERTIFICATES, "certificates_revoked"),
            (INACTIVE_AGENTS, "agents_inactive"),
            (LIVE_RETIRED_KEYS, "retired_keys_due"),
            (CERTIFICATES_OF_AGENT_PAGE, "certificates_by_agent_created"),
        ] {
            let sqlite_statement = statement.replace('$', "?");
            let mut plan = conn
                .prepare(&format!("EXPLAIN QUERY PLAN {sqlite_statement}"))
                .unwrap();
            let unbound = std::iter::repeat_n(rusqlite::types::Null, plan.parameter_count());
            let steps: Vec<String> = plan
                .query_map(rusqlite::params_from_iter(unbound), |row| {
                    row.get::<_, String>(3)
                })
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert!(
                steps
                    .iter()
                    .any(|step| step.contains(&format!("USING INDEX {index}"))),
                "{statement}\nplanned as {steps:?}, not through {index}"
            );
            // A page must not sort everything that matches to return a few.
            assert!(
                !steps.iter().any(|step| step.contains("TEMP B-TREE")),
                "{statement}\nplanned as {steps:?}: sorts its rows"
            );
        }
    }
}
