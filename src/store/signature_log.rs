//! Group commit for signature records: whoever is waiting when a write
//! starts goes into the next transaction together, so one fsync covers many
//! signatures under load, and a lone request is written at once. Under
//! load, a commit waits to gather more records (see `commit_start`), but
//! never past the time a waiting record is needed.
//!
//! A caller's `record` returns only after its row is durable; the sign
//! handler answers only after that.
//!
//! The writer runs on a thread of its own with its own connection. On
//! SQLite it drives the transaction itself through rusqlite: with sqlx every
//! statement would be a round trip to sqlx's connection thread, and on a
//! busy two-core machine each such hand-over waits for the scheduler, which
//! made a commit take milliseconds. On PostgreSQL the statements are network
//! round trips anyway; the writer uses sqlx on a runtime of its own, so it
//! never waits behind the request runtime's connection tasks.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::{signature_batch_event, SignatureRecord, Store, StoreError};
use crate::runtime::handoff::Handoff;

/// Records per transaction at most.
const MAX_BATCH: usize = 1024;

/// Under load, a commit waits for more records, up to this long after the
/// previous commit started: a commit costs about 110 us of CPU whatever it
/// holds (audit rows, WAL frames, fsync) and a record about 5 us, so at the
/// dozen records per commit seen without spacing the fixed part dominated.
/// Measured in alternating runs: more `http` throughput and a lower p50 in
/// 4 of 4 pairs. The interval runs from one commit's start to the next's:
/// a commit's fsync takes about half a millisecond here, and timing from
/// its end made every waiting request sit through both.
///
/// The wait is cut short when a waiting record's signature is due sooner
/// (see [`commit_start`]): under moderate load the token answers in a
/// fraction of a millisecond, and a full interval's wait became most of
/// each answer's latency.
const MAX_COMMIT_INTERVAL: Duration = Duration::from_millis(1);

/// A record, when its caller's answer would be ready but for the record,
/// and where to say it is durable.
type Pending = (SignatureRecord, Instant, oneshot::Sender<Written>);

/// Whether a record's commit succeeded (the error's text if not).
type Written = Result<(), String>;

#[derive(Clone)]
pub struct SignatureLog {
    queue: mpsc::Sender<Pending>,
}

impl SignatureLog {
    /// Starts the writer thread on its own connection to `database_url`
    /// (already migrated).
    pub async fn start(database_url: &str) -> Result<Self, StoreError> {
        let (queue, receiver) = mpsc::channel(8 * MAX_BATCH);
        let (ready, started) = oneshot::channel();
        let url = database_url.to_owned();
        // Created here, on the runtime the callers wait on.
        let handoff = Handoff::start();
        let spawned = std::thread::Builder::new()
            .name("keyward-sig-log".into())
            .spawn(move || {
                if url.starts_with("sqlite:") {
                    match open_sqlite(&url) {
                        Ok(conn) => {
                            let _ = ready.send(Ok(()));
                            write_sqlite_batches(conn, receiver, handoff);
                        }
                        Err(e) => {
                            let _ = ready.send(Err(e));
                        }
                    }
                    return;
                }
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready.send(Err(StoreError::BatchFailed(e.to_string())));
                        return;
                    }
                };
                runtime.block_on(async move {
                    match super::open(&url, 1, false).await {
                        Ok(store) => {
                            let _ = ready.send(Ok(()));
                            write_batches(store, receiver, handoff).await;
                        }
                        Err(e) => {
                            let _ = ready.send(Err(e));
                        }
                    }
                });
            });
        spawned.map_err(|e| StoreError::BatchFailed(e.to_string()))?;
        started.await.map_err(|_| StoreError::LogStopped)??;
        Ok(Self { queue })
    }

    /// Returns once the record is committed. `needed_at` is when the
    /// caller's answer would be ready but for the record (its signature's
    /// expected completion): until then the log may hold the record back to
    /// commit it with others, at no cost to the caller.
    pub async fn record(
        &self,
        record: SignatureRecord,
        needed_at: Instant,
    ) -> Result<(), StoreError> {
        let (done, written) = oneshot::channel();
        self.queue
            .send((record, needed_at, done))
            .await
            .map_err(|_| StoreError::LogStopped)?;
        match written.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(StoreError::BatchFailed(message)),
            Err(_) => Err(StoreError::LogStopped),
        }
    }
}

/// When to start the commit of `batch`: as late as the interval since
/// `last_commit` allows, to gather more records, but no later than the
/// earliest time one of them is needed. In the past means at once.
fn commit_start(last_commit: Instant, batch: &[Pending]) -> Instant {
    let latest = last_commit + MAX_COMMIT_INTERVAL;
    batch
        .iter()
        .map(|(_, needed_at, _)| *needed_at)
        .min()
        .map_or(latest, |needed| needed.min(latest))
}

/// Tells everyone in `batch` how its commit went, all at once (see
/// `handoff`: one by one, the last of a large commit waited milliseconds
/// behind the first).
fn answer(batch: &mut Vec<Pending>, result: Result<(), String>, handoff: &Handoff<Written>) {
    handoff.deliver(
        batch
            .drain(..)
            .map(|(_, _, done)| (done, result.clone()))
            .collect(),
    );
}

async fn write_batches(
    store: Arc<dyn Store>,
    mut receiver: mpsc::Receiver<Pending>,
    handoff: Handoff<Written>,
) {
    let mut batch: Vec<Pending> = Vec::with_capacity(MAX_BATCH);
    let mut last_commit = Instant::now();
    while receiver.recv_many(&mut batch, 1).await > 0 {
        drain(&mut receiver, &mut batch);
        let start = commit_start(last_commit, &batch);
        if start > Instant::now() {
            tokio::time::sleep_until(start.into()).await;
            drain(&mut receiver, &mut batch);
        }
        last_commit = Instant::now();
        let records: Vec<SignatureRecord> = batch.iter().map(|(r, _, _)| r.clone()).collect();
        let result = store.insert_signatures(&records).await.map_err(|e| {
            tracing::error!(error = %e, rows = records.len(), "writing signature records failed");
            e.to_string()
        });
        answer(&mut batch, result, &handoff);
    }
}

