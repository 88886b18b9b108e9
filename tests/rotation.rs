//! Custodial key rotation end to end: a keyward process with its keys on a
//! real SoftHSM2 token (inspected with pkcs11-tool) and in a real swtpm
//! (its key directory), on SQLite and PostgreSQL.

mod common;

use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use common::{Backends, Db, Server};
use serde_json::{json, Value};

fn message() -> String {
    B64.encode(b"rotate me")
}

async fn sign(server: &Server, name: &str, key_id: Option<&str>) -> (u16, Value) {
    let mut body = json!({"message_b64": message()});
    if let Some(key) = key_id {
        body["key_id"] = json!(key);
    }
    server
        .admin("POST", &format!("/v1/agents/{name}/sign"), Some(body))
        .await
}

/// What /v1/verify says of `signature` against `certificate_pem` now.
async fn verdict(server: &Server, certificate_pem: &Value, signature: &Value) -> Value {
    let (status, verdict) = server
        .admin(
            "POST",
            "/v1/verify",
            Some(json!({
                "certificate_pem": certificate_pem,
                "message_b64": message(),
                "signature_b64": signature,
            })),
        )
        .await;
    assert_eq!(status, 200, "{verdict}");
    verdict
}

/// The default: custodial keys kept wrapped in the database (SoftHSM2),
/// or as blobs in the key directory (a TPM).
async fn a_rotated_key_signs_only_in_its_grace_and_is_destroyed_after_retention(
    backends: Backends,
) {
    let server = Server::start(backends).await;
    rotated_key_lifecycle(&server).await;
    assert_eq!(
        server.key_counts().await,
        server.expected_key_counts(1),
        "(key store, wrapped): the new key alone is left, where the backend keeps it"
    );
}

async fn a_rotated_token_key_signs_only_in_its_grace_and_leaves_the_token_after_retention(db: Db) {
    let server = Server::start_with_config(db, common::TOKEN_STORAGE).await;
    rotated_key_lifecycle(&server).await;
    assert_eq!(server.token_private_key_count(), common::SERVICE_KEYS + 1);
}

async fn rotated_key_lifecycle(server: &Server) {
    let (agent, old_cert) = (
        common::register_agent(server, "alpha").await,
        common::issue_certificate(server, "alpha").await,
    );
    let old_key = agent["key_id"].as_str().unwrap().to_owned();

    let (status, rotated) = server
        .admin(
            "POST",
            "/v1/agents/alpha/rotate-key",
            Some(json!({"reason": "superseded", "grace_seconds": 2, "retention_seconds": 4})),
        )
        .await;
    assert_eq!(status, 200, "{rotated}");
    assert_eq!(rotated["old_key_id"], old_key);
    let new_key = rotated["new_key_id"].as_str().unwrap().to_owned();
    assert_ne!(new_key, old_key);
    assert!(server.custodial_key_held(&new_key).await && server.custodial_key_held(&old_key).await);

    // The current key signs by default, under the new certificate.
    let (status, signed) = sign(server, "alpha", None).await;
    assert_eq!(status, 200, "{signed}");
    assert_eq!(signed["key_id"], new_key);
    assert_eq!(signed["certificate_serial"], rotated["serial"]);
    let checked = verdict(
        server,
        &rotated["certificate_pem"],
        &signed["signature_der_b64"],
    )
    .await;
    assert_eq!(checked["valid"], true, "{checked}");

    // The old key, named, signs during its grace; its certificate is
    // revoked, so the signature no longer verifies as keyward's.
    let (status, by_old) = sign(server, "alpha", Some(&old_key)).await;
    assert_eq!(status, 200, "{by_old}");
    assert_eq!(by_old["key_id"], old_key);
    assert!(by_old["certificate_serial"].is_null());
    let checked = verdict(
        server,
        &old_cert["certificate_pem"],
        &by_old["signature_der_b64"],
    )
    .await;
    assert_eq!(checked["reason"], "revoked", "{checked}");

    tokio::time::sleep(Duration::from_millis(2200)).await;
    let (status, refused) = sign(server, "alpha", Some(&old_key)).await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (403, Some("key_retired"))
    );

    // After retention the old key is destroyed; the new one stays.
    let start = Instant::now();
    while server.custodial_key_held(&old_key).await {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the retired key is still on the token"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(server.custodial_key_held(&new_key).await);
    let records = server.store().await.audit_records(0, 1000).await.unwrap();
    keyward::audit::verify_sequence(&records).unwrap();
    let actions: Vec<&str> = records.iter().map(|r| r.event.action.as_str()).collect();
    assert!(actions.contains(&"agent.rotate_key"), "{actions:?}");
    let destroyed: Vec<_> = records
        .iter()
        .filter(|r| r.event.action == "key.destroy")
        .collect();
    assert_eq!(destroyed.len(), 1);
    assert_eq!(destroyed[0].event.subject, old_key);
}

