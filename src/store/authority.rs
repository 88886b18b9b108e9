//! keyward's own standing as an authority: its issuing CA (active and
//! previous), the keys it uses for itself, the admin tokens that act on it,
//! and its CRL numbers. None of it is about one agent, so it is an area of
//! its own rather than part of `agents`.

use async_trait::async_trait;
use sqlx::{Postgres, Sqlite};

use super::sql::{hash32, now, unique_violation, SqlStore};
use super::StoreError;
use crate::audit::AuditEvent;

/// keyward's issuing CA: the key on the token and its certificate.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct CaRecord {
    pub key_id: String,
    pub cert_der: Vec<u8>,
    /// The issuing certificate's chain up to its root, PEM, root last.
    pub chain_pem: String,
    pub created_at: i64,
}

/// A key keyward uses for itself (e.g. `attestation`), with its certificate.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct ServiceKeyRecord {
    pub purpose: String,
    pub key_id: String,
    pub cert_der: Vec<u8>,
    pub created_at: i64,
}

#[async_trait]
pub trait AuthorityStore: Send + Sync {
    async fn active_ca(&self) -> Result<Option<CaRecord>, StoreError>;
    /// Issuing CAs that stopped being active at or after `retired_since`
    /// (unix seconds), newest first.
    async fn previous_cas(&self, retired_since: i64) -> Result<Vec<CaRecord>, StoreError>;
    /// Makes `ca` the active issuing CA. Fails with `Conflict` when another
    /// replica installed one first and `replace` is false.
    async fn install_ca(
        &self,
        ca: &CaRecord,
        replace: bool,
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;

    async fn service_key(&self, purpose: &str) -> Result<Option<ServiceKeyRecord>, StoreError>;
    async fn insert_service_key(
        &self,
        key: &ServiceKeyRecord,
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;

    /// Stores the hash of an admin token that belongs to the admin `name`.
    async fn insert_admin_token(
        &self,
        token_sha256: &[u8; 32],
        name: &str,
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;
    /// Every admin token's hash with the name of the admin it belongs to.
    async fn admin_tokens(&self) -> Result<Vec<([u8; 32], String)>, StoreError>;

    /// The next CRL number: monotonic across replicas.
    async fn next_crl_number(&self) -> Result<i64, StoreError>;
}

macro_rules! impl_authority_store {
    ($db:ty) => {
        #[async_trait]
        impl AuthorityStore for SqlStore<$db> {
            async fn active_ca(&self) -> Result<Option<CaRecord>, StoreError> {
                Ok(sqlx::query_as("SELECT * FROM ca_certificates WHERE active = 1")
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn previous_cas(&self, retired_since: i64) -> Result<Vec<CaRecord>, StoreError> {
                Ok(sqlx::query_as(
                    "SELECT * FROM ca_certificates WHERE active = 0 AND retired_at >= $1
                     ORDER BY retired_at DESC",
                )
                .bind(retired_since)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn install_ca(&self, ca: &CaRecord, replace: bool, audit: &AuditEvent) -> Result<(), StoreError> {
                let mut tx = self.begin_write().await?;
                Self::append_audit(&mut tx, &[audit]).await?;
                if replace {
                    sqlx::query("UPDATE ca_certificates SET active = 0, retired_at = $1 WHERE active = 1")
                        .bind(now())
                        .execute(&mut *tx)
                        .await?;
                }
                sqlx::query(
                    "INSERT INTO ca_certificates (key_id, cert_der, chain_pem, active, created_at)
                     VALUES ($1, $2, $3, 1, $4)",
                )
                .bind(&ca.key_id)
                .bind(&ca.cert_der)
                .bind(&ca.chain_pem)
                .bind(ca.created_at)
                .execute(&mut *tx)
                .await
                .map_err(|e| unique_violation(e, "active CA"))?;
                tx.commit().await?;
                Ok(())
            }

            async fn service_key(&self, purpose: &str) -> Result<Option<ServiceKeyRecord>, StoreError> {
                Ok(sqlx::query_as("SELECT * FROM service_keys WHERE purpose = $1")
                    .bind(purpose)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn insert_service_key(&self, key: &ServiceKeyRecord, audit: &AuditEvent) -> Result<(), StoreError> {
                let mut tx = self.begin_write().await?;
                Self::append_audit(&mut tx, &[audit]).await?;
                sqlx::query(
                    "INSERT INTO service_keys (purpose, key_id, cert_der, created_at) VALUES ($1, $2, $3, $4)",
                )
                .bind(&key.purpose)
                .bind(&key.key_id)
                .bind(&key.cert_der)
                .bind(key.created_at)
                .execute(&mut *tx)
                .await
                .map_err(|e| unique_violation(e, "service key"))?;
                tx.commit().await?;
                Ok(())
            }

            async fn insert_admin_token(
                &self,
                token_sha256: &[u8; 32],
                name: &str,
                audit: &AuditEvent,
            ) -> Result<(), StoreError> {
                let mut tx = self.begin_write().await?;
                Self::append_audit(&mut tx, &[audit]).await?;
                sqlx::query("INSERT INTO admin_tokens (token_sha256, name, created_at) VALUES ($1, $2, $3)")
                    .bind(token_sha256.to_vec())
                    .bind(name)
                    .bind(now())
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| unique_violation(e, "admin token"))?;
                tx.commit().await?;
                Ok(())
            }

            async fn admin_tokens(&self) -> Result<Vec<([u8; 32], String)>, StoreError> {
                sqlx::query_as::<_, (Vec<u8>, String)>("SELECT token_sha256, name FROM admin_tokens")
                    .fetch_all(&self.pool)
                    .await?
                    .into_iter()
                    .map(|(hash, name)| Ok((hash32(hash, "admin token hash")?, name)))
                    .collect()
            }

            async fn next_crl_number(&self) -> Result<i64, StoreError> {
                Ok(sqlx::query_scalar("UPDATE crl_state SET number = number + 1 WHERE id = 1 RETURNING number")
                    .fetch_one(&self.pool)
                    .await?)
            }
        }
    };
}

impl_authority_store!(Sqlite);
impl_authority_store!(Postgres);
