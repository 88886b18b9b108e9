//! Agents on the wire: enrollment with a single-use token, then mutual TLS
//! with the agent's own key (held by the agent, as OpenSSL makes it here),
//! against a keyward process with its keys on a real SoftHSM2 token and in
//! a real swtpm, on SQLite and PostgreSQL.

mod common;

use std::process::Command;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use common::{
    enroll, enrolled, enrollment_token, key_and_csr, mtls_client, post, run, Backends, Server,
};
use serde_json::{json, Value};

fn sign_body() -> Value {
    json!({"message_b64": B64.encode(b"hello")})
}

async fn an_enrolled_agent_signs_as_itself_over_mtls_and_as_no_other(backends: Backends) {
    let server = Server::start(backends).await;
    let (alice_key, alice_cert) = enrolled(&server, "alice").await;
    common::register_agent(&server, "bob").await;
    let alice = mtls_client(
        &server,
        alice_cert["certificate_pem"].as_str().unwrap(),
        &alice_key,
    );

    let (status, signed) = post(&alice, &server, "/v1/agents/alice/sign", sign_body()).await;
    assert_eq!(status, 200, "{signed}");
    // The signature is made with alice's custodial key on the token, not
    // with her TLS key: two different keys.
    let (_, record) = server.admin("GET", "/v1/agents/alice", None).await;
    assert_eq!(signed["key_id"], record["key_id"]);

    for (path, body, code) in [
        ("/v1/agents/bob/sign", sign_body(), "other_agent"),
        ("/v1/agents/bob/certificates", json!({}), "other_agent"),
        (
            "/v1/agents",
            json!({"name": "mallory", "scopes": []}),
            "admin_only",
        ),
        (
            "/v1/agents/bob/revoke",
            json!({"reason": "keyCompromise"}),
            "admin_only",
        ),
        (
            "/v1/agents/alice/enrollment-tokens",
            json!({}),
            "admin_only",
        ),
        (
            "/v1/hooks",
            json!({"url": "http://127.0.0.1/x"}),
            "admin_only",
        ),
    ] {
        let (status, answer) = post(&alice, &server, path, body).await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (403, Some(code)),
            "{path}: {answer}"
        );
    }
    let response = alice
        .get(format!("{}/v1/agents", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    // Her own record she may read.
    let response = alice
        .get(format!("{}/v1/agents/alice", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // Renewal over mTLS with a new key; the admin token is not an agent.
    let (new_key, new_csr) = key_and_csr(server.data_dir.path(), "alice-next");
    let (status, renewed) = post(&alice, &server, "/v1/renew", json!({"csr_pem": new_csr})).await;
    assert_eq!(status, 201, "{renewed}");
    let next = mtls_client(
        &server,
        renewed["certificate_pem"].as_str().unwrap(),
        &new_key,
    );
    let (status, _) = post(&next, &server, "/v1/agents/alice/sign", sign_body()).await;
    assert_eq!(status, 200);
    let (status, answer) = server
        .admin("POST", "/v1/renew", Some(json!({"csr_pem": new_csr})))
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (403, Some("agent_only"))
    );

    // A revoked client certificate no longer authenticates.
    let (status, _) = server
        .admin(
            "POST",
            &format!(
                "/v1/certificates/{}/revoke",
                alice_cert["serial"].as_str().unwrap()
            ),
            Some(json!({"reason": "superseded"})),
        )
        .await;
    assert_eq!(status, 200);
    let (status, answer) = post(&alice, &server, "/v1/agents/alice/sign", sign_body()).await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (401, Some("certificate_revoked"))
    );
    let (status, _) = post(&next, &server, "/v1/agents/alice/sign", sign_body()).await;
    assert_eq!(status, 200, "the renewed certificate still stands");
}

async fn forged_and_foreign_certificates_get_no_identity(backends: Backends) {
    let server = Server::start(backends).await;
    let (alice_key, alice_cert) = enrolled(&server, "alice").await;
    let dir = server.data_dir.path();
    // Self-signed, same key, same SPIFFE ID: refused in the handshake.
    let forged = dir.join("forged.pem");
    common::openssl_self_signed(
        &alice_key,
        "/CN=alice",
        &["subjectAltName=URI:spiffe://keyward.local/agent/alice"],
        &forged,
    );
    let forger = mtls_client(
        &server,
        &std::fs::read_to_string(&forged).unwrap(),
        &alice_key,
    );
    let outcome = forger
        .post(format!("{}/v1/agents/alice/sign", server.url))
        .json(&sign_body())
        .send()
        .await;
    match outcome {
        Err(_) => {}
        Ok(response) => assert_eq!(response.status(), 401, "a forged certificate was accepted"),
    }
    // alice's certificate with bob's name in the path is still alice.
    let alice = mtls_client(
        &server,
        alice_cert["certificate_pem"].as_str().unwrap(),
        &alice_key,
    );
    common::register_agent(&server, "bob").await;
    let (status, _) = post(&alice, &server, "/v1/agents/bob/sign", sign_body()).await;
    assert_eq!(status, 403);
    // No credential at all.
    let (status, answer) = server
        .request("POST", "/v1/agents/alice/sign", Some(sign_body()), None)
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (401, Some("unauthenticated"))
    );
}

