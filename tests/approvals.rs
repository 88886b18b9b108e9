//! Human approval: an agent's request under a role with
//! `requires_approval` gets nothing until admins approve it; a keyward
//! process with its keys on a real SoftHSM2 token and in a real swtpm, on
//! SQLite and PostgreSQL.

mod common;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use common::{enrolled_with, mtls_client, post, Backends, Server};
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::DecodePublicKey;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn policy(approvals: u8) -> String {
    format!(
        "[roles.treasury]\nactions = [\"sign\"]\nrequires_approval = true\napprovals_required = {approvals}\n"
    )
}

async fn apply(server: &Server, content: &str) {
    let (status, applied) = server
        .admin("POST", "/v1/policies", Some(json!({"content": content})))
        .await;
    assert_eq!(status, 201, "{applied}");
}

fn sign_body() -> Value {
    json!({"message_b64": B64.encode(b"wire 1M to acme")})
}

async fn signature_rows(server: &Server) -> i64 {
    server.sql("SELECT COUNT(*) FROM signatures").await.unwrap()
}

/// alice (role treasury, over mTLS) and her pending sign request.
async fn pending_request(server: &Server, approvals: u8) -> (reqwest::Client, Value) {
    let (key, cert) = enrolled_with(server, "alice", &["treasury"]).await;
    let alice = mtls_client(server, cert["certificate_pem"].as_str().unwrap(), &key);
    apply(server, &policy(approvals)).await;
    let (status, pending) = post(&alice, server, "/v1/agents/alice/sign", sign_body()).await;
    assert_eq!(status, 202, "{pending}");
    assert_eq!(pending["status"], "pending");
    assert_eq!(pending["approvals_required"], i64::from(approvals));
    (alice, pending)
}

async fn poll(alice: &reqwest::Client, server: &Server, id: &str) -> (u16, Value) {
    let response = alice
        .get(format!("{}/v1/approvals/{id}", server.url))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn a_held_request_runs_only_once_an_admin_approves_it(backends: Backends) {
    let server = Server::start(backends).await;
    let (alice, pending) = pending_request(&server, 1).await;
    let id = pending["id"].as_str().unwrap();
    let (status, waiting) = poll(&alice, &server, id).await;
    assert_eq!((status, waiting["status"].as_str()), (200, Some("pending")));
    assert!(waiting.get("result").is_none());
    assert_eq!(
        signature_rows(&server).await,
        0,
        "nothing is signed while it waits"
    );

    let (_, listed) = server.admin("GET", "/v1/approvals", None).await;
    assert_eq!(listed["approvals"].as_array().unwrap().len(), 1);
    // The approver reads what was sent and the digest that will be signed.
    let held = &listed["approvals"][0]["request"];
    assert_eq!(held["message_b64"], B64.encode(b"wire 1M to acme"));
    assert_eq!(
        held["digest_sha256_b64"],
        B64.encode(Sha256::digest(b"wire 1M to acme"))
    );
    let (status, decided) = server
        .admin(
            "POST",
            &format!("/v1/approvals/{id}/approve"),
            Some(json!({"comment": "expected transfer"})),
        )
        .await;
    assert_eq!(status, 200, "{decided}");
    assert_eq!(decided["status"], "completed");

    let (_, done) = poll(&alice, &server, id).await;
    assert_eq!(done["status"], "completed");
    let signature = B64
        .decode(done["result"]["signature_der_b64"].as_str().unwrap())
        .unwrap();
    let (_, record) = server.admin("GET", "/v1/agents/alice", None).await;
    let key =
        VerifyingKey::from_public_key_pem(record["public_key_pem"].as_str().unwrap()).unwrap();
    key.verify_prehash(
        &Sha256::digest(b"wire 1M to acme"),
        &Signature::from_der(&signature).unwrap(),
    )
    .unwrap();
    assert_eq!(
        server
            .sql(
                "SELECT COUNT(*) FROM signatures WHERE agent_name = 'alice' AND policy_version = 1"
            )
            .await,
        Some(1)
    );
    let records = server.store().await.audit_records(0, 1000).await.unwrap();
    keyward::audit::verify_sequence(&records).unwrap();
    let approve = records
        .iter()
        .find(|r| r.event.action == "approval.approve")
        .unwrap();
    assert_eq!(approve.event.details["comment"], "expected transfer");
    assert!(records.iter().any(|r| r.event.action == "approval.request"));
}

async fn a_denied_request_never_runs(backends: Backends) {
    let server = Server::start(backends).await;
    let (alice, pending) = pending_request(&server, 1).await;
    let id = pending["id"].as_str().unwrap();
    let (status, denied) = server
        .admin("POST", &format!("/v1/approvals/{id}/deny"), None)
        .await;
    assert_eq!((status, denied["status"].as_str()), (200, Some("denied")));
    let (status, answer) = server
        .admin("POST", &format!("/v1/approvals/{id}/approve"), None)
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (409, Some("approval_not_pending"))
    );
    let (_, seen) = poll(&alice, &server, id).await;
    assert_eq!(seen["status"], "denied");
    assert_eq!(signature_rows(&server).await, 0);
}

