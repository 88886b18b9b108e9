//! /v1/agents: register agents, read them, issue their certificates.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::extract::{Json, Unparsed};
use super::paging::PageQuery;
use super::AppState;
use crate::agents::requests::{Certified, Outcome};
use crate::agents::AgentView;
use crate::identity::{AgentName, Scope};
use crate::policy::{authorize, Action, Caller};

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/agents", post(create_agent).get(list_agents))
        .route("/v1/agents/{name}", get(get_agent).patch(update_agent))
        .route(
            "/v1/agents/{name}/certificates",
            post(issue_certificate).get(list_certificates),
        )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateAgent {
    name: String,
    #[serde(default)]
    scopes: Vec<String>,
    /// `custodial` (default: keyward generates the key on its token) or
    /// `agent-tpm` (the agent makes it in its own TPM and proves it).
    custody: Option<String>,
    /// Lifetime of an agent-tpm agent's enrollment token.
    enrollment_token_ttl_seconds: Option<u64>,
}

#[derive(Serialize)]
struct CreatedAgent {
    #[serde(flatten)]
    agent: AgentView,
    /// agent-tpm only: shown once, pays for one attested enrollment.
    #[serde(skip_serializing_if = "Option::is_none")]
    enrollment_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    enrollment_token_expires_at: Option<String>,
}

fn agent_name(raw: &str) -> Result<AgentName, ApiError> {
    Ok(AgentName::parse(raw)?)
}

async fn create_agent(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: Unparsed<CreateAgent>,
) -> Result<(StatusCode, Json<CreatedAgent>), ApiError> {
    authorize(&caller, Action::CreateAgent)?;
    // Recorded with the agent: the version in force, not the built-in one.
    let policy_version = state.policy.version();
    let body = body.parse()?;
    let name = agent_name(&body.name)?;
    let scopes = body
        .scopes
        .iter()
        .map(|s| Scope::parse(s))
        .collect::<Result<Vec<_>, _>>()?;
    let created = match body.custody.as_deref().unwrap_or(crate::agents::CUSTODIAL) {
        crate::agents::CUSTODIAL => {
            if body.enrollment_token_ttl_seconds.is_some() {
                return Err(ApiError::bad_request(
                    "invalid_field",
                    "enrollment_token_ttl_seconds is for agent-tpm agents",
                ));
            }
            let agent = state
                .registry
                .create(&caller.audit_name(), &name, scopes, policy_version)
                .await?;
            CreatedAgent {
                agent,
                enrollment_token: None,
                enrollment_token_expires_at: None,
            }
        }
        crate::agents::AGENT_TPM => {
            let ttl = crate::agents::enrollment::token_ttl(body.enrollment_token_ttl_seconds)?;
            let expires_at = time::OffsetDateTime::now_utc().unix_timestamp() + ttl as i64;
            let (agent, token) = state
                .registry
                .create_agent_tpm(
                    &caller.audit_name(),
                    &name,
                    scopes,
                    policy_version,
                    expires_at,
                )
                .await?;
            CreatedAgent {
                agent,
                enrollment_token: Some(token),
                enrollment_token_expires_at: Some(rfc3339(expires_at)),
            }
        }
        _ => {
            return Err(ApiError::bad_request(
                "invalid_custody",
                "custody must be \"custodial\" or \"agent-tpm\"",
            ))
        }
    };
    state.metrics.agents_created.inc();
    Ok((StatusCode::CREATED, Json(created)))
}

async fn list_agents(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    query: PageQuery,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&caller, Action::ListAgents)?;
    let page = query.page::<String>("agents")?;
    let fetched = state
        .registry
        .agents_page(page.after.as_deref(), page.fetch())
        .await?;
    let (agents, next_cursor) = page.split(fetched, |a| a.name.clone());
    let agents: Vec<AgentView> = agents.into_iter().map(AgentView::from_record).collect();
    Ok(Json(
        serde_json::json!({ "agents": agents, "next_cursor": next_cursor }),
    ))
}

/// A certificate keyward issued, as `GET /v1/agents/{name}/certificates`
/// lists it.
#[derive(Serialize)]
struct CertificateView {
    serial: String,
    key_id: Option<String>,
    not_before: String,
    not_after: String,
    policy_version: i64,
    attestation: Option<String>,
    revoked_at: Option<String>,
    revocation_reason: Option<String>,
    certificate_pem: String,
}

