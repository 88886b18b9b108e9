//! Revocation hooks and their outbox: a change that hooks are told about
//! puts its event in every active hook's outbox in its own transaction
//! ([`SqlStore::enqueue_hook_event`]), and the deliverer leases, delivers
//! and retries from there.

use async_trait::async_trait;
use sqlx::{Postgres, Sqlite, Transaction};

use super::sql::{now, unique_violation, SqlStore};
use super::StoreError;
use crate::audit::AuditEvent;

/// A registered revocation hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookRecord {
    pub id: i64,
    pub url: String,
    /// The HMAC key receivers verify with. Never logged or audited.
    pub secret: String,
    pub active: bool,
    pub created_at: i64,
}

/// One event due for one hook, leased to this replica.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct HookDelivery {
    pub id: i64,
    pub hook_id: i64,
    pub event: String,
    pub attempts: i64,
}

#[async_trait]
pub trait HookStore: Send + Sync {
    /// Registers a hook; `Conflict` when the URL is registered already.
    async fn insert_hook(
        &self,
        url: &str,
        secret: &str,
        audit: &AuditEvent,
    ) -> Result<HookRecord, StoreError>;
    /// Every active hook (what the deliverer sends to).
    async fn hooks(&self) -> Result<Vec<HookRecord>, StoreError>;
    /// Active hooks by id, after `after`, at most `limit`.
    async fn hooks_page(
        &self,
        after: Option<i64>,
        limit: i64,
    ) -> Result<Vec<HookRecord>, StoreError>;
    /// Stops deliveries to a hook; false when there is no such active hook.
    async fn deactivate_hook(&self, id: i64, audit: &AuditEvent) -> Result<bool, StoreError>;
    /// Leases, until `now + lease_secs`, the oldest undelivered event of
    /// each active hook that is due and not leased: one per hook, so each
    /// hook receives its events in order.
    async fn lease_hook_deliveries(
        &self,
        now: i64,
        lease_secs: i64,
    ) -> Result<Vec<HookDelivery>, StoreError>;
    async fn hook_delivered(&self, id: i64, at: i64) -> Result<(), StoreError>;
    /// Records a failed attempt and when to try again.
    async fn hook_failed(
        &self,
        id: i64,
        next_attempt_at: i64,
        error: &str,
    ) -> Result<(), StoreError>;
    /// Undelivered events (all hooks).
    async fn pending_hook_deliveries(&self) -> Result<i64, StoreError>;
}

/// `active` is an integer flag in both databases' schema.
#[derive(sqlx::FromRow)]
struct HookRow {
    id: i64,
    url: String,
    secret: String,
    active: i64,
    created_at: i64,
}

impl From<HookRow> for HookRecord {
    fn from(row: HookRow) -> Self {
        HookRecord {
            id: row.id,
            url: row.url,
            secret: row.secret,
            active: row.active == 1,
            created_at: row.created_at,
        }
    }
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

macro_rules! impl_hook_store {
    ($db:ty) => {
        impl SqlStore<$db> {
            /// Puts the event in every active hook's outbox, in the
            /// transaction of the change itself.
            pub(super) async fn enqueue_hook_event(
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
        }

        #[async_trait]
        impl HookStore for SqlStore<$db> {
            async fn insert_hook(
                &self,
                url: &str,
                secret: &str,
                audit: &AuditEvent,
            ) -> Result<HookRecord, StoreError> {
                let mut tx = self.begin_write().await?;
                Self::append_audit(&mut tx, &[audit]).await?;
                let hook = sqlx::query_as::<_, HookRow>(
                    "INSERT INTO hooks (url, secret, active, created_at) VALUES ($1, $2, 1, $3)
                     RETURNING *",
                )
                .bind(url)
                .bind(secret)
                .bind(now())
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| unique_violation(e, "hook"))?;
                tx.commit().await?;
                Ok(hook.into())
            }

            async fn hooks(&self) -> Result<Vec<HookRecord>, StoreError> {
                let rows = sqlx::query_as::<_, HookRow>("SELECT * FROM hooks WHERE active = 1 ORDER BY id")
                    .fetch_all(&self.pool)
                    .await?;
                Ok(rows.into_iter().map(HookRecord::from).collect())
            }

            async fn hooks_page(&self, after: Option<i64>, limit: i64) -> Result<Vec<HookRecord>, StoreError> {
                let rows = sqlx::query_as::<_, HookRow>(
                    "SELECT * FROM hooks WHERE active = 1 AND ($1 IS NULL OR id > $1) ORDER BY id LIMIT $2",
                )
                .bind(after)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
                Ok(rows.into_iter().map(HookRecord::from).collect())
            }

            async fn deactivate_hook(&self, id: i64, audit: &AuditEvent) -> Result<bool, StoreError> {
                let mut tx = self.begin_write().await?;
                let changed = sqlx::query("UPDATE hooks SET active = 0 WHERE id = $1 AND active = 1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if changed == 0 {
                    return Ok(false);
                }
                Self::append_audit(&mut tx, &[audit]).await?;
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
                Ok(sqlx::query_as(
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
                .await?)
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
                Ok(sqlx::query_scalar(
                    "SELECT COUNT(*) AS pending FROM hook_deliveries WHERE delivered_at IS NULL",
                )
                .fetch_one(&self.pool)
                .await?)
            }
        }
    };
}

impl_hook_store!(Sqlite);
impl_hook_store!(Postgres);
