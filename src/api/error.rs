//! The one place where errors become HTTP answers:
//! `{"error":{"code":"snake_case","message":"..."}}`.
//!
//! Client errors say what was wrong. Server errors say only that something
//! failed; the detail goes to the log under the request's span, never to the
//! client (it could name files, keys or tokens).

use crate::transparency::AuditLogError;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::agents::requests::RequestError;
use crate::agents::AgentError;
use crate::approvals::ApprovalError;
use crate::attestation::tpm::TpmAttestationError;
use crate::attestation::AttestationError;
use crate::identity::NameError;
use crate::pki::CaError;
use crate::policy::engine::ApplyError;
use crate::policy::PolicyError;
use crate::pool::PoolError;
use crate::revocation::hooks::HookError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<Duration>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn unauthenticated(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }

    /// A 500 whose detail is logged, not returned.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        // The request's ids even at the default level, where its log span
        // is off: the line an operator looks up a trace or a report by.
        let context = crate::audit::RequestContext::current();
        tracing::error!(
            error = %detail,
            request_id = context.request_id.as_deref(),
            trace_id = context.trace_id.as_deref(),
            "request failed"
        );
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the server log",
        )
    }

    fn unavailable(code: &'static str, message: &str, retry_after: Duration) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code,
            message: message.into(),
            retry_after: Some(retry_after),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code, "message": self.message } });
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(after) = self.retry_after {
            let secs = after.as_secs().max(1).to_string();
            if let Ok(v) = HeaderValue::from_str(&secs) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        response.extensions_mut().insert(ErrorCode(self.code));
        response
    }
}

/// Attached to error responses so the metrics layer can count them by code.
#[derive(Clone, Copy, Debug)]
pub struct ErrorCode(pub &'static str);

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        match r {
            JsonRejection::BytesRejection(_) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    "request body is over 64 KiB",
                )
            }
            JsonRejection::MissingJsonContentType(_) => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send Content-Type: application/json",
            ),
            JsonRejection::JsonDataError(e) => {
                ApiError::bad_request("invalid_request", e.body_text())
            }
            other => ApiError::new(other.status(), "invalid_json", other.body_text()),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError::bad_request("invalid_path", r.body_text())
    }
}

impl From<NameError> for ApiError {
    fn from(e: NameError) -> Self {
        let code = match e {
            NameError::InvalidAgentName => "invalid_agent_name",
            NameError::InvalidScope => "invalid_scope",
            NameError::InvalidTrustDomain => "invalid_trust_domain",
        };
        ApiError::bad_request(code, e.to_string())
    }
}

impl From<PolicyError> for ApiError {
    fn from(e: PolicyError) -> Self {
        match e {
            PolicyError::Forbidden { reason } => {
                ApiError::new(StatusCode::FORBIDDEN, reason, "the caller may not do this")
            }
            PolicyError::Denied {
                reason,
                policy_version,
            } => ApiError::new(
                StatusCode::FORBIDDEN,
                reason,
                format!("not allowed under policy version {policy_version}"),
            ),
            PolicyError::RateLimited { retry_after } => ApiError {
                status: StatusCode::TOO_MANY_REQUESTS,
                code: "rate_limited",
                message: "this agent's rate limit is reached".into(),
                retry_after: Some(retry_after),
            },
            PolicyError::TtlAboveLimit {
                max,
                policy_version,
            } => ApiError::bad_request(
                "invalid_ttl",
                format!(
                    "policy version {policy_version} allows this agent certificates of at most {} s",
                    max.as_secs()
                ),
            ),
        }
    }
}

impl From<PoolError> for ApiError {
    fn from(e: PoolError) -> Self {
        match e {
            PoolError::QueueFull { retry_after } => ApiError::unavailable(
                "key_queue_full",
                "the key store is saturated; retry",
                retry_after,
            ),
            PoolError::Unavailable { retry_after } => ApiError::unavailable(
                "key_store_unavailable",
                "the key store is unavailable",
                retry_after,
            ),
            PoolError::DeadlineExceeded => ApiError::unavailable(
                "key_store_timeout",
                "the key store did not answer in time",
                Duration::from_secs(1),
            ),
            other => ApiError::internal(other),
        }
    }
}

impl From<ApplyError> for ApiError {
    fn from(e: ApplyError) -> Self {
        match e {
            ApplyError::Invalid(inner) => {
                ApiError::bad_request("invalid_policy", inner.to_string())
            }
            ApplyError::NoSuchVersion(_) => ApiError::not_found("policy_not_found", e.to_string()),
            ApplyError::Store(inner) => ApiError::internal(inner),
        }
    }
}

impl From<HookError> for ApiError {
    fn from(e: HookError) -> Self {
        match e {
            HookError::Url(inner) => ApiError::bad_request("invalid_hook_url", inner.to_string()),
            HookError::Exists => ApiError::new(StatusCode::CONFLICT, "hook_exists", e.to_string()),
            HookError::Store(inner) => ApiError::internal(inner),
        }
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        match e {
            RequestError::Agent(e) => e.into(),
            RequestError::Policy(e) => e.into(),
            RequestError::Approval(e) => e.into(),
            RequestError::Ca(e) => e.into(),
            RequestError::Tpm(e) => e.into(),
            RequestError::Store(e) => ApiError::internal(e),
            RequestError::TokenTtlOutOfRange { .. } => {
                ApiError::bad_request("invalid_ttl", e.to_string())
            }
            RequestError::InvalidEnrollmentToken => {
                ApiError::unauthenticated("invalid_enrollment_token", e.to_string())
            }
            RequestError::TooManyChallenges { .. } => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_challenges",
                e.to_string(),
            ),
            RequestError::CsrKeyMismatch => {
                ApiError::bad_request("csr_key_mismatch", e.to_string())
            }
        }
    }
}

