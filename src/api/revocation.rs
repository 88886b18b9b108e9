//! Revocation: `POST /v1/certificates/{serial}/revoke`,
//! `POST /v1/agents/{name}/revoke|suspend|resume`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::routing::post;
use axum::Router;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::extract::{Json, Unparsed};
use super::AppState;
use std::time::Duration;

use crate::agents::{AgentStatusChange, CertificateRevocation};
use crate::agents::{Rotation, StatusChange};
use crate::identity::AgentName;
use crate::pki::crl::RevocationReason;
use crate::policy::{authorize, Action, Caller};

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/certificates/{serial}/revoke", post(revoke_certificate))
        .route("/v1/agents/{name}/revoke", post(revoke_agent))
        .route("/v1/agents/{name}/suspend", post(suspend_agent))
        .route("/v1/agents/{name}/resume", post(resume_agent))
        .route("/v1/agents/{name}/rotate-key", post(rotate_key))
}

/// Grace period by default: long enough for relying parties to pick up
/// the new certificate.
const DEFAULT_GRACE_SECS: u64 = 300;
/// Retention by default: the old key stays on the token a day.
const DEFAULT_RETENTION_SECS: u64 = 86_400;
const MAX_RETENTION_SECS: u64 = 30 * 86_400;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RotateInput {
    /// For the old key's certificates; default `superseded`.
    reason: Option<String>,
    grace_seconds: Option<u64>,
    retention_seconds: Option<u64>,
    /// Lifetime of the new key's certificate.
    ttl_seconds: Option<u64>,
}

#[derive(Serialize)]
pub(crate) struct Rotated {
    name: String,
    old_key_id: String,
    new_key_id: String,
    /// Until when the old key signs (when named by `key_id`).
    old_key_signs_until: i64,
    /// When the old key is destroyed on the token.
    old_key_destroyed_after: i64,
    serial: String,
    certificate_pem: String,
    chain_pem: String,
    not_after: i64,
}

async fn rotate_key(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
    body: Unparsed<RotateInput>,
) -> Result<(axum::http::StatusCode, Json<Rotated>), ApiError> {
    authorize(&caller, Action::Revoke)?;
    let body = body.parse()?;
    let rotated = rotate(&state, &caller, &name, body).await?;
    Ok((axum::http::StatusCode::OK, Json(rotated)))
}

/// Rotates the agent's key, with the API's defaults for what `body`
/// leaves out (the console's rotation takes them all).
pub(crate) async fn rotate(
    state: &AppState,
    caller: &Caller,
    name: &str,
    body: RotateInput,
) -> Result<Rotated, ApiError> {
    authorize(caller, Action::Revoke)?;
    let name = AgentName::parse(name)?;
    let reason = match body.reason.as_deref() {
        Some(text) => reason(text)?,
        None => RevocationReason::Superseded,
    };
    if reason == RevocationReason::CertificateHold {
        return Err(ApiError::bad_request(
            "invalid_reason",
            "certificateHold does not retire a key",
        ));
    }
    // A compromised key signs nothing more, whatever was asked.
    let grace = match (reason, body.grace_seconds) {
        (RevocationReason::KeyCompromise, Some(g)) if g > 0 => {
            return Err(ApiError::bad_request(
                "invalid_grace",
                "a key rotated for keyCompromise has no grace period",
            ))
        }
        (RevocationReason::KeyCompromise, _) => 0,
        (_, requested) => requested.unwrap_or(DEFAULT_GRACE_SECS),
    };
    let retention = body.retention_seconds.unwrap_or(DEFAULT_RETENTION_SECS);
    if retention > MAX_RETENTION_SECS || grace > retention {
        return Err(ApiError::bad_request(
            "invalid_retention",
            format!(
                "retention_seconds must be at most {MAX_RETENTION_SECS} and not below grace_seconds"
            ),
        ));
    }
    let authority = state.registry.authority();
    let certificate_ttl = authority.ttl_limits().resolve(body.ttl_seconds)?;
    let rotated = state
        .registry
        .rotate_key(
            &caller.audit_name(),
            &name,
            Rotation {
                reason,
                grace: Duration::from_secs(grace),
                retention: Duration::from_secs(retention),
                certificate_ttl,
                expected_old_key: None,
            },
            // The new key's certificate records the version in force.
            state.policy.version(),
        )
        .await?;
    state.hooks.wake();
    let at = time::OffsetDateTime::now_utc().unix_timestamp();
    Ok(Rotated {
        name: name.to_string(),
        old_key_id: rotated.old_key_id,
        new_key_id: rotated.new_key_id,
        old_key_signs_until: at + grace as i64,
        old_key_destroyed_after: at + retention as i64,
        serial: rotated.certificate.serial,
        certificate_pem: rotated.certificate.pem,
        chain_pem: authority.chain_pem().to_owned(),
        not_after: rotated.certificate.not_after,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeInput {
    reason: String,
}

fn reason(text: &str) -> Result<RevocationReason, ApiError> {
    RevocationReason::parse(text).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_reason",
            "reason is not an RFC 5280 CRLReason name (e.g. keyCompromise, superseded, \
             cessationOfOperation)",
        )
    })
}

