//! The versioned policy against agents over mTLS: scopes, intents, rates
//! and certificate lifetimes, apply and rollback; a keyward process with
//! its keys on a real SoftHSM2 token and in a real swtpm, on SQLite and
//! PostgreSQL.

mod common;

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use common::{enrolled_with, mtls_client, post, run, Backends, Server};
use serde_json::{json, Value};

const SIGN_AND_MESSAGE: &str = r#"
[roles.payments]
actions = ["sign", "message"]
intents = ["refund order *"]
"#;

const MESSAGE_ONLY: &str = r#"
[roles.payments]
actions = ["message"]
intents = ["refund order *"]
"#;

async fn apply(server: &Server, content: &str) -> Value {
    let (status, applied) = server
        .admin("POST", "/v1/policies", Some(json!({"content": content})))
        .await;
    assert_eq!(status, 201, "{applied}");
    applied
}

fn sign_body() -> Value {
    json!({"message_b64": B64.encode(b"refund")})
}

async fn recorded_versions(server: &Server) -> Vec<i64> {
    let mut versions = Vec::new();
    for v in 0..10 {
        let n = server
            .sql(&format!(
                "SELECT COUNT(*) FROM signatures WHERE agent_name = 'alice' AND policy_version = {v}"
            ))
            .await
            .unwrap();
        if n > 0 {
            versions.push(v);
        }
    }
    versions
}

