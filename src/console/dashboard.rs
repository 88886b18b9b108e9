//! The dashboard: what waits for a person, what was detected, the KPIs,
//! and the audit log's last checkpoint.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use maud::html;

use super::session::ConsoleAdmin;
use super::view::{self, Refused};
use crate::detect::AnomalyQuery;
use crate::transparency::LogHealth;

const DAY_SECONDS: i64 = 86_400;
/// The dashboard counts detections up to this many (then says `100+`).
const ANOMALIES_READ: i64 = 100;

pub async fn page(State(state): State<Arc<crate::api::AppState>>, admin: ConsoleAdmin) -> Response {
    match render(&state, &admin).await {
        Ok(response) => response,
        Err(refused) => refused.into_response(),
    }
}

async fn render(state: &crate::api::AppState, admin: &ConsoleAdmin) -> Result<Response, Refused> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let approvals = state
        .approvals
        .recent(&admin.caller, now - DAY_SECONDS, 200)
        .await?;
    let pending: Vec<_> = approvals.iter().filter(|a| a.status == "pending").collect();
    let anomalies = state
        .detector
        .anomalies(&AnomalyQuery {
            agent: None,
            kind: None,
            since_ms: Some((now - DAY_SECONDS) * 1000),
            before: None,
            limit: ANOMALIES_READ,
        })
        .await?;
    let kpis = state
        .detector
        .kpis(std::time::Duration::from_secs(DAY_SECONDS as u64))
        .await?;
    let checkpoint = state.audit_log.latest().await?;
    let health = state.audit_log.health();
    let ratio =
        |r: Option<f64>| r.map_or_else(|| "—".to_owned(), |r| format!("{:.1} %", r * 100.0));
    let seconds = |s: Option<f64>| s.map_or_else(|| "—".to_owned(), |s| format!("{s:.1} s"));
    let body = html! {
        section.cards {
            a.card href="/ui/approvals" data-kpi="pending_approvals" {
                div.n { (pending.len()) } div.l { "requests waiting for approval" }
            }
            a.card href="/ui/anomalies" data-kpi="anomalies" {
                div.n { (anomalies.len()) @if anomalies.len() as i64 == ANOMALIES_READ { "+" } }
                div.l { "anomalies in the last 24 h" }
            }
            div.card data-kpi="policy_compliant_ratio" {
                div.n { (ratio(kpis.policy_compliant_ratio)) } div.l { "requests within policy (24 h)" }
            }
            div.card data-kpi="mean_time_to_detect" {
                div.n { (seconds(kpis.mean_time_to_detect_seconds)) } div.l { "mean time to detect" }
            }
            div.card data-kpi="mean_time_to_revoke" {
                div.n { (seconds(kpis.mean_time_to_revoke_seconds)) } div.l { "mean time to suspend or revoke" }
            }
            div.card data-kpi="checkpoint" {
                @match &checkpoint {
                    Some(c) => {
                        div.n { (view::age(now - c.signed_at_ms / 1000)) }
                        div.l { "since the last audit checkpoint (" (c.size) " entries)" }
                    }
                    None => { div.n { "—" } div.l { "no audit checkpoint yet" } }
                }
            }
        }
        p.muted {
            "Requests allowed " (kpis.requests_allowed) ", denied " (kpis.requests_denied)
            " in the last 24 h. Audit log: "
            @match &health {
                LogHealth::Consistent => span.status.status-ok data-log-health="consistent" { "verified" },
                LogHealth::Unchecked => span.status data-log-health="unchecked" { "not yet checked" },
                LogHealth::Inconsistent(reason) => span.status.status-bad data-log-health="inconsistent" { "INCONSISTENT: " (reason) },
            }
        }
        h2 { "Waiting for approval" }
        @if pending.is_empty() {
            p.muted { "Nothing is waiting." }
        } @else {
            div.scroll { table {
                thead { tr { th { "Agent" } th { "Request" } th { "Votes" } th { "Expires" } } }
                tbody { @for a in pending.iter().take(10) {
                    tr data-approval-id=(a.id) {
                        td { (a.agent) }
                        td { (a.kind) }
                        td { (a.approvals_required) " needed" }
                        td { (view::time(a.expires_at)) }
                    }
                } }
            } }
            p { a href="/ui/approvals" { "Open the approvals queue" } }
        }
        h2 { "Recent anomalies" }
        @if anomalies.is_empty() {
            p.muted { "None in the last 24 hours." }
        } @else {
            div.scroll { table {
                thead { tr { th { "Detected" } th { "Kind" } th { "Agent" } th { "Response" } } }
                tbody { @for a in anomalies.iter().take(10) {
                    tr data-anomaly-id=(a.id) {
                        td { (view::time(a.detected_at_ms / 1000)) }
                        td { (a.kind) }
                        td { (a.agent.as_deref().unwrap_or("—")) }
                        td { span class={ "status status-" (a.response) } { (a.response) } }
                    }
                } }
            } }
        }
    };
    Ok(admin.page("dashboard", "Dashboard", body))
}
