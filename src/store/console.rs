//! Web console sessions: which admin credential a browser signed in with,
//! and when it was last used. Sign-in and sign-out are written with their
//! audit events in one transaction.

use async_trait::async_trait;
use sqlx::{Postgres, Sqlite};

use super::sql::SqlStore;
use super::StoreError;
use crate::audit::AuditEvent;

/// A signed-in browser. `id_sha256` is the hash of the cookie's secret.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct ConsoleSessionRecord {
    pub id_sha256: String,
    /// The admin's name.
    pub admin: String,
    /// `token:<id>` or `cert:<serial>`: never a secret.
    pub credential: String,
    pub created_ms: i64,
    pub last_seen_ms: i64,
}

#[async_trait]
pub trait ConsoleStore: Send + Sync {
    /// Stores a new session with its audit event, and forgets every
    /// session last used before `expired_before_ms` or made before
    /// `created_before_ms`.
    async fn create_console_session(
        &self,
        session: &ConsoleSessionRecord,
        expired_before_ms: i64,
        created_before_ms: i64,
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;

    /// The session, if it was used at or after `idle_since_ms` and made
    /// at or after `created_since_ms`; its last use becomes `now_ms`.
    async fn touch_console_session(
        &self,
        id_sha256: &str,
        now_ms: i64,
        idle_since_ms: i64,
        created_since_ms: i64,
    ) -> Result<Option<ConsoleSessionRecord>, StoreError>;

    /// The session, under the same conditions, without moving its last
    /// use: what a page's background refresh reads, so that a page left
    /// open does not keep its session alive.
    async fn console_session(
        &self,
        id_sha256: &str,
        idle_since_ms: i64,
        created_since_ms: i64,
    ) -> Result<Option<ConsoleSessionRecord>, StoreError>;

    /// Ends the session with its audit event; false (nothing written) when
    /// there was none.
    async fn end_console_session(
        &self,
        id_sha256: &str,
        audit: &AuditEvent,
    ) -> Result<bool, StoreError>;
}

macro_rules! impl_console_store {
    ($db:ty) => {
        #[async_trait]
        impl ConsoleStore for SqlStore<$db> {
            async fn create_console_session(
                &self,
                session: &ConsoleSessionRecord,
                expired_before_ms: i64,
                created_before_ms: i64,
                audit: &AuditEvent,
            ) -> Result<(), StoreError> {
                let mut tx = self.begin_write().await?;
                sqlx::query(
                    "DELETE FROM console_sessions WHERE last_seen_ms < $1 OR created_ms < $2",
                )
                .bind(expired_before_ms)
                .bind(created_before_ms)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "INSERT INTO console_sessions
                         (id_sha256, admin, credential, created_ms, last_seen_ms)
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(&session.id_sha256)
                .bind(&session.admin)
                .bind(&session.credential)
                .bind(session.created_ms)
                .bind(session.last_seen_ms)
                .execute(&mut *tx)
                .await?;
                Self::append_audit(&mut tx, &[audit]).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn touch_console_session(
                &self,
                id_sha256: &str,
                now_ms: i64,
                idle_since_ms: i64,
                created_since_ms: i64,
            ) -> Result<Option<ConsoleSessionRecord>, StoreError> {
                Ok(sqlx::query_as(
                    "UPDATE console_sessions SET last_seen_ms = $2
                     WHERE id_sha256 = $1 AND last_seen_ms >= $3 AND created_ms >= $4
                     RETURNING id_sha256, admin, credential, created_ms, last_seen_ms",
                )
                .bind(id_sha256)
                .bind(now_ms)
                .bind(idle_since_ms)
                .bind(created_since_ms)
                .fetch_optional(&self.pool)
                .await?)
            }

            async fn console_session(
                &self,
                id_sha256: &str,
                idle_since_ms: i64,
                created_since_ms: i64,
            ) -> Result<Option<ConsoleSessionRecord>, StoreError> {
                Ok(sqlx::query_as(
                    "SELECT id_sha256, admin, credential, created_ms, last_seen_ms
                     FROM console_sessions
                     WHERE id_sha256 = $1 AND last_seen_ms >= $2 AND created_ms >= $3",
                )
                .bind(id_sha256)
                .bind(idle_since_ms)
                .bind(created_since_ms)
                .fetch_optional(&self.pool)
                .await?)
            }

            async fn end_console_session(
                &self,
                id_sha256: &str,
                audit: &AuditEvent,
            ) -> Result<bool, StoreError> {
                let mut tx = self.begin_write().await?;
                let ended = sqlx::query("DELETE FROM console_sessions WHERE id_sha256 = $1")
                    .bind(id_sha256)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected()
                    > 0;
                if ended {
                    Self::append_audit(&mut tx, &[audit]).await?;
                    tx.commit().await?;
                }
                Ok(ended)
            }
        }
    };
}

impl_console_store!(Sqlite);
impl_console_store!(Postgres);
