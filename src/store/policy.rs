//! Policy versions: each apply stores the next version; the highest is in
//! force.

use async_trait::async_trait;
use sqlx::{Postgres, Sqlite, Transaction};

use super::sql::{now, unique_violation, SqlStore};
use super::StoreError;
use crate::audit::AuditEvent;

/// One version of the policy.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct PolicyRecord {
    pub version: i64,
    pub content: String,
    pub content_sha256: String,
    pub author: String,
    pub source: String,
    pub created_at: i64,
}

impl SqlStore<Sqlite> {
    /// SQLite has one writer: a write transaction holds every lock already.
    async fn lock_policy_versions(_tx: &mut Transaction<'_, Sqlite>) -> Result<(), StoreError> {
        Ok(())
    }
}

impl SqlStore<Postgres> {
    /// Serializes applies until the transaction ends, so that each reads
    /// the version the previous one wrote: without it two replicas read the
    /// same latest version and one failed on the primary key.
    async fn lock_policy_versions(tx: &mut Transaction<'_, Postgres>) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('keyward.policy_versions', 0))")
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

#[async_trait]
pub trait PolicyStore: Send + Sync {
    /// Stores `content` as the next policy version (the highest so far plus
    /// one) with its audit event. Applies on every replica take consecutive
    /// versions.
    async fn insert_policy(
        &self,
        content: &str,
        author: &str,
        source: &str,
        audit: &AuditEvent,
    ) -> Result<PolicyRecord, StoreError>;
    /// The version in force: 0 when none was ever applied.
    async fn latest_policy_version(&self) -> Result<i64, StoreError>;
    async fn policy(&self, version: i64) -> Result<Option<PolicyRecord>, StoreError>;
    /// Versions, oldest first, after `after`, at most `limit`.
    async fn policies_page(
        &self,
        after: Option<i64>,
        limit: i64,
    ) -> Result<Vec<PolicyRecord>, StoreError>;
}

const LATEST_VERSION: &str = "SELECT MAX(version) AS latest FROM policies";

macro_rules! impl_policy_store {
    ($db:ty) => {
        #[async_trait]
        impl PolicyStore for SqlStore<$db> {
            async fn insert_policy(
                &self,
                content: &str,
                author: &str,
                source: &str,
                audit: &AuditEvent,
            ) -> Result<PolicyRecord, StoreError> {
                use sha2::Digest;
                let mut tx = self.begin_write().await?;
                Self::lock_policy_versions(&mut tx).await?;
                let latest: Option<i64> = sqlx::query_scalar(LATEST_VERSION)
                    .fetch_one(&mut *tx)
                    .await?;
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
                Self::append_audit(&mut tx, &[&event]).await?;
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
                let latest: Option<i64> = sqlx::query_scalar(LATEST_VERSION)
                    .fetch_one(&self.pool)
                    .await?;
                Ok(latest.unwrap_or(0))
            }

            async fn policy(&self, version: i64) -> Result<Option<PolicyRecord>, StoreError> {
                Ok(sqlx::query_as("SELECT * FROM policies WHERE version = $1")
                    .bind(version)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn policies_page(&self, after: Option<i64>, limit: i64) -> Result<Vec<PolicyRecord>, StoreError> {
                Ok(sqlx::query_as("SELECT * FROM policies WHERE ($1 IS NULL OR version > $1) ORDER BY version LIMIT $2")
                    .bind(after)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?)
            }
        }
    };
}

impl_policy_store!(Sqlite);
impl_policy_store!(Postgres);
