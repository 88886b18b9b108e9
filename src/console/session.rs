//! Console sessions: signing in with an admin token or an admin client
//! certificate, the session cookie, and the checks every state-changing
//! request passes (a session, the `Origin`, the session's CSRF token).
//!
//! A session is one admin credential: two people approving from two
//! browsers are two admins, as they would be on the API, and one person
//! cannot vote twice by signing in twice (votes are counted by name).
//! The cookie holds a 256-bit random id; the store keeps only its SHA-256,
//! so a copy of the database signs no one in. The CSRF token is derived
//! from the id, so it needs no storage and cannot be computed from the
//! database either.

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Extension;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::view::{self, Refused};
use crate::api::extract::PeerIdentity;
use crate::api::AppState;
use crate::audit::{AuditEvent, RequestContext};
use crate::identity::AgentName;
use crate::policy::{Admin, Caller};
use crate::store::{ConsoleSessionRecord, ConsoleStore};

/// `__Host-`: the browser keeps it only if it is Secure, has no Domain
/// and has Path=/, so no other host or path can set or shadow it.
pub const COOKIE: &str = "__Host-keyward-console";
/// A session unused this long is over.
pub const IDLE_TIMEOUT_MS: i64 = 15 * 60 * 1000;
/// And every session is over this long after sign-in.
pub const ABSOLUTE_TIMEOUT_MS: i64 = 8 * 60 * 60 * 1000;

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

fn id_hash(id: &str) -> String {
    hex::encode(Sha256::digest(id.as_bytes()))
}

/// The form token for a session id: a hash of the id under its own label.
fn csrf_token(id: &str) -> String {
    let mut hash = Sha256::new();
    hash.update(b"keyward console csrf\0");
    hash.update(id.as_bytes());
    URL_SAFE_NO_PAD.encode(hash.finalize())
}

