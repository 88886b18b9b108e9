//! Requests held for human approval, the admins' votes on them, and what
//! running an approved one produced.

use async_trait::async_trait;
use sqlx::{Postgres, Sqlite};

use super::sql::SqlStore;
use super::StoreError;
use crate::audit::AuditEvent;

/// A request waiting for (or decided by) human approval.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct ApprovalRecord {
    pub id: String,
    pub agent_name: String,
    /// `sign` or `message`.
    pub kind: String,
    /// The agent's request body, JSON, as it was made.
    pub request: String,
    pub approvals_required: i64,
    pub policy_version: i64,
    pub status: String,
    /// The answer the agent gets once the request has run (JSON).
    pub result: Option<String>,
    pub created_at: i64,
    pub expires_at: i64,
    pub decided_at: Option<i64>,
}

/// One admin's vote on a held request.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct ApprovalVote {
    pub admin: String,
    pub approve: bool,
    pub comment: Option<String>,
    pub at: i64,
}

/// A vote with the request it is on.
#[derive(sqlx::FromRow)]
struct RecentVote {
    approval_id: String,
    admin: String,
    approve: bool,
    comment: Option<String>,
    at: i64,
}

/// What a vote did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VoteOutcome {
    NotFound,
    /// Already decided or expired; nothing was written.
    NotPending {
        status: String,
    },
    /// This admin has voted on it before; nothing was written.
    AlreadyVoted,
    /// Recorded; the request's status now (`pending`, `approved`, `denied`).
    Recorded {
        status: String,
        approvals: i64,
    },
}

