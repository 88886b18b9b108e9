//! The web console, driven in a real headless Chromium as the people in
//! the loop use it: sign in, watch a held request arrive, approve it with
//! two admins, suspend and resume an agent; and the attacks a browser
//! makes possible (a cross-site form, a form without the session's token,
//! a session that was signed out) refused with nothing changed.

#[path = "common/browser.rs"]
mod browser;
mod common;

use browser::Browser;
use common::{agent_client, post, Db, Server};
use serde_json::{json, Value};

const PAYMENTS: &str =
    "[roles.payments]\nactions = [\"sign\"]\nrequires_approval = true\napprovals_required = 2\n";

async fn apply(server: &Server, content: &str) {
    let (status, applied) = server
        .admin("POST", "/v1/policies", Some(json!({"content": content})))
        .await;
    assert_eq!(status, 201, "{applied}");
}

/// "pay 10 to bob"
fn payment() -> Value {
    json!({"message_b64": "cGF5IDEwIHRvIGJvYg=="})
}

async fn agent_status(server: &Server, name: &str) -> String {
    let (status, agent) = server
        .admin("GET", &format!("/v1/agents/{name}"), None)
        .await;
    assert_eq!(status, 200, "{agent}");
    agent["status"].as_str().unwrap().to_owned()
}

async fn agent_key(server: &Server, name: &str) -> String {
    let (_, agent) = server
        .admin("GET", &format!("/v1/agents/{name}"), None)
        .await;
    agent["key_id"].as_str().unwrap().to_owned()
}

async fn audit_actions(server: &Server) -> Vec<(String, String)> {
    server
        .store()
        .await
        .audit_records(0, 10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.event.actor, r.event.action))
        .collect()
}

#[tokio::test]
async fn two_admins_approve_a_held_payment_in_their_browsers_and_the_agent_collects_the_signature()
{
    let server = Server::start(Db::Sqlite).await;
    let (server, bob_token) = common::with_admin_token(server, "bob").await;
    apply(&server, PAYMENTS).await;
    let (alpha, _, _) = agent_client(&server, "alpha", &["payments"]).await;

    let admin = Browser::open(&server.url).await;
    admin.goto("/ui/").await;
    admin.wait_for("input[name=token]").await;
    admin.screenshot("login").await;
    admin.sign_in(&server.admin_token).await;
    admin.goto("/ui/approvals").await;
    admin.wait_for("main[data-page=approvals]").await;

    // The agent asks while the page is open: the row appears without a
    // reload.
    let (status, held) = post(&alpha, &server, "/v1/agents/alpha/sign", payment()).await;
    assert_eq!(status, 202, "{held}");
    let id = held["id"].as_str().unwrap().to_owned();
    let row = format!("tr[data-approval-id=\"{id}\"]");
    admin.wait_for(&format!("{row}[data-status=pending]")).await;
    let shown = admin.wait_for(&row).await.text().await.unwrap();
    assert!(
        shown.contains("pay 10 to bob") && shown.contains("alpha") && shown.contains("0 of 2"),
        "the row shows what is asked, by whom, and the votes: {shown}"
    );
    admin.screenshot("approvals").await;

    admin.click_in(&row, "[data-action=approve]").await;
    admin.wait_for("[data-notice=approved]").await;
    admin
        .wait_for(&format!("{row}[data-status=pending] li[data-voter=admin]"))
        .await;
    // One person is one vote, however often they click.
    admin.click_in(&row, "[data-action=approve]").await;
    admin.wait_for("main[data-error=already_voted]").await;
    let (_, pending) = get(&alpha, &server, &format!("/v1/approvals/{id}")).await;
    assert_eq!(pending["status"], "pending", "{pending}");

    let bob = Browser::open(&server.url).await;
    bob.sign_in(&bob_token).await;
    bob.goto("/ui/approvals").await;
    bob.click_in(&row, "[data-action=approve]").await;
    bob.wait_for("[data-notice=approved]").await;
    bob.wait_for(&format!("{row}[data-status=approved]")).await;
    assert!(bob.has(&format!("{row} li[data-voter=admin]")).await);
    assert!(bob.has(&format!("{row} li[data-voter=bob]")).await);

    // The agent's poll returns the signature the request would have had.
    let (status, done) = get(&alpha, &server, &format!("/v1/approvals/{id}")).await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["status"], "completed", "{done}");
    let signature = done["result"]["signature_der_b64"]
        .as_str()
        .expect("a signature");
    assert!(
        signs(&server, "alpha", b"pay 10 to bob", signature).await,
        "the signature is alpha's over the payment: {done}"
    );
    // Each vote is audited with the admin who cast it, and each sign-in.
    let actions = audit_actions(&server).await;
    for expected in [
        ("admin:admin", "console.login"),
        ("admin:bob", "console.login"),
        ("admin:admin", "approval.approve"),
        ("admin:bob", "approval.approve"),
    ] {
        assert!(
            actions
                .iter()
                .any(|(actor, action)| (actor.as_str(), action.as_str()) == expected),
            "{expected:?} in {actions:?}"
        );
    }
    admin.close().await;
    bob.close().await;
}