async fn a_key_rotated_for_compromise_signs_nothing_more(backends: Backends) {
    let server = Server::start(backends).await;
    let (agent, _) = (
        common::register_agent(&server, "alpha").await,
        common::issue_certificate(&server, "alpha").await,
    );
    let old_key = agent["key_id"].as_str().unwrap();
    let (status, answer) = server
        .admin(
            "POST",
            "/v1/agents/alpha/rotate-key",
            Some(json!({"reason": "keyCompromise", "grace_seconds": 60})),
        )
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (400, Some("invalid_grace"))
    );
    let (status, rotated) = server
        .admin(
            "POST",
            "/v1/agents/alpha/rotate-key",
            Some(json!({"reason": "keyCompromise"})),
        )
        .await;
    assert_eq!(status, 200, "{rotated}");
    let (status, refused) = sign(&server, "alpha", Some(old_key)).await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (403, Some("key_retired"))
    );
    let (status, _) = sign(&server, "alpha", None).await;
    assert_eq!(status, 200);
    // A key that was never this agent's is refused the same way.
    let (status, _) = sign(&server, "alpha", Some("agent-0000")).await;
    assert_eq!(status, 403);
}

async fn bad_rotations_are_refused_and_leave_no_key_behind(backends: Backends) {
    let server = Server::start(backends).await;
    common::certified_agent(&server, "alpha").await;
    common::certified_agent(&server, "gone").await;
    server
        .admin(
            "POST",
            "/v1/agents/gone/revoke",
            Some(json!({"reason": "cessationOfOperation"})),
        )
        .await;
    let keys_before = server.key_store_key_count();
    let wrapped_before = server.wrapped_key_count().await;
    let rows_before = server.row_counts().await;
    let cases = [
        ("alpha", json!({"reason": "whim"}), 400, "invalid_reason"),
        (
            "alpha",
            json!({"reason": "certificateHold"}),
            400,
            "invalid_reason",
        ),
        (
            "alpha",
            json!({"retention_seconds": 99_999_999}),
            400,
            "invalid_retention",
        ),
        (
            "alpha",
            json!({"grace_seconds": 10, "retention_seconds": 5}),
            400,
            "invalid_retention",
        ),
        ("alpha", json!({"ttl_seconds": 0}), 400, "invalid_ttl"),
        ("alpha", json!({"grace": 1}), 400, "invalid_request"),
        ("nobody", json!({}), 404, "agent_not_found"),
        ("gone", json!({}), 403, "agent_not_active"),
    ];
    for (agent, body, status, code) in cases {
        let (got, answer) = server
            .admin(
                "POST",
                &format!("/v1/agents/{agent}/rotate-key"),
                Some(body.clone()),
            )
            .await;
        assert_eq!(
            (got, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "{agent} {body}: {answer}"
        );
    }
    assert_eq!(server.row_counts().await, rows_before);
    assert_eq!(
        server.key_store_key_count(),
        keys_before,
        "a refused rotation left a key in the key store"
    );
    assert_eq!(
        server.wrapped_key_count().await,
        wrapped_before,
        "a refused rotation left a wrapped key"
    );
}

fn pem_count(text: &str) -> usize {
    text.matches("-----BEGIN CERTIFICATE-----").count()
}

/// CA rotation: `keyward ca rotate` while keyward is stopped, then a
/// restart. The new CA issues; the old one still vouches, and answers OCSP,
/// for what it issued.
async fn a_rotated_ca_keeps_validating_what_it_issued(backends: Backends) {
    let mut server = Server::start(backends).await;
    let (_, old_cert) = (
        common::register_agent(&server, "alpha").await,
        common::issue_certificate(&server, "alpha").await,
    );
    let (status, old_signed) = sign(&server, "alpha", None).await;
    assert_eq!(status, 200);
    let old_root = std::fs::read_to_string(server.path("ca.pem")).unwrap();
    assert_eq!(pem_count(&old_root), 1);

    server.stop();
    let (ok, out) = server.operator(["ca", "rotate"]);
    assert!(ok, "keyward ca rotate: {out}");
    let server = server.restart().await;

    let (status, bundle) = server.request("GET", "/v1/trust-bundle", None, None).await;
    assert_eq!(status, 200);
    let bundle = bundle.as_str().unwrap().to_owned();
    assert_eq!(pem_count(&bundle), 2, "{bundle}");
    assert!(bundle.contains(old_root.trim()));
    let (_, chain) = server.request("GET", "/v1/ca/chain.pem", None, None).await;
    assert_eq!(pem_count(chain.as_str().unwrap()), 2);

    let (status, new_cert) = server
        .admin(
            "POST",
            "/v1/agents/alpha/certificates",
            Some(json!({"ttl_seconds": 600})),
        )
        .await;
    assert_eq!(status, 201, "{new_cert}");
    let dir = server.data_dir.path();
    std::fs::write(dir.join("bundle.pem"), &bundle).unwrap();
    std::fs::write(dir.join("old-root.pem"), &old_root).unwrap();
    for (name, cert) in [("old.pem", &old_cert), ("new.pem", &new_cert)] {
        std::fs::write(dir.join(name), cert["certificate_pem"].as_str().unwrap()).unwrap();
        let (ok, out) = common::run(
            std::process::Command::new("openssl")
                .args(["verify", "-CAfile"])
                .arg(dir.join("bundle.pem"))
                .arg(dir.join(name)),
        );
        assert!(ok, "{name} against the trust bundle: {out}");
    }
    let issuer = |name: &str| {
        common::run(
            std::process::Command::new("openssl")
                .args(["x509", "-noout", "-issuer", "-in"])
                .arg(dir.join(name)),
        )
        .1
    };
    assert_ne!(issuer("old.pem"), issuer("new.pem"), "the new CA issues");

    // The old certificate and what its key signed still verify.
    let checked = verdict(
        &server,
        &old_cert["certificate_pem"],
        &old_signed["signature_der_b64"],
    )
    .await;
    assert_eq!(checked["valid"], true, "{checked}");
    // The old CA answers OCSP for its certificate, with its own key.
    let (ok, out) = common::run(
        std::process::Command::new("openssl")
            .arg("ocsp")
            .arg("-issuer")
            .arg(dir.join("old-root.pem"))
            .arg("-CAfile")
            .arg(dir.join("old-root.pem"))
            .arg("-cert")
            .arg(dir.join("old.pem"))
            .arg("-url")
            .arg(format!("{}/v1/ocsp", server.url)),
    );
    assert!(
        ok && out.contains("Response verify OK") && out.contains("old.pem: good"),
        "{out}"
    );
    // Each CA's certificates point at that CA's own CRL, which the CA
    // signs: the old certificate stays checkable by CRL too.
    let crl_url = |name: &str| {
        let (ok, out) = common::run(
            std::process::Command::new("openssl")
                .args(["x509", "-noout", "-ext", "crlDistributionPoints", "-in"])
                .arg(dir.join(name)),
        );
        assert!(ok, "{out}");
        out.lines()
            .find_map(|l| l.trim().strip_prefix("URI:"))
            .expect("a CRL distribution point")
            .to_owned()
    };
    let (old_url, new_url) = (crl_url("old.pem"), crl_url("new.pem"));
    assert_ne!(old_url, new_url);
    let old_path = &old_url[old_url.find("/v1/crl/").expect("the CA's own CRL")..];
    let (status, old_crl) = server
        .request("GET", &format!("{old_path}?format=pem"), None, None)
        .await;
    assert_eq!(status, 200, "{old_crl}");
    std::fs::write(dir.join("old-crl.pem"), old_crl.as_str().unwrap()).unwrap();
    let (ok, out) = common::run(
        std::process::Command::new("openssl")
            .args(["crl", "-noout", "-in"])
            .arg(dir.join("old-crl.pem"))
            .arg("-CAfile")
            .arg(dir.join("old-root.pem")),
    );
    assert!(
        ok && out.contains("verify OK"),
        "the old CA signs its CRL: {out}"
    );
    std::fs::write(
        dir.join("old-root+crl.pem"),
        old_root.clone() + old_crl.as_str().unwrap(),
    )
    .unwrap();
    let (ok, out) = common::run(
        std::process::Command::new("openssl")
            .args(["verify", "-crl_check", "-CAfile"])
            .arg(dir.join("old-root+crl.pem"))
            .arg(dir.join("old.pem")),
    );
    assert!(ok, "{out}");
    let (status, answer) = server
        .request("GET", &format!("/v1/crl/{}", "0".repeat(40)), None, None)
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (404, Some("unknown_ca"))
    );

    let records = server.store().await.audit_records(0, 1000).await.unwrap();
    keyward::audit::verify_sequence(&records).unwrap();
    assert!(records.iter().any(|r| r.event.action == "ca.rotate"));
}

