//! The audit log: the one way events become entries
//! ([`SqlStore::append_audit`], inside the transaction of the change they
//! record), reading entries back and searching them, and the tree's tiles
//! and signed checkpoints.
//!
//! A list of events is appended in three statements however many there
//! are; a single event is a list of one. The SQLite writer threads of the
//! signature and certificate logs (rusqlite, see `signature_log`) append
//! with [`append_audit_sqlite`]: the same statements, the same entries.
//!
//! Numbering: `audit_head.seq` is the number of entries. Each append
//! updates it first, which takes its row lock until the transaction ends,
//! so appends on every connection and every replica are serialized, take
//! consecutive indexes, and commit in index order: the committed entries
//! are always the first `seq`, with no gap for the tree builder to trip
//! on. (A transaction that rolls back gives its numbers back with its head
//! update.)

use std::ops::Range;

use async_trait::async_trait;
use sqlx::{Postgres, QueryBuilder, Sqlite, Transaction};

use super::sql::{hash32, now_ms, SqlStore};
use super::StoreError;
use crate::audit::merkle::{leaf_hash, NodeHash};
use crate::audit::tiles::BuiltTile;
use crate::audit::{AuditEntry, AuditEvent, AuditQuery, AuditRecord};

/// A signed checkpoint as stored and served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredCheckpoint {
    pub size: u64,
    pub root: [u8; 32],
    /// The C2SP signed note.
    pub note: String,
    pub signed_at_ms: i64,
}

#[async_trait]
pub trait AuditStore: Send + Sync {
    /// Appends an event that records no other change (e.g. a failing hook).
    async fn append_audit_event(&self, event: &AuditEvent) -> Result<(), StoreError>;

    /// Entries from index `from` on, oldest first, at most `limit`.
    async fn audit_records(&self, from: u64, limit: i64) -> Result<Vec<AuditRecord>, StoreError>;

    /// The number of entries committed.
    async fn audit_size(&self) -> Result<u64, StoreError>;

    /// The entries in `range` with their indexes, in order (fewer if the
    /// log is shorter, or rows are missing), as the bytes stored.
    async fn audit_entries(&self, range: Range<u64>) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;

    /// The leaf hashes of the entries in `range` with their indexes, as
    /// `audit_entries` would give them: what sealing and the self-check
    /// read, hashed where the rows are read.
    async fn audit_leaf_hashes(
        &self,
        range: Range<u64>,
    ) -> Result<Vec<(u64, NodeHash)>, StoreError>;

    async fn search_audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError>;

    /// A tile's hashes as stored (a partial tile: the widest written).
    async fn audit_tile(&self, level: u8, index: u64) -> Result<Option<Vec<u8>>, StoreError>;

    /// The checkpoint of the largest tree signed so far.
    async fn latest_checkpoint(&self) -> Result<Option<StoredCheckpoint>, StoreError>;

    /// Stores `checkpoint` and the tiles that grew to make it, if the
    /// latest checkpoint is still `previous` (its size; `None`: there is
    /// none). False, with nothing written, when another replica got there
    /// first.
    async fn record_checkpoint(
        &self,
        previous: Option<u64>,
        tiles: &[BuiltTile],
        checkpoint: &StoredCheckpoint,
    ) -> Result<bool, StoreError>;
}

/// Takes the next `$1` indexes; returns the entry count after them.
const ADVANCE_HEAD: &str = "UPDATE audit_head SET seq = seq + $1 WHERE id = 1 RETURNING seq";
/// Followed by one `VALUES` row per event.
const INSERT_ENTRIES: &str = "INSERT INTO audit_entries (idx, at_ms, actor, action, agent, entry) ";
/// `INSERT_ENTRIES` for one event: what a prepared statement repeats.
const INSERT_ENTRY: &str = "INSERT INTO audit_entries (idx, at_ms, actor, action, agent, entry)
     VALUES ($1, $2, $3, $4, $5, $6)";
const ENTRY_COUNT: &str = "SELECT seq FROM audit_head WHERE id = 1";
const LATEST_CHECKPOINT: &str =
    "SELECT size, root, note, signed_at_ms FROM audit_checkpoints ORDER BY size DESC LIMIT 1";
/// Followed by one `VALUES` row per tile, then `UPSERT_TILES_WIDER`.
const INSERT_TILES: &str = "INSERT INTO audit_tiles (level, idx, hashes) ";
/// A partial tile is only ever replaced by a wider one: a replica behind
/// another cannot narrow a tile a served checkpoint needs.
const UPSERT_TILES_WIDER: &str = " ON CONFLICT (level, idx) DO UPDATE SET hashes = excluded.hashes
     WHERE length(excluded.hashes) > length(audit_tiles.hashes)";

