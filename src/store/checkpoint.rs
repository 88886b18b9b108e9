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
//! Once the log passes `RESTART_PAGES`, the next checkpoint is RESTART: it
//! waits for the writers of the moment, copies what the PASSIVE ones left
//! (little), and makes the next writer start the log from its beginning,
//! at most every few seconds. (TRUNCATE, which also cuts the file, put
//! ~50 ms stalls in issuance's tail under wrk at 32 connections: the file
//! freed and grown again every time.)

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::StoreError;

const INTERVAL: Duration = Duration::from_millis(100);

/// Log pages (4 KiB each) past which the log is emptied: 64 MiB.
const RESTART_PAGES: i64 = 16_384;

/// Checkpoints the database's log until dropped.
pub struct Checkpointer {
    stop: Arc<AtomicBool>,
}

impl Checkpointer {
    pub fn start(path: PathBuf) -> Result<Self, StoreError> {
        let failed = |e: rusqlite::Error| StoreError::BatchFailed(e.to_string());
        let conn = rusqlite::Connection::open(&path).map_err(failed)?;
        conn.busy_timeout(Duration::from_secs(1)).map_err(failed)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("keyward-checkpoint".into())
            .spawn(move || {
                let mut mode = "PASSIVE";
                while !stopped.load(Ordering::Relaxed) {
                    std::thread::sleep(INTERVAL);
                    // (busy, pages in the log, pages copied)
                    let done =
                        conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |row| {
                            row.get::<_, i64>(1)
                        });
                    mode = match done {
                        Ok(pages) if pages > RESTART_PAGES => "RESTART",
                        Ok(_) => "PASSIVE",
                        Err(e) => {
                            tracing::warn!(error = %e, "SQLite checkpoint failed; retrying");
                            "PASSIVE"
                        }
                    };
                }
            })
            .map_err(|e| StoreError::BatchFailed(e.to_string()))?;
        Ok(Self { stop })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
