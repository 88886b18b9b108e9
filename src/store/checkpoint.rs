//! WAL checkpoints for SQLite, off the commit path.
//!
//! By default the connection whose commit pushes the write-ahead log past
//! 1,000 pages copies the log into the database file and syncs it, inside
//! that commit: every certificate or signature in the batch waits for it.
//! Measured on `keyward bench issue`, those commits were the half-load
//! tail. keyward's connections turn automatic checkpoints off
//! (`wal_autocheckpoint = 0`), and this thread checkpoints every
//! `INTERVAL` in PASSIVE mode, which never blocks a writer or a reader:
//! commits sync only the log, as before, and durability is unchanged (a
//! committed transaction is in the synced log until the checkpoint has
//! copied it).
//!
//! A PASSIVE checkpoint never restarts the log: under steady load a commit
//! lands while each checkpoint runs, so no writer ever finds the log fully
//! copied, and it grew without bound (4.3 GB after 100,000 registrations).
//! Once the log passes `RESTART_PAGES`, a RESTART follows the PASSIVE
//! checkpoint at once: it waits for the writers of the moment, copies what
//! the PASSIVE one left (a few milliseconds of commits), and makes the next
//! writer start the log from its beginning, at most every few seconds.
//! (TRUNCATE, which also cuts the file, put ~50 ms stalls in issuance's
//! tail under wrk at 32 connections: the file freed and grown again every
//! time.)
//!
//! A RESTART holds the writer lock while it waits for the readers of older
//! log frames to finish, so every commit waits as long as it does. With a
//! one-second busy timeout, wrk at 32 connections saw signing stall for
//! 0.1-1 s every few seconds (p99 0.85-1.3 s, timeouts) once a slow reader
//! was about. The wait is therefore cut at `RESTART_WAIT`: a RESTART that
//! cannot have the log within it gives up, and the next interval tries
//! again; the log is then larger for a while, never a commit slower.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::StoreError;

const INTERVAL: Duration = Duration::from_millis(100);

/// Log pages (4 KiB each) past which the log is emptied: 64 MiB.
const RESTART_PAGES: i64 = 16_384;

/// How long a RESTART may hold writers back waiting for readers.
const RESTART_WAIT: Duration = Duration::from_millis(5);

/// A log this large (1 GiB) means RESTARTs keep giving up: worth a warning,
/// at most every `LARGE_LOG_WARNING`.
const LARGE_LOG_PAGES: i64 = 16 * RESTART_PAGES;
const LARGE_LOG_WARNING: Duration = Duration::from_secs(60);

/// Checkpoints the database's log until dropped.
pub struct Checkpointer {
    stop: Arc<AtomicBool>,
}

impl Checkpointer {
    pub fn start(path: PathBuf) -> Result<Self, StoreError> {
        let failed = |e: rusqlite::Error| StoreError::BatchFailed(e.to_string());
        let conn = rusqlite::Connection::open(&path).map_err(failed)?;
        conn.busy_timeout(RESTART_WAIT).map_err(failed)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("keyward-checkpoint".into())
            .spawn(move || {
                let mut warned_at: Option<std::time::Instant> = None;
                while !stopped.load(Ordering::Relaxed) {
                    std::thread::sleep(INTERVAL);
                    let pages = match checkpoint(&conn, "PASSIVE") {
                        Ok((_, pages)) => pages,
                        Err(e) => {
                            tracing::warn!(error = %e, "SQLite checkpoint failed; retrying");
                            continue;
                        }
                    };
                    if pages <= RESTART_PAGES {
                        continue;
                    }
                    // At once, so that it has only what was committed since
                    // the PASSIVE one to copy while writers wait.
                    let restarted = checkpoint(&conn, "RESTART").is_ok_and(|(busy, _)| !busy);
                    if !restarted
                        && pages > LARGE_LOG_PAGES
                        && warned_at.is_none_or(|at| at.elapsed() > LARGE_LOG_WARNING)
                    {
                        warned_at = Some(std::time::Instant::now());
                        tracing::warn!(
                            log_mib = pages / 256,
                            "SQLite's write-ahead log keeps growing: a reader holds an old snapshot"
                        );
                    }
                }
            })
            .map_err(|e| StoreError::BatchFailed(e.to_string()))?;
        Ok(Self { stop })
    }
}

/// Whether the checkpoint gave up (busy), and the pages in the log when it
/// started.
fn checkpoint(conn: &rusqlite::Connection, mode: &str) -> rusqlite::Result<(bool, i64)> {
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |row| {
        Ok((row.get::<_, i64>(0)? != 0, row.get::<_, i64>(1)?))
    })
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
