//! Revocation status for relying parties, without authentication (both
//! answers are signed): `GET /v1/crl`, `POST /v1/ocsp`, `GET /v1/ocsp/{req}`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine;
use serde::Deserialize;

use super::error::ApiError;
use super::AppState;

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/crl", get(crl))
        .route("/v1/crl/{ca}", get(crl_of_ca))
        .route("/v1/ocsp", post(ocsp_post))
        .route("/v1/ocsp/{*request}", get(ocsp_get))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CrlQuery {
    format: Option<String>,
}

/// The active CA's CRL.
async fn crl(
    State(state): State<Arc<AppState>>,
    Query(query): Query<CrlQuery>,
) -> Result<Response, ApiError> {
    let format = CrlFormat::parse(query.format.as_deref())?;
    format.render(&state.status.crl().await?)
}

/// The CRL of the CA whose key identifier (hex) is `ca`: where each CA's
/// certificates point, so the previous CA's stay checkable during a
/// rotation's overlap.
async fn crl_of_ca(
    State(state): State<Arc<AppState>>,
    Path(ca): Path<String>,
    Query(query): Query<CrlQuery>,
) -> Result<Response, ApiError> {
    let format = CrlFormat::parse(query.format.as_deref())?;
    let der = state.status.crl_for(&ca).await?.ok_or_else(|| {
        ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "unknown_ca",
            "no CA of keyward's has that key identifier",
        )
    })?;
    format.render(&der)
}

enum CrlFormat {
    Der,
    Pem,
}

impl CrlFormat {
    fn parse(format: Option<&str>) -> Result<Self, ApiError> {
        match format {
            None | Some("der") => Ok(CrlFormat::Der),
            Some("pem") => Ok(CrlFormat::Pem),
            Some(_) => Err(ApiError::bad_request(
                "invalid_format",
                "format is der or pem",
            )),
        }
    }

    fn render(self, der: &[u8]) -> Result<Response, ApiError> {
        match self {
            CrlFormat::Der => Ok((
                [(header::CONTENT_TYPE, "application/pkix-crl")],
                der.to_vec(),
            )
                .into_response()),
            CrlFormat::Pem => {
                let pem = der::pem::encode_string("X509 CRL", der::pem::LineEnding::LF, der)
                    .map_err(ApiError::internal)?;
                Ok(([(header::CONTENT_TYPE, "application/x-pem-file")], pem).into_response())
            }
        }
    }
}

fn ocsp_response(der: Vec<u8>) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/ocsp-response"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        der,
    )
        .into_response()
}

async fn ocsp_post(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type.eq_ignore_ascii_case("application/ocsp-request") {
        return Err(ApiError::new(
            axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send Content-Type: application/ocsp-request",
        ));
    }
    Ok(ocsp_response(state.status.ocsp(&body).await))
}

/// RFC 6960 Appendix A.1: the DER request, base64, URL-encoded, as the
/// rest of the path (it may contain '/').
async fn ocsp_get(State(state): State<Arc<AppState>>, Path(request): Path<String>) -> Response {
    match base64::engine::general_purpose::STANDARD.decode(request.as_bytes()) {
        Ok(der) => ocsp_response(state.status.ocsp(&der).await),
        // Still an OCSP answer: the client speaks OCSP, not keyward's JSON.
        Err(_) => ocsp_response(crate::pki::ocsp::error_response(
            crate::pki::ocsp::ResponseStatus::MalformedRequest,
        )),
    }
}