async fn the_two_person_rule_needs_two_different_admins(backends: Backends) {
    // A second admin, with a token of their own.
    let (server, second) = common::with_admin_token(Server::start(backends).await, "second").await;

    let (alice, pending) = pending_request(&server, 2).await;
    let id = pending["id"].as_str().unwrap();
    let approve = format!("/v1/approvals/{id}/approve");
    let (status, first) = server.admin("POST", &approve, None).await;
    assert_eq!((status, first["status"].as_str()), (200, Some("pending")));
    let (status, again) = server.admin("POST", &approve, None).await;
    assert_eq!(
        (status, again["error"]["code"].as_str()),
        (409, Some("already_voted")),
        "the same admin twice"
    );
    assert_eq!(signature_rows(&server).await, 0);
    let (status, done) = server
        .request("POST", &approve, None, Some(second.trim()))
        .await;
    assert_eq!(
        (status, done["status"].as_str()),
        (200, Some("completed")),
        "{done}"
    );
    let (_, seen) = poll(&alice, &server, id).await;
    assert!(seen["result"]["signature_der_b64"].is_string(), "{seen}");
}

async fn only_admins_decide_and_agents_see_only_their_own(backends: Backends) {
    let server = Server::start(backends).await;
    let (alice, pending) = pending_request(&server, 1).await;
    let id = pending["id"].as_str().unwrap();
    let (bob_key, bob_cert) = enrolled_with(&server, "bob", &["treasury"]).await;
    let bob = mtls_client(
        &server,
        bob_cert["certificate_pem"].as_str().unwrap(),
        &bob_key,
    );

    let (status, answer) = post(
        &alice,
        &server,
        &format!("/v1/approvals/{id}/approve"),
        json!({}),
    )
    .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (403, Some("admin_only"))
    );
    let (status, _) = poll(&bob, &server, id).await;
    assert_eq!(status, 404, "another agent's request is not bob's to see");
    let response = alice
        .get(format!("{}/v1/approvals", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);

    let before = server.row_counts().await;
    for (path, body, status, code) in [
        (
            "/v1/approvals/0000/approve".to_owned(),
            json!({}),
            404,
            "approval_not_found",
        ),
        (
            format!("/v1/approvals/{id}/approve"),
            json!({"comment": "x".repeat(2000)}),
            400,
            "invalid_comment",
        ),
        (
            format!("/v1/approvals/{id}/deny"),
            json!({"why": "no"}),
            400,
            "invalid_request",
        ),
    ] {
        let (got, answer) = server.admin("POST", &path, Some(body)).await;
        assert_eq!(
            (got, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "{path}"
        );
    }
    assert_eq!(server.row_counts().await, before);
    let (_, still) = poll(&alice, &server, id).await;
    assert_eq!(still["status"], "pending");
}

async fn a_held_certificate_is_issued_once_approved(backends: Backends) {
    let server = Server::start(backends).await;
    let (key, cert) = enrolled_with(&server, "alice", &["certs"]).await;
    let alice = mtls_client(&server, cert["certificate_pem"].as_str().unwrap(), &key);
    apply(
        &server,
        "[roles.certs]\nactions = [\"issue_cert\"]\nrequires_approval = true\nmax_ttl_seconds = 300\n",
    )
    .await;
    let before = server.row_counts().await.1;
    let (status, pending) = post(
        &alice,
        &server,
        "/v1/agents/alice/certificates",
        json!({"ttl_seconds": 120}),
    )
    .await;
    assert_eq!(status, 202, "{pending}");
    // Held with its lifetime settled under the version that held it.
    assert_eq!(pending["request"]["ttl_seconds"], 120);
    assert_eq!(server.row_counts().await.1, before, "nothing issued yet");
    let id = pending["id"].as_str().unwrap();
    let (status, decided) = server
        .admin("POST", &format!("/v1/approvals/{id}/approve"), None)
        .await;
    assert_eq!(
        (status, decided["status"].as_str()),
        (200, Some("completed")),
        "{decided}"
    );
    let (_, done) = poll(&alice, &server, id).await;
    assert!(done["result"]["certificate_pem"]
        .as_str()
        .unwrap()
        .starts_with("-----BEGIN CERTIFICATE-----"));
    assert_eq!(server.row_counts().await.1, before + 1);
    // A bad CSR is refused before anyone is asked.
    let (status, answer) = post(
        &alice,
        &server,
        "/v1/agents/alice/certificates",
        json!({"csr_pem": "nonsense"}),
    )
    .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (400, Some("invalid_csr"))
    );
}

on_every_backend!(
    a_held_certificate_is_issued_once_approved,
    a_held_request_runs_only_once_an_admin_approves_it,
    a_denied_request_never_runs,
    the_two_person_rule_needs_two_different_admins,
    only_admins_decide_and_agents_see_only_their_own,
);
