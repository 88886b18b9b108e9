//! The audit trail: the one way events join the hash chain
//! ([`SqlStore::append_audit`], inside the transaction of the change they
//! record) and reading the chain back.
//!
//! A list of events is appended in three statements however many there
//! are; a single event is a list of one. The SQLite writer threads of the
//! signature and certificate logs (rusqlite, see `signature_log`) append
//! with [`append_audit_sqlite`]: the same statements and the same links.

use std::ops::Range;

use async_trait::async_trait;
use sqlx::{Postgres, QueryBuilder, Sqlite, Transaction};

use super::sql::{hash32, now, SqlStore};
use super::StoreError;
use crate::audit::{chain_hash, AuditEvent, AuditRecord};

#[async_trait]
pub trait AuditStore: Send + Sync {
    /// Appends an event that records no other change (e.g. a failing hook).
    async fn append_audit_event(&self, event: &AuditEvent) -> Result<(), StoreError>;

    /// The audit trail from `after_seq` on, oldest first, at most `limit` rows.
    async fn audit_records(
        &self,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<AuditRecord>, StoreError>;
}

/// Takes the next `$1` sequence numbers. Updating the head row first takes
/// its write lock, which serializes appends across connections and
/// replicas.
const ADVANCE_HEAD: &str = "UPDATE audit_head SET seq = seq + $1 WHERE id = 1 RETURNING seq, hash";
/// Followed by one `VALUES` row per event.
const INSERT_EVENTS: &str =
    "INSERT INTO audit_events (seq, at, actor, action, subject, details, prev_hash, hash) ";
/// `INSERT_EVENTS` for one event: what a prepared statement repeats.
const INSERT_EVENT: &str =
    "INSERT INTO audit_events (seq, at, actor, action, subject, details, prev_hash, hash)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";
const SET_HEAD_HASH: &str = "UPDATE audit_head SET hash = $1 WHERE id = 1";

/// The chain's head as `ADVANCE_HEAD` leaves it: the last number taken,
/// and the hash of the row before the first.
#[derive(sqlx::FromRow)]
struct Head {
    seq: i64,
    hash: Vec<u8>,
}

/// One row of the chain.
struct Link<'a> {
    seq: i64,
    event: &'a AuditEvent,
    prev_hash: [u8; 32],
    hash: [u8; 32],
}

/// Chains `events`, numbered `seqs` and all recorded `at`, onto a chain
/// whose last hash is `prev`; returns the rows and the new last hash.
fn link<'a>(
    mut prev: [u8; 32],
    seqs: Range<i64>,
    at: i64,
    events: &[&'a AuditEvent],
) -> (Vec<Link<'a>>, [u8; 32]) {
    let links = seqs
        .zip(events)
        .map(|(seq, event)| {
            let hash = chain_hash(&prev, seq, at, event);
            let link = Link {
                seq,
                event,
                prev_hash: prev,
                hash,
            };
            prev = hash;
            link
        })
        .collect();
    (links, prev)
}

/// The numbers `count` events take when `last` is the last of them.
fn numbers(last: i64, count: i64) -> Range<i64> {
    last - count + 1..last + 1
}

#[derive(sqlx::FromRow)]
struct AuditRow {
    seq: i64,
    at: i64,
    actor: String,
    action: String,
    subject: String,
    details: String,
    prev_hash: Vec<u8>,
    hash: Vec<u8>,
}

impl TryFrom<AuditRow> for AuditRecord {
    type Error = StoreError;

    fn try_from(row: AuditRow) -> Result<Self, StoreError> {
        Ok(AuditRecord {
            seq: row.seq,
            at: row.at,
            event: AuditEvent {
                actor: row.actor,
                action: row.action,
                subject: row.subject,
                details: serde_json::from_str(&row.details)
                    .map_err(|e| StoreError::Corrupt(format!("audit details: {e}")))?,
            },
            prev_hash: hash32(row.prev_hash, "audit prev_hash")?,
            hash: hash32(row.hash, "audit hash")?,
        })
    }
}