/// Whether `signature_b64` (DER) is `agent`'s key's ECDSA P-256 signature
/// over `message`.
async fn signs(server: &Server, agent: &str, message: &[u8], signature_b64: &str) -> bool {
    use base64::Engine;
    use p256::ecdsa::signature::Verifier;
    use p256::pkcs8::DecodePublicKey;
    let (_, record) = server
        .admin("GET", &format!("/v1/agents/{agent}"), None)
        .await;
    let key = p256::ecdsa::VerifyingKey::from_public_key_pem(
        record["public_key_pem"].as_str().expect("a custodial key"),
    )
    .unwrap();
    let der = base64::engine::general_purpose::STANDARD
        .decode(signature_b64)
        .unwrap();
    let signature = p256::ecdsa::Signature::from_der(&der).unwrap();
    key.verify(message, &signature).is_ok()
}

async fn get(client: &reqwest::Client, server: &Server, path: &str) -> (u16, Value) {
    let response = client
        .get(format!("{}{path}", server.url))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn an_admin_suspends_resumes_and_revokes_agents_from_the_agents_page() {
    let server = Server::start(Db::Sqlite).await;
    let (alpha, _, _) = agent_client(&server, "alpha", &[]).await;
    common::register_agent(&server, "beta").await;
    let admin = Browser::open(&server.url).await;
    admin.sign_in(&server.admin_token).await;
    admin.goto("/ui/agents").await;
    let alpha_row = "tr[data-agent=alpha]";
    admin
        .wait_for(&format!("{alpha_row}[data-status=active]"))
        .await;
    admin.screenshot("agents").await;

    admin.click_in(alpha_row, "[data-action=suspend]").await;
    admin
        .wait_for(&format!("{alpha_row}[data-status=suspended]"))
        .await;
    assert_eq!(agent_status(&server, "alpha").await, "suspended");
    let (status, refused) = post(&alpha, &server, "/v1/agents/alpha/sign", payment()).await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (403, Some("agent_not_active"))
    );

    admin.click_in(alpha_row, "[data-action=resume]").await;
    admin
        .wait_for(&format!("{alpha_row}[data-status=active]"))
        .await;
    let (status, signed) = post(&alpha, &server, "/v1/agents/alpha/sign", payment()).await;
    assert_eq!(status, 200, "{signed}");

    // A rotation gives alpha a new custodial key.
    let key_before = agent_key(&server, "alpha").await;
    admin.click_in(alpha_row, "[data-action=rotate]").await;
    admin.wait_for("[data-notice=rotated]").await;
    assert_ne!(agent_key(&server, "alpha").await, key_before);

    // Revoking asks for a reason and a confirmation first.
    admin
        .click_in("tr[data-agent=beta]", "[data-action=revoke]")
        .await;
    let reason = admin.wait_for("select[name=reason]").await;
    reason
        .select_by_value("cessationOfOperation")
        .await
        .unwrap();
    assert_eq!(
        agent_status(&server, "beta").await,
        "active",
        "nothing before the confirmation"
    );
    admin
        .click_in("main[data-page=agent-revoke]", "[data-action=confirm]")
        .await;
    admin
        .wait_for("tr[data-agent=beta][data-status=revoked]")
        .await;
    assert_eq!(agent_status(&server, "beta").await, "revoked");

    let actions = audit_actions(&server).await;
    for action in [
        "agent.suspend",
        "agent.resume",
        "agent.rotate_key",
        "agent.revoke",
    ] {
        assert!(
            actions
                .iter()
                .any(|(actor, a)| actor == "admin:admin" && a == action),
            "{action} by admin:admin in {actions:?}"
        );
    }
    admin.close().await;
}

