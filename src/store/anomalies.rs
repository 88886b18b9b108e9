//! Anomaly detection's shared state: where each credential was seen from
//! (so that replicas see one another's sightings), and every detection,
//! stored with its audit entry and hook event in one transaction.

use async_trait::async_trait;
use sqlx::{Postgres, QueryBuilder, Sqlite, Transaction};

use super::sql::SqlStore;
use super::StoreError;
use crate::audit::AuditEvent;

/// A credential used from one address.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct Sighting {
    pub address: String,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
}

/// A detection to store.
#[derive(Clone, Debug, PartialEq)]
pub struct NewAnomaly {
    /// `credential_sharing`, `rate_spike`, `cross_agent_probing`.
    pub kind: &'static str,
    pub agent: Option<String>,
    /// `cert:<serial>` or `token:<id>`: never a secret.
    pub credential: String,
    /// `alert` or `suspend`.
    pub response: &'static str,
    /// When the first request that made the anomaly was seen (Unix ms).
    pub first_offense_ms: i64,
    pub detected_at_ms: i64,
    /// What was seen (addresses, rates, denials).
    pub details: serde_json::Value,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct AnomalyRecord {
    pub id: i64,
    pub kind: String,
    pub agent: Option<String>,
    pub credential: String,
    pub response: String,
    pub first_offense_ms: i64,
    pub detected_at_ms: i64,
    pub details: serde_json::Value,
}

/// What `GET /v1/anomalies` asks for: newest first, before `before` (an
/// id), matching every filter given.
#[derive(Clone, Debug, Default)]
pub struct AnomalyQuery {
    pub agent: Option<String>,
    pub kind: Option<String>,
    pub since_ms: Option<i64>,
    pub before: Option<i64>,
    pub limit: i64,
}

/// What the KPIs are computed from, over the window since `since_ms`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KpiSamples {
    /// Each detection's delay: detected minus first offense (ms).
    pub detection_delays_ms: Vec<i64>,
    /// For each detection whose agent was then suspended or revoked: from
    /// the detection to the first suspension or revocation of the agent at
    /// or after it, as the audit log recorded them (ms).
    pub revocation_delays_ms: Vec<i64>,
    /// Requests the policy allowed and that were carried out: signatures
    /// made and certificates issued.
    pub allowed: i64,
    /// Requests the versioned policy denied (`policy.deny` audit entries).
    pub denied: i64,
}

#[async_trait]
pub trait AnomalyStore: Send + Sync {
    /// Notes that `credential` was used from `address` at `at_ms`; returns
    /// every address it was used from at or after `since_ms`, this one
    /// included, across replicas.
    async fn sight_credential(
        &self,
        credential: &str,
        address: &str,
        agent: Option<&str>,
        at_ms: i64,
        since_ms: i64,
    ) -> Result<Vec<Sighting>, StoreError>;

    /// Forgets sightings last seen before `before_ms`.
    async fn prune_sightings(&self, before_ms: i64) -> Result<u64, StoreError>;

    /// Stores `anomaly` with its audit entry and a hook event of type
    /// `anomaly`, unless an anomaly of the same kind for the same
    /// credential was detected at or after `since_ms` (one detection per
    /// window, however many replicas notice it): then `None`.
    async fn record_anomaly(
        &self,
        anomaly: &NewAnomaly,
        since_ms: i64,
        audit: &AuditEvent,
    ) -> Result<Option<AnomalyRecord>, StoreError>;

    async fn anomalies(&self, query: &AnomalyQuery) -> Result<Vec<AnomalyRecord>, StoreError>;

    /// What `GET /v1/kpis` is computed from, since `since_ms`.
    async fn kpi_samples(&self, since_ms: i64) -> Result<KpiSamples, StoreError>;
}

const UPSERT_SIGHTING: &str =
    "INSERT INTO credential_sightings (credential, address, agent, first_seen_ms, last_seen_ms)
     VALUES ($1, $2, $3, $4, $4)
     ON CONFLICT (credential, address) DO UPDATE SET last_seen_ms = CASE
         WHEN excluded.last_seen_ms > credential_sightings.last_seen_ms
         THEN excluded.last_seen_ms ELSE credential_sightings.last_seen_ms END";