impl From<CaError> for ApiError {
    fn from(e: CaError) -> Self {
        match e {
            CaError::InvalidCsr(_) => ApiError::bad_request("invalid_csr", e.to_string()),
            CaError::CsrSignature => ApiError::bad_request("csr_signature_invalid", e.to_string()),
            CaError::UnsupportedKey(_) => ApiError::bad_request("unsupported_key", e.to_string()),
            CaError::TtlOutOfRange { .. } => ApiError::bad_request("invalid_ttl", e.to_string()),
            CaError::AgentNotActive { .. } => {
                ApiError::new(StatusCode::FORBIDDEN, "agent_not_active", e.to_string())
            }
            CaError::KeyCompromised => {
                ApiError::new(StatusCode::FORBIDDEN, "key_compromised", e.to_string())
            }
            CaError::Pool(p) => p.into(),
            other => ApiError::internal(other),
        }
    }
}

impl From<AttestationError> for ApiError {
    fn from(e: AttestationError) -> Self {
        match e {
            AttestationError::Pool(p) => p.into(),
            other => ApiError::internal(other),
        }
    }
}

/// Malformed or unsupported evidence is the sender's mistake (400); a
/// replay conflicts with the one use already made (409); everything else
/// is evidence that was understood and not believed (403).
impl From<TpmAttestationError> for ApiError {
    fn from(e: TpmAttestationError) -> Self {
        use TpmAttestationError as T;
        let status = match e {
            T::Malformed(_)
            | T::UnsupportedNameAlg
            | T::KeyUnsupported
            | T::EkUnsuitable(_)
            | T::AttestWrongType => StatusCode::BAD_REQUEST,
            T::NonceReplayed => StatusCode::CONFLICT,
            _ => StatusCode::FORBIDDEN,
        };
        ApiError::new(status, e.code(), e.to_string())
    }
}

impl From<ApprovalError> for ApiError {
    fn from(e: ApprovalError) -> Self {
        let message = e.to_string();
        match e {
            ApprovalError::AdminOnly => ApiError::new(StatusCode::FORBIDDEN, "admin_only", message),
            ApprovalError::NotFound => ApiError::not_found("approval_not_found", message),
            ApprovalError::NotPending { .. } => {
                ApiError::new(StatusCode::CONFLICT, "approval_not_pending", message)
            }
            ApprovalError::AlreadyVoted => {
                ApiError::new(StatusCode::CONFLICT, "already_voted", message)
            }
            ApprovalError::InvalidComment => ApiError::bad_request("invalid_comment", message),
            ApprovalError::Store(e) => ApiError::internal(e),
        }
    }
}

impl From<AuditLogError> for ApiError {
    fn from(e: AuditLogError) -> Self {
        match e {
            AuditLogError::NoCheckpoint => ApiError::not_found("no_checkpoint", e.to_string()),
            AuditLogError::TileNotFound => ApiError::not_found("tile_not_found", e.to_string()),
            AuditLogError::NotYourEvents | AuditLogError::AdminOnly => {
                ApiError::new(StatusCode::FORBIDDEN, "forbidden", e.to_string())
            }
            AuditLogError::Inconsistent(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "audit_log_inconsistent",
                e.to_string(),
            ),
            AuditLogError::Store(_) | AuditLogError::Signing(_) => ApiError::internal(e),
        }
    }
}

impl From<crate::detect::DetectError> for ApiError {
    fn from(e: crate::detect::DetectError) -> Self {
        ApiError::internal(e)
    }
}

impl From<AgentError> for ApiError {
    fn from(e: AgentError) -> Self {
        match e {
            AgentError::NotFound(_) => ApiError::not_found("agent_not_found", e.to_string()),
            AgentError::AlreadyExists(_) => {
                ApiError::new(StatusCode::CONFLICT, "agent_exists", e.to_string())
            }
            AgentError::NotActive(..) => {
                ApiError::new(StatusCode::FORBIDDEN, "agent_not_active", e.to_string())
            }
            AgentError::NoCustodialKey(_) => {
                ApiError::new(StatusCode::CONFLICT, "no_custodial_key", e.to_string())
            }
            AgentError::TooManyScopes(_) => ApiError::bad_request("too_many_scopes", e.to_string()),
            AgentError::KeyRetired(_) => {
                ApiError::new(StatusCode::FORBIDDEN, "key_retired", e.to_string())
            }
            AgentError::KeyCompromised(_) => {
                ApiError::new(StatusCode::FORBIDDEN, "key_compromised", e.to_string())
            }
            AgentError::HoldIsForSuspension => {
                ApiError::bad_request("invalid_reason", e.to_string())
            }
            AgentError::NoCertificate(_) => {
                ApiError::new(StatusCode::CONFLICT, "no_certificate", e.to_string())
            }
            AgentError::AttestationRequired(_) => {
                ApiError::new(StatusCode::FORBIDDEN, "attestation_required", e.to_string())
            }
            AgentError::NotTpmCustody(_) => {
                ApiError::new(StatusCode::CONFLICT, "not_agent_tpm", e.to_string())
            }
            AgentError::Envelope(inner) => ApiError::bad_request(inner.reason(), inner.to_string()),
            AgentError::Ca(e) => e.into(),
            AgentError::Attestation(e) => e.into(),
            AgentError::Pool(e) => e.into(),
            other => ApiError::internal(other),
        }
    }
}
