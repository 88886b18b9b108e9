//! The audit trail: search by agent, action, actor and time (the same
//! search as `GET /v1/audit/events`), one entry whole, the latest signed
//! checkpoint, and a check of the stored log against it.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use maud::{html, Markup};
use serde::Deserialize;

use super::session::{Checked, ConsoleAdmin, NoFields};
use super::view::{self, Refused};
use crate::api::audit::EventsQuery;
use crate::api::error::ApiError;
use crate::api::AppState;
use crate::audit::AuditQuery;
use crate::transparency::{AuditLogError, LogHealth};

const PAGE_SIZE: u32 = 100;
/// With no time and no position given, the search starts this long ago.
const DEFAULT_SPAN_MS: i64 = 3_600_000;

#[derive(Deserialize, Default)]
pub struct SearchQuery {
    agent: Option<String>,
    action: Option<String>,
    actor: Option<String>,
    since: Option<String>,
    until: Option<String>,
    after: Option<String>,
    notice: Option<String>,
    subject: Option<String>,
}

fn given(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

/// The form as the API's search (empty fields are absent), from an hour
/// ago when neither a time nor a position is given.
fn to_query(search: &SearchQuery) -> Result<AuditQuery, ApiError> {
    let field = |v: &Option<String>| given(v).map(str::to_owned);
    let mut query = EventsQuery {
        agent: field(&search.agent),
        action: field(&search.action),
        actor: field(&search.actor),
        since: field(&search.since),
        until: field(&search.until),
        after: field(&search.after),
        limit: Some(PAGE_SIZE.to_string()),
    }
    .checked()?;
    if query.since_ms.is_none() && query.after.is_none() {
        let now = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
        query.since_ms = Some(now - DEFAULT_SPAN_MS);
    }
    Ok(query)
}

async fn checkpoint_section(state: &AppState, admin: &ConsoleAdmin) -> Result<Markup, Refused> {
    let latest = state.audit_log.latest().await?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    Ok(html! {
        h2 { "Latest checkpoint" }
        @match &latest {
            Some(c) => {
                dl.kv data-checkpoint-size=(c.size) {
                    dt { "Entries" } dd { (c.size) }
                    dt { "Signed" } dd { (view::time(c.signed_at_ms / 1000)) " (" (view::age(now - c.signed_at_ms / 1000)) " ago)" }
                    dt { "Root" } dd { code { (hex::encode(c.root)) } }
                    dt { "Origin" } dd { code { (state.audit_log.origin()) } }
                }
                details { summary { "The signed note" } pre { (c.note) } }
            }
            None => p.muted { "No checkpoint has been signed yet." },
        }
        p {
            "This replica's view: "
            @match state.audit_log.health() {
                LogHealth::Consistent => span.status.status-ok data-log-health="consistent" { "consistent" },
                LogHealth::Unchecked => span.status data-log-health="unchecked" { "not yet checked" },
                LogHealth::Inconsistent(reason) => span.status.status-bad data-log-health="inconsistent" { "inconsistent: " (reason) },
            }
        }
        form.inline method="post" action="/ui/audit/verify" {
            (admin.csrf_field())
            button type="submit" data-action="verify" { "Verify the stored log against it" }
        }
    })
}

pub async fn page(
    State(state): State<Arc<AppState>>,
    admin: ConsoleAdmin,
    Query(search): Query<SearchQuery>,
) -> Response {
    match render(&state, &admin, &search, None).await {
        Ok(r) => r,
        Err(refused) => refused.into_response(),
    }
}

async fn render(
    state: &AppState,
    admin: &ConsoleAdmin,
    search: &SearchQuery,
    failure: Option<String>,
) -> Result<Response, Refused> {
    let query = to_query(search)?;
    let records = state.audit_log.events(&admin.caller, query).await?;
    let next = (records.len() == PAGE_SIZE as usize)
        .then(|| records.last().map(|r| r.index))
        .flatten();
    let next_link = next.map(|after| {
        let mut pairs: Vec<(&str, String)> = vec![("after", after.to_string())];
        for (k, v) in [
            ("agent", &search.agent),
            ("action", &search.action),
            ("actor", &search.actor),
            ("until", &search.until),
        ] {
            if let Some(v) = given(v) {
                pairs.push((k, v.to_owned()));
            }
        }
        format!(
            "/ui/audit?{}",
            serde_urlencoded::to_string(pairs).unwrap_or_default()
        )
    });
    let checkpoint = checkpoint_section(state, admin).await?;
    let body = html! {
        (view::notice(search.notice.as_deref(), search.subject.as_deref()))
        @if let Some(failure) = &failure { p.error role="alert" data-verified="false" { (failure) } }
        form.search method="get" action="/ui/audit" {
            label { "Agent" input type="search" name="agent" value=[given(&search.agent)]; }
            label { "Action" input type="search" name="action" placeholder="e.g. agent.suspend" value=[given(&search.action)]; }
            label { "Actor" input type="search" name="actor" placeholder="e.g. admin:alice" value=[given(&search.actor)]; }
            label { "Since" input type="text" name="since" placeholder="RFC 3339 or Unix seconds" value=[given(&search.since)]; }
            label { "Until" input type="text" name="until" placeholder="RFC 3339 or Unix seconds" value=[given(&search.until)]; }
            button type="submit" { "Search" }
        }
        p.muted { "Oldest first; without a time, from an hour ago." }
        div.scroll { table {
            thead { tr { th { "#" } th { "Time" } th { "Actor" } th { "Action" } th { "Agent" } th { "Subject" } } }
            tbody { @for r in &records {
                tr data-audit-index=(r.index) {
                    td { a href={ "/ui/audit/entries/" (r.index) } { (r.index) } }
                    td { (view::time(r.at_ms / 1000)) }
                    td { code { (r.event.actor) } }
                    td { (r.event.action) }
                    td { (r.event.agent.as_deref().unwrap_or("—")) }
                    td { code { (r.event.subject) } }
                }
            } }
        } }
        @if records.is_empty() { p.muted { "No entry matches." } }
        @if let Some(link) = next_link { p { a href=(link) { "Next page" } } }
        (checkpoint)
    };
    Ok(admin.page("audit", "Audit", body))
}

/// `GET /ui/audit/entries/{index}`: one entry, as its leaf holds it.
pub async fn entry(
    State(state): State<Arc<AppState>>,
    admin: ConsoleAdmin,
    Path(index): Path<String>,
) -> Response {
    let Ok(index) = index.parse::<u64>() else {
        return Refused(ApiError::bad_request(
            "invalid_index",
            "an entry index is a number",
        ))
        .into_response();
    };
    let query = AuditQuery {
        after: index.checked_sub(1),
        limit: 1,
        ..AuditQuery::default()
    };
    let found = match state.audit_log.events(&admin.caller, query).await {
        Ok(records) => records.into_iter().find(|r| r.index == index),
        Err(e) => return Refused::from(e).into_response(),
    };
    let Some(record) = found else {
        return Refused(ApiError::not_found(
            "entry_not_found",
            "no audit entry has that index",
        ))
        .into_response();
    };
    let covered = match state.audit_log.latest().await {
        Ok(latest) => latest.is_some_and(|c| index < c.size),
        Err(e) => return Refused::from(e).into_response(),
    };
    let pretty = serde_json::from_str::<serde_json::Value>(&record.entry)
        .and_then(|v| serde_json::to_string_pretty(&v))
        .unwrap_or_else(|_| record.entry.clone());
    let body = html! {
        p {
            @if covered { span.status.status-ok { "covered by the latest checkpoint" } }
            @else { span.status { "not yet in a checkpoint" } }
        }
        pre data-audit-entry=(index) { (pretty) }
        p { a href="/ui/audit" { "Back to the search" } }
    };
    admin.page("audit-entry", &format!("Audit entry {index}"), body)
}

/// `POST /ui/audit/verify`: recomputes the stored log and compares it with
/// every stored tile and the latest checkpoint's signed root
/// (`AuditLog::self_check`, which also fails the log closed on a
/// mismatch).
pub async fn verify(State(state): State<Arc<AppState>>, checked: Checked<NoFields>) -> Response {
    let admin = checked.admin;
    match state.audit_log.self_check().await {
        Ok(size) => view::back("/ui/audit", "verified", &format!("{size} entries")),
        Err(AuditLogError::Inconsistent(reason)) => {
            let failure = format!("The stored log does NOT verify: {reason}");
            match render(&state, &admin, &SearchQuery::default(), Some(failure)).await {
                Ok(r) => r,
                Err(refused) => refused.into_response(),
            }
        }
        Err(e) => Refused::from(e).into_response(),
    }
}
