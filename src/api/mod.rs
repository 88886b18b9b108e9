//! HTTP API v1 (axum). Only HTTP concerns live here: routes, extractors,
//! JSON shapes and the mapping of errors to status codes. Decisions are made
//! by `policy`, work is done by `agents`, `ca` and the pool.

mod agents;
mod anomalies;
mod approvals;
mod attestation;
pub(crate) mod audit;
mod enrollment;
pub mod error;
pub mod extract;
mod forwarded;
pub(crate) mod held;
mod hooks;
mod messages;
mod paging;
mod policies;
pub(crate) mod revocation;
mod signing;
mod status;
mod trace;

use crate::transparency::LogHealth;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::json;

use crate::agents::requests::AgentRequests;
use crate::agents::verification::Verifier;
use crate::agents::Registry;
use crate::policy::{authorize, Action, Caller};
use crate::pool::KeyPool;
use crate::telemetry::{HttpLabels, Metrics};
use error::{ApiError, ErrorCode};
pub use extract::AdminTokens;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

pub struct AppState {
    pub registry: Arc<Registry>,
    /// Every request an agent makes for itself, through one revocation
    /// check and one policy decision.
    pub requests: Arc<AgentRequests>,
    pub verifier: Arc<Verifier>,
    pub status: Arc<crate::pki::status::StatusPublisher>,
    pub hooks: Arc<crate::revocation::hooks::Deliverer>,
    pub policy: Arc<crate::policy::engine::PolicyEngine>,
    pub approvals: Arc<crate::approvals::Approvals>,
    pub pool: KeyPool,
    pub admin_tokens: AdminTokens,
    /// `server.admin_token = false` switches bearer tokens off: admins
    /// then authenticate with client certificates only.
    pub admin_token_enabled: bool,
    pub metrics: Metrics,
    pub audit_log: Arc<crate::transparency::AuditLog>,
    pub detector: Arc<crate::detect::Detector>,
    /// `[server] trusted_proxies`: connections from these forward for
    /// their clients (`forwarded`).
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

/// Only `/v1/crl` and `/v1/ocsp`: the plain-HTTP status listener.
pub fn status_router(state: Arc<AppState>) -> Router {
    status::router()
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(read_body_layer))
        .with_state(state)
}

/// The API, and `pages` (the web console, `crate::console`) beside it
/// under the same request layer.
pub fn router(state: Arc<AppState>, pages: Router<Arc<AppState>>) -> Router {
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/ca/chain.pem", get(ca_chain))
        .route("/v1/trust-bundle", get(trust_bundle))
        .route("/v1/attestations/{digest}", get(attestation))
        .merge(agents::router())
        .merge(audit::router())
        .merge(signing::router())
        .merge(messages::router())
        .merge(revocation::router())
        .merge(status::router())
        .merge(hooks::router())
        .merge(enrollment::router())
        .merge(attestation::router())
        .merge(policies::router())
        .merge(approvals::router())
        .merge(anomalies::router())
        .merge(pages)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            around_request,
        ));
    // Outermost, so the audit context, the span and the detectors all see
    // the client; no layer at all when no proxy is trusted.
    let router = if state.trusted_proxies.is_empty() {
        router
    } else {
        router.layer(axum::middleware::from_fn_with_state(
            state.clone(),
            forwarded::resolve_client,
        ))
    };
    router.with_state(state)
}

/// Everything done around every request, in one layer: each
/// `from_fn` layer costs a request a clone of the service below it and a
/// boxed future, which on the signing path was measurable (see
/// docs/architecture.md, "Detection, metrics and KPIs"). In order:
///
/// 1. the request id and the audit context its records carry (`request_id`);
/// 2. the OpenTelemetry server span, when traces are on (`trace`);
/// 3. the body, read whole before anything answers (`read_body_first`);
/// 4. the request's duration, as `http_server_request_duration_seconds`
///    by method, route template and status (a path no route matched is
///    `unmatched`; static labels, so counting allocates nothing), and its
///    credential and source address for the detectors
///    (`anomalies::watch_credentials`);
/// 5. the error code of a refusal, counted (`count_errors`).
async fn around_request(
    State(state): State<Arc<AppState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    with_request_id(request, |request| {
        trace::server_span(request, |request| async {
            let request = match read_body_first(request).await {
                Ok(request) => request,
                Err(refused) => return refused,
            };
            let started = std::time::Instant::now();
            let method = method_label(request.method());
            let route = request
                .extensions()
                .get::<axum::extract::MatchedPath>()
                .map_or("unmatched", |m| route_label(m.as_str()));
            let response = anomalies::watch_credentials(&state, request, |request| async {
                count_errors(&state, next.run(request).await)
            })
            .await;
            state
                .metrics
                .http_requests
                .get_or_create(&crate::telemetry::RequestLabels {
                    method,
                    route,
                    status: response.status().as_u16(),
                })
                .observe(started.elapsed().as_secs_f64());
            response
        })
    })
    .await
}

fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "_OTHER",
    }
}

/// The route template as a `'static` label. Templates are the router's
/// own, a fixed few dozen: each is leaked once, on its first request.
fn route_label(template: &str) -> &'static str {
    use std::collections::HashMap;
    use std::sync::{OnceLock, RwLock};
    static ROUTES: OnceLock<RwLock<HashMap<String, &'static str>>> = OnceLock::new();
    let routes = ROUTES.get_or_init(Default::default);
    if let Some(label) = routes
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(template)
    {
        return label;
    }
    let mut routes = routes.write().unwrap_or_else(|e| e.into_inner());
    routes
        .entry(template.to_owned())
        .or_insert_with(|| Box::leak(template.to_owned().into_boxed_str()))
}

fn count_errors(state: &AppState, response: Response) -> Response {
    if let Some(ErrorCode(code)) = response.extensions().get::<ErrorCode>() {
        // Partitioning's refusals are decisions the versioned policy never
        // sees (`policy::authorize`); the engine counts its own.
        if let code @ ("other_agent" | "admin_only") = *code {
            state.metrics.policy.decided("partition", "deny", code);
        }
        state
            .metrics
            .api_errors
            .get_or_create(&HttpLabels {
                code: (*code).to_owned(),
            })
            .inc();
    }
    response
}

/// A random id per request: in the response's `x-request-id` header, the
/// log span, and the records the request writes.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

/// Where a request comes from: the connection's peer, or the client a
/// trusted proxy forwarded for (`forwarded`), whose port is not known and
/// is 0.
#[derive(Clone, Copy, Debug)]
pub struct ClientAddress(pub std::net::SocketAddr);

impl ClientAddress {
    /// `ip:port`, or the IP alone when the port is not known.
    pub fn source(&self) -> String {
        if self.0.port() == 0 {
            self.0.ip().to_string()
        } else {
            self.0.to_string()
        }
    }
}

/// Gives the request its id, and opens the audit context its events carry
/// (id, W3C trace id, source address; the caller check adds the
/// credential).
async fn with_request_id<F, Fut>(mut request: axum::extract::Request, inner: F) -> Response
where
    F: FnOnce(axum::extract::Request) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    use tracing::Instrument;
    let id = hex::encode(rand::random::<[u8; 8]>());
    request.extensions_mut().insert(RequestId(id.clone()));
    let context = crate::audit::RequestContext {
        request_id: Some(id.clone()),
        trace_id: request
            .headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(trace_id),
        source: request
            .extensions()
            .get::<ClientAddress>()
            .map(ClientAddress::source),
        credential: None,
    };
    // `trace_id` when known: the caller's, or the server span's (`trace`).
    let span = tracing::debug_span!("request", id = %id, method = %request.method(), path = %request.uri().path(), trace_id = context.trace_id.as_deref());
    let mut response = context.scope(inner(request)).instrument(span).await;
    if let Ok(value) = header::HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

/// The trace id of a W3C `traceparent` header (`00-<32 hex>-<16 hex>-<2
/// hex>`), if it is one: 32 lowercase hex digits, not all zero.
fn trace_id(traceparent: &str) -> Option<String> {
    let mut parts = traceparent.split('-');
    let (_version, trace) = (parts.next()?, parts.next()?);
    let well_formed = trace.len() == 32
        && trace
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && trace.bytes().any(|b| b != b'0');
    well_formed.then(|| trace.to_owned())
}

/// Bodies declared larger than this are refused without reading them.
const MAX_DRAINED_BODY_BYTES: usize = 1024 * 1024;

