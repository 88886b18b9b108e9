//! Verification and signed messages:
//! `POST /v1/verify`, `POST /v1/agents/{name}/messages` and
//! `POST /v1/messages/verify`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Router};
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::extract::{Json, Unparsed};
use super::signing::{decode_b64, digest_of};
use super::{AppState, RequestId};
use crate::agents::envelope::{self, Claims, MAX_LIFETIME_SECS};
use crate::agents::requests::{MessageAsk, Outcome};
use crate::agents::signing::SignedMessage;
use crate::agents::verification::{Signer, Verdict};
use crate::identity::AgentName;
use crate::pki::parse_pem_chain;
use crate::policy::{authorize, Action, Caller};

/// Envelope lifetime when the caller does not ask for one.
const DEFAULT_MESSAGE_TTL_SECS: i64 = 60;

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/verify", post(verify_signature))
        .route("/v1/agents/{name}/messages", post(sign_message))
        .route("/v1/messages/verify", post(verify_message))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyInput {
    certificate_pem: Option<String>,
    agent: Option<String>,
    message_b64: Option<String>,
    digest_sha256_b64: Option<String>,
    signature_b64: String,
    /// RFC 3339; validity is judged at this instant. Default: now.
    at: Option<String>,
}

#[derive(Serialize)]
struct VerifyOutput {
    valid: bool,
    reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    certificate_serial: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spiffe_id: Option<String>,
}

fn instant(at: Option<&str>) -> Result<SystemTime, ApiError> {
    let Some(text) = at else {
        return Ok(SystemTime::now());
    };
    let parsed = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|_| ApiError::bad_request("invalid_time", "at is not an RFC 3339 time"))?;
    let seconds = parsed.unix_timestamp();
    let offset = Duration::from_secs(seconds.unsigned_abs());
    Ok(if seconds >= 0 {
        UNIX_EPOCH + offset
    } else {
        UNIX_EPOCH - offset
    })
}

async fn verify_signature(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: Unparsed<VerifyInput>,
) -> Result<Json<VerifyOutput>, ApiError> {
    authorize(&caller, Action::Verify)?;
    let body = body.parse()?;
    let digest = digest_of(
        body.message_b64.as_deref(),
        body.digest_sha256_b64.as_deref(),
    )?;
    let signature = decode_b64("signature_b64", &body.signature_b64)?;
    let at = instant(body.at.as_deref())?;
    let chain;
    let name;
    let signer = match (&body.certificate_pem, &body.agent) {
        (Some(pem), None) => {
            chain = parse_pem_chain(pem).map_err(|_| {
                ApiError::bad_request(
                    "invalid_certificate",
                    "certificate_pem is not one or more PEM certificates",
                )
            })?;
            if chain.is_empty() {
                return Err(ApiError::bad_request(
                    "invalid_certificate",
                    "certificate_pem holds no certificate",
                ));
            }
            Signer::Certificate(&chain)
        }
        (None, Some(agent)) => {
            name = AgentName::parse(agent)?;
            Signer::Agent(&name)
        }
        _ => {
            return Err(ApiError::bad_request(
                "invalid_request",
                "give exactly one of certificate_pem and agent",
            ))
        }
    };
    let verdict = state
        .verifier
        .verify_signature(signer, &digest, &signature, at)
        .await?;
    Ok(Json(match verdict {
        Verdict::Valid(cert) => VerifyOutput {
            valid: true,
            reason: None,
            certificate_serial: Some(cert.serial),
            spiffe_id: cert.spiffe_id,
        },
        Verdict::Invalid { reason } => VerifyOutput {
            valid: false,
            reason: Some(reason),
            certificate_serial: None,
            spiffe_id: None,
        },
    }))
}