#[async_trait]
pub trait ApprovalStore: Send + Sync {
    async fn insert_approval(
        &self,
        approval: &ApprovalRecord,
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;
    async fn approval(&self, id: &str) -> Result<Option<ApprovalRecord>, StoreError>;
    /// Pending requests not expired at `now`, oldest first (by creation,
    /// then id), after the `(created_at, id)` given, at most `limit`.
    async fn pending_approvals_page(
        &self,
        now: i64,
        after: Option<(i64, &str)>,
        limit: i64,
    ) -> Result<Vec<ApprovalRecord>, StoreError>;
    /// Requests made at or after `since`, decided or not, newest first, at
    /// most `limit`.
    async fn recent_approvals(
        &self,
        since: i64,
        limit: i64,
    ) -> Result<Vec<ApprovalRecord>, StoreError>;
    /// The votes on every request made at or after `since`, with the
    /// request's id, in the order they were cast: one read for a page of
    /// `recent_approvals`.
    async fn recent_approval_votes(
        &self,
        since: i64,
    ) -> Result<Vec<(String, ApprovalVote)>, StoreError>;
    /// Casts `admin`'s vote: a denial decides at once; enough approvals
    /// approve. One transaction with its audit event.
    async fn vote_on_approval(
        &self,
        id: &str,
        admin: &str,
        approve: bool,
        comment: Option<&str>,
        now: i64,
        audit: &AuditEvent,
    ) -> Result<VoteOutcome, StoreError>;
    /// Records what running an approved request produced.
    async fn finish_approval(&self, id: &str, status: &str, result: &str)
        -> Result<(), StoreError>;
}

/// What a vote is counted against, read under the request's row lock.
#[derive(sqlx::FromRow)]
struct Ballot {
    status: String,
    expires_at: i64,
    approvals_required: i64,
}

macro_rules! impl_approval_store {
    ($db:ty) => {
        #[async_trait]
        impl ApprovalStore for SqlStore<$db> {
            async fn insert_approval(
                &self,
                a: &ApprovalRecord,
                audit: &AuditEvent,
            ) -> Result<(), StoreError> {
                let mut tx = self.begin_write().await?;
                Self::append_audit(&mut tx, &[audit]).await?;
                sqlx::query(
                    "INSERT INTO approvals (id, agent_name, kind, request, approvals_required,
                         policy_version, status, created_at, expires_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                )
                .bind(&a.id)
                .bind(&a.agent_name)
                .bind(&a.kind)
                .bind(&a.request)
                .bind(a.approvals_required)
                .bind(a.policy_version)
                .bind(&a.status)
                .bind(a.created_at)
                .bind(a.expires_at)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn approval(&self, id: &str) -> Result<Option<ApprovalRecord>, StoreError> {
                Ok(sqlx::query_as("SELECT * FROM approvals WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn pending_approvals_page(
                &self,
                now: i64,
                after: Option<(i64, &str)>,
                limit: i64,
            ) -> Result<Vec<ApprovalRecord>, StoreError> {
                let (created_at, id) = after.unzip();
                Ok(sqlx::query_as(
                    "SELECT * FROM approvals WHERE status = 'pending' AND expires_at > $1
                       AND ($2 IS NULL OR created_at > $2 OR (created_at = $2 AND id > $3))
                     ORDER BY created_at, id LIMIT $4",
                )
                .bind(now)
                .bind(created_at)
                .bind(id)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn recent_approvals(
                &self,
                since: i64,
                limit: i64,
            ) -> Result<Vec<ApprovalRecord>, StoreError> {
                Ok(sqlx::query_as(
                    "SELECT * FROM approvals WHERE created_at >= $1
                     ORDER BY created_at DESC, id DESC LIMIT $2",
                )
                .bind(since)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn recent_approval_votes(
                &self,
                since: i64,
            ) -> Result<Vec<(String, ApprovalVote)>, StoreError> {
                let rows: Vec<RecentVote> = sqlx::query_as(
                    "SELECT v.approval_id, v.admin, v.approve <> 0 AS approve, v.comment, v.at
                     FROM approval_votes v JOIN approvals a ON a.id = v.approval_id
                     WHERE a.created_at >= $1 ORDER BY v.at, v.approval_id, v.admin",
                )
                .bind(since)
                .fetch_all(&self.pool)
                .await?;
                Ok(rows
                    .into_iter()
                    .map(|r| {
                        (
                            r.approval_id,
                            ApprovalVote {
                                admin: r.admin,
                                approve: r.approve,
                                comment: r.comment,
                                at: r.at,
                            },
                        )
                    })
                    .collect())
            }

            async fn vote_on_approval(
                &self,
                id: &str,
                admin: &str,
                approve: bool,
                comment: Option<&str>,
                now: i64,
                audit: &AuditEvent,
            ) -> Result<VoteOutcome, StoreError> {
                let mut tx = self.begin_write().await?;
                // Locks the row: concurrent votes are counted one at a time.
                let ballot: Option<Ballot> = sqlx::query_as(
                    "UPDATE approvals SET status = status WHERE id = $1
                     RETURNING status, expires_at, approvals_required",
                )
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
                let Some(ballot) = ballot else {
                    return Ok(VoteOutcome::NotFound);
                };
                if ballot.status != "pending" {
                    return Ok(VoteOutcome::NotPending { status: ballot.status });
                }
                if now >= ballot.expires_at {
                    sqlx::query("UPDATE approvals SET status = 'expired' WHERE id = $1")
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await?;
                    return Ok(VoteOutcome::NotPending {
                        status: "expired".into(),
                    });
                }
                let inserted = sqlx::query(
                    "INSERT INTO approval_votes (approval_id, admin, approve, comment, at)
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(id)
                .bind(admin)
                .bind(i64::from(approve))
                .bind(comment)
                .bind(now)
                .execute(&mut *tx)
                .await;
                match inserted {
                    Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                        return Ok(VoteOutcome::AlreadyVoted)
                    }
                    other => {
                        other?;
                    }
                }
                let approvals: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) AS n FROM approval_votes WHERE approval_id = $1 AND approve = 1",
                )
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
                let new_status = if !approve {
                    "denied"
                } else if approvals >= ballot.approvals_required {
                    "approved"
                } else {
                    "pending"
                };
                if new_status != "pending" {
                    sqlx::query("UPDATE approvals SET status = $1, decided_at = $2 WHERE id = $3")
                        .bind(new_status)
                        .bind(now)
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                }
                let event = audit
                    .clone()
                    .with("approve", approve)
                    .with("approvals", approvals)
                    .with("status", new_status);
                Self::append_audit(&mut tx, &[&event]).await?;
                tx.commit().await?;
                Ok(VoteOutcome::Recorded {
                    status: new_status.to_owned(),
                    approvals,
                })
            }

            async fn finish_approval(
                &self,
                id: &str,
                status: &str,
                result: &str,
            ) -> Result<(), StoreError> {
                sqlx::query("UPDATE approvals SET status = $1, result = $2 WHERE id = $3")
                    .bind(status)
                    .bind(result)
                    .bind(id)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }
        }
    };
}

impl_approval_store!(Sqlite);
impl_approval_store!(Postgres);