async fn a_rollback_changes_what_an_agent_may_do_on_its_next_request(backends: Backends) {
    let server = Server::start(backends).await;
    let (key, cert) = enrolled_with(&server, "alice", &["payments"]).await;
    let alice = mtls_client(&server, cert["certificate_pem"].as_str().unwrap(), &key);

    assert_eq!(apply(&server, SIGN_AND_MESSAGE).await["version"], 1);
    let (status, _) = post(&alice, &server, "/v1/agents/alice/sign", sign_body()).await;
    assert_eq!(status, 200);

    assert_eq!(apply(&server, MESSAGE_ONLY).await["version"], 2);
    let (status, denied) = post(&alice, &server, "/v1/agents/alice/sign", sign_body()).await;
    assert_eq!(
        (status, denied["error"]["code"].as_str()),
        (403, Some("not_in_scope")),
        "{denied}"
    );

    let (status, rolled) = server
        .admin("POST", "/v1/policies/rollback", Some(json!({"version": 1})))
        .await;
    assert_eq!(status, 201, "{rolled}");
    assert_eq!(rolled["version"], 3);
    assert_eq!(rolled["source"], "rollback:1");
    let (status, _) = post(&alice, &server, "/v1/agents/alice/sign", sign_body()).await;
    assert_eq!(status, 200, "the rollback is in force on the next request");

    // Every version is kept; the records name the version they were made
    // under; the denial is on the audit trail with its version.
    let (_, history) = server.admin("GET", "/v1/policies", None).await;
    let versions: Vec<(i64, bool)> = history["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["version"].as_i64().unwrap(),
                v["in_force"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(versions, [(1, false), (2, false), (3, true)]);
    assert_eq!(recorded_versions(&server).await, [1, 3]);
    let records = server.store().await.audit_records(0, 1000).await.unwrap();
    keyward::audit::verify_sequence(&records).unwrap();
    let denial = records
        .iter()
        .find(|r| r.event.action == "policy.deny")
        .expect("the denial is recorded");
    assert_eq!(denial.event.policy_version, Some(2));
    assert_eq!(denial.event.decision.as_deref(), Some("deny"));
    assert_eq!(denial.event.reason.as_deref(), Some("not_in_scope"));
    assert_eq!(denial.event.agent.as_deref(), Some("alice"));

    let mut diff = std::process::Command::new(common::keyward_bin());
    diff.args(["policy", "diff", "1", "2", "--url"])
        .arg(&server.url)
        .arg("--data-dir")
        .arg(server.data_dir.path())
        .env_remove("KEYWARD_TOKEN");
    let (ok, out) = run(&mut diff);
    assert!(ok, "{out}");
    assert!(out.contains("- actions = [\"sign\", \"message\"]"), "{out}");
    assert!(out.contains("+ actions = [\"message\"]"), "{out}");
}

async fn intents_rates_and_lifetimes_are_enforced(backends: Backends) {
    let server = Server::start(backends).await;
    let (key, cert) = enrolled_with(&server, "alice", &["payments", "certs"]).await;
    let alice = mtls_client(&server, cert["certificate_pem"].as_str().unwrap(), &key);
    common::register_agent(&server, "bob").await;
    apply(
        &server,
        r#"
[roles.payments]
actions = ["sign", "message"]
intents = ["refund order *"]
rate_per_second = 0.5
burst = 3

[roles.certs]
actions = ["issue_cert"]
max_ttl_seconds = 60
"#,
    )
    .await;

    // Lifetimes: above the role's maximum is refused; by default it is capped.
    let (status, answer) = post(
        &alice,
        &server,
        "/v1/agents/alice/certificates",
        json!({"ttl_seconds": 600}),
    )
    .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (400, Some("invalid_ttl"))
    );
    let (status, issued) = post(&alice, &server, "/v1/agents/alice/certificates", json!({})).await;
    assert_eq!(status, 201, "{issued}");
    let lifetime = time::OffsetDateTime::parse(
        issued["not_after"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap()
        - time::OffsetDateTime::parse(
            issued["not_before"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
    assert!(lifetime <= time::Duration::seconds(60 + 30), "{lifetime}");

    // Intents: only the patterns of the role.
    let (status, _) = post(
        &alice,
        &server,
        "/v1/agents/alice/messages",
        json!({"to": "bob", "intent": "refund order 42"}),
    )
    .await;
    assert_eq!(status, 201);
    let (status, answer) = post(
        &alice,
        &server,
        "/v1/agents/alice/messages",
        json!({"to": "bob", "intent": "transfer everything"}),
    )
    .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (403, Some("intent_not_allowed"))
    );

    // Rate: the message above took one of three tokens; two signs fit, the
    // next is told when to come back.
    for _ in 0..2 {
        let (status, answer) = post(&alice, &server, "/v1/agents/alice/sign", sign_body()).await;
        assert_eq!(status, 200, "{answer}");
    }
    let response = alice
        .post(format!("{}/v1/agents/alice/sign", server.url))
        .json(&sign_body())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    let retry: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    // An admin is not rate limited, and acts under the same version.
    let (status, _) = server
        .admin("POST", "/v1/agents/alice/sign", Some(sign_body()))
        .await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, _) = post(&alice, &server, "/v1/agents/alice/sign", sign_body()).await;
    assert_eq!(status, 200, "the bucket refills");
}

async fn bad_policies_are_refused_and_change_nothing(backends: Backends) {
    let server = Server::start(backends).await;
    let (key, cert) = enrolled_with(&server, "alice", &["payments"]).await;
    let alice = mtls_client(&server, cert["certificate_pem"].as_str().unwrap(), &key);
    apply(&server, SIGN_AND_MESSAGE).await;
    let before = server.row_counts().await;
    for content in [
        "[roles.x\nactions = [\"sign\"]",
        "[roles.x]\nactions = [\"launch\"]",
        "[roles.x]\nactions = []",
        "[roles.x]\nactions = [\"sign\"]\nrequires_approval = true\napprovals_required = 5",
        "[roles.x]\nactions = [\"sign\"]\nburst = 5",
        "[roles.\"Not A Scope\"]\nactions = [\"sign\"]",
    ] {
        let (status, answer) = server
            .admin("POST", "/v1/policies", Some(json!({"content": content})))
            .await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (400, Some("invalid_policy")),
            "{content}: {answer}"
        );
    }
    let (status, answer) = server
        .admin("POST", "/v1/policies/rollback", Some(json!({"version": 9})))
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (404, Some("policy_not_found"))
    );
    let (status, answer) = server.admin("GET", "/v1/policies/x", None).await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (400, Some("invalid_version"))
    );
    let (status, answer) = post(
        &alice,
        &server,
        "/v1/policies",
        json!({"content": "[roles.payments]\nactions = [\"sign\", \"message\", \"issue_cert\"]"}),
    )
    .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (403, Some("admin_only"))
    );
    assert_eq!(server.row_counts().await, before);
    let (_, history) = server.admin("GET", "/v1/policies", None).await;
    assert_eq!(history["versions"].as_array().unwrap().len(), 1);
}