/// The agent's certificates, newest first (admin, or the agent itself).
async fn list_certificates(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
    query: PageQuery,
) -> Result<Json<serde_json::Value>, ApiError> {
    let name = agent_name(&name)?;
    authorize(&caller, Action::ReadAgent(&name))?;
    let page = query.page::<(i64, String)>("certificates")?;
    let fetched = state
        .registry
        .certificates_page(
            &name,
            page.after
                .as_ref()
                .map(|(at, serial)| (*at, serial.as_str())),
            page.fetch(),
        )
        .await?;
    let (records, next_cursor) = page.split(fetched, |c| (c.created_at, c.serial.clone()));
    let certificates = records
        .into_iter()
        .map(|c| {
            let pem = der::Document::try_from(c.der.as_slice())
                .map_err(ApiError::internal)?
                .to_pem("CERTIFICATE", der::pem::LineEnding::LF)
                .map_err(ApiError::internal)?;
            Ok(CertificateView {
                serial: c.serial,
                key_id: c.key_id,
                not_before: rfc3339(c.not_before),
                not_after: rfc3339(c.not_after),
                policy_version: c.policy_version,
                attestation: c.attestation_digest,
                revoked_at: c.revoked_at.map(rfc3339),
                revocation_reason: c.revocation_reason,
                certificate_pem: pem,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(Json(
        serde_json::json!({ "certificates": certificates, "next_cursor": next_cursor }),
    ))
}

async fn get_agent(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<AgentView>, ApiError> {
    let name = agent_name(&name)?;
    authorize(&caller, Action::ReadAgent(&name))?;
    let record = state.registry.get(&name).await?;
    Ok(Json(AgentView::from_record(record)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateAgent {
    scopes: Vec<String>,
}

/// Replaces the agent's scopes (its roles under the policy). Admin only.
async fn update_agent(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
    body: Unparsed<UpdateAgent>,
) -> Result<Json<AgentView>, ApiError> {
    let name = agent_name(&name)?;
    authorize(&caller, Action::UpdateAgent)?;
    let body = body.parse()?;
    let scopes = body
        .scopes
        .iter()
        .map(|s| Scope::parse(s))
        .collect::<Result<Vec<_>, _>>()?;
    let record = state
        .registry
        .set_scopes(&caller.audit_name(), &name, scopes)
        .await?;
    Ok(Json(AgentView::from_record(record)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IssueCertificate {
    ttl_seconds: Option<u64>,
    csr_pem: Option<String>,
}

#[derive(Serialize)]
pub(super) struct IssuedCertificateView {
    pub serial: String,
    pub certificate_pem: String,
    pub chain_pem: String,
    pub not_before: String,
    pub not_after: String,
    /// Digest of the key's attestation evidence, fetchable at
    /// /v1/attestations/{digest}; null for a CSR key keyward cannot vouch for.
    pub attestation: Option<String>,
}

impl IssuedCertificateView {
    pub(super) fn new(state: &AppState, certified: Certified) -> Self {
        let issued = certified.certificate;
        Self {
            serial: issued.serial,
            certificate_pem: issued.pem,
            chain_pem: state.registry.authority().chain_pem().to_owned(),
            not_before: rfc3339(issued.not_before),
            not_after: rfc3339(issued.not_after),
            attestation: certified.attestation,
        }
    }
}

/// 201 with the certificate, counted.
pub(super) fn issued(
    state: &AppState,
    certified: Certified,
) -> (StatusCode, Json<IssuedCertificateView>) {
    state.metrics.certificates_issued.inc();
    (
        StatusCode::CREATED,
        Json(IssuedCertificateView::new(state, certified)),
    )
}

pub(super) fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

async fn issue_certificate(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
    body: Unparsed<IssueCertificate>,
) -> Result<Response, ApiError> {
    let name = agent_name(&name)?;
    authorize(&caller, Action::IssueCertificate(&name))?;
    let body = body.parse()?;
    match state
        .requests
        .certificate(&caller, &name, body.ttl_seconds, body.csr_pem)
        .await?
    {
        Outcome::Done(certified) => Ok(issued(&state, certified).into_response()),
        Outcome::Held(approval) => Ok(super::held_answer(approval)),
    }
}
