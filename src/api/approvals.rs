//! Human approval: a request under a role with `requires_approval` is held
//! (202) until enough admins approve it; then it runs, under the policy
//! version that held it, and the agent collects the result.
//! `GET /v1/approvals`, `GET /v1/approvals/{id}`,
//! `POST /v1/approvals/{id}/approve|deny`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::ApiError;
use super::extract::{Json, Unparsed};
use super::paging::PageQuery;
use super::{AppState, RequestId};
use crate::audit::AuditEvent;
use crate::identity::AgentName;
use crate::policy::engine::Permit;
use crate::policy::{Admin, Caller};
use crate::store::{ApprovalRecord, VoteOutcome};

/// How long a request waits for its approval.
const PENDING_LIFETIME_SECS: i64 = 3600;

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/approvals", get(list))
        .route("/v1/approvals/{id}", get(show))
        .route("/v1/approvals/{id}/approve", post(approve))
        .route("/v1/approvals/{id}/deny", post(deny))
}

#[derive(Serialize)]
struct ApprovalView {
    id: String,
    agent: String,
    kind: String,
    status: String,
    approvals_required: i64,
    policy_version: i64,
    created_at: i64,
    expires_at: i64,
    /// What the agent asked for, as it asked.
    request: Value,
    /// Once it has run: the answer the agent would have had at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<Value>,
}

fn view(record: ApprovalRecord) -> ApprovalView {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let status = if record.status == "pending" && now >= record.expires_at {
        "expired".to_owned()
    } else {
        record.status
    };
    ApprovalView {
        id: record.id,
        agent: record.agent_name,
        kind: record.kind,
        status,
        approvals_required: record.approvals_required,
        policy_version: record.policy_version,
        created_at: record.created_at,
        expires_at: record.expires_at,
        request: serde_json::from_str(&record.request).unwrap_or(Value::Null),
        result: record
            .result
            .as_deref()
            .and_then(|r| serde_json::from_str(r).ok()),
    }
}

/// Holds the agent's request for approval: 202 with the id to poll.
pub(super) async fn hold(
    state: &AppState,
    caller: &Caller,
    agent: &AgentName,
    kind: &str,
    request: &[u8],
    permit: &Permit,
) -> Result<Response, ApiError> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let record = ApprovalRecord {
        id: hex::encode(rand::random::<[u8; 16]>()),
        agent_name: agent.to_string(),
        kind: kind.to_owned(),
        // Checked JSON already (it parsed); kept as sent.
        request: String::from_utf8_lossy(request).into_owned(),
        approvals_required: i64::from(permit.approvals_required),
        policy_version: permit.policy_version,
        status: "pending".into(),
        result: None,
        created_at: now,
        expires_at: now + PENDING_LIFETIME_SECS,
        decided_at: None,
    };
    let audit = AuditEvent::new(caller.audit_name(), "approval.request", &record.id)
        .with("agent", agent.to_string())
        .with("kind", kind)
        .with("policy_version", permit.policy_version)
        .with("approvals_required", i64::from(permit.approvals_required));
    state.store.insert_approval(&record, &audit).await?;
    Ok((StatusCode::ACCEPTED, Json(view(record))).into_response())
}

fn admin_of(caller: &Caller) -> Result<&Admin, ApiError> {
    match caller {
        Caller::Admin(admin) => Ok(admin),
        Caller::Agent(_) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "admin_only",
            "only an admin decides approvals",
        )),
    }
}

async fn list(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    query: PageQuery,
) -> Result<Json<Value>, ApiError> {
    admin_of(&caller)?;
    let page = query.page::<(i64, String)>("approvals")?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let fetched = state
        .store
        .pending_approvals_page(
            now,
            page.after.as_ref().map(|(at, id)| (*at, id.as_str())),
            page.fetch(),
        )
        .await?;
    let (pending, next_cursor) = page.split(fetched, |a| (a.created_at, a.id.clone()));
    let approvals: Vec<ApprovalView> = pending.into_iter().map(view).collect();
    Ok(Json(
        serde_json::json!({ "approvals": approvals, "next_cursor": next_cursor }),
    ))
}

async fn load(state: &AppState, caller: &Caller, id: &str) -> Result<ApprovalRecord, ApiError> {
    let record = state.store.approval(id).await?;
    // An agent sees only its own requests; another's is as good as absent.
    match (record, caller) {
        (Some(r), Caller::Admin(_)) => Ok(r),
        (Some(r), Caller::Agent(me)) if r.agent_name == me.as_str() => Ok(r),
        _ => Err(ApiError::not_found(
            "approval_not_found",
            "no such approval request",
        )),
    }
}