/// The recipient: a SPIFFE ID, or the name of an agent of this keyward.
fn audience(
    state: &AppState,
    audience: Option<&str>,
    to: Option<&str>,
) -> Result<String, ApiError> {
    match (audience, to) {
        (Some(id), None) if crate::pki::verify::is_spiffe_id(id) => Ok(id.to_owned()),
        (Some(_), None) => Err(ApiError::bad_request(
            "invalid_audience",
            "audience is not a SPIFFE ID",
        )),
        (None, Some(agent)) => {
            let agent = AgentName::parse(agent)?;
            Ok(state
                .registry
                .authority()
                .trust_domain()
                .agent_spiffe_id(&agent))
        }
        _ => Err(ApiError::bad_request(
            "invalid_request",
            "give exactly one of audience (a SPIFFE ID) and to (an agent name)",
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MessageInput {
    audience: Option<String>,
    to: Option<String>,
    intent: String,
    ttl_seconds: Option<i64>,
}

#[derive(Serialize)]
pub(super) struct MessageOutput {
    token: String,
    /// `iss`, `aud`, `iat`, `exp`, `jti`, `intent`.
    #[serde(flatten)]
    claims: Claims,
    certificate_serial: String,
}

async fn sign_message(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    caller: Caller,
    Path(name): Path<String>,
    request: Unparsed<MessageInput>,
) -> Result<Response, ApiError> {
    let name = AgentName::parse(&name)?;
    authorize(&caller, Action::SignMessage(&name))?;
    let body = request.parse()?;
    let (audience, lifetime_secs) = check_message(&state, &body)?;
    let ask = MessageAsk {
        audience,
        intent: body.intent,
        lifetime_secs,
    };
    match state
        .requests
        .message(&caller, &name, ask, &request_id.0)
        .await?
    {
        Outcome::Done(signed) => {
            Ok((StatusCode::CREATED, Json(MessageOutput::from(signed))).into_response())
        }
        Outcome::Held(approval) => Ok(super::held_answer(approval)),
    }
}

/// The recipient and lifetime a message request asks for, checked with its
/// intent.
fn check_message(state: &AppState, body: &MessageInput) -> Result<(String, i64), ApiError> {
    envelope::check_intent(&body.intent)
        .map_err(|e| ApiError::bad_request(e.reason(), e.to_string()))?;
    let audience = audience(state, body.audience.as_deref(), body.to.as_deref())?;
    let lifetime_secs = body.ttl_seconds.unwrap_or(DEFAULT_MESSAGE_TTL_SECS);
    if !(1..=MAX_LIFETIME_SECS).contains(&lifetime_secs) {
        return Err(ApiError::bad_request(
            "invalid_ttl",
            format!("ttl_seconds must be 1 to {MAX_LIFETIME_SECS}"),
        ));
    }
    Ok((audience, lifetime_secs))
}

impl From<SignedMessage> for MessageOutput {
    fn from(signed: SignedMessage) -> Self {
        MessageOutput {
            token: signed.token,
            claims: signed.claims,
            certificate_serial: signed.certificate_serial,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageVerifyInput {
    token: String,
    /// Who the verifier is: a SPIFFE ID, or `to` with an agent name. An
    /// agent may leave both out (it is itself the recipient).
    audience: Option<String>,
    to: Option<String>,
}

#[derive(Serialize)]
struct MessageVerifyOutput {
    valid: bool,
    reason: Option<&'static str>,
    #[serde(flatten)]
    message: Option<VerifiedClaims>,
}

#[derive(Serialize)]
struct VerifiedClaims {
    iss: String,
    aud: String,
    iat: i64,
    exp: i64,
    jti: String,
    intent: String,
    signer_serial: String,
}

/// Whom a message must be addressed to for this caller to verify it. An
/// agent verifies only messages to itself: verifying spends the message
/// (replay), so one verified "as" its recipient by a third party would be
/// lost to the recipient. Admins may verify for any recipient.
fn verifying_audience(
    state: &AppState,
    caller: &Caller,
    body: &MessageVerifyInput,
) -> Result<String, ApiError> {
    let Caller::Agent(me) = caller else {
        return audience(state, body.audience.as_deref(), body.to.as_deref());
    };
    let own = state
        .registry
        .authority()
        .trust_domain()
        .agent_spiffe_id(me);
    if body.audience.is_none() && body.to.is_none() {
        return Ok(own);
    }
    if audience(state, body.audience.as_deref(), body.to.as_deref())? != own {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "other_agent",
            "an agent verifies only messages addressed to itself",
        ));
    }
    Ok(own)
}

async fn verify_message(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: Unparsed<MessageVerifyInput>,
) -> Result<Json<MessageVerifyOutput>, ApiError> {
    authorize(&caller, Action::Verify)?;
    let body = body.parse()?;
    let audience = verifying_audience(&state, &caller, &body)?;
    if body.token.len() > envelope::MAX_TOKEN_LEN {
        return Err(ApiError::bad_request(
            "invalid_token",
            "token is longer than 32 KiB",
        ));
    }
    let verdict = state
        .verifier
        .verify_message(&body.token, &audience)
        .await?;
    Ok(Json(match verdict {
        Verdict::Valid(m) => MessageVerifyOutput {
            valid: true,
            reason: None,
            message: Some(VerifiedClaims {
                iss: m.iss().to_owned(),
                aud: m.aud().to_owned(),
                iat: m.iat(),
                exp: m.exp(),
                jti: m.jti().to_owned(),
                intent: m.intent().to_owned(),
                signer_serial: m.signer_serial().to_owned(),
            }),
        },
        Verdict::Invalid { reason } => MessageVerifyOutput {
            valid: false,
            reason: Some(reason),
            message: None,
        },
    }))
}
