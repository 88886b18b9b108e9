//! The approvals queue: every request held in the last day, live (the
//! page's script fetches `rows` every two seconds), with what exactly was
//! asked, who has voted, and the approve and deny buttons. A vote goes
//! through `Approvals::vote` with `HeldRunner`, as `POST
//! /v1/approvals/{id}/approve|deny` does.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::{Html, IntoResponse, Response};
use axum::Extension;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use maud::{html, Markup};
use serde::Deserialize;
use serde_json::Value;

use super::session::{Checked, ConsoleAdmin};
use super::view::{self, Refused};
use crate::api::error::ApiError;
use crate::api::held::HeldRunner;
use crate::api::{AppState, RequestId};
use crate::approvals::Approval;
use crate::store::ApprovalVote;

/// Held requests made this long ago are still listed, decided or not.
const LISTED_SECONDS: i64 = 86_400;
const LISTED_MAX: i64 = 100;

#[derive(Deserialize)]
pub struct Notice {
    notice: Option<String>,
    subject: Option<String>,
}

/// How a request's state reads in `data-status`: a request that was
/// approved is `approved` whether running it then succeeded or failed
/// (that is `data-outcome`).
fn status_attribute(status: &str) -> &str {
    match status {
        "completed" | "failed" => "approved",
        other => other,
    }
}

/// What was asked for, as an approver must see it: the message itself
/// when it is text, the digest that will be signed, the audience, intent
/// and lifetime of a message, the lifetime of a certificate.
fn request_details(request: &Value) -> Markup {
    let field = |name: &str| request.get(name).filter(|v| !v.is_null());
    let message = field("message_b64")
        .and_then(Value::as_str)
        .and_then(|m| B64.decode(m).ok());
    let digest = field("digest_sha256_b64")
        .and_then(Value::as_str)
        .and_then(|d| B64.decode(d).ok());
    html! {
        dl.kv {
            @if let Some(bytes) = &message {
                dt { "Message" }
                dd {
                    @match std::str::from_utf8(bytes) {
                        Ok(text) if !text.chars().any(|c| c.is_control() && c != '\n') => q { (text) },
                        _ => span.muted { "binary, " (bytes.len()) " bytes" },
                    }
                }
            }
            @if let Some(digest) = &digest {
                dt { "SHA-256" } dd { code { (hex::encode(digest)) } }
            }
            @for name in ["key_id", "audience", "intent", "ttl_seconds"] {
                @if let Some(v) = field(name) {
                    dt { (name.replace('_', " ")) } dd { code { (view::value(v)) } }
                }
            }
            @if field("csr_pem").is_some() {
                dt { "CSR" } dd { span.muted { "a certificate signing request" } }
            }
        }
    }
}

fn row(admin: &ConsoleAdmin, approval: &Approval, votes: &[ApprovalVote]) -> Markup {
    let approvals = votes.iter().filter(|v| v.approve).count();
    let outcome = matches!(approval.status.as_str(), "completed" | "failed")
        .then_some(approval.status.as_str());
    html! {
        tr data-approval-id=(approval.id) data-status=(status_attribute(&approval.status))
            data-outcome=[outcome] {
            td { strong { (approval.agent) } br; span.muted { (approval.kind) } }
            td { (request_details(&approval.request)) }
            td { "v" (approval.policy_version) }
            td data-votes=(approvals) {
                (approvals) " of " (approval.approvals_required)
                @if !votes.is_empty() {
                    ul.votes { @for v in votes {
                        li data-voter=(v.admin) {
                            (if v.approve { "approved by " } else { "denied by " }) strong { (v.admin) }
                            @if let Some(c) = &v.comment { ": " q { (c) } }
                        }
                    } }
                }
            }
            td { (view::time(approval.created_at)) br; span.muted { "expires " (view::time(approval.expires_at)) } }
            td {
                span class={ "status status-" (approval.status) } { (approval.status) }
                @if approval.status == "pending" {
                    form.inline method="post" action={ "/ui/approvals/" (approval.id) "/vote" } {
                        (admin.csrf_field())
                        input type="text" name="comment" maxlength="1024" placeholder="Comment (optional)" aria-label="Comment";
                        button type="submit" name="decision" value="approve" data-action="approve" { "Approve" }
                        button type="submit" name="decision" value="deny" data-action="deny" { "Deny" }
                    }
                }
                @if let Some(error) = approval.result.as_ref().and_then(|r| r.get("error")) {
                    p.error { "Running it failed: " code { (view::value(&error["code"])) } }
                }
            }
        }
    }
}

async fn rendered_rows(state: &AppState, admin: &ConsoleAdmin) -> Result<Markup, Refused> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut approvals = state
        .approvals
        .recent_with_votes(&admin.caller, now - LISTED_SECONDS, LISTED_MAX)
        .await?;
    // Waiting first, then the decided, newest first within each.
    approvals.sort_by_key(|(a, _)| (a.status != "pending", -a.created_at));
    Ok(html! { @for (approval, votes) in &approvals { (row(admin, approval, votes)) } })
}

pub async fn page(
    State(state): State<Arc<AppState>>,
    admin: ConsoleAdmin,
    Query(notice): Query<Notice>,
) -> Response {
    let rows = match rendered_rows(&state, &admin).await {
        Ok(rows) => rows,
        Err(refused) => return refused.into_response(),
    };
    let empty = rows.0.is_empty();
    let body = html! {
        (view::notice(notice.notice.as_deref(), notice.subject.as_deref()))
        p.muted #live-status aria-live="polite" {
            "Requests held in the last 24 hours. New ones appear here as they arrive."
        }
        div.scroll { table {
            thead { tr {
                th { "Agent" } th { "Asks for" } th { "Policy" } th { "Votes" } th { "Held" } th { "Status" }
            } }
            tbody #approval-rows { (rows) }
        } }
        p.muted #approvals-empty hidden[!empty] { "No request is held." }
    };
    admin.page("approvals", "Approvals", body)
}

/// `GET /ui/approvals/rows`: the table's rows alone, for the live update.
pub async fn rows(State(state): State<Arc<AppState>>, admin: ConsoleAdmin) -> Response {
    match rendered_rows(&state, &admin).await {
        Ok(rows) => Html(rows.into_string()).into_response(),
        Err(refused) => refused.into_response(),
    }
}

#[derive(Deserialize)]
pub struct VoteForm {
    decision: String,
    comment: Option<String>,
}

/// `POST /ui/approvals/{id}/vote`: `decision=approve|deny`, `comment=`.
pub async fn vote(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    Path(id): Path<String>,
    checked: Checked<VoteForm>,
) -> Response {
    let Checked { admin, form } = checked;
    let approve = match form.decision.as_str() {
        "approve" => true,
        "deny" => false,
        _ => {
            return Refused(ApiError::bad_request(
                "invalid_decision",
                "decision is approve or deny",
            ))
            .into_response()
        }
    };
    let comment = form
        .comment
        .as_deref()
        .map(str::trim)
        .filter(|c| !c.is_empty());
    let runner = HeldRunner::new(&state, &request_id.0);
    match state
        .approvals
        .vote(&admin.caller, &id, approve, comment, &runner)
        .await
    {
        Ok(_) => {
            let notice = if approve { "approved" } else { "denied" };
            view::back("/ui/approvals", notice, &id)
        }
        Err(e) => Refused::from(e).into_response(),
    }
}