const SIGHTINGS_SINCE: &str = "SELECT address, first_seen_ms, last_seen_ms
     FROM credential_sightings WHERE credential = $1 AND last_seen_ms >= $2
     ORDER BY first_seen_ms, address";
const SELECT_ANOMALIES: &str = "SELECT id, kind, agent, credential, response, first_offense_ms,
     detected_at_ms, details FROM anomalies WHERE 1 = 1";

#[derive(sqlx::FromRow)]
struct AnomalyRow {
    id: i64,
    kind: String,
    agent: Option<String>,
    credential: String,
    response: String,
    first_offense_ms: i64,
    detected_at_ms: i64,
    details: String,
}

impl TryFrom<AnomalyRow> for AnomalyRecord {
    type Error = StoreError;

    fn try_from(row: AnomalyRow) -> Result<Self, StoreError> {
        Ok(AnomalyRecord {
            details: serde_json::from_str(&row.details)
                .map_err(|e| StoreError::Corrupt(format!("anomaly {} details: {e}", row.id)))?,
            id: row.id,
            kind: row.kind,
            agent: row.agent,
            credential: row.credential,
            response: row.response,
            first_offense_ms: row.first_offense_ms,
            detected_at_ms: row.detected_at_ms,
        })
    }
}

impl SqlStore<Sqlite> {
    /// SQLite has one writer: a write transaction holds every lock already.
    async fn lock_anomalies(_tx: &mut Transaction<'_, Sqlite>) -> Result<(), StoreError> {
        Ok(())
    }
}

