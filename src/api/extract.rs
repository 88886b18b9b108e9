//! Request extractors: JSON bodies with our error shape, and the caller.

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::AppState;
use crate::identity::{AgentName, TrustDomain};
use crate::pki::{Authority, Certificate};
use crate::policy::{Admin, Caller};

/// `axum::Json` whose rejections are [`ApiError`]s.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Json<T>(pub T);

impl<T: serde::Serialize> axum::response::IntoResponse for Json<T> {
    fn into_response(self) -> axum::response::Response {
        axum::Json(self.0).into_response()
    }
}

/// A JSON body read but not yet parsed: handlers parse it after the caller
/// has been authorized, so that a caller who may not make the request is
/// told so (403) rather than what is wrong with its body (400).
pub struct Unparsed<T> {
    is_json: bool,
    bytes: axum::body::Bytes,
    target: std::marker::PhantomData<T>,
}

impl<S: Send + Sync, T> FromRequest<S> for Unparsed<T> {
    type Rejection = ApiError;

    async fn from_request(request: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let is_json = request
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| {
                let v = v.trim();
                v.eq_ignore_ascii_case("application/json")
                    || (v.starts_with("application/") && v.ends_with("+json"))
            });
        let bytes = axum::body::Bytes::from_request(request, state)
            .await
            .map_err(|_| {
                ApiError::bad_request("unreadable_body", "the request body could not be read")
            })?;
        Ok(Self {
            is_json,
            bytes,
            target: std::marker::PhantomData,
        })
    }
}

impl<T: serde::de::DeserializeOwned> Unparsed<T> {
    /// The body as sent (e.g. to keep a request for its approval).
    pub fn raw(&self) -> &[u8] {
        &self.bytes
    }

    /// The body as `T`, with the same errors as [`Json`]. The bytes stay,
    /// for a request that must be kept as sent (approval).
    pub fn parse(&self) -> Result<T, ApiError> {
        if !self.is_json {
            return Err(ApiError::new(
                axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send Content-Type: application/json",
            ));
        }
        serde_json::from_slice(&self.bytes).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => ApiError::bad_request(
                "invalid_request",
                format!("the JSON body does not fit this request: {e}"),
            ),
            _ => ApiError::bad_request("invalid_json", format!("the body is not JSON: {e}")),
        })
    }
}

/// The admin tokens' SHA-256 hashes with the admins they belong to; the
/// tokens themselves are never kept.
#[derive(Default)]
pub struct AdminTokens {
    tokens: Vec<([u8; 32], AgentName)>,
}

impl AdminTokens {
    pub fn new(tokens: Vec<([u8; 32], AgentName)>) -> Self {
        Self { tokens }
    }

    pub fn verify(&self, presented: &str) -> bool {
        self.identify(presented).is_some()
    }

    /// The admin the token belongs to, when it is one of ours. Every
    /// stored hash is compared, in constant time, whatever matches; which
    /// one matched is selected without a branch on secret data.
    pub fn identify(&self, presented: &str) -> Option<Admin> {
        use subtle::ConditionallySelectable;
        let presented: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut matched = subtle::Choice::from(0);
        let mut index = 0u64;
        for (i, (stored, _)) in self.tokens.iter().enumerate() {
            let equal = stored.ct_eq(&presented);
            index = u64::conditional_select(&index, &(i as u64), equal);
            matched |= equal;
        }
        let (_, name) = self.tokens.get(usize::try_from(index).ok()?)?;
        bool::from(matched).then(|| Admin {
            name: name.clone(),
            credential: format!("token:{}", hex::encode(&presented[..4])),
        })
    }
}

/// Who the connection's client certificate says the caller is, decided
/// once per connection. rustls has already refused a certificate that does
/// not chain to keyward's CAs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerIdentity {
    /// No client certificate.
    None,
    /// An agent certificate of this trust domain.
    Agent {
        name: AgentName,
        serial: String,
        /// Unix seconds.
        not_before: i64,
        /// Unix seconds; a long-lived connection outlives its certificate.
        not_after: i64,
    },
    /// An operator's client certificate (`spiffe://<td>/admin/<name>`).
    Admin {
        name: AgentName,
        serial: String,
        not_after: i64,
    },
    /// A certificate keyward's CA issued that names no agent of this trust
    /// domain (a server certificate, another trust domain's ID).
    NotAnAgent,
}