async fn show(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<ApprovalView>, ApiError> {
    Ok(Json(view(load(&state, &caller, &id).await?)))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct VoteInput {
    comment: Option<String>,
}

async fn approve(
    state: State<Arc<AppState>>,
    request_id: Extension<RequestId>,
    caller: Caller,
    id: Path<String>,
    body: Unparsed<VoteInput>,
) -> Result<Json<ApprovalView>, ApiError> {
    vote(state, request_id, caller, id, body, true).await
}

async fn deny(
    state: State<Arc<AppState>>,
    request_id: Extension<RequestId>,
    caller: Caller,
    id: Path<String>,
    body: Unparsed<VoteInput>,
) -> Result<Json<ApprovalView>, ApiError> {
    vote(state, request_id, caller, id, body, false).await
}

async fn vote(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    caller: Caller,
    Path(id): Path<String>,
    body: Unparsed<VoteInput>,
    approve: bool,
) -> Result<Json<ApprovalView>, ApiError> {
    // Votes are counted by name: one person's token and certificate are
    // one vote between them.
    let admin = admin_of(&caller)?.clone();
    let body: VoteInput = if body.raw().iter().all(u8::is_ascii_whitespace) {
        VoteInput::default()
    } else {
        body.parse()?
    };
    if body.comment.as_ref().is_some_and(|c| c.len() > 1024) {
        return Err(ApiError::bad_request(
            "invalid_comment",
            "a comment is at most 1024 bytes",
        ));
    }
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let action = if approve {
        "approval.approve"
    } else {
        "approval.deny"
    };
    let mut audit = AuditEvent::new(caller.audit_name(), action, &id)
        .with("credential", admin.credential.clone());
    if let Some(comment) = &body.comment {
        audit = audit.with("comment", comment.clone());
    }
    let outcome = state
        .store
        .vote_on_approval(
            &id,
            admin.name.as_str(),
            approve,
            body.comment.as_deref(),
            now,
            &audit,
        )
        .await?;
    match outcome {
        VoteOutcome::NotFound => Err(ApiError::not_found(
            "approval_not_found",
            "no such approval request",
        )),
        VoteOutcome::NotPending { status } => Err(ApiError::new(
            StatusCode::CONFLICT,
            "approval_not_pending",
            format!("the request is {status}"),
        )),
        VoteOutcome::AlreadyVoted => Err(ApiError::new(
            StatusCode::CONFLICT,
            "already_voted",
            "this admin has already voted on this request (with this or another of their \
             credentials): another admin must",
        )),
        VoteOutcome::Recorded { status, .. } => {
            let record = load(&state, &caller, &id).await?;
            if status == "approved" {
                run(&state, record, &request_id.0).await?;
            }
            Ok(Json(view(load(&state, &caller, &id).await?)))
        }
    }
}

/// Runs an approved request as its agent, under the version that held it,
/// and keeps the answer (or the error) for the agent to collect.
async fn run(state: &AppState, record: ApprovalRecord, request_id: &str) -> Result<(), ApiError> {
    let name = AgentName::parse(&record.agent_name).map_err(ApiError::internal)?;
    let result: Result<Value, ApiError> = match record.kind.as_str() {
        "sign" => {
            let body: super::signing::SignInput =
                serde_json::from_str(&record.request).map_err(ApiError::internal)?;
            match body.digest() {
                Ok(digest) => super::signing::execute(
                    state,
                    &name,
                    &body,
                    digest,
                    request_id,
                    record.policy_version,
                )
                .await
                .map(|r| serde_json::to_value(r).unwrap_or(Value::Null)),
                Err(e) => Err(e),
            }
        }
        "message" => {
            let body: super::messages::MessageInput =
                serde_json::from_str(&record.request).map_err(ApiError::internal)?;
            match super::messages::check_message(state, &body) {
                Ok((audience, lifetime)) => super::messages::execute(
                    state,
                    &name,
                    &body,
                    &audience,
                    lifetime,
                    request_id,
                    record.policy_version,
                )
                .await
                .map(|r| serde_json::to_value(r).unwrap_or(Value::Null)),
                Err(e) => Err(e),
            }
        }
        "certificate" => {
            let body: super::agents::IssueCertificate =
                serde_json::from_str(&record.request).map_err(ApiError::internal)?;
            super::agents::execute(
                state,
                &format!("agent:{name}"),
                &name,
                &body,
                record.policy_version,
            )
            .await
            .map(|r| serde_json::to_value(r).unwrap_or(Value::Null))
        }
        other => Err(ApiError::internal(format!("unknown approval kind {other}"))),
    };
    let (status, value) = match result {
        Ok(value) => ("completed", value),
        Err(e) => (
            "failed",
            serde_json::json!({"error": {"code": e.code, "message": e.message}}),
        ),
    };
    state
        .store
        .finish_approval(&record.id, status, &value.to_string())
        .await?;
    Ok(())
}
