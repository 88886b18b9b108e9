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

use super::agents::{rfc3339, IssuedCertificateView};
use super::error::ApiError;
use super::extract::{Json, Unparsed};
use super::AppState;
use crate::agents::CertificateKey;
use crate::audit::AuditEvent;
use crate::ca::csr::VerifiedCsr;
use crate::identity::{enrollment_token_hash, new_enrollment_token, AgentName};
use crate::policy::{authorize, Action, Caller};

/// Enrollment tokens live this long unless asked otherwise.
const DEFAULT_TOKEN_TTL_SECS: u64 = 900;
const MAX_TOKEN_TTL_SECS: u64 = 86_400;

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route(
            "/v1/agents/{name}/enrollment-tokens",
            post(create_enrollment_token),
        )
        .route("/v1/enroll", post(enroll))
        .route("/v1/renew", post(renew))
}

/// An enrollment token's lifetime in seconds, default or asked for.
pub(super) fn token_ttl(requested: Option<u64>) -> Result<u64, ApiError> {
    let ttl = requested.unwrap_or(DEFAULT_TOKEN_TTL_SECS);
    if !(1..=MAX_TOKEN_TTL_SECS).contains(&ttl) {
        return Err(ApiError::bad_request(
            "invalid_ttl",
            format!("token lifetime must be 1 to {MAX_TOKEN_TTL_SECS} seconds"),
        ));
    }
    Ok(ttl)
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
    let ttl = token_ttl(body.ttl_seconds)?;
    let agent = state.registry.get(&name).await?;
    if agent.status != crate::agents::ACTIVE {
        return Err(crate::agents::AgentError::NotActive(agent.name, agent.status).into());
    }
    let token = new_enrollment_token();
    let expires_at = time::OffsetDateTime::now_utc().unix_timestamp() + ttl as i64;
    let audit = AuditEvent::new(
        caller.audit_name(),
        "enrollment_token.create",
        name.as_str(),
    )
    .with("expires_at", expires_at);
    state
        .store
        .insert_enrollment_token(
            &enrollment_token_hash(&token),
            name.as_str(),
            expires_at,
            &audit,
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(TokenOutput {
            agent: name.to_string(),
            token,
            expires_at: rfc3339(expires_at),
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
/// only credential; it is spent only once the CSR has been checked, so a
/// malformed request does not burn it.
async fn enroll(
    State(state): State<Arc<AppState>>,
    body: Unparsed<EnrollInput>,
) -> Result<(StatusCode, Json<IssuedCertificateView>), ApiError> {
    let body = body.parse()?;
    let csr = VerifiedCsr::from_pem(&body.csr_pem)?;
    let authority = state.registry.authority();
    let ttl = authority.ttl_limits().resolve(body.ttl_seconds)?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let token_hash = enrollment_token_hash(&body.token);
    // An agent-tpm agent's token pays for attested enrollment only; a CSR
    // must not spend it.
    if let Some(agent) = state.store.enrollment_token_agent(&token_hash, now).await? {
        let name = AgentName::parse(&agent).map_err(ApiError::internal)?;
        if state.registry.get(&name).await?.custody == crate::agents::AGENT_TPM {
            return Err(crate::agents::AgentError::AttestationRequired(agent).into());
        }
    }
    let audit = AuditEvent::new("enrollment", "enrollment_token.redeem", "token");
    let agent = state
        .store
        .redeem_enrollment_token(&token_hash, now, &audit)
        .await?
        .ok_or_else(|| {
            // Unknown, used or expired: the same answer for all three.
            ApiError::unauthenticated(
                "invalid_enrollment_token",
                "the enrollment token is not valid",
            )
        })?;
    let name = AgentName::parse(&agent).map_err(ApiError::internal)?;
    issue(
        &state,
        &format!("agent:{name}"),
        &name,
        CertificateKey::Csr(csr),
        ttl,
    )
    .await
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
    let csr = VerifiedCsr::from_pem(&body.csr_pem)?;
    let ttl = state
        .registry
        .authority()
        .ttl_limits()
        .resolve(body.ttl_seconds)?;
    issue(
        &state,
        &caller.audit_name(),
        name,
        CertificateKey::Csr(csr),
        ttl,
    )
    .await
}

/// A certificate for an agent's own credential (a CSR key, or a key
/// proven in its TPM), under the built-in policy, as the 201 answer.
pub(super) async fn issue(
    state: &AppState,
    actor: &str,
    name: &AgentName,
    key: CertificateKey,
    ttl: std::time::Duration,
) -> Result<(StatusCode, Json<IssuedCertificateView>), ApiError> {
    let (issued, attestation) = state
        .registry
        .issue_certificate(actor, name, key, ttl, crate::policy::BUILTIN_POLICY_VERSION)
        .await?;
    state.metrics.certificates_issued.inc();
    Ok((
        StatusCode::CREATED,
        Json(IssuedCertificateView::new(state, issued, attestation)),
    ))
}