/// [`SqlStore::append_audit`] on a rusqlite connection, in its
/// transaction: the same statements, a row at a time through one prepared
/// statement.
pub(super) fn append_audit_sqlite(
    tx: &rusqlite::Transaction<'_>,
    events: &[&AuditEvent],
) -> rusqlite::Result<Range<i64>> {
    use rusqlite::params;
    let count = events.len() as i64;
    if count == 0 {
        return Ok(0..0);
    }
    let (last, prev): (i64, Vec<u8>) = tx
        .prepare_cached(ADVANCE_HEAD)?
        .query_row(params![count], |row| Ok((row.get(0)?, row.get(1)?)))?;
    let prev: [u8; 32] = prev.try_into().map_err(|_| {
        rusqlite::Error::InvalidColumnType(1, "hash".into(), rusqlite::types::Type::Blob)
    })?;
    let seqs = numbers(last, count);
    let at = now();
    let (links, head) = link(prev, seqs.clone(), at, events);
    let mut insert = tx.prepare_cached(INSERT_EVENT)?;
    for link in &links {
        insert.execute(params![
            link.seq,
            at,
            link.event.actor,
            link.event.action,
            link.event.subject,
            link.event.details.to_string(),
            link.prev_hash,
            link.hash
        ])?;
    }
    tx.prepare_cached(SET_HEAD_HASH)?.execute(params![head])?;
    Ok(seqs)
}

macro_rules! impl_audit_store {
    ($db:ty) => {
        impl SqlStore<$db> {
            /// Appends `events` to the chain in this order, inside `tx`, in
            /// three statements however many there are: one write
            /// transaction's worth of certificates costs the database a few
            /// round trips, not a few per certificate. Returns the sequence
            /// numbers they took (none for no events: the head is then not
            /// touched, nor its lock taken).
            pub(super) async fn append_audit(
                tx: &mut Transaction<'_, $db>,
                events: &[&AuditEvent],
            ) -> Result<Range<i64>, StoreError> {
                let Ok(count) = i64::try_from(events.len()) else {
                    return Err(StoreError::Corrupt("too many audit events".into()));
                };
                if count == 0 {
                    return Ok(0..0);
                }
                let head: Head = sqlx::query_as(ADVANCE_HEAD)
                    .bind(count)
                    .fetch_one(&mut **tx)
                    .await?;
                let seqs = numbers(head.seq, count);
                let at = now();
                let prev = hash32(head.hash, "audit head hash")?;
                let (links, head) = link(prev, seqs.clone(), at, events);
                // 8 binds a row: far below either database's limit.
                for chunk in links.chunks(1000) {
                    let mut insert = QueryBuilder::<$db>::new(INSERT_EVENTS);
                    insert.push_values(chunk, |mut row, link| {
                        row.push_bind(link.seq)
                            .push_bind(at)
                            .push_bind(&link.event.actor)
                            .push_bind(&link.event.action)
                            .push_bind(&link.event.subject)
                            .push_bind(link.event.details.to_string())
                            .push_bind(link.prev_hash.to_vec())
                            .push_bind(link.hash.to_vec());
                    });
                    insert.build().execute(&mut **tx).await?;
                }
                sqlx::query(SET_HEAD_HASH)
                    .bind(head.to_vec())
                    .execute(&mut **tx)
                    .await?;
                Ok(seqs)
            }
        }

        #[async_trait]
        impl AuditStore for SqlStore<$db> {
            async fn append_audit_event(&self, event: &AuditEvent) -> Result<(), StoreError> {
                let mut tx = self.begin_write().await?;
                Self::append_audit(&mut tx, &[event]).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn audit_records(
                &self,
                after_seq: i64,
                limit: i64,
            ) -> Result<Vec<AuditRecord>, StoreError> {
                sqlx::query_as::<_, AuditRow>(
                    "SELECT * FROM audit_events WHERE seq > $1 ORDER BY seq LIMIT $2",
                )
                .bind(after_seq)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
                .into_iter()
                .map(AuditRecord::try_from)
                .collect()
            }
        }
    };
}

impl_audit_store!(Sqlite);
impl_audit_store!(Postgres);
