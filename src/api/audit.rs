//! The audit log over HTTP, as C2SP tlog-tiles lays it out under
//! `/v1/audit`: the checkpoint and the audit key (no credential), hash
//! tiles (no credential), entry bundles (admins), and a search of the
//! entries (admins; an agent its own).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::AppState;
use crate::audit::tiles::{TileKind, TilePath};
use crate::audit::AuditQuery;
use crate::policy::Caller;

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/audit/checkpoint", get(checkpoint))
        .route("/v1/audit/public-key.pem", get(public_key))
        .route("/v1/audit/tile/{*path}", get(tile))
        .route("/v1/audit/events", get(events))
}

/// Mutable: a client must not be served one older than the log.
async fn checkpoint(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let note = state.audit_log.checkpoint().await?;
    Ok((
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        note,
    )
        .into_response())
}

async fn public_key(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        state.audit_log.public_key_pem(),
    )
        .into_response()
}

/// Immutable once it exists: a tile's bytes never change, a wider partial
/// tile has another URL. Entry bundles name agents and what they asked
/// for, so only private caches may keep them.
async fn tile(
    State(state): State<Arc<AppState>>,
    Path(path): Path<String>,
    mut parts: axum::http::request::Parts,
) -> Result<Response, ApiError> {
    use axum::extract::FromRequestParts as _;
    let path = TilePath::parse(&path)
        .map_err(|e| ApiError::bad_request("invalid_tile_path", e.to_string()))?;
    let cache = match path.kind {
        TileKind::Hashes { .. } => "public, max-age=31536000, immutable",
        TileKind::Entries => "private, max-age=31536000, immutable",
    };
    // Hash tiles are public; the caller is asked for only for entries.
    let caller = match path.kind {
        TileKind::Entries => Some(Caller::from_request_parts(&mut parts, &state).await?),
        TileKind::Hashes { .. } => None,
    };
    let bytes = state.audit_log.tile(caller.as_ref(), path).await?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream"),
            (header::CACHE_CONTROL, cache),
        ],
        bytes,
    )
        .into_response())
}

/// An audit search as sent, not yet checked (the API's query string, the
/// console's form).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct EventsQuery {
    pub agent: Option<String>,
    pub action: Option<String>,
    pub actor: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub after: Option<String>,
    pub limit: Option<String>,
}

impl EventsQuery {
    /// The search, each field checked (`invalid_limit`, `invalid_after`,
    /// `invalid_filter`, `invalid_time`).
    pub(crate) fn checked(self) -> Result<AuditQuery, ApiError> {
        let limit = match self.limit.as_deref() {
            None => 100,
            Some(l) => l
                .parse::<u32>()
                .ok()
                .filter(|l| (1..=crate::transparency::MAX_EVENTS_PAGE).contains(l))
                .ok_or_else(|| ApiError::bad_request("invalid_limit", "limit is 1 to 1000"))?,
        };
        let after = self
            .after
            .as_deref()
            .map(|a| {
                a.parse::<u64>()
                    .map_err(|_| ApiError::bad_request("invalid_after", "after is an entry index"))
            })
            .transpose()?;
        Ok(AuditQuery {
            agent: self.agent.map(checked_filter).transpose()?,
            action: self.action.map(checked_filter).transpose()?,
            actor: self.actor.map(checked_filter).transpose()?,
            since_ms: self.since.as_deref().map(unix_ms).transpose()?,
            until_ms: self.until.as_deref().map(unix_ms).transpose()?,
            after,
            limit,
        })
    }
}

/// `GET /v1/audit/events`: entries oldest first, each as its leaf's JSON,
/// and `next` (the `after` of the next page, null on the last).
async fn events(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Result<Response, ApiError> {
    let raw: EventsQuery = serde_urlencoded::from_str(query.as_deref().unwrap_or_default())
        .map_err(|e| ApiError::bad_request("invalid_query", e.to_string()))?;
    let query = raw.checked()?;
    let limit = query.limit;
    let records = state.audit_log.events(&caller, query).await?;
    let next = (records.len() == limit as usize)
        .then(|| records.last().map(|r| r.index))
        .flatten();
    let events: Vec<serde_json::Value> = records
        .iter()
        .map(|r| serde_json::from_str(&r.entry).unwrap_or(serde_json::Value::Null))
        .collect();
    Ok((
        StatusCode::OK,
        axum::Json(json!({"events": events, "next": next})),
    )
        .into_response())
}

/// A filter value: what an entry field can hold, nothing longer.
pub(crate) fn checked_filter(value: String) -> Result<String, ApiError> {
    if value.is_empty() || value.len() > 256 || value.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "invalid_filter",
            "a filter is 1 to 256 printable characters",
        ));
    }
    Ok(value)
}

/// RFC 3339 (`2026-12-06T10:00:00Z`) or Unix seconds, as Unix milliseconds.
pub(crate) fn unix_ms(value: &str) -> Result<i64, ApiError> {
    let invalid = || {
        ApiError::bad_request(
            "invalid_time",
            "since and until are RFC 3339 times or Unix seconds",
        )
    };
    if let Ok(seconds) = value.parse::<i64>() {
        return seconds.checked_mul(1000).ok_or_else(invalid);
    }
    let t = time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339)
        .map_err(|_| invalid())?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).map_err(|_| invalid())
}