/// The session id the request's cookie carries, if any.
fn session_id(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
        // Ours are 43 base64url characters; anything else is not worth a
        // database read.
        .filter(|v| {
            v.len() == 43
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Where sessions are kept: the console's one table, which it reads
/// itself. A session is an HTTP matter (a cookie standing for an admin
/// credential), so no domain module owns it; the API never sees it.
#[derive(Clone)]
pub struct Sessions(pub Arc<dyn ConsoleStore>);

/// A signed-in admin.
#[derive(Clone)]
pub struct ConsoleAdmin {
    pub caller: Caller,
    pub name: String,
    /// For the forms of the page being rendered.
    pub csrf: String,
    id_hash: String,
}

impl ConsoleAdmin {
    /// A console page for this admin (`view::page`).
    pub fn page(&self, page: &str, title: &str, body: maud::Markup) -> Response {
        view::page(&self.name, &self.csrf, page, title, body)
    }

    /// The hidden form-token field of this admin's forms.
    pub fn csrf_field(&self) -> maud::Markup {
        view::csrf(&self.csrf)
    }
}

/// Why a request has no signed-in admin: a page is sent to the sign-in
/// form; a script's request, or a form post, is told 401.
#[derive(Clone, Copy)]
pub struct NotSignedIn {
    navigation: bool,
}

impl IntoResponse for NotSignedIn {
    fn into_response(self) -> Response {
        if self.navigation {
            Redirect::to("/ui/").into_response()
        } else {
            Refused(crate::api::error::ApiError::unauthenticated(
                "console_session_required",
                "sign in to the console first (your session may have ended)",
            ))
            .into_response()
        }
    }
}

impl FromRequestParts<Arc<AppState>> for ConsoleAdmin {
    type Rejection = NotSignedIn;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &Arc<AppState>,
    ) -> Result<Self, NotSignedIn> {
        let navigation = parts.method == axum::http::Method::GET
            && parts
                .headers
                .get("sec-fetch-mode")
                .is_none_or(|m| m.as_bytes() == b"navigate");
        let refused = NotSignedIn { navigation };
        let id = session_id(&parts.headers).ok_or(refused)?;
        let hash = id_hash(id);
        let now = now_ms();
        let Some(Sessions(sessions)) = parts.extensions.get::<Sessions>() else {
            tracing::error!("the console's routes were built without their session store");
            return Err(refused);
        };
        // A page's background refresh (a script's GET) reads the session
        // without moving its last use: an open page left alone still
        // times out. Anything a person does moves it.
        let background = parts.method == axum::http::Method::GET && !navigation;
        let (idle_since, created_since) = (now - IDLE_TIMEOUT_MS, now - ABSOLUTE_TIMEOUT_MS);
        let found = if background {
            sessions
                .console_session(&hash, idle_since, created_since)
                .await
        } else {
            sessions
                .touch_console_session(&hash, now, idle_since, created_since)
                .await
        };
        let session = found
            .map_err(|e| {
                tracing::error!(error = %e, "reading a console session failed");
                refused
            })?
            .ok_or(refused)?;
        // A session signed in with a certificate lasts only while the
        // browser still presents that certificate: a stolen cookie alone
        // is not the admin.
        if let Some(serial) = session.credential.strip_prefix("cert:") {
            let presented = parts.extensions.get::<PeerIdentity>();
            let same = matches!(presented, Some(PeerIdentity::Admin { serial: s, not_after, .. })
                if s == serial && time::OffsetDateTime::now_utc().unix_timestamp() < *not_after);
            if !same {
                return Err(refused);
            }
        }
        let name = AgentName::parse(&session.admin).map_err(|_| refused)?;
        RequestContext::set_credential(session.credential.clone());
        Ok(ConsoleAdmin {
            caller: Caller::Admin(Admin {
                name,
                credential: session.credential,
            }),
            name: session.admin,
            csrf: csrf_token(id),
            id_hash: hash,
        })
    }
}

/// Refuses a state-changing request another site's page could have made:
/// an `Origin` (or, without one, a `Sec-Fetch-Site`) that is not this
/// console's. Clients that send neither (curl, scripts) are not browsers
/// and carry no ambient cookie by accident; the CSRF token still binds
/// their forms to the session.
/// `authority` is the request's own (HTTP/2 sends `:authority`, not Host).
fn same_origin(headers: &HeaderMap, authority: Option<&str>) -> bool {
    if let Some(origin) = headers.get(header::ORIGIN) {
        let host = authority.or_else(|| headers.get(header::HOST).and_then(|h| h.to_str().ok()));
        return match (origin.to_str().ok(), host) {
            (Some(origin), Some(host)) => origin == format!("https://{host}"),
            _ => false,
        };
    }
    match headers.get("sec-fetch-site").map(HeaderValue::as_bytes) {
        Some(site) => site == b"same-origin" || site == b"none",
        None => true,
    }
}

fn forbidden_cross_site() -> Refused {
    Refused(crate::api::error::ApiError::new(
        StatusCode::FORBIDDEN,
        "cross_site_request",
        "this request did not come from the console's own pages",
    ))
}

/// A form posted from a console page by its signed-in admin: the session,
/// the origin and the CSRF token are checked, in that order, before the
/// form's fields are read.
pub struct Checked<T> {
    pub admin: ConsoleAdmin,
    pub form: T,
}

#[derive(Deserialize)]
struct CsrfField {
    csrf: Option<String>,
}

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for Checked<T> {
    type Rejection = Response;

    async fn from_request(request: Request, state: &Arc<AppState>) -> Result<Self, Response> {
        let (mut parts, body) = request.into_parts();
        let admin = ConsoleAdmin::from_request_parts(&mut parts, state)
            .await
            .map_err(IntoResponse::into_response)?;
        if !same_origin(&parts.headers, parts.uri.authority().map(|a| a.as_str())) {
            return Err(forbidden_cross_site().into_response());
        }
        let bytes = axum::body::to_bytes(body, crate::api::MAX_BODY_BYTES)
            .await
            .map_err(|_| {
                Refused(crate::api::error::ApiError::bad_request(
                    "unreadable_body",
                    "the form could not be read",
                ))
                .into_response()
            })?;
        let sent = serde_urlencoded::from_bytes::<CsrfField>(&bytes)
            .ok()
            .and_then(|f| f.csrf)
            .unwrap_or_default();
        if !bool::from(sent.as_bytes().ct_eq(admin.csrf.as_bytes())) {
            return Err(Refused(crate::api::error::ApiError::new(
                StatusCode::FORBIDDEN,
                "csrf_token_invalid",
                "the form's token is missing or is not this session's: reload the page",
            ))
            .into_response());
        }
        let form = serde_urlencoded::from_bytes::<T>(&bytes).map_err(|e| {
            Refused(crate::api::error::ApiError::bad_request(
                "invalid_form",
                format!("the form's fields are not as expected: {e}"),
            ))
            .into_response()
        })?;
        Ok(Checked { admin, form })
    }
}

fn session_cookie(id: &str) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{COOKIE}={id}; Path=/; Secure; HttpOnly; SameSite=Strict"
    ))
    .expect("base64url is a valid header value")
}

