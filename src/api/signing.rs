//! /v1/agents/{name}/sign: sign with the agent's custodial key.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Router};
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::extract::{Json, Unparsed};
use super::{AppState, RequestId};
use crate::agents::requests::{Outcome, SignRequest};
use crate::agents::signing::AgentSignature;
use crate::identity::AgentName;
use crate::policy::{authorize, Action, Caller};

pub fn router() -> Router<Arc<AppState>> {
    Router::new().route("/v1/agents/{name}/sign", post(sign))
}

/// Standard base64 (RFC 4648 §4), padding optional.
pub fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    )
}

pub fn decode_b64(field: &'static str, value: &str) -> Result<Vec<u8>, ApiError> {
    b64().decode(value.trim()).map_err(|_| {
        ApiError::bad_request("invalid_base64", format!("{field} is not standard base64"))
    })
}

/// What to sign: a message (hashed here with SHA-256) or its digest.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignInput {
    pub message_b64: Option<String>,
    pub digest_sha256_b64: Option<String>,
    /// A retired key within its grace period; default the current key.
    pub key_id: Option<String>,
}

impl SignInput {
    pub fn digest(&self) -> Result<[u8; 32], ApiError> {
        digest_of(
            self.message_b64.as_deref(),
            self.digest_sha256_b64.as_deref(),
        )
    }
}

/// The SHA-256 digest of exactly one of a message and a given digest.
pub fn digest_of(
    message_b64: Option<&str>,
    digest_b64: Option<&str>,
) -> Result<[u8; 32], ApiError> {
    match (message_b64, digest_b64) {
        (Some(message), None) => Ok(Sha256::digest(decode_b64("message_b64", message)?).into()),
        (None, Some(digest)) => decode_b64("digest_sha256_b64", digest)?
            .try_into()
            .map_err(|_| {
                ApiError::bad_request(
                    "invalid_digest",
                    "digest_sha256_b64 must decode to 32 bytes",
                )
            }),
        _ => Err(ApiError::bad_request(
            "invalid_request",
            "give exactly one of message_b64 and digest_sha256_b64",
        )),
    }
}

#[derive(Serialize)]
pub(super) struct SignResponse {
    signature_der_b64: String,
    signature_p1363_b64: String,
    algorithm: &'static str,
    key_id: String,
    certificate_serial: Option<String>,
}

async fn sign(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    caller: Caller,
    Path(name): Path<String>,
    request: Unparsed<SignInput>,
) -> Result<Response, ApiError> {
    let name = AgentName::parse(&name)?;
    authorize(&caller, Action::Sign(&name))?;
    let body = request.parse()?;
    let ask = SignRequest {
        digest: body.digest()?,
        key_id: body.key_id,
        message_b64: body.message_b64,
    };
    match state
        .requests
        .sign(&caller, &name, ask, &request_id.0)
        .await?
    {
        Outcome::Done(signed) => Ok(Json(SignResponse::from(signed)).into_response()),
        Outcome::Held(approval) => Ok(super::held_answer(approval)),
    }
}

impl From<AgentSignature> for SignResponse {
    fn from(signed: AgentSignature) -> Self {
        SignResponse {
            signature_der_b64: b64().encode(signed.signature.to_der().as_bytes()),
            signature_p1363_b64: b64().encode(signed.signature.to_bytes()),
            algorithm: "ES256",
            key_id: signed.key_id.to_string(),
            certificate_serial: signed.certificate_serial,
        }
    }
}
