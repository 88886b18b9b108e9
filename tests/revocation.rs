//! Revocation end to end: a keyward process with its keys on a real
//! SoftHSM2 token and in a real swtpm, on SQLite and PostgreSQL, checked
//! with OpenSSL's own CRL and OCSP clients; and two replicas on one token
//! and one PostgreSQL database.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use common::{run, Backends, Db, Server};
use serde_json::{json, Value};

fn write(server: &Server, name: &str, contents: &[u8]) -> PathBuf {
    let path = server.path(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// A certified agent's issuance answer, and its certificate written to
/// `leaf.pem` for openssl.
async fn certified_leaf(server: &Server, name: &str) -> (serde_json::Value, PathBuf) {
    let issued = common::certified_agent(server, name).await;
    let leaf = write(
        server,
        "leaf.pem",
        issued["certificate_pem"].as_str().unwrap().as_bytes(),
    );
    (issued, leaf)
}

/// `openssl ocsp` against keyward's responder: the status line for `cert`.
fn ocsp_status(server: &Server, cert: &PathBuf) -> String {
    ocsp_query(server, cert, &[])
}

/// `openssl ocsp` for `cert` with `extra` arguments; its output, once it
/// has verified the answer.
fn ocsp_query(server: &Server, cert: &PathBuf, extra: &[&str]) -> String {
    let (ok, out) = run(Command::new("openssl")
        .arg("ocsp")
        .arg("-issuer")
        .arg(server.path("ca.pem"))
        .arg("-CAfile")
        .arg(server.path("ca.pem"))
        .arg("-cert")
        .arg(cert)
        .arg("-url")
        .arg(format!("{}/v1/ocsp", server.url))
        .args(extra));
    assert!(ok, "openssl ocsp failed: {out}");
    assert!(out.contains("Response verify OK"), "{out}");
    out
}

async fn crl_pem(server: &Server) -> PathBuf {
    let response = server
        .client
        .get(format!("{}/v1/crl", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/pkix-crl");
    let der = response.bytes().await.unwrap();
    let der_path = write(server, "crl.der", &der);
    let pem_path = server.path("crl.pem");
    let (ok, out) = run(Command::new("openssl")
        .args(["crl", "-inform", "DER", "-in"])
        .arg(&der_path)
        .arg("-out")
        .arg(&pem_path));
    assert!(ok, "{out}");
    let (_, out) = run(Command::new("openssl")
        .args(["crl", "-noout", "-in"])
        .arg(&pem_path)
        .arg("-CAfile")
        .arg(server.path("ca.pem")));
    assert!(out.contains("verify OK"), "the CRL's signature: {out}");
    pem_path
}

fn crl_text(crl: &PathBuf) -> String {
    let (ok, out) = run(Command::new("openssl")
        .args(["crl", "-noout", "-text", "-in"])
        .arg(crl));
    assert!(ok, "{out}");
    out
}

/// `openssl verify -crl_check` of `leaf` with the CRL: its verdict.
fn verify_with_crl(server: &Server, crl: &PathBuf, leaf: &PathBuf) -> (bool, String) {
    let bundle = server.path("ca+crl.pem");
    let mut text = std::fs::read_to_string(server.path("ca.pem")).unwrap();
    text.push_str(&std::fs::read_to_string(crl).unwrap());
    std::fs::write(&bundle, text).unwrap();
    run(Command::new("openssl")
        .args(["verify", "-crl_check", "-CAfile"])
        .arg(&bundle)
        .arg(leaf))
}

fn sign_body() -> Value {
    json!({"message_b64": B64.encode(b"pay 10 to bob")})
}

async fn audit_actions(server: &Server) -> Vec<String> {
    let records = server.store().await.audit_records(0, 10_000).await.unwrap();
    keyward::audit::verify_sequence(&records).unwrap();
    records.into_iter().map(|r| r.event.action).collect()
}

async fn a_revoked_agent_is_refused_at_once_and_openssl_sees_its_certificates_revoked(
    backends: Backends,
) {
    let server = Server::start(backends).await;
    let (issued, leaf) = certified_leaf(&server, "victim").await;
    // The certificate says where to ask.
    let (_, uri) = run(Command::new("openssl")
        .args(["x509", "-noout", "-ocsp_uri", "-in"])
        .arg(&leaf));
    assert_eq!(uri.trim(), format!("{}/v1/ocsp", server.url));
    assert!(ocsp_status(&server, &leaf).contains("leaf.pem: good"));
    let crl = crl_pem(&server).await;
    let (ok, out) = verify_with_crl(&server, &crl, &leaf);
    assert!(ok, "a live certificate passes -crl_check: {out}");
    let (status, signed) = server
        .admin("POST", "/v1/agents/victim/sign", Some(sign_body()))
        .await;
    assert_eq!(status, 200);
    // The report is recorded to the second, and a signature in the same
    // second as the report counts as after it; this one is in an earlier
    // second, so keyward's log shows it made before the report.
    let into_second = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    tokio::time::sleep(Duration::from_nanos(1_000_000_000 - u64::from(into_second))).await;

    let (status, revoked) = server
        .admin(
            "POST",
            "/v1/agents/victim/revoke",
            Some(json!({"reason": "keyCompromise"})),
        )
        .await;
    assert_eq!(status, 200, "{revoked}");
    assert_eq!(revoked["status"], "revoked");
    assert_eq!(revoked["changed"], true);
    assert_eq!(revoked["serials"], json!([issued["serial"]]));

    // From the moment the call returned: no signing, no messages, no
    // certificates.
    for (path, body) in [
        ("/v1/agents/victim/sign", sign_body()),
        (
            "/v1/agents/victim/messages",
            json!({"to": "victim", "intent": "x"}),
        ),
        ("/v1/agents/victim/certificates", json!({})),
    ] {
        let (status, answer) = server.admin("POST", path, Some(body)).await;
        assert_eq!(status, 403, "{path}: {answer}");
        assert_eq!(answer["error"]["code"], "agent_not_active");
    }
    let out = ocsp_status(&server, &leaf);
    assert!(out.contains("leaf.pem: revoked"), "{out}");
    assert!(out.contains("Reason: keyCompromise"), "{out}");
    let crl = crl_pem(&server).await;
    let serial = issued["serial"].as_str().unwrap().to_uppercase();
    let text = crl_text(&crl);
    assert!(
        text.contains(&serial) && text.contains("Key Compromise"),
        "{text}"
    );
    let (ok, out) = verify_with_crl(&server, &crl, &leaf);
    assert!(!ok && out.contains("certificate revoked"), "{out}");
    // A signature keyward made before the compromise was reported still
    // verifies: its signature log says so (SECURITY.md M22). Signatures
    // after the report are refused (tests/security.rs).
    let (_, verdict) = server
        .admin(
            "POST",
            "/v1/verify",
            Some(json!({
                "certificate_pem": issued["certificate_pem"],
                "message_b64": B64.encode(b"pay 10 to bob"),
                "signature_b64": signed["signature_der_b64"],
            })),
        )
        .await;
    assert_eq!(verdict["valid"], true, "{verdict}");

    // Revoking again changes nothing and writes nothing.
    let before = server.row_counts().await;
    let (status, again) = server
        .admin(
            "POST",
            "/v1/agents/victim/revoke",
            Some(json!({"reason": "superseded"})),
        )
        .await;
    assert_eq!((status, again["changed"].as_bool()), (200, Some(false)));
    assert_eq!(server.row_counts().await, before);
    assert_eq!(
        audit_actions(&server)
            .await
            .iter()
            .filter(|a| *a == "agent.revoke")
            .count(),
        1
    );
}

async fn one_certificate_can_be_revoked_alone(backends: Backends) {
    let server = Server::start(backends).await;
    let first = common::certified_agent(&server, "alpha").await;
    let second = common::issue_certificate(&server, "alpha").await;
    let (status, revoked) = server
        .admin(
            "POST",
            &format!(
                "/v1/certificates/{}/revoke",
                first["serial"].as_str().unwrap().to_uppercase()
            ),
            Some(json!({"reason": "superseded"})),
        )
        .await;
    assert_eq!(status, 200, "{revoked}");
    assert_eq!(revoked["already_revoked"], false);
    assert_eq!(revoked["serial"], first["serial"]);

    let text = crl_text(&crl_pem(&server).await);
    assert!(
        text.contains(&first["serial"].as_str().unwrap().to_uppercase()),
        "{text}"
    );
    assert!(
        !text.contains(&second["serial"].as_str().unwrap().to_uppercase()),
        "{text}"
    );
    assert!(text.contains("Superseded"), "{text}");
    // The agent still signs, under its remaining certificate.
    let (status, signed) = server
        .admin("POST", "/v1/agents/alpha/sign", Some(sign_body()))
        .await;
    assert_eq!(status, 200, "{signed}");
    assert_eq!(signed["certificate_serial"], second["serial"]);

    let before = server.row_counts().await;
    let (status, again) = server
        .admin(
            "POST",
            &format!(
                "/v1/certificates/{}/revoke",
                first["serial"].as_str().unwrap()
            ),
            Some(json!({"reason": "cessationOfOperation"})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(again["already_revoked"], true);
    assert_eq!(again["reason"], "superseded");
    assert_eq!(server.row_counts().await, before);

    // A compromise report is never "already done": it bars the key, so the
    // key's other certificate goes too, and the key signs no more.
    let (status, compromised) = server
        .admin(
            "POST",
            &format!(
                "/v1/certificates/{}/revoke",
                first["serial"].as_str().unwrap()
            ),
            Some(json!({"reason": "keyCompromise"})),
        )
        .await;
    assert_eq!(status, 200, "{compromised}");
    assert_eq!(compromised["already_revoked"], false);
    assert_eq!(compromised["reason"], "keyCompromise");
    assert_eq!(compromised["also_revoked"], json!([second["serial"]]));
    let (status, refused) = server
        .admin("POST", "/v1/agents/alpha/sign", Some(sign_body()))
        .await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (403, Some("key_compromised"))
    );
}

async fn a_suspension_holds_the_agent_and_resuming_releases_it(backends: Backends) {
    let server = Server::start(backends).await;
    let (issued, leaf) = certified_leaf(&server, "paused").await;
    let (status, suspended) = server
        .admin("POST", "/v1/agents/paused/suspend", None)
        .await;
    assert_eq!(status, 200, "{suspended}");
    assert_eq!(suspended["status"], "suspended");
    let (status, _) = server
        .admin("POST", "/v1/agents/paused/sign", Some(sign_body()))
        .await;
    assert_eq!(status, 403);
    let out = ocsp_status(&server, &leaf);
    assert!(
        out.contains("leaf.pem: revoked") && out.contains("certificateHold"),
        "{out}"
    );
    assert!(crl_text(&crl_pem(&server).await).contains("Certificate Hold"));

    let (status, resumed) = server
        .admin("POST", "/v1/agents/paused/resume", Some(json!({})))
        .await;
    assert_eq!(status, 200, "{resumed}");
    assert_eq!(resumed["status"], "active");
    assert_eq!(resumed["serials"], json!([issued["serial"]]));
    let (status, _) = server
        .admin("POST", "/v1/agents/paused/sign", Some(sign_body()))
        .await;
    assert_eq!(status, 200);
    assert!(ocsp_status(&server, &leaf).contains("leaf.pem: good"));
    let crl = crl_pem(&server).await;
    let (ok, out) = verify_with_crl(&server, &crl, &leaf);
    assert!(ok, "{out}");

    // A revoked agent cannot be resumed or suspended.
    server
        .admin(
            "POST",
            "/v1/agents/paused/revoke",
            Some(json!({"reason": "cessationOfOperation"})),
        )
        .await;
    for action in ["resume", "suspend"] {
        let (status, answer) = server
            .admin("POST", &format!("/v1/agents/paused/{action}"), None)
            .await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (409, Some("agent_revoked"))
        );
    }
    let actions = audit_actions(&server).await;
    for action in ["agent.suspend", "agent.resume", "agent.revoke"] {
        assert!(actions.iter().any(|a| a == action), "{actions:?}");
    }
}

/// Signatures the token has made for this server, from its metrics.
async fn token_signatures(server: &Server) -> u64 {
    let (_, metrics) = server.admin("GET", "/metrics", None).await;
    metrics
        .as_str()
        .unwrap()
        .lines()
        .find(|l| l.starts_with("keyward_pool_operations_total{op=\"sign\",outcome=\"ok\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// RFC 6960 §4.2.2.2: OCSP answers are signed by a responder key of their
/// own, certified by the CA for OCSP signing only, never by the CA key; a
/// flood of requests for one certificate is answered from the one signed
/// answer.
async fn ocsp_answers_come_from_a_delegated_responder_and_a_flood_signs_nothing(
    backends: Backends,
) {
    let server = Server::start(backends).await;
    let (_, leaf) = certified_leaf(&server, "alpha").await;
    let out = ocsp_query(&server, &leaf, &["-resp_text"]);
    assert!(out.contains("leaf.pem: good"), "{out}");
    assert!(
        out.contains("OCSP Signing"),
        "the signer is an OCSP responder: {out}"
    );
    assert!(out.contains("OCSP No Check"), "{out}");
    assert!(out.contains("keyward OCSP responder"), "{out}");
    let records = server.store().await.audit_records(0, 1000).await.unwrap();
    assert!(records
        .iter()
        .any(|r| r.event.action == "ocsp_responder.certify"));

    let request =
        common::openssl_ocsp_request(&server.path("ca.pem"), &leaf, &server.path("leaf.req"));
    let (_, first) = post_ocsp(&server, request.clone(), "application/ocsp-request").await;
    let signed_before = token_signatures(&server).await;
    for _ in 0..50 {
        let (status, answer) =
            post_ocsp(&server, request.clone(), "application/ocsp-request").await;
        assert_eq!((status, &answer), (200, &first), "the same signed answer");
    }
    // Background work signs too (the audit log's checkpoint, sealed each
    // second while there are new entries; a TLS handshake if the client
    // reconnects): at most a couple. Answers signed per request would be
    // 50.
    let signed_during = token_signatures(&server).await - signed_before;
    assert!(
        signed_during <= 2,
        "the flood cost {signed_during} signatures"
    );
}

/// The raw OCSP answer to `body` (DER), posted as an OCSP client would.
async fn post_ocsp(server: &Server, body: Vec<u8>, content_type: &str) -> (u16, Vec<u8>) {
    let response = server
        .client
        .post(format!("{}/v1/ocsp", server.url))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.bytes().await.unwrap().to_vec())
}

async fn bad_revocation_requests_are_refused_and_write_nothing(backends: Backends) {
    let server = Server::start(backends).await;
    let issued = common::certified_agent(&server, "alpha").await;
    let serial = issued["serial"].as_str().unwrap();
    let before = server.row_counts().await;
    let cases = [
        (
            format!("/v1/certificates/{serial}/revoke"),
            Some(json!({"reason": "becauseISaidSo"})),
            400,
            "invalid_reason",
        ),
        (
            format!("/v1/certificates/{serial}/revoke"),
            Some(json!({"reason": "removeFromCRL"})),
            400,
            "invalid_reason",
        ),
        (
            format!("/v1/certificates/{serial}/revoke"),
            Some(json!({"reason": "certificateHold"})),
            400,
            "invalid_reason",
        ),
        (
            format!("/v1/certificates/{serial}/revoke"),
            Some(json!({"reason": "keyCompromise", "when": "now"})),
            400,
            "invalid_request",
        ),
        (
            format!("/v1/certificates/{serial}/revoke"),
            Some(json!({})),
            400,
            "invalid_request",
        ),
        (
            "/v1/certificates/not-hex/revoke".to_owned(),
            Some(json!({"reason": "keyCompromise"})),
            400,
            "invalid_serial",
        ),
        (
            "/v1/certificates/DEADBEEF/revoke".to_owned(),
            Some(json!({"reason": "keyCompromise"})),
            404,
            "certificate_not_found",
        ),
        (
            "/v1/agents/nobody/revoke".to_owned(),
            Some(json!({"reason": "keyCompromise"})),
            404,
            "agent_not_found",
        ),
        (
            "/v1/agents/alpha/revoke".to_owned(),
            Some(json!({"reason": "certificateHold"})),
            400,
            "invalid_reason",
        ),
        (
            "/v1/agents/Bad_Name/revoke".to_owned(),
            Some(json!({"reason": "keyCompromise"})),
            400,
            "invalid_agent_name",
        ),
        (
            "/v1/agents/alpha/suspend".to_owned(),
            Some(json!({"reason": "x"})),
            400,
            "invalid_request",
        ),
    ];
    for (path, body, status, code) in cases {
        let (got, answer) = server.admin("POST", &path, body).await;
        assert_eq!(
            (got, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "{path}: {answer}"
        );
    }
    let (got, _) = server
        .request(
            "POST",
            &format!("/v1/certificates/{serial}/revoke"),
            Some(json!({"reason": "keyCompromise"})),
            None,
        )
        .await;
    assert_eq!(got, 401);

    // OCSP speaks OCSP: a malformed request gets malformedRequest (1), a
    // certificate of another CA gets unauthorized (6), both as DER.
    let (status, answer) =
        post_ocsp(&server, b"not DER".to_vec(), "application/ocsp-request").await;
    assert_eq!((status, answer), (200, vec![0x30, 0x03, 0x0a, 0x01, 0x01]));
    let (status, _) = post_ocsp(&server, vec![0x30, 0x00], "application/json").await;
    assert_eq!(status, 415);
    let dir = server.data_dir.path();
    common::openssl_self_signed(
        &dir.join("other.key"),
        "/CN=other-ca",
        &[],
        &dir.join("other.pem"),
    );
    let request = common::openssl_ocsp_request(
        &dir.join("other.pem"),
        &dir.join("other.pem"),
        &dir.join("other.req"),
    );
    let (status, answer) = post_ocsp(&server, request, "application/ocsp-request").await;
    assert_eq!((status, answer), (200, vec![0x30, 0x03, 0x0a, 0x01, 0x06]));
    let (status, answer) = server
        .request("GET", "/v1/crl?format=xml", None, None)
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (400, Some("invalid_format"))
    );

    assert_eq!(server.row_counts().await, before);
    let (status, _) = server
        .admin("POST", "/v1/agents/alpha/sign", Some(sign_body()))
        .await;
    assert_eq!(status, 200, "nothing was revoked");
}

/// The production shape: two keyward processes on one token and one
/// PostgreSQL database. A revocation made on one is enforced by the other
/// within a second, pushed by LISTEN/NOTIFY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_one_replica_is_enforced_by_the_other_within_a_second() {
    let server = Server::start(Db::Postgres).await;
    common::certified_agent(&server, "roamer").await;
    let replica = server.spawn_replica();
    let token = server.admin_token.clone();
    let sign_on_replica = || {
        server.request_at(
            &replica.url,
            "POST",
            "/v1/agents/roamer/sign",
            Some(sign_body()),
            Some(&token),
        )
    };
    let (status, answer) = sign_on_replica().await;
    assert_eq!(status, 200, "{answer}");

    let (status, _) = server
        .admin(
            "POST",
            "/v1/agents/roamer/revoke",
            Some(json!({"reason": "keyCompromise"})),
        )
        .await;
    assert_eq!(status, 200);
    let revoked = Instant::now();
    let refused_after = loop {
        let (status, _) = sign_on_replica().await;
        if status == 403 {
            break revoked.elapsed();
        }
        assert_eq!(status, 200);
        assert!(
            revoked.elapsed() < Duration::from_secs(5),
            "the replica still signs 5 s after the revocation"
        );
    };
    // Shown with --no-capture: the figure for the README.
    eprintln!("time to revoke on the other replica: {refused_after:?}");
    assert!(
        refused_after < Duration::from_secs(1),
        "the other replica refused only after {refused_after:?}"
    );
    let (_, metrics) = server
        .request_at(&replica.url, "GET", "/metrics", None, Some(&token))
        .await;
    let metrics = metrics.as_str().unwrap().to_owned();
    let observed = metrics
        .lines()
        .find(|l| l.starts_with("keyward_revocation_propagation_seconds_count"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|n| n.parse::<u64>().ok());
    assert!(observed >= Some(1), "{metrics}");
}

/// With `server.status_listen`, CRL and OCSP are also served over plain
/// HTTP, and certificates point there; nothing else is.
async fn crl_and_ocsp_can_be_served_over_plain_http(backends: Backends) {
    let server =
        Server::start_with_config(backends, "[server]\nstatus_listen = \"127.0.0.1:0\"\n").await;
    let status = std::fs::read_to_string(server.path("status.addr")).unwrap();
    let base = format!("http://{}", status.trim());
    let (_, leaf) = certified_leaf(&server, "plain").await;
    let (_, uri) = run(Command::new("openssl")
        .args(["x509", "-noout", "-ocsp_uri", "-in"])
        .arg(&leaf));
    assert_eq!(uri.trim(), format!("{base}/v1/ocsp"));
    let (_, text) = run(Command::new("openssl")
        .args(["x509", "-noout", "-ext", "crlDistributionPoints", "-in"])
        .arg(&leaf));
    assert!(text.contains(&format!("{base}/v1/crl")), "{text}");
    server
        .admin(
            "POST",
            "/v1/agents/plain/revoke",
            Some(json!({"reason": "keyCompromise"})),
        )
        .await;
    let (ok, out) = run(Command::new("openssl")
        .arg("ocsp")
        .arg("-issuer")
        .arg(server.path("ca.pem"))
        .arg("-CAfile")
        .arg(server.path("ca.pem"))
        .arg("-cert")
        .arg(&leaf)
        .arg("-url")
        .arg(format!("{base}/v1/ocsp")));
    assert!(
        ok && out.contains("leaf.pem: revoked") && out.contains("Response verify OK"),
        "{out}"
    );
    let plain = reqwest::Client::new();
    let crl = plain.get(format!("{base}/v1/crl")).send().await.unwrap();
    assert_eq!(crl.status(), 200);
    assert_eq!(crl.headers()["content-type"], "application/pkix-crl");
    for path in ["/v1/agents", "/healthz", "/v1/ca/chain.pem"] {
        let answer = plain.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(answer.status(), 404, "{path} over plain HTTP");
    }
}

on_every_backend!(
    crl_and_ocsp_can_be_served_over_plain_http,
    a_revoked_agent_is_refused_at_once_and_openssl_sees_its_certificates_revoked,
    one_certificate_can_be_revoked_alone,
    a_suspension_holds_the_agent_and_resuming_releases_it,
    bad_revocation_requests_are_refused_and_write_nothing,
    ocsp_answers_come_from_a_delegated_responder_and_a_flood_signs_nothing,
);
