//! Persistence, by area: one trait and one file for each, and [`Store`],
//! the umbrella every caller holds (`Arc<dyn Store>`), implemented once
//! for SQLite (the embedded default) and once for PostgreSQL (production,
//! several replicas).
//!
//! | file | trait | holds | used by |
//! |---|---|---|---|
//! | `agents` | [`AgentStore`] | agents, certificates, attestations, key rotation and retired keys, signature records | agents, api, pki, policy |
//! | `authority` | [`AuthorityStore`] | the issuing CA (active and previous), service keys, admin tokens, CRL numbers | app, pki |
//! | `revocation` | [`RevocationStore`] | revoking certificates, agents' standing, compromised keys, the revocation snapshot | agents, pki, revocation |
//! | `policy` | [`PolicyStore`] | policy versions | api, policy |
//! | `approvals` | [`ApprovalStore`] | held requests and votes | approvals |
//! | `enrollment` | [`EnrollmentStore`] | enrollment tokens and TPM challenges | api, app |
//! | `hooks` | [`HookStore`] | revocation hooks and their outbox | api, revocation |
//! | `audit` | [`AuditStore`] | the hash-chained audit trail | agents, app, pki, policy, revocation |
//! | `anomalies` | [`AnomalyStore`] | credential sightings, detections, KPI samples | detect |
//! | `console` | [`ConsoleStore`] | web console sessions | console |
//!
//! A caller needs no `use` of an area trait: Rust resolves the methods of a
//! trait object's supertraits without the trait in scope, and an import
//! the compiler does not need is an unused-import warning. The "used by"
//! column is therefore kept here.
//!
//! Policy versions and approvals are two areas, not one: they share no
//! table and no transaction (an approval only notes the version it was
//! held under), and their domains (`policy`, `approvals`) are separate
//! modules. The authority is an area of its own: nothing in it is about
//! one agent. `sql` holds what the areas' SQL shares; `signature_log` and
//! `certificate_log` are the group-commit writers for the two hot inserts,
//! `checkpoint` SQLite's log checkpoints.
//!
//! Every write that changes security state appends its audit event in the
//! same transaction, so there is never a change without its record, nor a
//! record of a change that did not happen.

mod agents;
mod anomalies;
mod approvals;
mod audit;
mod authority;
mod certificate_log;
mod checkpoint;
mod console;
mod enrollment;
mod hooks;
mod policy;
mod revocation;
mod signature_log;
mod sql;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

pub use agents::{
    signature_batch_event, AgentRecord, AgentStore, AttestationRecord, CertificateInsert,
    CertificateRecord, CustodialKeyAge, KeyRotation, KeyRotationOutcome, NewCertificate,
    RetiredKey, SignatureRecord,
};
pub use anomalies::{AnomalyQuery, AnomalyRecord, AnomalyStore, KpiSamples, NewAnomaly, Sighting};
pub use approvals::{ApprovalRecord, ApprovalStore, ApprovalVote, VoteOutcome};
pub use audit::{AuditStore, StoredCheckpoint};
pub use authority::{AuthorityStore, CaRecord, ServiceKeyRecord};
pub use certificate_log::CertificateLog;
pub use console::{ConsoleSessionRecord, ConsoleStore};
pub use enrollment::{EnrollmentStore, NewEnrollmentToken, TpmChallengeRecord, TpmRedemption};
pub use hooks::{HookDelivery, HookRecord, HookStore};
pub use policy::{PolicyRecord, PolicyStore};
pub use revocation::{
    public_key_sha256, AgentStatusChange, AgentTransition, CertificateRevocation,
    RevocationSnapshot, RevocationStore, RevokedCertificate, KEY_COMPROMISE, REVOCATION_CHANNEL,
};
pub use signature_log::SignatureLog;
pub use sql::SqlStore;

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

/// The whole store: every area, and the store's own health.
#[async_trait]
pub trait Store:
    AgentStore
    + AuthorityStore
    + RevocationStore
    + PolicyStore
    + ApprovalStore
    + EnrollmentStore
    + HookStore
    + AuditStore
    + AnomalyStore
    + ConsoleStore
    + Send
    + Sync
    + 'static
{
    /// `sqlite` or `postgres`.
    fn backend_name(&self) -> &'static str;

    async fn ping(&self) -> Result<(), StoreError>;
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
        let bulk_reader = signature_log::open_sqlite(url)?;
        let checkpoints = checkpoint::Checkpointer::start(path)?;
        Ok(Arc::new(
            SqlStore::new(pool, "sqlite")
                .with_checkpoints(checkpoints)
                .with_bulk_reader(bulk_reader),
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