fn cleared_cookie() -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0"
    ))
    .expect("a constant header value")
}

#[derive(Deserialize)]
pub struct LoginForm {
    token: Option<String>,
    /// `certificate`: sign in as the admin the browser's client
    /// certificate names.
    method: Option<String>,
}

/// `POST /ui/login`: a form-encoded `token=`, or `method=certificate`.
/// A wrong token gets the form again, with 401, and an audit of nothing:
/// the authentication metric counts it.
pub async fn login(
    State(state): State<Arc<AppState>>,
    Extension(Sessions(sessions)): Extension<Sessions>,
    peer: Option<axum::Extension<PeerIdentity>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    // A sign-in another site's page posted would sign the victim in as
    // the attacker (login CSRF).
    if !same_origin(&headers, uri.authority().map(|a| a.as_str())) {
        return forbidden_cross_site().into_response();
    }
    let Ok(form) = serde_urlencoded::from_bytes::<LoginForm>(&body) else {
        return Refused(crate::api::error::ApiError::bad_request(
            "invalid_form",
            "send token=<admin token> (form-encoded)",
        ))
        .into_response();
    };
    let peer = peer.map(|p| p.0);
    let (method, admin) = if form.method.as_deref() == Some("certificate") {
        let admin = match &peer {
            Some(PeerIdentity::Admin {
                name,
                serial,
                not_after,
            }) if time::OffsetDateTime::now_utc().unix_timestamp() < *not_after => Some(Admin {
                name: name.clone(),
                credential: crate::api::extract::certificate_credential(serial),
            }),
            _ => None,
        };
        ("console_certificate", admin)
    } else {
        let token = form.token.as_deref().map(str::trim).unwrap_or_default();
        let admin = (state.admin_token_enabled && !token.is_empty())
            .then(|| state.admin_tokens.identify(token))
            .flatten();
        ("console_token", admin)
    };
    let outcome = if admin.is_some() {
        "ok"
    } else {
        "invalid_credentials"
    };
    state
        .metrics
        .authentications
        .get_or_create(&crate::telemetry::AuthenticationLabels { method, outcome })
        .inc();
    let certificate = match &peer {
        Some(PeerIdentity::Admin { name, .. }) => Some(name.to_string()),
        _ => None,
    };
    let Some(admin) = admin else {
        let message = if method == "console_certificate" {
            "the browser presented no valid admin certificate"
        } else if !state.admin_token_enabled {
            "admin tokens are switched off here: sign in with an admin certificate"
        } else {
            "that is not an admin token"
        };
        return view::login(
            Some(message),
            certificate.as_deref(),
            StatusCode::UNAUTHORIZED,
        );
    };
    RequestContext::set_credential(admin.credential.clone());
    let id = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
    let now = now_ms();
    let record = ConsoleSessionRecord {
        id_sha256: id_hash(&id),
        admin: admin.name.to_string(),
        credential: admin.credential.clone(),
        created_ms: now,
        last_seen_ms: now,
    };
    let caller = Caller::Admin(admin);
    let audit = AuditEvent::new(caller.audit_name(), "console.login", record.admin.clone())
        .with("credential", record.credential.clone())
        .with("method", method.trim_start_matches("console_"));
    // A browser that signs in again gives up the session it had: it is
    // ended, not left to expire.
    if let Some(previous) = session_id(&headers) {
        let ended = AuditEvent::new(caller.audit_name(), "console.logout", record.admin.clone())
            .with("reason", "signed in again");
        if let Err(e) = sessions
            .end_console_session(&id_hash(previous), &ended)
            .await
        {
            return Refused(crate::api::error::ApiError::internal(e)).into_response();
        }
    }
    let stored = sessions
        .create_console_session(
            &record,
            now - IDLE_TIMEOUT_MS,
            now - ABSOLUTE_TIMEOUT_MS,
            &audit,
        )
        .await;
    if let Err(e) = stored {
        return Refused(crate::api::error::ApiError::internal(e)).into_response();
    }
    let mut response = Redirect::to("/ui/").into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, session_cookie(&id));
    response
}

