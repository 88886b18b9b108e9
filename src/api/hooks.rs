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
use crate::audit::AuditEvent;
use crate::policy::{authorize, Action, Caller};
use crate::revocation::hooks::{check_url, new_secret};
use crate::store::StoreError;

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
    let url = check_url(&body.url, &state.hook_allowed_hosts)
        .map_err(|e| ApiError::bad_request("invalid_hook_url", e.to_string()))?;
    let secret = new_secret();
    let audit = AuditEvent::new(caller.audit_name(), "hook.create", &url);
    let hook = state
        .store
        .insert_hook(&url, &secret, &audit)
        .await
        .map_err(|e| match e {
            StoreError::Conflict(_) => ApiError::new(
                StatusCode::CONFLICT,
                "hook_exists",
                "a hook with that URL is registered already",
            ),
            other => other.into(),
        })?;
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
    let fetched = state.store.hooks_page(page.after, page.fetch()).await?;
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
    let audit = AuditEvent::new(caller.audit_name(), "hook.delete", id.to_string());
    if state.store.deactivate_hook(id, &audit).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(
            "hook_not_found",
            "no active hook with that id",
        ))
    }
}