fn sqlite_path(url: &str) -> Result<PathBuf, StoreError> {
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)?;
    Ok(options.get_filename().to_owned())
}

/// How often a writer waiting for SQLite's write lock looks again, and for
/// how long it waits in all (as the sqlx pool's busy timeout).
const LOCK_POLL: Duration = Duration::from_micros(200);
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// SQLite's own busy handler sleeps 1, 2, 5, 10, 15, 20, 25 ms... between
/// looks: a writer held up 10 ms by a checkpoint found the lock free only
/// at its 34 ms look, and issuance's p99 under wrk followed those steps.
/// The writers here are the hot path; they look every `LOCK_POLL`.
fn wait_for_write_lock(attempts: i32) -> bool {
    if LOCK_POLL * attempts.max(0) as u32 >= LOCK_WAIT {
        return false;
    }
    std::thread::sleep(LOCK_POLL);
    true
}

/// The same settings as the sqlx pool (`store::open`), but for how a
/// writer waits for the write lock.
pub(super) fn open_sqlite(url: &str) -> Result<rusqlite::Connection, StoreError> {
    let failed = |e: rusqlite::Error| StoreError::BatchFailed(e.to_string());
    let conn = rusqlite::Connection::open(sqlite_path(url)?).map_err(failed)?;
    conn.busy_handler(Some(wait_for_write_lock))
        .map_err(failed)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(failed)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(failed)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(failed)?;
    // Checkpoints are store::checkpoint's, off the commit path.
    conn.pragma_update(None, "wal_autocheckpoint", 0)
        .map_err(failed)?;
    Ok(conn)
}

fn write_sqlite_batches(
    mut conn: rusqlite::Connection,
    mut receiver: mpsc::Receiver<Pending>,
    handoff: Handoff<Written>,
) {
    let mut batch: Vec<Pending> = Vec::with_capacity(MAX_BATCH);
    let mut last_commit = Instant::now();
    while let Some(first) = receiver.blocking_recv() {
        batch.push(first);
        drain(&mut receiver, &mut batch);
        if let Some(rest) = commit_start(last_commit, &batch).checked_duration_since(Instant::now())
        {
            std::thread::sleep(rest);
            drain(&mut receiver, &mut batch);
        }
        last_commit = Instant::now();
        let records: Vec<SignatureRecord> = batch.iter().map(|(r, _, _)| r.clone()).collect();
        let result = insert_sqlite(&mut conn, &records).map_err(|e| {
            tracing::error!(error = %e, rows = records.len(), "writing signature records failed");
            e.to_string()
        });
        answer(&mut batch, result, &handoff);
    }
}

/// Moves what is waiting into `batch`, up to `MAX_BATCH`, without blocking.
fn drain(receiver: &mut mpsc::Receiver<Pending>, batch: &mut Vec<Pending>) {
    while batch.len() < MAX_BATCH {
        match receiver.try_recv() {
            Ok(p) => batch.push(p),
            Err(_) => break,
        }
    }
}

/// `AgentStore::insert_signatures` for SQLite, in this thread. Keep the
/// statements in step with `store/agents.rs`.
fn insert_sqlite(
    conn: &mut rusqlite::Connection,
    records: &[SignatureRecord],
) -> rusqlite::Result<()> {
    use rusqlite::params;
    let event = signature_batch_event(records);
    // IMMEDIATE takes the write lock up front, as the sqlx path's first
    // statement (the audit head update) does.
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let seq = super::audit::append_audit_sqlite(&tx, &[&event])?.start;
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO signatures (request_id, agent_name, key_id, digest, purpose, message,
                policy_version, signed_at_ms, audit_index)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?;
        for r in records {
            insert.execute(params![
                r.request_id,
                r.agent_name,
                r.key_id,
                r.digest,
                r.purpose,
                r.message,
                r.policy_version,
                r.signed_at_ms,
                seq
            ])?;
        }
    }
    tx.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(needed_at: Instant) -> Pending {
        let record = SignatureRecord {
            request_id: "r".into(),
            agent_name: "a".into(),
            key_id: "k".into(),
            digest: "00".into(),
            purpose: "sign".into(),
            message: None,
            policy_version: 0,
            signed_at_ms: 0,
        };
        (record, needed_at, oneshot::channel().0)
    }

    #[test]
    fn records_needed_later_wait_out_the_interval_to_share_a_commit() {
        let last = Instant::now();
        let later = last + 5 * MAX_COMMIT_INTERVAL;
        let batch = [waiting(later), waiting(later + MAX_COMMIT_INTERVAL)];
        assert_eq!(commit_start(last, &batch), last + MAX_COMMIT_INTERVAL);
    }

    #[test]
    fn a_record_needed_sooner_cuts_the_wait_short() {
        let last = Instant::now();
        let soon = last + MAX_COMMIT_INTERVAL / 4;
        let batch = [waiting(last + 5 * MAX_COMMIT_INTERVAL), waiting(soon)];
        assert_eq!(commit_start(last, &batch), soon);
    }

    #[test]
    fn after_a_quiet_spell_the_commit_starts_at_once() {
        let now = Instant::now();
        let last = now - 10 * MAX_COMMIT_INTERVAL;
        let batch = [waiting(now + MAX_COMMIT_INTERVAL)];
        assert!(commit_start(last, &batch) <= now);
    }
}