/// A page another site serves, whose form posts to the console, as a
/// CSRF attack would: on its own plain-HTTP origin.
async fn attacker_site(target: &str) -> (String, tokio::task::JoinHandle<()>) {
    let page = format!(
        "<!DOCTYPE html><html><body><form method=post action=\"{target}/ui/agents/alpha/suspend\">\
         <input type=hidden name=back value=agents>\
         <button type=submit id=go>Win a prize</button></form></body></html>"
    );
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(move || {
            let page = page.clone();
            async move { axum::response::Html(page) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, task)
}

#[tokio::test]
async fn forms_from_another_site_or_without_the_session_token_are_refused_and_change_nothing() {
    let server = Server::start(Db::Sqlite).await;
    common::register_agent(&server, "alpha").await;
    let admin = Browser::open(&server.url).await;
    admin.sign_in(&server.admin_token).await;

    // The signed-in admin visits another site, whose form posts to the
    // console.
    let (evil, site) = attacker_site(&server.url).await;
    admin.client.goto(&evil).await.unwrap();
    admin.wait_for("#go").await.click().await.unwrap();
    let refused = admin.wait_for("main[data-error]").await;
    let code = refused.attr("data-error").await.unwrap().unwrap();
    assert!(
        ["console_session_required", "cross_site_request"].contains(&code.as_str()),
        "{code}"
    );
    assert_eq!(agent_status(&server, "alpha").await, "active");
    site.abort();

    // From the console's own origin, a form without the session's token,
    // or with a made-up one, is refused too.
    admin.goto("/ui/agents").await;
    admin.wait_for("tr[data-agent=alpha]").await;
    for body in [
        "back=agents",
        "back=agents&csrf=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ] {
        let status = admin
            .client
            .execute(
                "return fetch('/ui/agents/alpha/suspend', {method: 'POST', \
                   headers: {'Content-Type': 'application/x-www-form-urlencoded'}, \
                   body: arguments[0]}).then(r => r.status)",
                vec![json!(body)],
            )
            .await
            .unwrap();
        assert_eq!(status, json!(403), "{body}");
    }
    assert_eq!(agent_status(&server, "alpha").await, "active");
    assert!(
        !audit_actions(&server)
            .await
            .iter()
            .any(|(_, a)| a == "agent.suspend"),
        "no suspension was recorded"
    );
    admin.close().await;
}

#[tokio::test]
async fn a_signed_out_session_is_refused_everywhere() {
    let server = Server::start(Db::Sqlite).await;
    common::register_agent(&server, "alpha").await;
    let admin = Browser::open(&server.url).await;
    admin.sign_in(&server.admin_token).await;
    admin.goto("/ui/agents").await;
    let csrf = admin
        .attribute("tr[data-agent=alpha] input[name=csrf]", "value")
        .await
        .unwrap();
    let cookie = admin
        .client
        .get_all_cookies()
        .await
        .unwrap()
        .into_iter()
        .find(|c| c.name() == "__Host-keyward-console")
        .expect("the session cookie");
    assert!(cookie.http_only().unwrap_or(false) && cookie.secure().unwrap_or(false));
    let cookie = format!("{}={}", cookie.name(), cookie.value());

    admin.click_in("header", "[data-action=logout]").await;
    admin.wait_for("main[data-login]").await;
    admin.goto("/ui/agents").await;
    admin.wait_for("main[data-login]").await;
    assert!(!admin.has("[data-page]").await);
    admin.close().await;

    // The cookie kept from before signing out opens nothing.
    let ca = std::fs::read(server.path("ca.pem")).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let page = client
        .get(format!("{}/ui/agents", server.url))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status().as_u16(), 303);
    assert_eq!(page.headers()["location"], "/ui/");
    let origin = server.url.clone();
    let suspend = client
        .post(format!("{}/ui/agents/alpha/suspend", server.url))
        .header("cookie", &cookie)
        .header("origin", origin)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("csrf={csrf}&back=agents"))
        .send()
        .await
        .unwrap();
    assert_eq!(suspend.status().as_u16(), 401);
    assert_eq!(agent_status(&server, "alpha").await, "active");
    let actions = audit_actions(&server).await;
    assert!(
        actions.iter().any(|(_, a)| a == "console.logout"),
        "{actions:?}"
    );
}