/// `renew_at_half_life`: past half its lifetime, a client certificate
/// authenticates for its renewal only.
async fn a_certificate_past_half_life_must_be_renewed_first(backends: Backends) {
    let server = Server::start(backends).await;
    common::register_agent_with(&server, "alice", &["short"]).await;
    let token = common::enrollment_token(&server, "alice").await;
    let (key, csr) = common::key_and_csr(server.data_dir.path(), "alice");
    let (status, cert) = server
        .request(
            "POST",
            "/v1/enroll",
            Some(json!({"token": token, "csr_pem": csr, "ttl_seconds": 4})),
            None,
        )
        .await;
    assert_eq!(status, 201, "{cert}");
    apply(
        &server,
        "[roles.short]\nactions = [\"sign\"]\nrenew_at_half_life = true\n",
    )
    .await;
    let alice = mtls_client(&server, cert["certificate_pem"].as_str().unwrap(), &key);
    let (status, _) = post(&alice, &server, "/v1/agents/alice/sign", sign_body()).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let (status, answer) = post(&alice, &server, "/v1/agents/alice/sign", sign_body()).await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (401, Some("renewal_required"))
    );
    let (new_key, new_csr) = common::key_and_csr(server.data_dir.path(), "alice-2");
    let (status, renewed) = post(&alice, &server, "/v1/renew", json!({"csr_pem": new_csr})).await;
    assert_eq!(status, 201, "{renewed}");
    let renewed_client = mtls_client(
        &server,
        renewed["certificate_pem"].as_str().unwrap(),
        &new_key,
    );
    let (status, _) = post(
        &renewed_client,
        &server,
        "/v1/agents/alice/sign",
        sign_body(),
    )
    .await;
    assert_eq!(status, 200);
}

async fn changing_an_agents_scopes_changes_what_it_may_do(backends: Backends) {
    let server = Server::start(backends).await;
    let (key, cert) = enrolled_with(&server, "alice", &[]).await;
    let alice = mtls_client(&server, cert["certificate_pem"].as_str().unwrap(), &key);
    apply(&server, "[roles.payments]\nactions = [\"sign\"]\n").await;
    let (status, _) = post(&alice, &server, "/v1/agents/alice/sign", sign_body()).await;
    assert_eq!(status, 403);
    let (status, updated) = server
        .admin(
            "PATCH",
            "/v1/agents/alice",
            Some(json!({"scopes": ["payments"]})),
        )
        .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["scopes"], json!(["payments"]));
    let (status, _) = post(&alice, &server, "/v1/agents/alice/sign", sign_body()).await;
    assert_eq!(status, 200, "the new role applies from the next request");

    let before = server.row_counts().await;
    for (path, body, status, code) in [
        (
            "/v1/agents/alice",
            json!({"scopes": ["Not A Scope"]}),
            400,
            "invalid_scope",
        ),
        (
            "/v1/agents/alice",
            json!({"roles": ["payments"]}),
            400,
            "invalid_request",
        ),
        (
            "/v1/agents/nobody",
            json!({"scopes": []}),
            404,
            "agent_not_found",
        ),
    ] {
        let (got, answer) = server.admin("PATCH", path, Some(body)).await;
        assert_eq!(
            (got, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "{path}"
        );
    }
    let response = alice
        .patch(format!("{}/v1/agents/alice", server.url))
        .json(&json!({"scopes": ["payments", "admin"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        403,
        "an agent does not choose its own roles"
    );
    assert_eq!(server.row_counts().await, before);
}

/// The revocation state is checked before the policy charges a rate: a
/// suspended agent's enrollment is refused without spending its token or
/// a renewal from its bucket, so once resumed it enrolls with both.
async fn a_suspended_agents_refused_enrollment_spends_neither_token_nor_rate(backends: Backends) {
    let server = Server::start(backends).await;
    common::register_agent_with(&server, "alice", &["slow"]).await;
    apply(
        &server,
        "[roles.slow]\nactions = [\"sign\"]\nrate_per_second = 0.001\nburst = 1\n",
    )
    .await;
    let token = common::enrollment_token(&server, "alice").await;
    let dir = common::private_tempdir();
    let (_key, csr) = common::key_and_csr(dir.path(), "alice");

    let (status, _) = server.admin("POST", "/v1/agents/alice/suspend", None).await;
    assert_eq!(status, 200);
    let (status, refused) = common::enroll(&server, &token, &csr).await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (403, Some("agent_not_active")),
        "{refused}"
    );

    let (status, _) = server.admin("POST", "/v1/agents/alice/resume", None).await;
    assert_eq!(status, 200);
    let (status, enrolled) = common::enroll(&server, &token, &csr).await;
    assert_eq!(
        status, 201,
        "the token and the one renewal are still there: {enrolled}"
    );
}

on_every_backend!(
    a_suspended_agents_refused_enrollment_spends_neither_token_nor_rate,
    changing_an_agents_scopes_changes_what_it_may_do,
    a_certificate_past_half_life_must_be_renewed_first,
    a_rollback_changes_what_an_agent_may_do_on_its_next_request,
    intents_rates_and_lifetimes_are_enforced,
    bad_policies_are_refused_and_change_nothing,
);