async fn enrollment_tokens_work_once_and_not_after_they_expire(backends: Backends) {
    let server = Server::start(backends).await;
    common::register_agent(&server, "alice").await;
    let dir = server.data_dir.path();
    let (_, csr) = key_and_csr(dir, "alice");

    let token = enrollment_token(&server, "alice").await;
    // A bad CSR is refused without spending the token.
    let (status, answer) = enroll(&server, &token, "not a CSR").await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (400, Some("invalid_csr"))
    );
    let (status, _) = enroll(&server, &token, &csr).await;
    assert_eq!(status, 201);
    let (status, answer) = enroll(&server, &token, &csr).await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (401, Some("invalid_enrollment_token")),
        "reused"
    );

    let (status, short) = server
        .admin(
            "POST",
            "/v1/agents/alice/enrollment-tokens",
            Some(json!({"ttl_seconds": 1})),
        )
        .await;
    assert_eq!(status, 201);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, _) = enroll(&server, short["token"].as_str().unwrap(), &csr).await;
    assert_eq!(status, 401, "expired");
    let (status, _) = enroll(&server, "kwe_0000", &csr).await;
    assert_eq!(status, 401, "unknown");

    let before = server.row_counts().await;
    for (path, body, status, code) in [
        (
            "/v1/agents/nobody/enrollment-tokens",
            json!({}),
            404,
            "agent_not_found",
        ),
        (
            "/v1/agents/alice/enrollment-tokens",
            json!({"ttl_seconds": 0}),
            400,
            "invalid_ttl",
        ),
        (
            "/v1/agents/alice/enrollment-tokens",
            json!({"ttl_seconds": 999_999}),
            400,
            "invalid_ttl",
        ),
        (
            "/v1/agents/alice/enrollment-tokens",
            json!({"uses": 2}),
            400,
            "invalid_request",
        ),
    ] {
        let (got, answer) = server.admin("POST", path, Some(body.clone())).await;
        assert_eq!(
            (got, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}"
        );
    }
    let (status, answer) = server
        .request("POST", "/v1/enroll", Some(json!({"token": token})), None)
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (400, Some("invalid_request"))
    );
    assert_eq!(server.row_counts().await, before);
    // What is stored is the token's SHA-256, not the token.
    use sha2::Digest;
    let hash = hex::encode(sha2::Sha256::digest(token.as_bytes()));
    let literal = if server.database.url.starts_with("sqlite") {
        format!("X'{hash}'")
    } else {
        format!("decode('{hash}', 'hex')")
    };
    let stored = server
        .sql(&format!(
            "SELECT COUNT(*) FROM enrollment_tokens WHERE token_sha256 = {literal}"
        ))
        .await;
    assert_eq!(stored, Some(1));
}

