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

use super::agents::{requested_ttl, rfc3339, token_ttl, IssuedCertificateView};
use super::error::ApiError;
use super::extract::{Json, Unparsed};
use super::AppState;
use crate::agents::CertificateKey;
use crate::audit::AuditEvent;
use crate::identity::{enrollment_token_hash, new_enrollment_token, AgentName};
use crate::pki::csr::VerifiedCsr;
use crate::policy::engine::{AgentRequest, Permit, RequestedTtl};
use crate::policy::{authorize, Action, Caller};
use crate::store::AgentRecord;

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
/// only credential; it is spent only once the request has been checked and
/// the policy has decided, so a refused request does not burn it.
async fn enroll(
    State(state): State<Arc<AppState>>,
    body: Unparsed<EnrollInput>,
) -> Result<(StatusCode, Json<IssuedCertificateView>), ApiError> {
    let body = body.parse()?;
    let csr = VerifiedCsr::from_pem(&body.csr_pem)?;
    let requested = requested_ttl(&state, body.ttl_seconds)?;
    let (name, agent) = token_agent(&state, &body.token).await?;
    // An agent-tpm agent's token pays for attested enrollment only; a CSR
    // must not spend it.
    if agent.custody == crate::agents::AGENT_TPM {
        return Err(crate::agents::AgentError::AttestationRequired(agent.name).into());
    }
    let permit = client_certificate_permit(&state, &name, requested).await?;
    let audit = AuditEvent::new("enrollment", "enrollment_token.redeem", "token");
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let redeemed = state
        .store
        .redeem_enrollment_token(&enrollment_token_hash(&body.token), now, &audit)
        .await?;
    // Used or expired since it was looked up: the same answer as unknown.
    if redeemed.as_deref() != Some(name.as_str()) {
        return Err(invalid_enrollment_token());
    }
    issue(
        &state,
        &format!("agent:{name}"),
        &name,
        CertificateKey::Csr(csr),
        permit,
    )
    .await
}

/// The agent an unspent enrollment token is for, and its record. Spends
/// nothing.
pub(super) async fn token_agent(
    state: &AppState,
    token: &str,
) -> Result<(AgentName, AgentRecord), ApiError> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let agent = state
        .store
        .enrollment_token_agent(&enrollment_token_hash(token), now)
        .await?
        .ok_or_else(invalid_enrollment_token)?;
    let name = AgentName::parse(&agent).map_err(ApiError::internal)?;
    let record = state.registry.get(&name).await?;
    Ok((name, record))
}

/// Unknown, used or expired: the same answer for all three.
pub(super) fn invalid_enrollment_token() -> ApiError {
    ApiError::unauthenticated(
        "invalid_enrollment_token",
        "the enrollment token is not valid",
    )
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
    let requested = requested_ttl(&state, body.ttl_seconds)?;
    let permit = client_certificate_permit(&state, name, requested).await?;
    issue(
        &state,
        &caller.audit_name(),
        name,
        CertificateKey::Csr(csr),
        permit,
    )
    .await
}

/// The policy's decision on a client certificate for `name` (enrollment,
/// attested enrollment, renewal): the agent asks for itself.
pub(super) async fn client_certificate_permit(
    state: &AppState,
    name: &AgentName,
    requested: RequestedTtl,
) -> Result<Permit, ApiError> {
    Ok(state
        .policy
        .permit(
            &Caller::Agent(name.clone()),
            name,
            AgentRequest::Renew(requested),
        )
        .await?)
}

/// A certificate for an agent's own credential (a CSR key, or a key
/// proven in its TPM) with the lifetime and under the version the policy
/// decided, as the 201 answer.
pub(super) async fn issue(
    state: &AppState,
    actor: &str,
    name: &AgentName,
    key: CertificateKey,
    permit: Permit,
) -> Result<(StatusCode, Json<IssuedCertificateView>), ApiError> {
    let ttl = permit
        .certificate_ttl
        .ok_or_else(|| ApiError::internal("a certificate permit without a lifetime"))?;
    let (issued, attestation) = state
        .registry
        .issue_certificate(actor, name, key, ttl, permit.policy_version)
        .await?;
    state.metrics.certificates_issued.inc();
    Ok((
        StatusCode::CREATED,
        Json(IssuedCertificateView::new(state, issued, attestation)),
    ))
}