/// `rotate_after_seconds`: keyward rotates the custodial keys of agents
/// with that role once they are older.
async fn the_policy_rotates_old_keys_on_schedule(backends: Backends) {
    let server = Server::start(backends).await;
    let agent = common::register_agent_with(&server, "alpha", &["rotating"]).await;
    common::register_agent(&server, "steady").await;
    let (_, steady) = server.admin("GET", "/v1/agents/steady", None).await;
    let first_key = agent["key_id"].as_str().unwrap().to_owned();
    let (status, _) = server
        .admin(
            "POST",
            "/v1/policies",
            Some(json!({"content": "[roles.rotating]\nactions = [\"sign\"]\nrotate_after_seconds = 2\n"})),
        )
        .await;
    assert_eq!(status, 201);
    let start = Instant::now();
    loop {
        let (_, now) = server.admin("GET", "/v1/agents/alpha", None).await;
        if now["key_id"] != first_key {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no scheduled rotation"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, signed) = sign(&server, "alpha", None).await;
    assert_eq!(status, 200);
    // The agent may already be on a later key: rotations keep coming.
    assert_ne!(signed["key_id"], first_key);
    let records = server.store().await.audit_records(0, 1000).await.unwrap();
    let by_policy = records
        .iter()
        .filter(|r| r.event.action == "agent.rotate_key" && r.event.actor == "policy")
        .count();
    assert!(by_policy >= 1);
    // An agent without the role keeps its key.
    let (_, steady_now) = server.admin("GET", "/v1/agents/steady", None).await;
    assert_eq!(steady_now["key_id"], steady["key_id"]);
}

/// Two replicas on one token and PostgreSQL database: after a rotation on
/// one, the other stops using the old key at once, though its agent cache
/// (1 s) still named it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_other_replica_stops_using_a_rotated_key_at_once() {
    let server = Server::start(Db::Postgres).await;
    let (agent, _) = (
        common::register_agent(&server, "alpha").await,
        common::issue_certificate(&server, "alpha").await,
    );
    let old_key = agent["key_id"].as_str().unwrap().to_owned();
    let replica = server.spawn_replica();
    let token = server.admin_token.clone();
    let sign_on_replica = || {
        server.request_at(
            &replica.url,
            "POST",
            "/v1/agents/alpha/sign",
            Some(json!({"message_b64": message()})),
            Some(&token),
        )
    };
    let (status, before) = sign_on_replica().await;
    assert_eq!(
        (status, before["key_id"].as_str()),
        (200, Some(old_key.as_str()))
    );
    let (status, rotated) = server
        .admin(
            "POST",
            "/v1/agents/alpha/rotate-key",
            Some(json!({"reason": "keyCompromise"})),
        )
        .await;
    assert_eq!(status, 200, "{rotated}");
    let rotated_at = Instant::now();
    loop {
        let (status, signed) = sign_on_replica().await;
        assert_eq!(status, 200, "{signed}");
        if signed["key_id"] == rotated["new_key_id"] {
            break;
        }
        assert_eq!(signed["key_id"], old_key);
        assert!(
            rotated_at.elapsed() < Duration::from_millis(300),
            "the replica still signed with the compromised key after {:?}",
            rotated_at.elapsed()
        );
    }
}

on_every_backend!(
    the_policy_rotates_old_keys_on_schedule,
    a_rotated_ca_keeps_validating_what_it_issued,
    a_rotated_key_signs_only_in_its_grace_and_is_destroyed_after_retention,
    a_key_rotated_for_compromise_signs_nothing_more,
    bad_rotations_are_refused_and_leave_no_key_behind,
);

on_both_databases!(
    a_rotated_token_key_signs_only_in_its_grace_and_leaves_the_token_after_retention,
);
