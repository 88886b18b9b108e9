//! Agents and anomalies: each agent's standing, scopes, custody and live
//! certificates, and what the detectors saw; suspend, resume, rotate and
//! revoke go through the same functions as `POST
//! /v1/agents/{name}/suspend|resume|rotate-key|revoke`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use maud::{html, Markup};
use serde::Deserialize;

use super::session::{Checked, ConsoleAdmin};
use super::view::{self, Refused};
use crate::agents::StatusChange;
use crate::api::error::ApiError;
use crate::api::revocation::{self, RotateInput};
use crate::api::AppState;
use crate::detect::AnomalyQuery;
use crate::identity::AgentName;
use crate::policy::{authorize, Action};
use crate::store::{AgentRecord, CertificateRecord};

const PAGE_SIZE: i64 = 100;
/// The newest certificates looked at per agent for its live ones.
const CERTIFICATES_SHOWN: i64 = 5;

#[derive(Deserialize)]
pub struct AgentsQuery {
    after: Option<String>,
    notice: Option<String>,
    subject: Option<String>,
}

fn status_badge(status: &str) -> Markup {
    html! { span class={ "status status-" (status) } { (status) } }
}

/// The buttons an agent's standing allows, each its own small form.
/// `back` is the page to return to.
fn actions(admin: &ConsoleAdmin, agent: &str, status: &str, back: &str) -> Markup {
    let form = |action: &str, label: &str, class: &str| {
        html! {
            form.inline method="post" action={ "/ui/agents/" (agent) "/" (action) } {
                (admin.csrf_field())
                input type="hidden" name="back" value=(back);
                button.(class) type="submit" data-action=(action) { (label) }
            }
        }
    };
    html! {
        @match status {
            "active" => {
                (form("suspend", "Suspend", "secondary"))
                (form("rotate", "Rotate key", "secondary"))
            }
            "suspended" => { (form("resume", "Resume", "")) }
            _ => {}
        }
        @if status != "revoked" {
            a.inline href={ "/ui/agents/" (agent) "/revoke" } data-action="revoke" { "Revoke…" }
        }
    }
}

fn live(certificates: &[CertificateRecord], now: i64) -> Vec<&CertificateRecord> {
    certificates
        .iter()
        .filter(|c| c.revoked_at.is_none() && c.not_after > now)
        .collect()
}

fn agent_row(
    admin: &ConsoleAdmin,
    agent: &AgentRecord,
    certificates: &[CertificateRecord],
    now: i64,
) -> Markup {
    let live = live(certificates, now);
    html! {
        tr data-agent=(agent.name) data-status=(agent.status) {
            td { strong { (agent.name) } br; code.muted { (agent.spiffe_id) } }
            td { (status_badge(&agent.status)) }
            td { @for s in &agent.scopes { code { (s) } " " } @if agent.scopes.is_empty() { span.muted { "none" } } }
            td { (agent.custody) @if let Some(k) = &agent.key_id { br; code.muted { (k) } } }
            td data-live-certificates=(live.len()) {
                @if live.is_empty() { span.muted { "none live" } }
                @for c in &live {
                    div { code { (c.serial) } br; span.muted { "until " (view::time(c.not_after)) } }
                }
            }
            td { (actions(admin, &agent.name, &agent.status, "agents")) }
        }
    }
}

pub async fn page(
    State(state): State<Arc<AppState>>,
    admin: ConsoleAdmin,
    Query(query): Query<AgentsQuery>,
) -> Response {
    match render(&state, &admin, &query).await {
        Ok(r) => r,
        Err(refused) => refused.into_response(),
    }
}

async fn render(
    state: &AppState,
    admin: &ConsoleAdmin,
    query: &AgentsQuery,
) -> Result<Response, Refused> {
    authorize(&admin.caller, Action::ListAgents)?;
    let mut agents = state
        .registry
        .agents_page(query.after.as_deref(), PAGE_SIZE + 1)
        .await?;
    let more = agents.len() > PAGE_SIZE as usize;
    agents.truncate(PAGE_SIZE as usize);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut rows = Vec::with_capacity(agents.len());
    for agent in &agents {
        let name = AgentName::parse(&agent.name)?;
        let certificates = state
            .registry
            .certificates_page(&name, None, CERTIFICATES_SHOWN)
            .await?;
        rows.push(agent_row(admin, agent, &certificates, now));
    }
    let body = html! {
        (view::notice(query.notice.as_deref(), query.subject.as_deref()))
        div.scroll { table {
            thead { tr {
                th { "Agent" } th { "Status" } th { "Scopes" } th { "Custody" } th { "Live certificates" } th { "Actions" }
            } }
            tbody { @for r in rows { (r) } }
        } }
        @if agents.is_empty() { p.muted { "No agents are registered." } }
        @if more {
            @if let Some(last) = agents.last() {
                p { a href={ "/ui/agents?after=" (last.name) } { "Next page" } }
            }
        }
    };
    Ok(admin.page("agents", "Agents", body))
}