/// A console session held by a plain HTTP client (no browser): its
/// cookie and the form token read from a page, with redirects not
/// followed so that each answer is seen as sent.
struct Session {
    client: reqwest::Client,
    base: String,
    cookie: String,
    csrf: String,
}

fn plain_client(server: &Server, identity: Option<reqwest::Identity>) -> reqwest::Client {
    let ca = std::fs::read(server.path("ca.pem")).unwrap();
    let mut builder = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .redirect(reqwest::redirect::Policy::none());
    if let Some(identity) = identity {
        builder = builder.identity(identity);
    }
    builder.build().unwrap()
}

fn identity(certificate_pem: &str, key: &std::path::Path) -> reqwest::Identity {
    let mut pem = std::fs::read(key).unwrap();
    pem.extend_from_slice(certificate_pem.as_bytes());
    reqwest::Identity::from_pem(&pem).unwrap()
}

fn session_cookie(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("__Host-keyward-console=") && !v.contains("Max-Age=0"))
        .map(|v| v.split(';').next().unwrap().to_owned())
}

impl Session {
    async fn sign_in(server: &Server, client: reqwest::Client, form: &[(&str, &str)]) -> Self {
        let response = client
            .post(format!("{}/ui/login", server.url))
            .form(form)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 303);
        let cookie = session_cookie(&response).expect("a session cookie");
        let mut session = Session {
            client,
            base: server.url.clone(),
            cookie,
            csrf: String::new(),
        };
        let (status, page) = session.get("/ui/approvals").await;
        assert_eq!(status, 200, "{page}");
        let at = page.find("name=\"csrf\" value=\"").expect("a form token") + 19;
        session.csrf = page[at..at + 43].to_owned();
        session
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .header("cookie", &self.cookie)
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    /// Posts `form` with this session's token, from the console's origin.
    async fn post(&self, path: &str, form: &[(&str, &str)]) -> (u16, String) {
        let mut fields = vec![("csrf", self.csrf.as_str())];
        fields.extend_from_slice(form);
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .header("cookie", &self.cookie)
            .header("origin", &self.base)
            .form(&fields)
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }
}

/// The machine-readable code of a refusal page.
fn refusal(page: &str) -> Option<&str> {
    let at = page.find("data-error=\"")? + 12;
    page[at..].split('"').next()
}

