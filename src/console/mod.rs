//! The web console at `/ui/`: server-rendered pages (maud, which escapes
//! what it renders) for the people in the loop, on the API's listener and
//! under its request layer. Every asset is compiled into the binary.
//!
//! The console makes no decision of its own: each action calls the same
//! domain function as the API endpoint that does the same thing, with the
//! signed-in admin as the caller, so authorization, audit and revocation
//! are the API's. An agent's client certificate signs no one in here.
//!
//! Every response under `/ui` carries a Content-Security-Policy that
//! allows only the console's own scripts, styles and images (no inline
//! script or style, no framing), and is not cached.

mod agents;
mod approvals;
mod assets;
mod audit;
mod dashboard;
mod policy;
pub mod session;
mod view;

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{Redirect, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::api::extract::PeerIdentity;
use crate::api::AppState;
use session::{ConsoleAdmin, NotSignedIn};

/// `default-src 'self'` and nothing inline: a script injected into a page
/// would not run, and no other site may frame the console (clickjacking).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; \
     frame-ancestors 'none'; base-uri 'none'; object-src 'none'";

/// The console's routes, with `sessions` where its sessions are kept.
pub fn router(sessions: Arc<dyn crate::store::ConsoleStore>) -> Router<Arc<AppState>> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(home))
        .route("/ui/login", post(session::login))
        .route("/ui/logout", post(session::logout))
        .route("/ui/approvals", get(approvals::page))
        .route("/ui/approvals/rows", get(approvals::rows))
        .route("/ui/approvals/{id}/vote", post(approvals::vote))
        .route("/ui/agents", get(agents::page))
        .route(
            "/ui/agents/{name}/revoke",
            get(agents::confirm_revoke).post(agents::revoke),
        )
        .route("/ui/agents/{name}/{action}", post(agents::act))
        .route("/ui/anomalies", get(agents::anomalies))
        .route("/ui/audit", get(audit::page))
        .route("/ui/audit/entries/{index}", get(audit::entry))
        .route("/ui/audit/verify", post(audit::verify))
        .route("/ui/policy", get(policy::page))
        .route("/ui/policy/diff", get(policy::diff))
        .route(
            "/ui/policy/rollback",
            get(policy::confirm_rollback).post(policy::rollback),
        )
        .route("/ui/static/{file}", get(assets::serve))
        .layer(axum::Extension(session::Sessions(sessions)))
        .layer(axum::middleware::map_response(security_headers))
}

/// `GET /ui/`: the dashboard when signed in, else the sign-in form (which
/// offers the admin certificate the browser presented, if any).
async fn home(
    state: State<Arc<AppState>>,
    admin: Result<ConsoleAdmin, NotSignedIn>,
    peer: Option<axum::Extension<PeerIdentity>>,
) -> Response {
    match admin {
        Ok(admin) => dashboard::page(state, admin).await,
        Err(_) => {
            let certificate = match peer.map(|p| p.0) {
                Some(PeerIdentity::Admin { name, .. }) => Some(name.to_string()),
                _ => None,
            };
            view::login(None, certificate.as_deref(), StatusCode::OK)
        }
    }
}

async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        // Not `no-referrer`: under it a browser sends `Origin: null` with
        // a form, and the origin check could not tell the console's own
        // forms from another site's.
        (header::REFERRER_POLICY, "same-origin"),
        (header::STRICT_TRANSPORT_SECURITY, "max-age=31536000"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    // Pages show live state and a session's form token: never cached.
    // The assets are the binary's own and may be.
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}
