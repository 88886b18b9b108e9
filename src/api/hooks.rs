//! Revocation hooks: `POST /v1/hooks`, `GET /v1/hooks`, `DELETE /v1/hooks/{id}`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::Router;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::extract::{Json, Unparsed};
use super::paging::PageQuery;
use super::AppState;
use crate::policy::{authorize, Action, Caller};

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/hooks", get(list).post(register))
        .route("/v1/hooks/{id}", delete(remove))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HookInput {
    url: String,
}

#[derive(Serialize)]
struct HookOutput {
    id: i64,
    url: String,
    created_at: i64,
    /// Shown once, at registration: the HMAC key to verify events with.
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
}

async fn register(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: Unparsed<HookInput>,
) -> Result<(StatusCode, Json<HookOutput>), ApiError> {
    authorize(&caller, Action::ManageHooks)?;
    let body = body.parse()?;
    let hook = state
        .hooks
        .register(&caller.audit_name(), &body.url)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(HookOutput {
            id: hook.id,
            url: hook.url,
            created_at: hook.created_at,
            secret: Some(hook.secret),
        }),
    ))
}

async fn list(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    query: PageQuery,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&caller, Action::ManageHooks)?;
    let page = query.page::<i64>("hooks")?;
    let fetched = state
        .hooks
        .page(page.after, page.fetch())
        .await
        .map_err(ApiError::internal)?;
    let (hooks, next_cursor) = page.split(fetched, |h| h.id);
    let hooks: Vec<HookOutput> = hooks
        .into_iter()
        .map(|h| HookOutput {
            id: h.id,
            url: h.url,
            created_at: h.created_at,
            secret: None,
        })
        .collect();
    Ok(Json(
        serde_json::json!({ "hooks": hooks, "next_cursor": next_cursor }),
    ))
}

async fn remove(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    authorize(&caller, Action::ManageHooks)?;
    let id: i64 = id
        .parse()
        .map_err(|_| ApiError::bad_request("invalid_hook_id", "a hook id is an integer"))?;
    let removed = state
        .hooks
        .remove(&caller.audit_name(), id)
        .await
        .map_err(ApiError::internal)?;
    if removed {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(
            "hook_not_found",
            "no active hook with that id",
        ))
    }
}
