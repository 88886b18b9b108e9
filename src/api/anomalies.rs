//! Anomaly detection at the edge: every request's credential and source
//! address go to the detector, and admins list what it found.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use serde_json::json;

use super::audit::{checked_filter, unix_ms};
use super::error::{ApiError, ErrorCode};
use super::extract::{certificate_credential, PeerIdentity};
use super::{AdminOnly, AppState, ClientAddress};
use crate::audit::RequestContext;
use crate::detect::{AnomalyQuery, CredentialUse};
use crate::identity::AgentName;

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/anomalies", get(list))
        .route("/v1/kpis", get(kpis))
}

const MAX_PAGE: i64 = 1000;

/// Shows the detector each credential used and where from. A client
/// certificate is known before the handler runs, so a use that makes an
/// agent's certificate shared suspends the agent before this request is
/// served; an admin token is known only once the caller check has run.
/// Detection never fails a request: a store error is logged.
pub(super) async fn watch_credentials<F, Fut>(
    state: &AppState,
    request: Request,
    inner: F,
) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    let Some(address) = request
        .extensions()
        .get::<ClientAddress>()
        .map(|a| a.0.ip())
    else {
        return inner(request).await;
    };
    let certificate = match request.extensions().get::<PeerIdentity>() {
        Some(PeerIdentity::Agent { name, serial, .. }) => {
            Some((certificate_credential(serial), Some(name.clone())))
        }
        Some(PeerIdentity::Admin { serial, .. }) => Some((certificate_credential(serial), None)),
        _ => None,
    };
    if let Some((credential, agent)) = &certificate {
        watch(state, credential, agent.as_ref(), address).await;
        if let Some(agent) = agent {
            if let Err(e) = state.detector.agent_request(credential, agent).await {
                tracing::error!(error = %e, credential, "anomaly detection failed for a request");
            }
        }
    }
    let response = inner(request).await;
    if let (Some((credential, Some(agent))), Some(ErrorCode(code))) =
        (&certificate, response.extensions().get::<ErrorCode>())
    {
        if let Err(e) = state.detector.denied(credential, agent, code).await {
            tracing::error!(error = %e, credential, "anomaly detection failed for a denial");
        }
    }
    if certificate.is_none() {
        if let Some(token) =
            RequestContext::current_credential().filter(|c| c.starts_with("token:"))
        {
            watch(state, &token, None, address).await;
        }
    }
    response
}

async fn watch(
    state: &AppState,
    credential: &str,
    agent: Option<&AgentName>,
    address: std::net::IpAddr,
) {
    let usage = CredentialUse {
        credential,
        agent,
        address,
    };
    if let Err(e) = state.detector.credential_used(usage).await {
        tracing::error!(error = %e, credential, "anomaly detection failed for a request");
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    agent: Option<String>,
    kind: Option<String>,
    since: Option<String>,
    before: Option<String>,
    limit: Option<String>,
}

/// `GET /v1/anomalies?agent=&kind=&since=&before=&limit=`, newest first;
/// `next` is the `before` of the next page.
async fn list(
    State(state): State<Arc<AppState>>,
    _admin: AdminOnly,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Result<Response, ApiError> {
    let raw: ListQuery = serde_urlencoded::from_str(query.as_deref().unwrap_or_default())
        .map_err(|e| ApiError::bad_request("invalid_query", e.to_string()))?;
    let limit = match raw.limit.as_deref() {
        None => 100,
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=MAX_PAGE).contains(l))
            .ok_or_else(|| ApiError::bad_request("invalid_limit", "limit is 1 to 1000"))?,
    };
    let before =
        raw.before
            .as_deref()
            .map(|b| {
                b.parse::<i64>().ok().filter(|b| *b > 0).ok_or_else(|| {
                    ApiError::bad_request("invalid_before", "before is an anomaly id")
                })
            })
            .transpose()?;
    let query = AnomalyQuery {
        agent: raw.agent.map(checked_filter).transpose()?,
        kind: raw.kind.map(checked_filter).transpose()?,
        since_ms: raw.since.as_deref().map(unix_ms).transpose()?,
        before,
        limit,
    };
    let anomalies = state.detector.anomalies(&query).await?;
    let next = (anomalies.len() == limit as usize)
        .then(|| anomalies.last().map(|a| a.id))
        .flatten();
    Ok(axum::Json(json!({"anomalies": anomalies, "next": next})).into_response())
}

/// The default KPI window: a day.
const DEFAULT_KPI_WINDOW_SECONDS: u64 = 86_400;
/// The longest: 90 days.
const MAX_KPI_WINDOW_SECONDS: u64 = 90 * 86_400;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KpiQuery {
    window_seconds: Option<String>,
}

/// `GET /v1/kpis?window_seconds=`: the mission's KPIs over the window
/// (a day by default).
async fn kpis(
    State(state): State<Arc<AppState>>,
    _admin: AdminOnly,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Result<Response, ApiError> {
    let raw: KpiQuery = serde_urlencoded::from_str(query.as_deref().unwrap_or_default())
        .map_err(|e| ApiError::bad_request("invalid_query", e.to_string()))?;
    let window = match raw.window_seconds.as_deref() {
        None => DEFAULT_KPI_WINDOW_SECONDS,
        Some(w) => w
            .parse::<u64>()
            .ok()
            .filter(|w| (1..=MAX_KPI_WINDOW_SECONDS).contains(w))
            .ok_or_else(|| {
                ApiError::bad_request("invalid_window", "window_seconds is 1 to 7776000 (90 days)")
            })?,
    };
    let kpis = state
        .detector
        .kpis(std::time::Duration::from_secs(window))
        .await?;
    Ok(axum::Json(kpis).into_response())
}
