//! An agent's own client credential: enrollment tokens
//! (`POST /v1/agents/{name}/enrollment-tokens`), the first certificate
//! (`POST /v1/enroll`, authenticated by the token alone) and the next ones
//! (`POST /v1/renew`, over mTLS with the current certificate).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use serde::{Deserialize, Serialize};

use super::agents::{issued, rfc3339, IssuedCertificateView};
use super::error::ApiError;
use super::extract::{Json, Unparsed};
use super::AppState;
use crate::identity::AgentName;
use crate::policy::{authorize, Action, Caller};

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route(
            "/v1/agents/{name}/enrollment-tokens",
            post(create_enrollment_token),
        )
        .route("/v1/enroll", post(enroll))
        .route("/v1/renew", post(renew))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenInput {
    ttl_seconds: Option<u64>,
}

#[derive(Serialize)]
struct TokenOutput {
    agent: String,
    /// Shown once; keyward keeps only its SHA-256.
    token: String,
    expires_at: String,
}

async fn create_enrollment_token(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
    body: Unparsed<TokenInput>,
) -> Result<(StatusCode, Json<TokenOutput>), ApiError> {
    let name = AgentName::parse(&name)?;
    authorize(&caller, Action::CreateEnrollmentToken)?;
    let body = body.parse()?;
    let created = state
        .requests
        .create_enrollment_token(&caller.audit_name(), &name, body.ttl_seconds)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(TokenOutput {
            agent: name.to_string(),
            token: created.token,
            expires_at: rfc3339(created.expires_at),
        }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrollInput {
    token: String,
    csr_pem: String,
    ttl_seconds: Option<u64>,
}

/// The first client certificate, for the key in the CSR. The token is the
/// only credential; it is spent only once the request has been checked and
/// the policy has decided, so a refused request does not burn it.
async fn enroll(
    State(state): State<Arc<AppState>>,
    body: Unparsed<EnrollInput>,
) -> Result<(StatusCode, Json<IssuedCertificateView>), ApiError> {
    let body = body.parse()?;
    let certified = state
        .requests
        .enroll(&body.token, &body.csr_pem, body.ttl_seconds)
        .await?;
    Ok(issued(&state, certified))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RenewInput {
    csr_pem: String,
    ttl_seconds: Option<u64>,
}

/// The next client certificate, for an agent that proves itself with its
/// current, valid one (mTLS). An admin token is no agent identity here.
async fn renew(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: Unparsed<RenewInput>,
) -> Result<(StatusCode, Json<IssuedCertificateView>), ApiError> {
    let Caller::Agent(name) = &caller else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "agent_only",
            "renewal is for an agent presenting its own client certificate",
        ));
    };
    authorize(&caller, Action::IssueCertificate(name))?;
    let body = body.parse()?;
    let certified = state
        .requests
        .renew(name, &body.csr_pem, body.ttl_seconds)
        .await?;
    Ok(issued(&state, certified))
}
