//! Request extractors: JSON bodies with our error shape, and the caller.

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::AppState;
use crate::policy::Caller;

/// `axum::Json` whose rejections are [`ApiError`]s.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Json<T>(pub T);

impl<T: serde::Serialize> axum::response::IntoResponse for Json<T> {
    fn into_response(self) -> axum::response::Response {
        axum::Json(self.0).into_response()
    }
}

/// SHA-256 hashes of the admin tokens; the tokens themselves are never kept.
#[derive(Default)]
pub struct AdminTokens {
    hashes: Vec<[u8; 32]>,
}

impl AdminTokens {
    pub fn new(hashes: Vec<[u8; 32]>) -> Self {
        Self { hashes }
    }

    /// Compares the presented token's hash against every stored hash in
    /// constant time (no early exit on a match either).
    pub fn verify(&self, presented: &str) -> bool {
        let presented: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut matched = subtle::Choice::from(0);
        for stored in &self.hashes {
            matched |= stored.ct_eq(&presented);
        }
        matched.into()
    }
}

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        let Some(value) = parts.headers.get(AUTHORIZATION) else {
            return Err(ApiError::unauthenticated(
                "unauthenticated",
                "send Authorization: Bearer <admin token>",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .unwrap_or_default();
        if !token.is_empty() && state.admin_tokens.verify(token) {
            Ok(Caller::Admin)
        } else {
            Err(ApiError::unauthenticated(
                "invalid_credentials",
                "the credentials are not valid",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_right_token_verifies() {
        let tokens = AdminTokens::new(vec![Sha256::digest(b"right").into()]);
        assert!(tokens.verify("right"));
        assert!(!tokens.verify("wrong"));
        assert!(!tokens.verify(""));
        assert!(!AdminTokens::default().verify("right"));
    }
}
