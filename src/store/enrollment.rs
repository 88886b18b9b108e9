//! Enrollment: one-time enrollment tokens (their hashes) and the TPM
//! credential challenges an agent's TPM answers, which a token pays for.
//! Redeeming a challenge spends its token in the same transaction, so the
//! two share an area.

use async_trait::async_trait;
use sqlx::{Postgres, Sqlite};

use super::sql::{hash32, now, unique_violation, SqlStore};
use super::StoreError;
use crate::audit::AuditEvent;

/// An enrollment token created with its agent, in the agent's transaction.
#[derive(Clone, Debug)]
pub struct NewEnrollmentToken {
    pub token_sha256: [u8; 32],
    pub expires_at: i64,
}

/// A TPM attestation challenge: what keyward sent one agent, and what it
/// expects back.
#[derive(Clone, Debug)]
pub struct TpmChallengeRecord {
    /// The qualifying data TPM2_Certify must carry; unique.
    pub nonce: Vec<u8>,
    pub agent_name: String,
    /// SHA-256 of the credential only the EK's TPM can recover.
    pub secret_sha256: [u8; 32],
    /// The AK's `TPMT_PUBLIC`, whose signature the evidence must carry.
    pub ak_public: Vec<u8>,
    /// The EK certificate's SHA-256, or the EK public key's for an EK
    /// admitted by the allow-list.
    pub ek_sha256: [u8; 32],
    /// The TPM as its EK certificate (or the allow-list) describes it.
    pub key_location: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub used_at: Option<i64>,
}

/// What redeeming a TPM challenge did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TpmRedemption {
    Redeemed,
    /// Used or expired in the meantime.
    ChallengeSpent,
    /// The enrollment token is not (or no longer) valid for its agent.
    TokenInvalid,
}