/// Reads the whole request body before any handler or extractor runs, and
/// answers 413 when it is over the limit.
///
/// Why read first: a server that answers (say, 401 from the caller check)
/// while the client is still sending resets the HTTP/2 stream or the TCP
/// connection, and the client sees a transport error instead of the answer.
/// Bodies are at most 64 KiB, so buffering them costs little.
async fn read_body_first(
    request: axum::extract::Request,
) -> Result<axum::extract::Request, Response> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "request body is over 64 KiB",
        )
        .into_response()
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > MAX_DRAINED_BODY_BYTES) {
        return Err(too_large());
    }
    let (parts, body) = request.into_parts();
    match axum::body::to_bytes(body, MAX_DRAINED_BODY_BYTES).await {
        Ok(bytes) if bytes.len() <= MAX_BODY_BYTES => Ok(axum::extract::Request::from_parts(
            parts,
            axum::body::Body::from(bytes),
        )),
        Ok(_) => Err(too_large()),
        Err(_) => Err(ApiError::bad_request(
            "unreadable_body",
            "the request body could not be read",
        )
        .into_response()),
    }
}

/// `read_body_first` as a layer of its own, for the status listener.
async fn read_body_layer(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match read_body_first(request).await {
        Ok(request) => next.run(request).await,
        Err(refused) => refused,
    }
}

async fn not_found() -> ApiError {
    ApiError::not_found("no_such_endpoint", "no such endpoint")
}

async fn healthz() -> impl IntoResponse {
    axum::Json(json!({ "status": "ok" }))
}

/// Ready when both the token (through the pool) and the database answer.
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let limit = Duration::from_secs(2);
    let token = tokio::time::timeout(limit, state.pool.ping()).await;
    let database = tokio::time::timeout(limit, state.registry.ping_database()).await;
    let token_ok = matches!(token, Ok(Ok(())));
    let database_ok = matches!(database, Ok(Ok(())));
    let audit = state.audit_log.health();
    let audit_ok = audit == LogHealth::Consistent;
    let status = if token_ok && database_ok && audit_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = json!({
        "status": if status == StatusCode::OK { "ready" } else { "not_ready" },
        "token": if token_ok { "ok" } else { "unavailable" },
        "database": if database_ok { "ok" } else { "unavailable" },
        "audit_log": match &audit {
            LogHealth::Consistent => "ok",
            LogHealth::Unchecked => "unchecked",
            LogHealth::Inconsistent(_) => "inconsistent",
        },
    });
    // The code a client acts on: the one thing an operator must fix first.
    if let LogHealth::Inconsistent(reason) = &audit {
        body["code"] = json!("audit_log_inconsistent");
        body["reason"] = json!(reason);
    } else if audit == LogHealth::Unchecked {
        body["code"] = json!("audit_log_unchecked");
    }
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>, _caller: AdminOnly) -> Response {
    state
        .metrics
        .pool
        .queue_depth
        .set(state.pool.queue_depth() as i64);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// The issuing chain, root last, then any previous CA's root still in its
/// overlap.
async fn ca_chain(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let chain = state
        .registry
        .authority()
        .published_chain_pem()
        .map_err(ApiError::internal)?;
    Ok((
        [(header::CONTENT_TYPE, "application/pem-certificate-chain")],
        chain,
    )
        .into_response())
}

/// Every root to trust now: the active CA's and, during a CA rotation's
/// overlap, the previous ones'.
async fn trust_bundle(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let bundle = state
        .registry
        .authority()
        .trust_bundle_pem()
        .map_err(ApiError::internal)?;
    Ok((
        [(header::CONTENT_TYPE, "application/pem-certificate-chain")],
        bundle,
    )
        .into_response())
}

async fn attestation(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(digest): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&caller, Action::ReadAttestation)?;
    let valid = digest.len() == 64
        && digest
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !valid {
        return Err(ApiError::bad_request(
            "invalid_digest",
            "a digest is 64 lower-case hex digits",
        ));
    }
    let evidence = state.registry.evidence(&digest).await?.ok_or_else(|| {
        ApiError::not_found("attestation_not_found", "no evidence with that digest")
    })?;
    Ok(([(header::CONTENT_TYPE, "application/json")], evidence).into_response())
}

/// A caller that must be an admin.
pub struct AdminOnly;

impl FromRequestParts<Arc<AppState>> for AdminOnly {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        match Caller::from_request_parts(parts, state).await? {
            Caller::Admin(_) => Ok(AdminOnly),
            Caller::Agent(_) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "admin_only",
                "admins only",
            )),
        }
    }
}

/// 202 with the approval to poll: the request waits for the approvers
/// the policy asks for, and runs once they have voted (`approvals`).
fn held_answer(approval: crate::approvals::Approval) -> Response {
    (StatusCode::ACCEPTED, extract::Json(approval)).into_response()
}