#[derive(Deserialize)]
pub struct NoFields {}

/// `POST /ui/logout`: ends the session in the store, so the cookie is
/// worthless even if the browser kept it.
pub async fn logout(
    Extension(Sessions(sessions)): Extension<Sessions>,
    checked: Checked<NoFields>,
) -> Response {
    let admin = checked.admin;
    let audit = AuditEvent::new(
        admin.caller.audit_name(),
        "console.logout",
        admin.name.clone(),
    );
    if let Err(e) = sessions.end_console_session(&admin.id_hash, &audit).await {
        return Refused(crate::api::error::ApiError::internal(e)).into_response();
    }
    let mut response = Redirect::to("/ui/").into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, cleared_cookie());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn only_this_consoles_origin_may_post() {
        let host = ("host", "keyward.example:8443");
        let ok = |pairs: &[(&'static str, &str)]| same_origin(&headers(pairs), None);
        assert!(ok(&[host, ("origin", "https://keyward.example:8443")]));
        assert!(!ok(&[host, ("origin", "https://evil.example")]));
        assert!(!ok(&[host, ("origin", "http://keyward.example:8443")]));
        assert!(!ok(&[host, ("origin", "null")]));
        assert!(!ok(&[host, ("sec-fetch-site", "cross-site")]));
        assert!(!ok(&[host, ("sec-fetch-site", "same-site")]));
        assert!(ok(&[host, ("sec-fetch-site", "same-origin")]));
        assert!(ok(&[host]));
        // HTTP/2: the authority, not a Host header.
        let origin = headers(&[("origin", "https://keyward.example:8443")]);
        assert!(same_origin(&origin, Some("keyward.example:8443")));
        assert!(!same_origin(&origin, Some("other.example:8443")));
        assert!(!same_origin(&origin, None));
    }

    #[test]
    fn the_session_cookie_is_found_among_others_and_nothing_else_is_taken_for_it() {
        let id = URL_SAFE_NO_PAD.encode([7u8; 32]);
        let h = headers(&[("cookie", &format!("a=b; {COOKIE}={id}; c=d"))]);
        assert_eq!(session_id(&h), Some(id.as_str()));
        let h = headers(&[("cookie", &format!("{COOKIE}=short"))]);
        assert_eq!(session_id(&h), None);
        let h = headers(&[("cookie", &format!("x{COOKIE}={id}"))]);
        assert_eq!(session_id(&h), None);
    }

    #[test]
    fn each_session_has_its_own_csrf_token_which_is_not_its_stored_hash() {
        let a = URL_SAFE_NO_PAD.encode([1u8; 32]);
        let b = URL_SAFE_NO_PAD.encode([2u8; 32]);
        assert_ne!(csrf_token(&a), csrf_token(&b));
        assert_ne!(csrf_token(&a), id_hash(&a));
        assert_eq!(csrf_token(&a), csrf_token(&a));
    }
}