/// The reason for revoking an agent: any RFC 5280 name but
/// certificateHold, which is what suspending an agent sets.
pub(crate) fn agent_revocation_reason(text: &str) -> Result<RevocationReason, ApiError> {
    match reason(text)? {
        RevocationReason::CertificateHold => Err(ApiError::bad_request(
            "invalid_reason",
            "certificateHold is a suspension: suspend the agent \
             (POST /v1/agents/{name}/suspend) instead",
        )),
        reason => Ok(reason),
    }
}

/// keyward's serials are 16 bytes, written as lower-case hex; any case is
/// accepted. Anything else cannot be one of ours.
fn serial(text: &str) -> Result<String, ApiError> {
    let ok = !text.is_empty() && text.len() <= 40 && text.bytes().all(|b| b.is_ascii_hexdigit());
    if ok {
        Ok(text.to_ascii_lowercase())
    } else {
        Err(ApiError::bad_request(
            "invalid_serial",
            "a serial is up to 40 hex digits",
        ))
    }
}

#[derive(Serialize)]
struct CertificateRevoked {
    serial: String,
    reason: String,
    revoked_at: i64,
    /// True when it had been revoked before; nothing was changed.
    already_revoked: bool,
    /// For keyCompromise: the other certificates for the same key, revoked
    /// with it (the key is barred from being certified again).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    also_revoked: Vec<String>,
}

async fn revoke_certificate(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(serial_text): Path<String>,
    body: Unparsed<RevokeInput>,
) -> Result<Json<CertificateRevoked>, ApiError> {
    authorize(&caller, Action::Revoke)?;
    let body = body.parse()?;
    let serial = serial(&serial_text)?;
    let reason = reason(&body.reason)?;
    let outcome = state
        .registry
        .revoke_certificate(&caller.audit_name(), &serial, reason)
        .await?;
    match outcome {
        CertificateRevocation::NotFound => Err(ApiError::not_found(
            "certificate_not_found",
            "keyward issued no certificate with that serial",
        )),
        CertificateRevocation::AlreadyRevoked { revoked_at, reason } => {
            Ok(Json(CertificateRevoked {
                serial,
                reason,
                revoked_at,
                already_revoked: true,
                also_revoked: Vec::new(),
            }))
        }
        CertificateRevocation::Revoked { serials } => {
            state.hooks.wake();
            let revoked = state.registry.revocations().certificate(&serial);
            let also_revoked = serials.into_iter().filter(|s| *s != serial).collect();
            Ok(Json(CertificateRevoked {
                serial,
                reason: reason.as_str().to_owned(),
                revoked_at: revoked.map_or_else(
                    || time::OffsetDateTime::now_utc().unix_timestamp(),
                    |r| r.revoked_at,
                ),
                already_revoked: false,
                also_revoked,
            }))
        }
    }
}

#[derive(Serialize)]
pub(crate) struct AgentStatus {
    name: String,
    status: &'static str,
    /// False when the agent was already in this state.
    pub(crate) changed: bool,
    /// Certificates whose revocation state this call changed.
    serials: Vec<String>,
}

/// Suspends, resumes or revokes the agent (`status` is what it becomes).
pub(crate) async fn change(
    state: &AppState,
    caller: &Caller,
    name: &str,
    change: StatusChange,
    status: &'static str,
) -> Result<AgentStatus, ApiError> {
    authorize(caller, Action::Revoke)?;
    let name = AgentName::parse(name)?;
    let outcome = state
        .registry
        .change_status(&caller.audit_name(), &name, change)
        .await?;
    match outcome {
        AgentStatusChange::NotFound => Err(ApiError::not_found(
            "agent_not_found",
            format!("agent {name} not found"),
        )),
        AgentStatusChange::Refused { status: current } => Err(ApiError::new(
            axum::http::StatusCode::CONFLICT,
            "agent_revoked",
            format!("agent {name} is {current}: a revoked agent stays revoked"),
        )),
        AgentStatusChange::Unchanged => Ok(AgentStatus {
            name: name.to_string(),
            status,
            changed: false,
            serials: Vec::new(),
        }),
        AgentStatusChange::Changed { serials } => {
            state.hooks.wake();
            Ok(AgentStatus {
                name: name.to_string(),
                status,
                changed: true,
                serials,
            })
        }
    }
}

async fn revoke_agent(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
    body: Unparsed<RevokeInput>,
) -> Result<Json<AgentStatus>, ApiError> {
    authorize(&caller, Action::Revoke)?;
    let body = body.parse()?;
    let reason = agent_revocation_reason(&body.reason)?;
    change(
        &state,
        &caller,
        &name,
        StatusChange::Revoke(reason),
        "revoked",
    )
    .await
    .map(Json)
}

/// Suspend and resume take no parameters: an empty body or `{}`.
fn no_parameters(body: &Bytes) -> Result<(), ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Empty {}
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    serde_json::from_slice::<Empty>(body)
        .map(|_| ())
        .map_err(|_| ApiError::bad_request("invalid_request", "this call takes no parameters"))
}

async fn suspend_agent(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<AgentStatus>, ApiError> {
    authorize(&caller, Action::Revoke)?;
    no_parameters(&body)?;
    change(&state, &caller, &name, StatusChange::Suspend, "suspended")
        .await
        .map(Json)
}

async fn resume_agent(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<AgentStatus>, ApiError> {
    authorize(&caller, Action::Revoke)?;
    no_parameters(&body)?;
    change(&state, &caller, &name, StatusChange::Resume, "active")
        .await
        .map(Json)
}