/// How audit records, metrics and the detectors name a client
/// certificate as a credential: `cert:<serial>`.
pub(crate) fn certificate_credential(serial: &str) -> String {
    format!("cert:{serial}")
}

/// Turns a verified client certificate into a [`PeerIdentity`].
#[derive(Clone)]
pub struct ClientIdentifier {
    anchors: Arc<Vec<Certificate>>,
    intermediates: Arc<Vec<Certificate>>,
    trust_domain: TrustDomain,
}

impl ClientIdentifier {
    pub fn new(authority: &Authority) -> Self {
        Self {
            anchors: Arc::new(authority.roots()),
            intermediates: Arc::new(authority.all_intermediates()),
            trust_domain: authority.trust_domain().clone(),
        }
    }

    /// Checks the leaf again with keyward's own rules (exactly one SPIFFE
    /// URI SAN, not a CA, digitalSignature), which the TLS library does not
    /// know, and reads the agent's name from it.
    pub fn identify(
        &self,
        chain: Option<&[rustls::pki_types::CertificateDer<'_>]>,
    ) -> PeerIdentity {
        use der::Decode;
        let Some(leaf) = chain.and_then(|c| c.first()) else {
            return PeerIdentity::None;
        };
        let Ok(leaf) = Certificate::from_der(leaf.as_ref()) else {
            return PeerIdentity::NotAnAgent;
        };
        let verified = crate::pki::verify::verify_chain(
            &leaf,
            &self.intermediates,
            &self.anchors,
            std::time::SystemTime::now(),
        );
        let Ok(verified) = verified else {
            return PeerIdentity::NotAnAgent;
        };
        // The name is the last segment, and the whole ID must be exactly
        // what this trust domain would give that admin or agent.
        let Some(id) = verified.spiffe_id() else {
            return PeerIdentity::NotAnAgent;
        };
        let Some(name) = id.rsplit('/').next().and_then(|n| AgentName::parse(n).ok()) else {
            return PeerIdentity::NotAnAgent;
        };
        let unix = |t: std::time::SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64)
        };
        if self.trust_domain.admin_spiffe_id(&name) == id {
            return PeerIdentity::Admin {
                name,
                serial: verified.serial_hex().to_owned(),
                not_after: unix(verified.not_after()),
            };
        }
        let name = (self.trust_domain.agent_spiffe_id(&name) == id).then_some(name);
        match name {
            Some(name) => PeerIdentity::Agent {
                name,
                serial: verified.serial_hex().to_owned(),
                not_before: verified
                    .not_before()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64),
                not_after: verified
                    .not_after()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64),
            },
            None => PeerIdentity::NotAnAgent,
        }
    }
}

/// The caller: the admin token when one is sent, else the agent named by
/// the connection's client certificate (not revoked, not expired).
impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        let method = if parts.headers.contains_key(AUTHORIZATION) {
            "token"
        } else {
            "client_certificate"
        };
        let identified = identify(parts, state).await;
        let outcome = match &identified {
            Ok(_) => "ok",
            Err(refused) => refused.code,
        };
        state
            .metrics
            .authentications
            .get_or_create(&crate::telemetry::AuthenticationLabels { method, outcome })
            .inc();
        identified
    }
}

