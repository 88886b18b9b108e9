//! What every area's SQL shares: the [`SqlStore`] the area traits are
//! implemented for, the few places the two databases differ (how a write
//! transaction starts), and the umbrella [`Store`] itself.
//!
//! Each area file implements its trait once, in a `macro_rules!` that is
//! instantiated for `SqlStore<Sqlite>` and `SqlStore<Postgres>`. A macro
//! rather than `impl<DB: sqlx::Database>`: sqlx's executors are
//! per-database types, so generic code would repeat on every impl and
//! helper the bounds that make a query run on `DB` (`for<'c> &'c mut
//! DB::Connection: Executor<'c, Database = DB>`, the arguments'
//! `IntoArguments`, `Encode + Decode + Type` for each bound or read type,
//! `FromRow` for each row), which a trait cannot carry for its users. The
//! statements themselves are portable (`$n` placeholders, `RETURNING`,
//! integers as 64-bit, blobs as bytes); only the migrations differ.

use async_trait::async_trait;
use sqlx::{Pool, Postgres, Sqlite, Transaction};

use super::{Store, StoreError};

pub struct SqlStore<DB: sqlx::Database> {
    pub(super) pool: Pool<DB>,
    name: &'static str,
    /// SQLite's log checkpoints, for as long as the store is open.
    _checkpoints: Option<super::checkpoint::Checkpointer>,
    /// SQLite only: a connection of its own for reading many rows at once
    /// (`audit::read_entries_sqlite`), used on blocking threads.
    pub(super) bulk_reader: Option<std::sync::Arc<std::sync::Mutex<rusqlite::Connection>>>,
}

impl<DB: sqlx::Database> SqlStore<DB> {
    pub fn new(pool: Pool<DB>, name: &'static str) -> Self {
        Self {
            pool,
            name,
            _checkpoints: None,
            bulk_reader: None,
        }
    }

    pub fn with_bulk_reader(mut self, connection: rusqlite::Connection) -> Self {
        self.bulk_reader = Some(std::sync::Arc::new(std::sync::Mutex::new(connection)));
        self
    }

    pub fn with_checkpoints(mut self, checkpoints: super::checkpoint::Checkpointer) -> Self {
        self._checkpoints = Some(checkpoints);
        self
    }
}

pub(super) fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

pub(super) fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

pub(super) fn unique_violation(e: sqlx::Error, what: &'static str) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict(what),
        _ => StoreError::Database(e),
    }
}

pub(super) fn hash32(bytes: Vec<u8>, what: &str) -> Result<[u8; 32], StoreError> {
    bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("{what} is not 32 bytes")))
}

impl SqlStore<Sqlite> {
    /// A transaction that holds SQLite's one write lock from its first
    /// statement, so that what it reads is what it writes against: a
    /// deferred one reads a snapshot that another writer may commit past
    /// before this one upgrades, and SQLite then refuses the upgrade at
    /// once ("database is locked"; the busy handler is not asked). Every
    /// write transaction of the store begins here
    /// (`a_write_that_reads_first_waits_for_other_writers_instead_of_failing`).
    pub(super) async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }
}

impl SqlStore<Postgres> {
    pub(super) async fn begin_write(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        Ok(self.pool.begin().await?)
    }
}

macro_rules! impl_store {
    ($db:ty) => {
        #[async_trait]
        impl Store for SqlStore<$db> {
            fn backend_name(&self) -> &'static str {
                self.name
            }

            async fn ping(&self) -> Result<(), StoreError> {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
            }
        }
    };
}

impl_store!(Sqlite);
impl_store!(Postgres);

#[cfg(test)]
mod tests {
    use super::super::{agents, revocation};

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
            (agents::NEWEST_CERTIFICATE_OF_KEY, "certificates_by_agent"),
            (agents::REVOKE_CERTIFICATES_OF_KEY, "certificates_by_agent"),
            (revocation::REVOKED_CERTIFICATES, "certificates_revoked"),
            (revocation::INACTIVE_AGENTS, "agents_inactive"),
            (revocation::LIVE_RETIRED_KEYS, "retired_keys_due"),
            (
                agents::CERTIFICATES_OF_AGENT_PAGE,
                "certificates_by_agent_created",
            ),
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