/// Each tile of `tiles` once, the widest given: one statement may not
/// upsert a row twice (PostgreSQL refuses it).
fn widest_tiles(tiles: &[BuiltTile]) -> Vec<&BuiltTile> {
    let mut widest = std::collections::BTreeMap::new();
    for tile in tiles {
        widest
            .entry((tile.level, tile.index))
            .and_modify(|kept: &mut &BuiltTile| {
                if tile.hashes.len() > kept.hashes.len() {
                    *kept = tile;
                }
            })
            .or_insert(tile);
    }
    widest.into_values().collect()
}

/// One entry to insert.
struct NewEntry<'a> {
    index: i64,
    event: &'a AuditEvent,
    entry: String,
}

/// The entries `events` become when `count_after` is the entry count
/// after them, all recorded `at_ms`.
fn entries<'a>(count_after: i64, at_ms: i64, events: &[&'a AuditEvent]) -> Vec<NewEntry<'a>> {
    let first = count_after - events.len() as i64;
    let time = crate::audit::entry_time(at_ms);
    events
        .iter()
        .enumerate()
        .map(|(i, event)| {
            let index = first + i as i64;
            NewEntry {
                index,
                event,
                entry: event.to_entry(index as u64, &time),
            }
        })
        .collect()
}

fn indexes(entries: &[NewEntry<'_>]) -> Range<i64> {
    match (entries.first(), entries.last()) {
        (Some(first), Some(last)) => first.index..last.index + 1,
        _ => 0..0,
    }
}

#[derive(sqlx::FromRow)]
struct EntryRow {
    idx: i64,
    at_ms: i64,
    entry: String,
}

impl TryFrom<EntryRow> for AuditRecord {
    type Error = StoreError;

    fn try_from(row: EntryRow) -> Result<Self, StoreError> {
        let parsed: AuditEntry = serde_json::from_str(&row.entry)
            .map_err(|e| StoreError::Corrupt(format!("audit entry {}: {e}", row.idx)))?;
        Ok(AuditRecord {
            index: row.idx as u64,
            at_ms: row.at_ms,
            entry: row.entry,
            event: parsed.event,
        })
    }
}

#[derive(sqlx::FromRow)]
struct CheckpointRow {
    size: i64,
    root: Vec<u8>,
    note: String,
    signed_at_ms: i64,
}

impl TryFrom<CheckpointRow> for StoredCheckpoint {
    type Error = StoreError;

    fn try_from(row: CheckpointRow) -> Result<Self, StoreError> {
        Ok(StoredCheckpoint {
            size: row.size as u64,
            root: hash32(row.root, "checkpoint root")?,
            note: row.note,
            signed_at_ms: row.signed_at_ms,
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
    if events.is_empty() {
        return Ok(0..0);
    }
    let count_after: i64 = tx
        .prepare_cached(ADVANCE_HEAD)?
        .query_row(params![events.len() as i64], |row| row.get(0))?;
    let at_ms = now_ms();
    let entries = entries(count_after, at_ms, events);
    let mut insert = tx.prepare_cached(INSERT_ENTRY)?;
    for e in &entries {
        insert.execute(params![
            e.index,
            at_ms,
            e.event.actor,
            e.event.action,
            e.event.agent,
            e.entry
        ])?;
    }
    Ok(indexes(&entries))
}

const ENTRIES_IN_RANGE: &str =
    "SELECT idx, entry FROM audit_entries WHERE idx >= $1 AND idx < $2 ORDER BY idx";

fn in_range(range: &Range<u64>) -> (i64, i64) {
    let bound = |i: u64| i64::try_from(i).unwrap_or(i64::MAX);
    (bound(range.start), bound(range.end))
}

impl SqlStore<Sqlite> {
    /// SQLite has one writer: a write transaction holds every lock already.
    async fn lock_checkpoints(_tx: &mut Transaction<'_, Sqlite>) -> Result<(), StoreError> {
        Ok(())
    }

    /// Each entry in `range` as `leaf` makes it from its index and bytes,
    /// read on a blocking thread through the store's own rusqlite
    /// connection (`None` without one). Sealing reads every entry once,
    /// thousands a second under load: through sqlx each row is handed from
    /// the connection's worker thread to the reading task over a channel,
    /// and those hand-overs (thread wake-ups on cores that serve requests)
    /// and the hashing on the runtime's thread were most of what sealing
    /// cost issuance. One statement is its own read snapshot, released when
    /// it ends (see `READ_CHUNK` in `transparency`).
    async fn read_entries_in_bulk<T: Send + 'static>(
        &self,
        range: Range<u64>,
        leaf: fn(u64, &[u8]) -> T,
    ) -> Option<Result<Vec<T>, StoreError>> {
        let reader = self.bulk_reader.clone()?;
        let read = move || -> rusqlite::Result<Vec<T>> {
            let conn = reader.lock().unwrap_or_else(|e| e.into_inner());
            let (start, end) = in_range(&range);
            let mut statement = conn.prepare_cached(ENTRIES_IN_RANGE)?;
            let mut rows = statement.query(rusqlite::params![start, end])?;
            let mut read = Vec::new();
            while let Some(row) = rows.next()? {
                let index: i64 = row.get(0)?;
                read.push(leaf(index as u64, row.get_ref(1)?.as_bytes()?));
            }
            Ok(read)
        };
        let failed = |e: String| StoreError::BatchFailed(e);
        Some(match tokio::task::spawn_blocking(read).await {
            Ok(read) => read.map_err(|e| failed(e.to_string())),
            Err(e) => Err(failed(e.to_string())),
        })
    }

    async fn read_entries(&self, range: Range<u64>) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let as_stored = |index, bytes: &[u8]| (index, bytes.to_vec());
        match self.read_entries_in_bulk(range.clone(), as_stored).await {
            Some(read) => read,
            None => self.read_entries_through_pool(range).await,
        }
    }

    async fn read_leaf_hashes(
        &self,
        range: Range<u64>,
    ) -> Result<Vec<(u64, NodeHash)>, StoreError> {
        let hashed = |index, bytes: &[u8]| (index, leaf_hash(bytes));
        match self.read_entries_in_bulk(range.clone(), hashed).await {
            Some(read) => read,
            None => Ok(hash_leaves(self.read_entries_through_pool(range).await?)),
        }
    }
}

fn hash_leaves(entries: Vec<(u64, Vec<u8>)>) -> Vec<(u64, NodeHash)> {
    entries
        .into_iter()
        .map(|(index, entry)| (index, leaf_hash(&entry)))
        .collect()
}

impl SqlStore<Postgres> {
    /// PostgreSQL's driver decodes rows as they arrive on the socket.
    async fn read_entries(&self, range: Range<u64>) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.read_entries_through_pool(range).await
    }

    async fn read_leaf_hashes(
        &self,
        range: Range<u64>,
    ) -> Result<Vec<(u64, NodeHash)>, StoreError> {
        Ok(hash_leaves(self.read_entries_through_pool(range).await?))
    }

    /// Serializes checkpoint writers across replicas until the transaction
    /// ends, so each sees the checkpoint the previous one wrote.
    async fn lock_checkpoints(tx: &mut Transaction<'_, Postgres>) -> Result<(), StoreError> {
        sqlx::query(
            "SELECT pg_advisory_xact_lock(hashtextextended('keyward.audit_checkpoints', 0))",
        )
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

macro_rules! impl_audit_store {
    ($db:ty) => {
        impl SqlStore<$db> {
            /// Appends `events` as entries in this order, inside `tx`, in
            /// three statements however many there are: one write
            /// transaction's worth of certificates costs the database a few
            /// round trips, not a few per certificate. Returns the indexes
            /// they took (none for no events: the head is then not touched,
            /// nor its lock taken).
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
                let count_after: i64 = sqlx::query_scalar(ADVANCE_HEAD)
                    .bind(count)
                    .fetch_one(&mut **tx)
                    .await?;
                let at_ms = now_ms();
                let entries = entries(count_after, at_ms, events);
                // 6 binds a row: far below either database's limit.
                for chunk in entries.chunks(1000) {
                    let mut insert = QueryBuilder::<$db>::new(INSERT_ENTRIES);
                    insert.push_values(chunk, |mut row, e| {
                        row.push_bind(e.index)
                            .push_bind(at_ms)
                            .push_bind(&e.event.actor)
                            .push_bind(&e.event.action)
                            .push_bind(&e.event.agent)
                            .push_bind(&e.entry);
                    });
                    insert.build().execute(&mut **tx).await?;
                }
                Ok(indexes(&entries))
            }

            async fn read_entries_through_pool(
                &self,
                range: Range<u64>,
            ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
                let (start, end) = in_range(&range);
                let rows: Vec<(i64, String)> = sqlx::query_as(ENTRIES_IN_RANGE)
                    .bind(start)
                    .bind(end)
                    .fetch_all(&self.pool)
                    .await?;
                Ok(rows
                    .into_iter()
                    .map(|(i, e)| (i as u64, e.into_bytes()))
                    .collect())
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
                from: u64,
                limit: i64,
            ) -> Result<Vec<AuditRecord>, StoreError> {
                sqlx::query_as::<_, EntryRow>(
                    "SELECT idx, at_ms, entry FROM audit_entries WHERE idx >= $1
                     ORDER BY idx LIMIT $2",
                )
                .bind(from as i64)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
                .into_iter()
                .map(AuditRecord::try_from)
                .collect()
            }

            async fn audit_size(&self) -> Result<u64, StoreError> {
                let count: i64 = sqlx::query_scalar(ENTRY_COUNT)
                    .fetch_one(&self.pool)
                    .await?;
                Ok(count as u64)
            }

            async fn audit_entries(
                &self,
                range: Range<u64>,
            ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
                self.read_entries(range).await
            }

            async fn audit_leaf_hashes(
                &self,
                range: Range<u64>,
            ) -> Result<Vec<(u64, NodeHash)>, StoreError> {
                self.read_leaf_hashes(range).await
            }

            async fn search_audit(
                &self,
                query: &AuditQuery,
            ) -> Result<Vec<AuditRecord>, StoreError> {
                let mut select = QueryBuilder::<$db>::new(
                    "SELECT idx, at_ms, entry FROM audit_entries WHERE idx > ",
                );
                select.push_bind(query.after.map_or(-1, |a| a as i64));
                if let Some(agent) = &query.agent {
                    select.push(" AND agent = ").push_bind(agent);
                }
                if let Some(action) = &query.action {
                    select.push(" AND action = ").push_bind(action);
                }
                if let Some(actor) = &query.actor {
                    select.push(" AND actor = ").push_bind(actor);
                }
                if let Some(since) = query.since_ms {
                    select.push(" AND at_ms >= ").push_bind(since);
                }
                if let Some(until) = query.until_ms {
                    select.push(" AND at_ms < ").push_bind(until);
                }
                select
                    .push(" ORDER BY idx LIMIT ")
                    .push_bind(i64::from(query.limit));
                select
                    .build_query_as::<EntryRow>()
                    .fetch_all(&self.pool)
                    .await?
                    .into_iter()
                    .map(AuditRecord::try_from)
                    .collect()
            }

            async fn audit_tile(
                &self,
                level: u8,
                index: u64,
            ) -> Result<Option<Vec<u8>>, StoreError> {
                Ok(sqlx::query_scalar(
                    "SELECT hashes FROM audit_tiles WHERE level = $1 AND idx = $2",
                )
                .bind(i32::from(level))
                .bind(index as i64)
                .fetch_optional(&self.pool)
                .await?)
            }

            async fn latest_checkpoint(&self) -> Result<Option<StoredCheckpoint>, StoreError> {
                sqlx::query_as::<_, CheckpointRow>(LATEST_CHECKPOINT)
                    .fetch_optional(&self.pool)
                    .await?
                    .map(StoredCheckpoint::try_from)
                    .transpose()
            }

            async fn record_checkpoint(
                &self,
                previous: Option<u64>,
                tiles: &[BuiltTile],
                checkpoint: &StoredCheckpoint,
            ) -> Result<bool, StoreError> {
                let mut tx = self.begin_write().await?;
                Self::lock_checkpoints(&mut tx).await?;
                let latest: Option<i64> =
                    sqlx::query_scalar("SELECT MAX(size) FROM audit_checkpoints")
                        .fetch_one(&mut *tx)
                        .await?;
                if latest.map(|s| s as u64) != previous {
                    return Ok(false);
                }
                // One statement for many tiles: the write lock is held from
                // the first statement to the commit, and on SQLite every
                // statement through sqlx is a hand-over between threads,
                // which every certificate and signature writer waited out
                // (one statement a tile made sealing most of what the audit
                // log cost issuance).
                for chunk in widest_tiles(tiles).chunks(1000) {
                    let mut upsert = QueryBuilder::<$db>::new(INSERT_TILES);
                    upsert.push_values(chunk, |mut row, tile| {
                        row.push_bind(i32::from(tile.level))
                            .push_bind(tile.index as i64)
                            .push_bind(&tile.hashes);
                    });
                    upsert.push(UPSERT_TILES_WIDER);
                    upsert.build().execute(&mut *tx).await?;
                }
                sqlx::query(
                    "INSERT INTO audit_checkpoints (size, root, note, signed_at_ms)
                     VALUES ($1, $2, $3, $4)",
                )
                .bind(checkpoint.size as i64)
                .bind(checkpoint.root.to_vec())
                .bind(&checkpoint.note)
                .bind(checkpoint.signed_at_ms)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(true)
            }
        }
    };
}

impl_audit_store!(Sqlite);
impl_audit_store!(Postgres);
