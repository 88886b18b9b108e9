//! The versioned policy: `POST /v1/policies`, `GET /v1/policies`,
//! `GET /v1/policies/{version}`, `POST /v1/policies/rollback`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::extract::{Json, Unparsed};
use super::paging::PageQuery;
use super::AppState;
use crate::policy::engine::PolicyRecord;
use crate::policy::{authorize, Action, Caller};

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/policies", get(history).post(apply))
        .route("/v1/policies/rollback", post(rollback))
        .route("/v1/policies/{version}", get(show))
}

/// A version without its content (history) or with it (show, apply).
#[derive(Serialize)]
struct Version {
    version: i64,
    content_sha256: String,
    author: String,
    source: String,
    created_at: i64,
    in_force: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<String>,
}

fn version(record: PolicyRecord, in_force: i64, with_content: bool) -> Version {
    Version {
        in_force: record.version == in_force,
        version: record.version,
        content_sha256: record.content_sha256,
        author: record.author,
        source: record.source,
        created_at: record.created_at,
        content: with_content.then_some(record.content),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplyInput {
    content: String,
}

async fn apply(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: Unparsed<ApplyInput>,
) -> Result<(StatusCode, Json<Version>), ApiError> {
    authorize(&caller, Action::ManagePolicy)?;
    let body = body.parse()?;
    let record = state
        .policy
        .apply(&caller.audit_name(), &body.content, "apply")
        .await?;
    let in_force = state.policy.version();
    Ok((StatusCode::CREATED, Json(version(record, in_force, true))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackInput {
    version: i64,
}

async fn rollback(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: Unparsed<RollbackInput>,
) -> Result<(StatusCode, Json<Version>), ApiError> {
    authorize(&caller, Action::ManagePolicy)?;
    let body = body.parse()?;
    let record = state
        .policy
        .rollback(&caller.audit_name(), body.version)
        .await?;
    let in_force = state.policy.version();
    Ok((StatusCode::CREATED, Json(version(record, in_force, true))))
}

async fn history(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    query: PageQuery,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&caller, Action::ManagePolicy)?;
    let page = query.page::<i64>("policies")?;
    let in_force = state.policy.version();
    let fetched = state
        .policy
        .history_page(page.after, page.fetch())
        .await
        .map_err(ApiError::internal)?;
    let (records, next_cursor) = page.split(fetched, |r| r.version);
    let versions: Vec<Version> = records
        .into_iter()
        .map(|r| version(r, in_force, false))
        .collect();
    Ok(Json(
        serde_json::json!({ "versions": versions, "next_cursor": next_cursor }),
    ))
}

async fn show(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(requested): Path<String>,
) -> Result<Json<Version>, ApiError> {
    authorize(&caller, Action::ManagePolicy)?;
    let requested: i64 = requested
        .parse()
        .map_err(|_| ApiError::bad_request("invalid_version", "a version is an integer"))?;
    let record = state
        .policy
        .applied_version(requested)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::not_found("policy_not_found", "no such policy version"))?;
    Ok(Json(version(record, state.policy.version(), true)))
}