#[async_trait]
pub trait EnrollmentStore: Send + Sync {
    /// Stores an enrollment token's hash for `agent`, with its audit event.
    async fn insert_enrollment_token(
        &self,
        token_sha256: &[u8; 32],
        agent: &str,
        expires_at: i64,
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;
    /// Spends a token: the agent it was for, if it exists, is unused and
    /// has not expired at `now`. Atomic: of two concurrent redemptions at
    /// most one gets the agent.
    async fn redeem_enrollment_token(
        &self,
        token_sha256: &[u8; 32],
        now: i64,
        audit: &AuditEvent,
    ) -> Result<Option<String>, StoreError>;

    /// The agent an enrollment token is for, if the token exists, is
    /// unused and has not expired at `now`. Spends nothing.
    async fn enrollment_token_agent(
        &self,
        token_sha256: &[u8; 32],
        now: i64,
    ) -> Result<Option<String>, StoreError>;

    /// Records a TPM attestation challenge with its audit event.
    async fn insert_tpm_challenge(
        &self,
        challenge: &TpmChallengeRecord,
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;
    async fn tpm_challenge(&self, nonce: &[u8]) -> Result<Option<TpmChallengeRecord>, StoreError>;
    /// Deletes challenges, used or not, that expired before `before`.
    /// Evidence naming one is refused either way: as expired or replayed
    /// while the row exists, as stale after. Returns how many went.
    async fn delete_expired_tpm_challenges(&self, before: i64) -> Result<u64, StoreError>;
    /// Challenges issued to `agent` that are neither used nor expired.
    async fn open_tpm_challenges(&self, agent: &str, now: i64) -> Result<i64, StoreError>;
    /// Spends a challenge and the enrollment token that pays for it, in
    /// one transaction with `audit`: both or neither. Of two concurrent
    /// redemptions at most one succeeds.
    async fn redeem_tpm_challenge(
        &self,
        nonce: &[u8],
        token_sha256: &[u8; 32],
        now: i64,
        audit: &AuditEvent,
    ) -> Result<TpmRedemption, StoreError>;
}

/// The hashes are blobs in the schema; the record holds them as 32 bytes.
#[derive(sqlx::FromRow)]
struct TpmChallengeRow {
    nonce: Vec<u8>,
    agent_name: String,
    secret_sha256: Vec<u8>,
    ak_public: Vec<u8>,
    ek_sha256: Vec<u8>,
    key_location: String,
    created_at: i64,
    expires_at: i64,
    used_at: Option<i64>,
}

impl TryFrom<TpmChallengeRow> for TpmChallengeRecord {
    type Error = StoreError;

    fn try_from(row: TpmChallengeRow) -> Result<Self, StoreError> {
        Ok(TpmChallengeRecord {
            nonce: row.nonce,
            agent_name: row.agent_name,
            secret_sha256: hash32(row.secret_sha256, "challenge secret hash")?,
            ak_public: row.ak_public,
            ek_sha256: hash32(row.ek_sha256, "EK certificate hash")?,
            key_location: row.key_location,
            created_at: row.created_at,
            expires_at: row.expires_at,
            used_at: row.used_at,
        })
    }
}

macro_rules! impl_enrollment_store {
    ($db:ty) => {
        #[async_trait]
        impl EnrollmentStore for SqlStore<$db> {
            async fn insert_enrollment_token(
                &self,
                token_sha256: &[u8; 32],
                agent: &str,
                expires_at: i64,
                audit: &AuditEvent,
            ) -> Result<(), StoreError> {
                let mut tx = self.begin_write().await?;
                Self::append_audit(&mut tx, &[audit]).await?;
                sqlx::query(
                    "INSERT INTO enrollment_tokens (token_sha256, agent_name, created_at, expires_at)
                     VALUES ($1, $2, $3, $4)",
                )
                .bind(token_sha256.to_vec())
                .bind(agent)
                .bind(now())
                .bind(expires_at)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn redeem_enrollment_token(
                &self,
                token_sha256: &[u8; 32],
                now: i64,
                audit: &AuditEvent,
            ) -> Result<Option<String>, StoreError> {
                let mut tx = self.begin_write().await?;
                let agent: Option<String> = sqlx::query_scalar(
                    "UPDATE enrollment_tokens SET used_at = $1
                     WHERE token_sha256 = $2 AND used_at IS NULL AND expires_at > $1
                     RETURNING agent_name",
                )
                .bind(now)
                .bind(token_sha256.to_vec())
                .fetch_optional(&mut *tx)
                .await?;
                let Some(agent) = agent else {
                    return Ok(None);
                };
                Self::append_audit(&mut tx, &[&audit.clone().with("agent", agent.clone())]).await?;
                tx.commit().await?;
                Ok(Some(agent))
            }

            async fn enrollment_token_agent(
                &self,
                token_sha256: &[u8; 32],
                now: i64,
            ) -> Result<Option<String>, StoreError> {
                Ok(sqlx::query_scalar(
                    "SELECT agent_name FROM enrollment_tokens
                     WHERE token_sha256 = $1 AND used_at IS NULL AND expires_at > $2",
                )
                .bind(token_sha256.to_vec())
                .bind(now)
                .fetch_optional(&self.pool)
                .await?)
            }

            async fn insert_tpm_challenge(
                &self,
                challenge: &TpmChallengeRecord,
                audit: &AuditEvent,
            ) -> Result<(), StoreError> {
                let mut tx = self.begin_write().await?;
                Self::append_audit(&mut tx, &[audit]).await?;
                sqlx::query(
                    "INSERT INTO tpm_challenges (nonce, agent_name, secret_sha256, ak_public,
                        ek_sha256, key_location, created_at, expires_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(&challenge.nonce)
                .bind(&challenge.agent_name)
                .bind(challenge.secret_sha256.to_vec())
                .bind(&challenge.ak_public)
                .bind(challenge.ek_sha256.to_vec())
                .bind(&challenge.key_location)
                .bind(challenge.created_at)
                .bind(challenge.expires_at)
                .execute(&mut *tx)
                .await
                .map_err(|e| unique_violation(e, "challenge"))?;
                tx.commit().await?;
                Ok(())
            }

            async fn tpm_challenge(
                &self,
                nonce: &[u8],
            ) -> Result<Option<TpmChallengeRecord>, StoreError> {
                sqlx::query_as::<_, TpmChallengeRow>("SELECT * FROM tpm_challenges WHERE nonce = $1")
                    .bind(nonce)
                    .fetch_optional(&self.pool)
                    .await?
                    .map(TpmChallengeRecord::try_from)
                    .transpose()
            }

            async fn delete_expired_tpm_challenges(&self, before: i64) -> Result<u64, StoreError> {
                let done = sqlx::query("DELETE FROM tpm_challenges WHERE expires_at < $1")
                    .bind(before)
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected())
            }

            async fn open_tpm_challenges(&self, agent: &str, now: i64) -> Result<i64, StoreError> {
                Ok(sqlx::query_scalar(
                    "SELECT COUNT(*) AS open FROM tpm_challenges
                     WHERE agent_name = $1 AND used_at IS NULL AND expires_at > $2",
                )
                .bind(agent)
                .bind(now)
                .fetch_one(&self.pool)
                .await?)
            }

            async fn redeem_tpm_challenge(
                &self,
                nonce: &[u8],
                token_sha256: &[u8; 32],
                now: i64,
                audit: &AuditEvent,
            ) -> Result<TpmRedemption, StoreError> {
                let mut tx = self.begin_write().await?;
                let agent: Option<String> = sqlx::query_scalar(
                    "UPDATE tpm_challenges SET used_at = $1
                     WHERE nonce = $2 AND used_at IS NULL AND expires_at > $1
                     RETURNING agent_name",
                )
                .bind(now)
                .bind(nonce)
                .fetch_optional(&mut *tx)
                .await?;
                let Some(agent) = agent else {
                    return Ok(TpmRedemption::ChallengeSpent);
                };
                let token = sqlx::query(
                    "UPDATE enrollment_tokens SET used_at = $1
                     WHERE token_sha256 = $2 AND agent_name = $3
                       AND used_at IS NULL AND expires_at > $1",
                )
                .bind(now)
                .bind(token_sha256.to_vec())
                .bind(&agent)
                .execute(&mut *tx)
                .await?;
                if token.rows_affected() != 1 {
                    return Ok(TpmRedemption::TokenInvalid);
                }
                Self::append_audit(&mut tx, &[audit]).await?;
                tx.commit().await?;
                Ok(TpmRedemption::Redeemed)
            }
        }
    };
}

impl_enrollment_store!(Sqlite);
impl_enrollment_store!(Postgres);