#[derive(Deserialize)]
pub struct ActForm {
    back: Option<String>,
}

/// The page to return to after an action: one of a fixed few.
fn back_to(back: Option<&str>) -> &'static str {
    match back {
        Some("anomalies") => "/ui/anomalies",
        _ => "/ui/agents",
    }
}

/// `POST /ui/agents/{name}/suspend|resume|rotate`.
pub async fn act(
    State(state): State<Arc<AppState>>,
    Path((name, action)): Path<(String, String)>,
    checked: Checked<ActForm>,
) -> Response {
    let Checked { admin, form } = checked;
    let back = back_to(form.back.as_deref());
    let done = match action.as_str() {
        "suspend" | "resume" => {
            let (change, status, notice) = if action == "suspend" {
                (StatusChange::Suspend, "suspended", "suspended")
            } else {
                (StatusChange::Resume, "active", "resumed")
            };
            revocation::change(&state, &admin.caller, &name, change, status)
                .await
                .map(|s| if s.changed { notice } else { "unchanged" })
        }
        "rotate" => revocation::rotate(&state, &admin.caller, &name, RotateInput::default())
            .await
            .map(|_| "rotated"),
        _ => Err(ApiError::not_found(
            "not_found",
            "an agent's actions here are suspend, resume, rotate and revoke",
        )),
    };
    match done {
        Ok(notice) => view::back(back, notice, &name),
        Err(e) => Refused(e).into_response(),
    }
}

/// The reasons offered for revoking an agent, as RFC 5280 names them.
const REVOCATION_REASONS: [(&str, &str); 5] = [
    (
        "keyCompromise",
        "Key compromise: the key or its agent was stolen or misused",
    ),
    (
        "cessationOfOperation",
        "Cessation of operation: the agent is retired",
    ),
    ("affiliationChanged", "Affiliation changed"),
    ("superseded", "Superseded"),
    ("unspecified", "Unspecified"),
];

/// `GET /ui/agents/{name}/revoke`: what revoking means, the reason, and
/// the button that confirms it.
pub async fn confirm_revoke(
    State(state): State<Arc<AppState>>,
    admin: ConsoleAdmin,
    Path(name): Path<String>,
) -> Response {
    let agent = match AgentName::parse(&name) {
        Ok(agent) => agent,
        Err(e) => return Refused::from(e).into_response(),
    };
    let record = match state.registry.get(&agent).await {
        Ok(record) => record,
        Err(e) => return Refused::from(e).into_response(),
    };
    let body = html! {
        section.confirm {
            p { "Revoking " strong { (record.name) } " (now " (status_badge(&record.status)) ") revokes every certificate it holds and cannot be undone: the agent never signs or authenticates again." }
            form method="post" action={ "/ui/agents/" (record.name) "/revoke" } {
                (admin.csrf_field())
                label for="reason" { "Reason" }
                select #reason name="reason" required {
                    @for (value, label) in REVOCATION_REASONS { option value=(value) { (label) } }
                }
                button.danger type="submit" data-action="confirm" { "Revoke " (record.name) }
            }
            p { a href="/ui/agents" { "Cancel" } }
        }
    };
    admin.page("agent-revoke", "Revoke an agent", body)
}

#[derive(Deserialize)]
pub struct RevokeForm {
    reason: String,
}

/// `POST /ui/agents/{name}/revoke`: `reason=` (an RFC 5280 name).
pub async fn revoke(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    checked: Checked<RevokeForm>,
) -> Response {
    let Checked { admin, form } = checked;
    let done = match revocation::agent_revocation_reason(&form.reason) {
        Ok(reason) => {
            revocation::change(
                &state,
                &admin.caller,
                &name,
                StatusChange::Revoke(reason),
                "revoked",
            )
            .await
        }
        Err(e) => Err(e),
    };
    match done {
        Ok(s) => view::back(
            "/ui/agents",
            if s.changed { "revoked" } else { "unchanged" },
            &name,
        ),
        Err(e) => Refused(e).into_response(),
    }
}