async fn identify(parts: &mut Parts, state: &Arc<AppState>) -> Result<Caller, ApiError> {
    let Some(value) = parts.headers.get(AUTHORIZATION) else {
        let peer = parts.extensions.get::<PeerIdentity>().cloned();
        return match peer {
            Some(PeerIdentity::Agent {
                name,
                serial,
                not_before,
                not_after,
            }) => {
                // One reading of the revocation set for both checks. The
                // agent's own standing is checked as well as the serial:
                // a certificate a revocation did not list (issued on
                // another replica the moment before) must not outlive it.
                // A suspended agent (its certificates on hold) is known
                // and refused, as the admin path refuses it (403); a
                // revoked certificate authenticates no one (401).
                let revoked = state.registry.revocations().current();
                match revoked.certificate(&serial) {
                    Some(r) if r.reason == "certificateHold" => {
                        return Err(ApiError::new(
                            axum::http::StatusCode::FORBIDDEN,
                            "agent_not_active",
                            "the agent is suspended",
                        ));
                    }
                    Some(_) => {
                        return Err(ApiError::unauthenticated(
                            "certificate_revoked",
                            "the client certificate is revoked",
                        ));
                    }
                    None => {}
                }
                if let Some(status) = revoked.inactive_status(name.as_str()) {
                    return Err(ApiError::new(
                        axum::http::StatusCode::FORBIDDEN,
                        "agent_not_active",
                        format!("the agent is {status}"),
                    ));
                }
                let now = time::OffsetDateTime::now_utc().unix_timestamp();
                if now >= not_after {
                    return Err(ApiError::unauthenticated(
                        "certificate_expired",
                        "the client certificate has expired: reconnect with a renewed one",
                    ));
                }
                // keyward backdates notBefore for clock skew; the
                // lifetime it granted starts at issuance.
                let issued = not_before + crate::pki::profile::BACKDATE.as_secs() as i64;
                let past_half_life = now >= issued + (not_after - issued) / 2;
                if past_half_life
                    && parts.uri.path() != "/v1/renew"
                    && state.requests.must_renew_at_half_life(&name).await
                {
                    return Err(ApiError::unauthenticated(
                        "renewal_required",
                        "the policy requires renewal at half the certificate's lifetime: \
                         POST /v1/renew first",
                    ));
                }
                crate::audit::RequestContext::set_credential(certificate_credential(&serial));
                Ok(Caller::Agent(name))
            }
            Some(PeerIdentity::Admin {
                name,
                serial,
                not_after,
            }) => {
                if time::OffsetDateTime::now_utc().unix_timestamp() >= not_after {
                    return Err(ApiError::unauthenticated(
                        "certificate_expired",
                        "the client certificate has expired",
                    ));
                }
                crate::audit::RequestContext::set_credential(certificate_credential(&serial));
                Ok(Caller::Admin(Admin {
                    name,
                    credential: certificate_credential(&serial),
                }))
            }
            Some(PeerIdentity::NotAnAgent) => Err(ApiError::unauthenticated(
                "not_an_agent_certificate",
                "the client certificate names no agent of this trust domain",
            )),
            Some(PeerIdentity::None) | None => Err(ApiError::unauthenticated(
                "unauthenticated",
                "present an agent client certificate or Authorization: Bearer <admin token>",
            )),
        };
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or_default();
    if !state.admin_token_enabled {
        return Err(ApiError::unauthenticated(
            "admin_token_disabled",
            "admin tokens are switched off here: use an admin client certificate",
        ));
    }
    let admin = (!token.is_empty())
        .then(|| state.admin_tokens.identify(token))
        .flatten();
    if let Some(admin) = admin {
        crate::audit::RequestContext::set_credential(admin.credential.clone());
        Ok(Caller::Admin(admin))
    } else {
        Err(ApiError::unauthenticated(
            "invalid_credentials",
            "the credentials are not valid",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(n: &str) -> AgentName {
        AgentName::parse(n).unwrap()
    }

    #[test]
    fn only_the_right_token_verifies() {
        let tokens = AdminTokens::new(vec![(Sha256::digest(b"right").into(), name("ops"))]);
        assert!(tokens.verify("right"));
        assert!(!tokens.verify("wrong"));
        assert!(!tokens.verify(""));
        assert!(!AdminTokens::default().verify("right"));
    }

    #[test]
    fn a_token_names_the_admin_it_belongs_to() {
        let tokens = AdminTokens::new(vec![
            (Sha256::digest(b"first").into(), name("alice")),
            (Sha256::digest(b"second").into(), name("bob")),
            (Sha256::digest(b"third").into(), name("alice")),
        ]);
        let who = |t: &str| tokens.identify(t).map(|a| a.name.to_string());
        assert_eq!(who("first").as_deref(), Some("alice"));
        assert_eq!(who("second").as_deref(), Some("bob"));
        assert_eq!(who("third").as_deref(), Some("alice"));
        assert_eq!(who("fourth"), None);
        let credential = tokens.identify("second").unwrap().credential;
        assert_eq!(
            credential,
            format!("token:{}", hex::encode(&Sha256::digest(b"second")[..4]))
        );
    }
}
