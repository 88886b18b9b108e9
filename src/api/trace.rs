//! One OpenTelemetry server span per request, when traces are on
//! (`telemetry::traces`): named `<METHOD> <route template>`, with the
//! stable HTTP semantic-convention attributes, continuing the caller's W3C
//! `traceparent`. Its trace id becomes the request's: in the audit
//! context its records carry and in its log span.
//!
//! With traces off this is one relaxed atomic load per request.

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderMap;
use axum::response::Response;
use opentelemetry::propagation::Extractor;
use opentelemetry::trace::TraceContextExt as _;
use tracing::field::Empty;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::error::ErrorCode;
use super::ClientAddress;
use crate::telemetry::traces::{self, TARGET};

pub(super) async fn server_span<F, Fut>(request: Request, inner: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    if !traces::enabled() {
        return inner(request).await;
    }
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&Headers(request.headers()))
    });
    let caller = parent.span().span_context().clone();
    let parent_sampled = caller.is_valid().then(|| caller.is_sampled());
    // Not traced: no span at all, nor any child (`traces::SERVER_SPAN`).
    if !traces::trace_request(parent_sampled) {
        return inner(request).await;
    }
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    // Semantic conventions: `{method} {route}`, or the method alone when
    // no route matched (the path would make names without bound).
    let name = match &route {
        Some(route) => format!("{method} {route}"),
        None => method.to_string(),
    };
    // Only the TLS listener says where a connection comes from; the
    // loopback plain-HTTP one (`--insecure-http`) does not.
    let client = request
        .extensions()
        .get::<ClientAddress>()
        .map(|a| a.0.ip());
    let span = tracing::debug_span!(
        target: TARGET,
        traces::SERVER_SPAN,
        otel.name = %name,
        otel.kind = "server",
        otel.status_code = Empty,
        http.request.method = %method,
        http.route = Empty,
        http.response.status_code = Empty,
        url.scheme = if client.is_some() { "https" } else { "http" },
        client.address = Empty,
        error.type = Empty,
        keyward.error_code = Empty,
        keyward.agent = Empty,
    );
    if span.is_disabled() {
        return inner(request).await;
    }
    if let Some(route) = &route {
        span.record("http.route", route.as_str());
        if let Some(agent) = acted_for(route, request.uri().path()) {
            span.record("keyward.agent", agent);
        }
    }
    if let Some(ip) = client {
        span.record("client.address", tracing::field::display(ip));
    }
    // Only fails for a span already started, which this one is not.
    let _ = span.set_parent(parent);
    let trace_id = span.context().span().span_context().trace_id().to_string();
    crate::audit::RequestContext::set_trace_id(trace_id.clone());
    tracing::Span::current().record("trace_id", trace_id.as_str());

    let response = inner(request).instrument(span.clone()).await;

    let status = response.status();
    // As an i64: the OTel layer records unsigned integers as strings.
    span.record("http.response.status_code", i64::from(status.as_u16()));
    if status.is_client_error() || status.is_server_error() {
        span.record("error.type", status.as_str());
        if let Some(ErrorCode(code)) = response.extensions().get::<ErrorCode>() {
            span.record("keyward.error_code", *code);
        }
    }
    // A 4xx is the client's error, not the server span's (semconv).
    if status.is_server_error() {
        span.record("otel.status_code", "error");
    }
    response
}

/// The agent a `/v1/agents/{name}/...` request acts for: the path segment
/// where the route says `{name}`.
fn acted_for<'a>(route: &str, path: &'a str) -> Option<&'a str> {
    route.strip_prefix("/v1/agents/{name}")?;
    path.strip_prefix("/v1/agents/")?
        .split('/')
        .next()
        .filter(|name| !name.is_empty())
}

/// The request's headers as the W3C propagator reads them.
struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::acted_for;

    #[test]
    fn the_agent_is_the_name_segment_of_agent_routes_only() {
        assert_eq!(
            acted_for("/v1/agents/{name}/sign", "/v1/agents/alpha/sign"),
            Some("alpha")
        );
        assert_eq!(
            acted_for("/v1/agents/{name}", "/v1/agents/beta"),
            Some("beta")
        );
        assert_eq!(acted_for("/v1/agents", "/v1/agents"), None);
        assert_eq!(acted_for("/v1/verify", "/v1/verify"), None);
    }
}