#[derive(Deserialize)]
pub struct AnomaliesQuery {
    agent: Option<String>,
    kind: Option<String>,
    notice: Option<String>,
    subject: Option<String>,
}

/// `GET /ui/anomalies?agent=&kind=`: the newest detections, what was seen
/// and what was done, and a resume button for an agent still suspended.
pub async fn anomalies(
    State(state): State<Arc<AppState>>,
    admin: ConsoleAdmin,
    Query(query): Query<AnomaliesQuery>,
) -> Response {
    match render_anomalies(&state, &admin, query).await {
        Ok(r) => r,
        Err(refused) => refused.into_response(),
    }
}

fn filter(value: Option<String>) -> Result<Option<String>, ApiError> {
    value
        .filter(|v| !v.is_empty())
        .map(crate::api::audit::checked_filter)
        .transpose()
}

async fn render_anomalies(
    state: &AppState,
    admin: &ConsoleAdmin,
    query: AnomaliesQuery,
) -> Result<Response, Refused> {
    authorize(&admin.caller, Action::ListAgents)?;
    let (notice, subject) = (query.notice, query.subject);
    let (agent, kind) = (filter(query.agent)?, filter(query.kind)?);
    let found = state
        .detector
        .anomalies(&AnomalyQuery {
            agent: agent.clone(),
            kind: kind.clone(),
            since_ms: None,
            before: None,
            limit: PAGE_SIZE,
        })
        .await?;
    // Each agent's standing now, read once.
    let mut standing = BTreeMap::new();
    for name in found.iter().filter_map(|a| a.agent.as_deref()) {
        if standing.contains_key(name) {
            continue;
        }
        let status = match AgentName::parse(name) {
            Ok(n) => state.registry.get(&n).await.map(|r| r.status).ok(),
            Err(_) => None,
        };
        standing.insert(name.to_owned(), status.unwrap_or_else(|| "unknown".into()));
    }
    let body = html! {
        (view::notice(notice.as_deref(), subject.as_deref()))
        form.search method="get" action="/ui/anomalies" {
            label { "Agent" input type="search" name="agent" value=[agent.as_deref()]; }
            label { "Kind"
                select name="kind" {
                    option value="" { "any" }
                    @for k in ["credential_sharing", "rate_spike", "cross_agent_probing"] {
                        option value=(k) selected[kind.as_deref() == Some(k)] { (k) }
                    }
                }
            }
            button type="submit" { "Filter" }
        }
        div.scroll { table {
            thead { tr {
                th { "Detected" } th { "Kind" } th { "Agent" } th { "Credential" } th { "What was seen" } th { "Response" } th { "Now" }
            } }
            tbody { @for a in &found {
                tr data-anomaly-id=(a.id) data-kind=(a.kind) data-anomaly-agent=[a.agent.as_deref()] {
                    td { (view::time(a.detected_at_ms / 1000)) br;
                         span.muted { "first offense " (view::time(a.first_offense_ms / 1000)) } }
                    td { (a.kind) }
                    td { (a.agent.as_deref().unwrap_or("—")) }
                    td { code { (a.credential) } }
                    td { (details(&a.details)) }
                    td { span class={ "status status-" (a.response) } { (a.response) } }
                    td {
                        @if let Some(agent) = &a.agent {
                            @let status = standing.get(agent).map_or("unknown", String::as_str);
                            (status_badge(status))
                            @if status == "suspended" {
                                (actions(admin, agent, status, "anomalies"))
                            }
                        }
                    }
                }
            } }
        } }
        @if found.is_empty() { p.muted { "No anomaly has been detected." } }
    };
    Ok(admin.page("anomalies", "Anomalies", body))
}

/// An anomaly's details (addresses, rates, denials), one line a field.
fn details(details: &serde_json::Value) -> Markup {
    let Some(fields) = details.as_object() else {
        return html! { code { (details.to_string()) } };
    };
    html! {
        dl.kv { @for (k, v) in fields {
            dt { (k.replace('_', " ")) }
            dd { @match v {
                serde_json::Value::Array(items) => {
                    @for item in items { code { (view::value(item)) } br; }
                }
                serde_json::Value::Object(counts) => {
                    @for (name, n) in counts { code { (name) } ": " (view::value(n)) br; }
                }
                other => code { (view::value(other)) },
            } }
        } }
    }
}