#[tokio::test]
async fn an_agents_client_certificate_opens_nothing_in_the_console() {
    let server = Server::start(Db::Sqlite).await;
    let (_, key, issued) = agent_client(&server, "alpha", &[]).await;
    let agent = plain_client(
        &server,
        Some(identity(issued["certificate_pem"].as_str().unwrap(), &key)),
    );
    let page = agent
        .get(format!("{}/ui/agents", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status().as_u16(), 303, "to the sign-in form");
    let login = agent
        .post(format!("{}/ui/login", server.url))
        .form(&[("method", "certificate")])
        .send()
        .await
        .unwrap();
    assert_eq!(login.status().as_u16(), 401);
    assert!(session_cookie(&login).is_none());
    assert_eq!(
        server.sql("SELECT COUNT(*) FROM console_sessions").await,
        Some(0)
    );
}

#[tokio::test]
async fn an_admin_certificate_signs_in_and_its_session_lasts_only_with_that_certificate() {
    let mut server = Server::start(Db::Sqlite).await;
    let out = server.path("ops");
    let (ok, text) = server
        .operator_beside(["admin", "cert-issue", "ops", "--out", out.to_str().unwrap()])
        .await;
    assert!(ok, "{text}");
    let certificate = std::fs::read_to_string(out.join("cert.pem")).unwrap();
    let ops = plain_client(&server, Some(identity(&certificate, &out.join("key.pem"))));
    let form = ops.get(format!("{}/ui/", server.url)).send().await.unwrap();
    assert!(form
        .text()
        .await
        .unwrap()
        .contains("Sign in as ops (client certificate)"));
    let session = Session::sign_in(&server, ops, &[("method", "certificate")]).await;
    let (status, page) = session.get("/ui/agents").await;
    assert!(
        status == 200 && page.contains("data-page=\"agents\""),
        "{status}"
    );
    // The cookie without the certificate is nobody.
    let stolen = plain_client(&server, None)
        .get(format!("{}/ui/agents", server.url))
        .header("cookie", &session.cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(stolen.status().as_u16(), 303);
    let records = server.store().await.audit_records(0, 1000).await.unwrap();
    let login = records
        .iter()
        .find(|r| r.event.action == "console.login")
        .expect("the sign-in is audited");
    assert_eq!(login.event.actor, "admin:ops");
    assert_eq!(login.event.details["method"], "certificate");
}

#[tokio::test]
async fn bad_console_input_is_refused_with_a_code_and_writes_nothing() {
    let server = Server::start(Db::Sqlite).await;
    apply(&server, PAYMENTS).await;
    let (alpha, _, _) = agent_client(&server, "alpha", &["payments"]).await;
    let (_, held) = post(&alpha, &server, "/v1/agents/alpha/sign", payment()).await;
    let id = held["id"].as_str().unwrap().to_owned();
    let anonymous = plain_client(&server, None);
    for (form, status) in [
        (vec![("token", "not-an-admin-token")], 401),
        (vec![("token", "")], 401),
    ] {
        let response = anonymous
            .post(format!("{}/ui/login", server.url))
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status, "{form:?}");
        assert!(session_cookie(&response).is_none());
        let page = response.text().await.unwrap();
        assert!(
            !page.contains("not-an-admin-token"),
            "a token is never shown back"
        );
    }
    let garbage = anonymous
        .post(format!("{}/ui/login", server.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("token=%ZZ%")
        .send()
        .await
        .unwrap();
    assert!(garbage.status().is_client_error());

    let session = Session::sign_in(
        &server,
        plain_client(&server, None),
        &[("token", server.admin_token.trim())],
    )
    .await;
    let entries = server.sql("SELECT COUNT(*) FROM audit_entries").await;
    let vote = format!("/ui/approvals/{id}/vote");
    let long_comment = "x".repeat(2000);
    // (path, form fields, status, code)
    type Case<'a> = (String, Vec<(&'a str, &'a str)>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            vote.clone(),
            vec![("decision", "maybe")],
            400,
            "invalid_decision",
        ),
        (vote.clone(), vec![], 400, "invalid_form"),
        (
            vote.clone(),
            vec![("decision", "approve"), ("comment", &long_comment)],
            400,
            "invalid_comment",
        ),
        (
            "/ui/approvals/0123/vote".into(),
            vec![("decision", "approve")],
            404,
            "approval_not_found",
        ),
        ("/ui/agents/alpha/explode".into(), vec![], 404, "not_found"),
        (
            "/ui/agents/nobody/suspend".into(),
            vec![],
            404,
            "agent_not_found",
        ),
        (
            "/ui/agents/Not%20A%20Name/suspend".into(),
            vec![],
            400,
            "invalid_agent_name",
        ),
        (
            "/ui/agents/alpha/revoke".into(),
            vec![("reason", "bored")],
            400,
            "invalid_reason",
        ),
        (
            "/ui/agents/alpha/revoke".into(),
            vec![("reason", "certificateHold")],
            400,
            "invalid_reason",
        ),
        (
            "/ui/agents/alpha/revoke".into(),
            vec![],
            400,
            "invalid_form",
        ),
        (
            "/ui/policy/rollback".into(),
            vec![("version", "abc")],
            400,
            "invalid_version",
        ),
        (
            "/ui/policy/rollback".into(),
            vec![("version", "99")],
            404,
            "policy_not_found",
        ),
    ];
    for (path, form, status, code) in &cases {
        let (got, page) = session.post(path, form).await;
        assert_eq!(
            (got, refusal(&page)),
            (*status, Some(*code)),
            "{path} {form:?}"
        );
    }
    for (path, status, code) in [
        ("/ui/audit/entries/x", 400, "invalid_index"),
        ("/ui/audit/entries/999999", 404, "entry_not_found"),
        ("/ui/audit?since=yesterday", 400, "invalid_time"),
        ("/ui/audit?actor=%01", 400, "invalid_filter"),
        ("/ui/policy/diff?from=0&to=1", 400, "invalid_version"),
        ("/ui/agents/nobody/revoke", 404, "agent_not_found"),
        ("/ui/static/secrets.txt", 404, "not_found"),
    ] {
        let (got, page) = session.get(path).await;
        assert_eq!((got, refusal(&page)), (status, Some(code)), "{path}");
    }
    assert_eq!(
        server.sql("SELECT COUNT(*) FROM audit_entries").await,
        entries,
        "nothing was written"
    );
    assert_eq!(agent_status(&server, "alpha").await, "active");
    let (_, still) = server
        .admin("GET", &format!("/v1/approvals/{id}"), None)
        .await;
    assert_eq!(still["status"], "pending");
}

#[tokio::test]
async fn every_page_serves_its_work_anomalies_resumed_audit_verified_policy_rolled_back() {
    let server = Server::start(Db::Sqlite).await;
    let first =
        format!("{PAYMENTS}\n[anomaly]\ncross_agent_probing = \"suspend\"\nprobing_denials = 3\n");
    apply(&server, &first).await;
    apply(
        &server,
        &format!("{first}\n[roles.reports]\nactions = [\"sign\"]\n"),
    )
    .await;
    let (alpha, _, _) = agent_client(&server, "alpha", &["payments"]).await;
    common::register_agent(&server, "beta").await;
    let (status, _) = post(&alpha, &server, "/v1/agents/alpha/sign", payment()).await;
    assert_eq!(status, 202);
    // alpha tries beta's key until the prober is quarantined.
    for _ in 0..3 {
        post(&alpha, &server, "/v1/agents/beta/sign", payment()).await;
    }
    assert_eq!(agent_status(&server, "alpha").await, "suspended");

    let admin = Browser::open(&server.url).await;
    admin.sign_in(&server.admin_token).await;
    assert!(admin.has("[data-kpi=pending_approvals]").await);
    let page = admin.client.source().await.unwrap();
    assert!(
        !page.contains(server.admin_token.trim()),
        "no secret is rendered"
    );
    admin.screenshot("dashboard").await;

    admin.goto("/ui/anomalies").await;
    let probing = "tr[data-kind=cross_agent_probing][data-anomaly-agent=alpha]";
    admin.wait_for(probing).await;
    admin.screenshot("anomalies").await;
    admin.click_in(probing, "[data-action=resume]").await;
    admin.wait_for("[data-notice=resumed]").await;
    assert_eq!(agent_status(&server, "alpha").await, "active");

    admin.goto("/ui/audit?action=agent.resume").await;
    let row = "tr[data-audit-index]";
    admin.wait_for(row).await;
    admin.screenshot("audit").await;
    admin.click_in(row, "a").await;
    let entry = admin
        .wait_for("pre[data-audit-entry]")
        .await
        .text()
        .await
        .unwrap();
    assert!(
        entry.contains("agent.resume") && entry.contains("admin:admin"),
        "{entry}"
    );
    admin.goto("/ui/audit").await;
    admin
        .click_in("main[data-page=audit]", "[data-action=verify]")
        .await;
    admin.wait_for("[data-notice=verified]").await;

    admin.goto("/ui/policy").await;
    admin.wait_for("tr[data-policy-version=\"2\"]").await;
    admin.screenshot("policy").await;
    admin
        .click_in("main[data-page=policy]", "[data-action=diff]")
        .await;
    let diff = admin.wait_for("pre[data-diff]").await.text().await.unwrap();
    assert!(diff.contains("+ [roles.reports]"), "{diff}");
    admin.goto("/ui/policy").await;
    admin
        .click_in("tr[data-policy-version=\"1\"]", "[data-action=rollback]")
        .await;
    admin
        .wait_for("main[data-page=policy-rollback] pre[data-diff]")
        .await;
    admin.screenshot("policy-rollback").await;
    admin
        .click_in("main[data-page=policy-rollback]", "[data-action=confirm]")
        .await;
    admin.wait_for("[data-notice=rolled_back]").await;
    let (_, versions) = server.admin("GET", "/v1/policies", None).await;
    let newest = versions["versions"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(
        (newest["version"].as_i64(), newest["in_force"].as_bool()),
        (Some(3), Some(true))
    );
    let (_, third) = server.admin("GET", "/v1/policies/3", None).await;
    assert_eq!(
        third["content"].as_str(),
        Some(first.as_str()),
        "version 1's content"
    );

    // At phone width the queue is still usable.
    admin.client.set_window_size(390, 844).await.unwrap();
    admin.goto("/ui/approvals").await;
    admin
        .wait_for("tr[data-approval-id] [data-action=approve]")
        .await;
    admin.screenshot("approvals-phone").await;
    admin.close().await;
}

/// The CSP forbids inline script and style, so a page that had any would
/// break in the browser: none has, on any page.
#[tokio::test]
async fn no_page_has_inline_script_style_or_event_handlers() {
    let server = Server::start(Db::Sqlite).await;
    apply(&server, PAYMENTS).await;
    apply(
        &server,
        &format!("{PAYMENTS}\n[roles.reports]\nactions = [\"sign\"]\n"),
    )
    .await;
    let (alpha, _, _) = agent_client(&server, "alpha", &["payments"]).await;
    let (_, held) = post(&alpha, &server, "/v1/agents/alpha/sign", payment()).await;
    assert!(held["id"].is_string(), "{held}");
    let session = Session::sign_in(
        &server,
        plain_client(&server, None),
        &[("token", server.admin_token.trim())],
    )
    .await;
    for path in [
        "/ui/",
        "/ui/approvals",
        "/ui/approvals/rows",
        "/ui/agents",
        "/ui/agents/alpha/revoke",
        "/ui/anomalies",
        "/ui/audit",
        "/ui/audit/entries/0",
        "/ui/policy",
        "/ui/policy/diff?from=1&to=2",
        "/ui/policy/rollback?version=1",
    ] {
        let (status, page) = session.get(path).await;
        assert_eq!(status, 200, "{path}");
        let lower = page.to_ascii_lowercase();
        assert!(!lower.contains(" style="), "{path}: a style attribute");
        assert!(!lower.contains("<style"), "{path}: a style element");
        assert!(!lower.contains("javascript:"), "{path}: a javascript: URL");
        for at in lower.match_indices("<script").map(|(i, _)| i) {
            let tag = &lower[at..at + lower[at..].find('>').unwrap()];
            assert!(tag.contains(" src="), "{path}: an inline script");
        }
        let handler = event_handler_attribute(&lower);
        assert!(handler.is_none(), "{path}: an event handler {handler:?}");
    }
}

/// An `on...=` attribute inside a tag, if any.
fn event_handler_attribute(page: &str) -> Option<String> {
    let mut in_tag = false;
    let bytes = page.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        match b {
            b'<' => in_tag = true,
            b'>' => in_tag = false,
            b' ' if in_tag && page[i + 1..].starts_with("on") => {
                let name: String = page[i + 1..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphabetic())
                    .collect();
                if page[i + 1 + name.len()..].starts_with('=') {
                    return Some(name);
                }
            }
            _ => {}
        }
    }
    None
}

#[tokio::test]
async fn signing_in_again_ends_the_session_the_browser_had() {
    let server = Server::start(Db::Sqlite).await;
    let token = server.admin_token.trim().to_owned();
    let first = Session::sign_in(&server, plain_client(&server, None), &[("token", &token)]).await;
    let again = first
        .client
        .post(format!("{}/ui/login", server.url))
        .header("cookie", &first.cookie)
        .form(&[("token", token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(again.status().as_u16(), 303);
    let second = session_cookie(&again).expect("a new session");
    assert_ne!(second, first.cookie, "a new id, never the old one");
    let (status, _) = first.get("/ui/agents").await;
    assert_eq!(status, 303, "the old session is over");
    let fresh = first
        .client
        .get(format!("{}/ui/agents", server.url))
        .header("cookie", &second)
        .send()
        .await
        .unwrap();
    assert_eq!(fresh.status().as_u16(), 200);
    assert_eq!(
        server.sql("SELECT COUNT(*) FROM console_sessions").await,
        Some(1)
    );
}
