//! `GET /v1/approvals`, `GET /v1/approvals/{id}`,
//! `POST /v1/approvals/{id}/approve|deny`: HTTP over `crate::approvals`.
//! An approving vote runs the request through `held::HeldRunner`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Extension, Router};
use serde::Deserialize;
use serde_json::Value;

use super::error::ApiError;
use super::extract::{Json, Unparsed};
use super::held::HeldRunner;
use super::paging::PageQuery;
use super::{AppState, RequestId};
use crate::approvals::Approval;
use crate::policy::Caller;

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/approvals", get(list))
        .route("/v1/approvals/{id}", get(show))
        .route("/v1/approvals/{id}/approve", post(approve))
        .route("/v1/approvals/{id}/deny", post(deny))
}

async fn list(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    query: PageQuery,
) -> Result<Json<Value>, ApiError> {
    if !matches!(caller, Caller::Admin(_)) {
        return Err(crate::approvals::ApprovalError::AdminOnly.into());
    }
    let page = query.page::<(i64, String)>("approvals")?;
    let fetched = state
        .approvals
        .pending_page(
            &caller,
            page.after.as_ref().map(|(at, id)| (*at, id.as_str())),
            page.fetch(),
        )
        .await?;
    let (approvals, next_cursor) = page.split(fetched, |a| (a.created_at, a.id.clone()));
    Ok(Json(
        serde_json::json!({ "approvals": approvals, "next_cursor": next_cursor }),
    ))
}

async fn show(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Approval>, ApiError> {
    Ok(Json(state.approvals.get(&caller, &id).await?))
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
) -> Result<Json<Approval>, ApiError> {
    vote(state, request_id, caller, id, body, true).await
}

async fn deny(
    state: State<Arc<AppState>>,
    request_id: Extension<RequestId>,
    caller: Caller,
    id: Path<String>,
    body: Unparsed<VoteInput>,
) -> Result<Json<Approval>, ApiError> {
    vote(state, request_id, caller, id, body, false).await
}

async fn vote(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    caller: Caller,
    Path(id): Path<String>,
    body: Unparsed<VoteInput>,
    approve: bool,
) -> Result<Json<Approval>, ApiError> {
    if !matches!(caller, Caller::Admin(_)) {
        // Before the body is read: an agent's vote is refused whatever it
        // sends.
        return Err(crate::approvals::ApprovalError::AdminOnly.into());
    }
    let body: VoteInput = if body.raw().iter().all(u8::is_ascii_whitespace) {
        VoteInput::default()
    } else {
        body.parse()?
    };
    let runner = HeldRunner::new(&state, &request_id.0);
    let approval = state
        .approvals
        .vote(&caller, &id, approve, body.comment.as_deref(), &runner)
        .await?;
    Ok(Json(approval))
}