impl SqlStore<Postgres> {
    /// Serializes anomaly writers across replicas until the transaction
    /// ends, so that two replicas noticing one anomaly store it once.
    async fn lock_anomalies(tx: &mut Transaction<'_, Postgres>) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('keyward.anomalies', 0))")
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

macro_rules! impl_anomaly_store {
    ($db:ty) => {
        #[async_trait]
        impl AnomalyStore for SqlStore<$db> {
            async fn sight_credential(
                &self,
                credential: &str,
                address: &str,
                agent: Option<&str>,
                at_ms: i64,
                since_ms: i64,
            ) -> Result<Vec<Sighting>, StoreError> {
                let mut tx = self.begin_write().await?;
                sqlx::query(UPSERT_SIGHTING)
                    .bind(credential)
                    .bind(address)
                    .bind(agent)
                    .bind(at_ms)
                    .execute(&mut *tx)
                    .await?;
                let seen: Vec<Sighting> = sqlx::query_as(SIGHTINGS_SINCE)
                    .bind(credential)
                    .bind(since_ms)
                    .fetch_all(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(seen)
            }

            async fn prune_sightings(&self, before_ms: i64) -> Result<u64, StoreError> {
                let done = sqlx::query("DELETE FROM credential_sightings WHERE last_seen_ms < $1")
                    .bind(before_ms)
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected())
            }

            async fn record_anomaly(
                &self,
                anomaly: &NewAnomaly,
                since_ms: i64,
                audit: &AuditEvent,
            ) -> Result<Option<AnomalyRecord>, StoreError> {
                let mut tx = self.begin_write().await?;
                Self::lock_anomalies(&mut tx).await?;
                let recent: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM anomalies
                     WHERE credential = $1 AND kind = $2 AND detected_at_ms >= $3",
                )
                .bind(&anomaly.credential)
                .bind(anomaly.kind)
                .bind(since_ms)
                .fetch_one(&mut *tx)
                .await?;
                if recent > 0 {
                    return Ok(None);
                }
                let details = anomaly.details.to_string();
                let id: i64 = sqlx::query_scalar(
                    "INSERT INTO anomalies (kind, agent, credential, response, first_offense_ms,
                         detected_at_ms, details)
                     VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
                )
                .bind(anomaly.kind)
                .bind(&anomaly.agent)
                .bind(&anomaly.credential)
                .bind(anomaly.response)
                .bind(anomaly.first_offense_ms)
                .bind(anomaly.detected_at_ms)
                .bind(&details)
                .fetch_one(&mut *tx)
                .await?;
                Self::append_audit(&mut tx, &[audit]).await?;
                if let Some(agent) = &anomaly.agent {
                    Self::enqueue_hook_event(&mut tx, audit, agent, anomaly.detected_at_ms / 1000)
                        .await?;
                }
                tx.commit().await?;
                Ok(Some(AnomalyRecord {
                    id,
                    kind: anomaly.kind.to_owned(),
                    agent: anomaly.agent.clone(),
                    credential: anomaly.credential.clone(),
                    response: anomaly.response.to_owned(),
                    first_offense_ms: anomaly.first_offense_ms,
                    detected_at_ms: anomaly.detected_at_ms,
                    details: anomaly.details.clone(),
                }))
            }

            async fn anomalies(
                &self,
                query: &AnomalyQuery,
            ) -> Result<Vec<AnomalyRecord>, StoreError> {
                let mut select = QueryBuilder::<$db>::new(SELECT_ANOMALIES);
                if let Some(agent) = &query.agent {
                    select.push(" AND agent = ").push_bind(agent);
                }
                if let Some(kind) = &query.kind {
                    select.push(" AND kind = ").push_bind(kind);
                }
                if let Some(since) = query.since_ms {
                    select.push(" AND detected_at_ms >= ").push_bind(since);
                }
                if let Some(before) = query.before {
                    select.push(" AND id < ").push_bind(before);
                }
                select
                    .push(" ORDER BY id DESC LIMIT ")
                    .push_bind(query.limit);
                select
                    .build_query_as::<AnomalyRow>()
                    .fetch_all(&self.pool)
                    .await?
                    .into_iter()
                    .map(AnomalyRecord::try_from)
                    .collect()
            }

            async fn kpi_samples(&self, since_ms: i64) -> Result<KpiSamples, StoreError> {
                let detection_delays_ms: Vec<i64> = sqlx::query_scalar(
                    "SELECT detected_at_ms - first_offense_ms FROM anomalies
                     WHERE detected_at_ms >= $1 ORDER BY id",
                )
                .bind(since_ms)
                .fetch_all(&self.pool)
                .await?;
                // From the audit log, not the certificates: a resumption
                // clears a hold's time there, and the log keeps it (ms).
                let revoked: Vec<(i64, Option<i64>)> = sqlx::query_as(
                    "SELECT a.detected_at_ms,
                            (SELECT MIN(e.at_ms) FROM audit_entries e
                             WHERE e.agent = a.agent
                               AND e.action IN ('agent.suspend', 'agent.revoke')
                               AND e.at_ms >= a.detected_at_ms)
                     FROM anomalies a
                     WHERE a.detected_at_ms >= $1 AND a.agent IS NOT NULL ORDER BY a.id",
                )
                .bind(since_ms)
                .fetch_all(&self.pool)
                .await?;
                let revocation_delays_ms = revoked
                    .into_iter()
                    .filter_map(|(detected, revoked)| Some(revoked? - detected))
                    .collect();
                let signatures: i64 =
                    sqlx::query_scalar("SELECT COUNT(*) FROM signatures WHERE signed_at_ms >= $1")
                        .bind(since_ms)
                        .fetch_one(&self.pool)
                        .await?;
                let certificates: i64 =
                    sqlx::query_scalar("SELECT COUNT(*) FROM certificates WHERE created_at >= $1")
                        .bind(since_ms / 1000)
                        .fetch_one(&self.pool)
                        .await?;
                let denied: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM audit_entries
                     WHERE action = 'policy.deny' AND at_ms >= $1",
                )
                .bind(since_ms)
                .fetch_one(&self.pool)
                .await?;
                Ok(KpiSamples {
                    detection_delays_ms,
                    revocation_delays_ms,
                    allowed: signatures + certificates,
                    denied,
                })
            }
        }
    };
}

impl_anomaly_store!(Sqlite);
impl_anomaly_store!(Postgres);