/// `keyward agent login`: enrolls with a key of the agent's own, then keeps
/// the client certificate renewed at half-life.
async fn keyward_agent_login_enrolls_and_keeps_the_credential_renewed(backends: Backends) {
    use std::os::unix::fs::PermissionsExt;
    let server = Server::start(backends).await;
    common::register_agent(&server, "alice").await;
    let token = enrollment_token(&server, "alice").await;
    let dir = server.path("alice-credential");
    let login = |extra: &[&str]| {
        let mut command = Command::new(common::keyward_bin());
        command
            .args(["agent", "login", "alice", "--url", &server.url, "--ca"])
            .arg(server.path("ca.pem"))
            .arg("--dir")
            .arg(&dir)
            .args(extra);
        command
    };
    let (ok, out) = run(&mut login(&["--token", &token, "--once", "--ttl", "4"]));
    assert!(ok, "{out}");
    let mode = std::fs::metadata(dir.join("key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let serial = |d: &std::path::Path| {
        run(Command::new("openssl")
            .args(["x509", "-noout", "-serial", "-in"])
            .arg(d.join("cert.pem")))
        .1
    };
    let first = serial(&dir);
    let cert = std::fs::read_to_string(dir.join("cert.pem")).unwrap();
    let alice = mtls_client(&server, &cert, &dir.join("key.pem"));
    let (status, _) = post(
        &alice,
        &server,
        "/v1/agents/alice/sign",
        json!({"message_b64": B64.encode(b"hi")}),
    )
    .await;
    assert_eq!(status, 200);

    // Running on, it renews at half of the 4 s lifetime.
    let mut running = login(&["--ttl", "4"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let mut renewals = 0;
    let mut last = serial(&dir);
    while start.elapsed() < Duration::from_secs(12) && renewals < 2 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = serial(&dir);
        if now != last && !now.is_empty() {
            renewals += 1;
            last = now;
        }
    }
    let _ = running.kill();
    let _ = running.wait();
    assert!(renewals >= 2, "renewed {renewals} times");
    assert_ne!(last, first);
    let cert = std::fs::read_to_string(dir.join("cert.pem")).unwrap();
    let renewed = mtls_client(&server, &cert, &dir.join("key.pem"));
    let (status, _) = post(
        &renewed,
        &server,
        "/v1/agents/alice/sign",
        json!({"message_b64": B64.encode(b"hi")}),
    )
    .await;
    assert_eq!(
        status, 200,
        "the renewed key and certificate belong together"
    );
}

/// Admins with client certificates, and admin tokens switched off.
async fn admins_can_use_client_certificates_when_tokens_are_off(backends: Backends) {
    let mut server = Server::start_with_config(backends, "[server]\nadmin_token = false\n").await;
    let (status, answer) = server.admin("GET", "/v1/agents", None).await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (401, Some("admin_token_disabled"))
    );
    let out = server.path("ops");
    let (ok, text) = server
        .operator_beside(["admin", "cert-issue", "ops", "--out", out.to_str().unwrap()])
        .await;
    assert!(ok, "{text}");
    let cert = std::fs::read_to_string(out.join("cert.pem")).unwrap();
    let ops = mtls_client(&server, &cert, &out.join("key.pem"));
    let (status, created) = post(
        &ops,
        &server,
        "/v1/agents",
        json!({"name": "alpha", "scopes": []}),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    // The CLI with the certificate instead of a token.
    let (ok, listed) = run(Command::new(common::keyward_bin())
        .args(["agent", "list", "--url", &server.url, "--data-dir"])
        .arg(server.data_dir.path())
        .arg("--cert")
        .arg(out.join("cert.pem"))
        .arg("--key")
        .arg(out.join("key.pem")));
    assert!(ok && listed.contains("alpha"), "{listed}");
    let records = server.store().await.audit_records(0, 1000).await.unwrap();
    let create = records
        .iter()
        .find(|r| r.event.action == "agent.create")
        .unwrap();
    // Named as the admin: the same person whichever credential they use.
    assert_eq!(create.event.actor, "admin:ops");
}

on_every_backend!(
    admins_can_use_client_certificates_when_tokens_are_off,
    keyward_agent_login_enrolls_and_keeps_the_credential_renewed,
    an_enrolled_agent_signs_as_itself_over_mtls_and_as_no_other,
    forged_and_foreign_certificates_get_no_identity,
    enrollment_tokens_work_once_and_not_after_they_expire,
);

/// `--insecure-http`: the API over plain HTTP, on loopback only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_is_for_loopback_only() {
    let dir = common::private_tempdir();
    let (ok, out) = run(Command::new(common::keyward_bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--insecure-http",
            "0.0.0.0:0",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .env_remove("SOFTHSM2_CONF"));
    assert!(!ok && out.contains("loopback"), "{out}");

    let mut child = Command::new(common::keyward_bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--insecure-http",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .env_remove("SOFTHSM2_CONF")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr_file = dir.path().join("insecure-http.addr");
    let start = std::time::Instant::now();
    while !addr_file.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no plain-HTTP listener"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let base = format!(
        "http://{}",
        std::fs::read_to_string(&addr_file).unwrap().trim()
    );
    let token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let plain = reqwest::Client::new();
    let health = plain.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let agents = plain
        .get(format!("{base}/v1/agents"))
        .bearer_auth(token.trim())
        .send()
        .await
        .unwrap();
    assert_eq!(agents.status(), 200);
    let anonymous = plain.get(format!("{base}/v1/agents")).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let _ = child.kill();
    let _ = child.wait();
}
