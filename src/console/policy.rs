//! Policy versions: the history, the difference between any two, and a
//! rollback (which makes an earlier version's content the next version,
//! as `POST /v1/policies/rollback` does) after its difference from the
//! version in force has been shown.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use maud::{html, Markup};
use serde::Deserialize;
use similar::{ChangeTag, TextDiff};

use super::session::{Checked, ConsoleAdmin};
use super::view::{self, Refused};
use crate::api::error::ApiError;
use crate::api::AppState;
use crate::policy::{authorize, Action};
use crate::store::PolicyRecord;

/// Versions listed; a deployment with more reads the rest from the API.
const VERSIONS_SHOWN: i64 = 500;

#[derive(Deserialize)]
pub struct PolicyQuery {
    notice: Option<String>,
    subject: Option<String>,
}

pub async fn page(
    State(state): State<Arc<AppState>>,
    admin: ConsoleAdmin,
    Query(query): Query<PolicyQuery>,
) -> Response {
    if let Err(e) = authorize(&admin.caller, Action::ManagePolicy) {
        return Refused::from(e).into_response();
    }
    let mut versions = match state.policy.history_page(None, VERSIONS_SHOWN).await {
        Ok(v) => v,
        Err(e) => return Refused(ApiError::internal(e)).into_response(),
    };
    versions.sort_by_key(|v| std::cmp::Reverse(v.version));
    let in_force = state.policy.version();
    let latest = versions.first().map(|v| v.version);
    let body = html! {
        (view::notice(query.notice.as_deref(), query.subject.as_deref()))
        p { "In force: " strong data-policy-in-force=(in_force) { "version " (in_force) } }
        @if versions.is_empty() {
            p.muted { "No policy has been applied: the built-in one is in force." }
        } @else {
            form.search method="get" action="/ui/policy/diff" {
                label { "From" (version_select("from", &versions, versions.get(1).map(|v| v.version))) }
                label { "To" (version_select("to", &versions, latest)) }
                button type="submit" data-action="diff" { "Compare" }
            }
            div.scroll { table {
                thead { tr { th { "Version" } th { "Applied" } th { "By" } th { "How" } th { "SHA-256" } th {} } }
                tbody { @for v in &versions {
                    tr data-policy-version=(v.version) {
                        td { (v.version) @if v.version == in_force { " " span.status.status-active { "in force" } } }
                        td { (view::time(v.created_at)) }
                        td { code { (v.author) } }
                        td { (v.source) }
                        td { code { (&v.content_sha256[..16.min(v.content_sha256.len())]) "…" } }
                        td {
                            @if v.version != in_force {
                                a href={ "/ui/policy/rollback?version=" (v.version) } data-action="rollback" { "Roll back to this…" }
                            }
                        }
                    }
                } }
            } }
        }
    };
    admin.page("policy", "Policy", body)
}

fn version_select(name: &str, versions: &[PolicyRecord], selected: Option<i64>) -> Markup {
    html! {
        select name=(name) {
            @for v in versions {
                option value=(v.version) selected[Some(v.version) == selected] { "version " (v.version) }
            }
        }
    }
}

/// A line diff, `-` and `+` lines marked for the stylesheet.
fn line_diff(from: &str, to: &str) -> Markup {
    let diff = TextDiff::from_lines(from, to);
    html! {
        pre.diff data-diff {
            @for change in diff.iter_all_changes() {
                @match change.tag() {
                    ChangeTag::Delete => span.del { "- " (change.value().trim_end_matches('\n')) "\n" },
                    ChangeTag::Insert => span.add { "+ " (change.value().trim_end_matches('\n')) "\n" },
                    ChangeTag::Equal => { "  " (change.value().trim_end_matches('\n')) "\n" },
                }
            }
        }
    }
}

async fn content(state: &AppState, version: i64) -> Result<String, Refused> {
    state
        .policy
        .applied_version(version)
        .await
        .map_err(ApiError::internal)?
        .map(|r| r.content)
        .ok_or_else(|| {
            Refused(ApiError::not_found(
                "policy_not_found",
                "no such policy version",
            ))
        })
}

fn version_number(text: Option<&str>) -> Result<i64, Refused> {
    text.and_then(|v| v.parse().ok())
        .filter(|v: &i64| *v > 0)
        .ok_or_else(|| {
            Refused(ApiError::bad_request(
                "invalid_version",
                "a version is a positive integer",
            ))
        })
}

#[derive(Deserialize)]
pub struct DiffQuery {
    from: Option<String>,
    to: Option<String>,
}

/// `GET /ui/policy/diff?from=&to=`.
async fn diff_page(
    state: &AppState,
    admin: &ConsoleAdmin,
    query: &DiffQuery,
) -> Result<Response, Refused> {
    authorize(&admin.caller, Action::ManagePolicy)?;
    let (from, to) = (
        version_number(query.from.as_deref())?,
        version_number(query.to.as_deref())?,
    );
    let (old, new) = (content(state, from).await?, content(state, to).await?);
    let body = html! {
        p { "From version " strong { (from) } " to version " strong { (to) } }
        (line_diff(&old, &new))
        p { a href="/ui/policy" { "Back to the versions" } }
    };
    Ok(admin.page("policy-diff", "Policy difference", body))
}

pub async fn diff(
    State(state): State<Arc<AppState>>,
    admin: ConsoleAdmin,
    Query(query): Query<DiffQuery>,
) -> Response {
    diff_page(&state, &admin, &query)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

#[derive(Deserialize)]
pub struct RollbackQuery {
    version: Option<String>,
}

/// `GET /ui/policy/rollback?version=`: what rolling back would change, and
/// the button that confirms it.
pub async fn confirm_rollback(
    State(state): State<Arc<AppState>>,
    admin: ConsoleAdmin,
    Query(query): Query<RollbackQuery>,
) -> Response {
    let shown = async {
        authorize(&admin.caller, Action::ManagePolicy)?;
        let version = version_number(query.version.as_deref())?;
        let in_force = state.policy.version();
        let target = content(&state, version).await?;
        let current = if in_force > 0 {
            content(&state, in_force).await?
        } else {
            String::new()
        };
        let body = html! {
            section.confirm {
                p { "Rolling back makes version " strong { (version) } "'s content the next version, in force at once on every replica. What changes from version " (in_force) ":" }
                (line_diff(&current, &target))
                form method="post" action="/ui/policy/rollback" {
                    (admin.csrf_field())
                    input type="hidden" name="version" value=(version);
                    button.danger type="submit" data-action="confirm" { "Roll back to version " (version) }
                }
                p { a href="/ui/policy" { "Cancel" } }
            }
        };
        Ok::<_, Refused>(admin.page("policy-rollback", "Roll back the policy", body))
    };
    shown.await.unwrap_or_else(IntoResponse::into_response)
}

#[derive(Deserialize)]
pub struct RollbackForm {
    version: String,
}

/// `POST /ui/policy/rollback`: `version=`.
pub async fn rollback(
    State(state): State<Arc<AppState>>,
    checked: Checked<RollbackForm>,
) -> Response {
    let Checked { admin, form } = checked;
    let done = async {
        authorize(&admin.caller, Action::ManagePolicy)?;
        let version = version_number(Some(&form.version))?;
        let record = state
            .policy
            .rollback(&admin.caller.audit_name(), version)
            .await?;
        Ok::<_, Refused>(view::back(
            "/ui/policy",
            "rolled_back",
            &format!("version {}", record.version),
        ))
    };
    done.await.unwrap_or_else(IntoResponse::into_response)
}
