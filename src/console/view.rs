//! What every page shares: the layout, the sign-in form, the error page
//! and the small formatting helpers. maud escapes every value it renders;
//! nothing here writes raw HTML from data.

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use maud::{html, Markup, DOCTYPE};

use crate::api::error::{ApiError, ErrorCode};

/// The pages, as the navigation names them: (`data-page`, path, label).
const PAGES: [(&str, &str, &str); 6] = [
    ("dashboard", "/ui/", "Dashboard"),
    ("approvals", "/ui/approvals", "Approvals"),
    ("agents", "/ui/agents", "Agents"),
    ("anomalies", "/ui/anomalies", "Anomalies"),
    ("audit", "/ui/audit", "Audit"),
    ("policy", "/ui/policy", "Policy"),
];

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · keyward" }
            link rel="icon" href="/ui/static/favicon.svg" type="image/svg+xml";
            link rel="stylesheet" href="/ui/static/console.css";
            script src="/ui/static/console.js" defer {}
        }
    }
}

/// A page of the signed-in console, for the admin `who`, whose session's
/// form token is `csrf`. `page` is the root's `data-page`.
pub fn page(who: &str, csrf_token: &str, page: &str, title: &str, body: Markup) -> Response {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                header.bar {
                    a.brand href="/ui/" { "keyward" }
                    nav {
                        @for (name, path, label) in PAGES {
                            a href=(path) aria-current=[(name == page).then_some("page")] { (label) }
                        }
                    }
                    form.signout method="post" action="/ui/logout" {
                        (csrf(csrf_token))
                        span.who { "Signed in as " strong { (who) } }
                        button type="submit" data-action="logout" { "Sign out" }
                    }
                }
                main data-page=(page) {
                    h1 { (title) }
                    (body)
                }
            }
        }
    };
    Html(markup.into_string()).into_response()
}

/// The hidden field every form of a signed-in page carries.
pub fn csrf(token: &str) -> Markup {
    html! { input type="hidden" name="csrf" value=(token); }
}

/// The sign-in page. Deliberately without `data-page`: only a signed-in
/// page has one.
pub fn login(error: Option<&str>, certificate: Option<&str>, status: StatusCode) -> Response {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            (head("Sign in"))
            body.signin {
                main data-login {
                    h1 { "keyward console" }
                    p { "Approvals, agents, anomalies, audit and policy, for keyward's admins." }
                    @if let Some(error) = error {
                        p.error role="alert" { (error) }
                    }
                    form method="post" action="/ui/login" {
                        label for="token" { "Admin token" }
                        input #token type="password" name="token" autocomplete="off" required autofocus;
                        button type="submit" { "Sign in" }
                    }
                    @if let Some(name) = certificate {
                        form method="post" action="/ui/login" {
                            input type="hidden" name="method" value="certificate";
                            button type="submit" { "Sign in as " (name) " (client certificate)" }
                        }
                    }
                    p.hint { "Sessions end after 15 minutes idle and 8 hours in all." }
                }
            }
        }
    };
    (status, Html(markup.into_string())).into_response()
}

/// A refusal, as an HTML page with the API's status and code (and the
/// `ErrorCode` the request layer counts).
pub struct Refused(pub ApiError);

impl<E: Into<ApiError>> From<E> for Refused {
    fn from(e: E) -> Self {
        Refused(e.into())
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let ApiError {
            status,
            code,
            message,
            ..
        } = self.0;
        let markup = html! {
            (DOCTYPE)
            html lang="en" {
                (head("Refused"))
                body {
                    main data-error=(code) {
                        h1 { "Refused" }
                        p.error role="alert" { (message) }
                        p { "Code: " code { (code) } " (HTTP " (status.as_u16()) ")" }
                        p { a href="/ui/" { "Back to the console" } }
                    }
                }
            }
        };
        let mut response = (status, Html(markup.into_string())).into_response();
        response.extensions_mut().insert(ErrorCode(code));
        response
    }
}

/// Unix seconds as `2026-12-07 10:00:00 UTC`.
pub fn time(unix: i64) -> String {
    let format =
        time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_else(|| unix.to_string())
}

/// A duration in words: `3 min`, `2 h 5 min`.
pub fn age(seconds: i64) -> String {
    match seconds {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min", s / 60),
        s if s < 86_400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        s => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
    }
}

/// A notice after an action, from a fixed list: the query string chooses
/// which, never what it says.
pub fn notice(code: Option<&str>, subject: Option<&str>) -> Markup {
    let text = match code {
        Some("approved") => "Your approval was recorded",
        Some("denied") => "Your denial was recorded",
        Some("suspended") => "Suspended",
        Some("resumed") => "Resumed",
        Some("revoked") => "Revoked",
        Some("rotated") => "Key rotated",
        Some("unchanged") => "Nothing to change",
        Some("rolled_back") => "Policy rolled back; now in force",
        Some("verified") => "The stored log verifies against the latest checkpoint",
        _ => return html! {},
    };
    html! {
        p.notice role="status" data-notice=(code.unwrap_or_default()) {
            (text) @if let Some(s) = subject { ": " strong { (s) } }
        }
    }
}

/// A JSON value for a table cell, strings without their quotes.
pub fn value(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "—".into(),
        other => other.to_string(),
    }
}

/// A 303 back to a console page with a notice (`view::notice`) about
/// `subject`, the query encoded (a name or id never becomes markup or a
/// header by itself).
pub fn back(path: &str, notice: &str, subject: &str) -> Response {
    let query =
        serde_urlencoded::to_string([("notice", notice), ("subject", subject)]).unwrap_or_default();
    axum::response::Redirect::to(&format!("{path}?{query}")).into_response()
}
