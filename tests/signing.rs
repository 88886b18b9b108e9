//! Signing for agents, verification and signed messages, end to end: a
//! keyward process with its keys on a real SoftHSM2 token and in a real
//! swtpm, each on SQLite and on PostgreSQL,
//! checked by independent verifiers (OpenSSL, p256, Python's
//! `cryptography` running the verifier printed in docs/envelope.md).

mod common;

use std::process::Command;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use common::{keyward_bin, run, Backends, Server};
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::DecodePublicKey;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

async fn signature_rows(server: &Server) -> i64 {
    server.sql("SELECT COUNT(*) FROM signatures").await.unwrap()
}

fn write(server: &Server, name: &str, contents: &[u8]) -> std::path::PathBuf {
    let path = server.path(name);
    std::fs::write(&path, contents).unwrap();
    path
}

async fn a_signature_from_the_api_verifies_independently_and_is_recorded(backends: Backends) {
    let server = Server::start(backends).await;
    let issued = common::certified_agent(&server, "payer").await;
    let message = b"pay 10 to bob";
    let (status, signed) = server
        .admin(
            "POST",
            "/v1/agents/payer/sign",
            Some(json!({"message_b64": B64.encode(message)})),
        )
        .await;
    assert_eq!(status, 200, "{signed}");
    assert_eq!(signed["algorithm"], "ES256");
    assert_eq!(signed["certificate_serial"], issued["serial"]);

    // OpenSSL checks the DER signature with the certificate's key.
    let cert = write(
        &server,
        "payer.pem",
        issued["certificate_pem"].as_str().unwrap().as_bytes(),
    );
    let (ok, pubkey) = run(Command::new("openssl")
        .args(["x509", "-noout", "-pubkey", "-in"])
        .arg(&cert));
    assert!(ok, "{pubkey}");
    let pubkey_path = write(&server, "payer.pub", pubkey.as_bytes());
    let der = B64
        .decode(signed["signature_der_b64"].as_str().unwrap())
        .unwrap();
    let sig_path = write(&server, "sig.der", &der);
    let msg_path = write(&server, "msg.txt", message);
    let (ok, out) = run(Command::new("openssl")
        .args(["dgst", "-sha256", "-verify"])
        .arg(&pubkey_path)
        .arg("-signature")
        .arg(&sig_path)
        .arg(&msg_path));
    assert!(ok, "openssl does not verify the API's signature: {out}");

    // The P1363 form is the same signature.
    let key = VerifyingKey::from_public_key_pem(&pubkey).unwrap();
    let p1363 = B64
        .decode(signed["signature_p1363_b64"].as_str().unwrap())
        .unwrap();
    let digest = Sha256::digest(message);
    key.verify_prehash(&digest, &Signature::from_slice(&p1363).unwrap())
        .unwrap();
    assert_eq!(
        Signature::from_der(&der).unwrap().to_bytes().to_vec(),
        p1363
    );

    // A digest signs the same as its message.
    let (status, by_digest) = server
        .admin(
            "POST",
            "/v1/agents/payer/sign",
            Some(json!({"digest_sha256_b64": B64.encode(digest)})),
        )
        .await;
    assert_eq!(status, 200, "{by_digest}");
    let p1363 = B64
        .decode(by_digest["signature_p1363_b64"].as_str().unwrap())
        .unwrap();
    key.verify_prehash(&digest, &Signature::from_slice(&p1363).unwrap())
        .unwrap();

    // Both were recorded, with what was signed, under the audit chain.
    assert_eq!(signature_rows(&server).await, 2);
    let digest_hex = hex::encode(digest);
    let matching = server
        .sql(&format!(
            "SELECT COUNT(*) FROM signatures WHERE agent_name = 'payer' \
             AND digest = '{digest_hex}' AND purpose = 'sign'"
        ))
        .await;
    assert_eq!(matching, Some(2));
    let records = server.store().await.audit_records(0, 1000).await.unwrap();
    keyward::audit::verify_sequence(&records).unwrap();
    let batched: i64 = records
        .iter()
        .filter(|r| r.event.action == "signature.batch")
        .map(|r| r.event.details["count"].as_i64().unwrap())
        .sum();
    assert_eq!(batched, 2);
}

async fn bad_sign_requests_are_refused_and_record_nothing(backends: Backends) {
    let server = Server::start(backends).await;
    common::certified_agent(&server, "payer").await;
    let digest = B64.encode([7u8; 32]);
    let cases = [
        ("payer", json!({}), 400, "invalid_request"),
        (
            "payer",
            json!({"message_b64": "aGk=", "digest_sha256_b64": digest}),
            400,
            "invalid_request",
        ),
        (
            "payer",
            json!({"message_b64": "not base64!"}),
            400,
            "invalid_base64",
        ),
        (
            "payer",
            json!({"digest_sha256_b64": B64.encode([1u8; 31])}),
            400,
            "invalid_digest",
        ),
        (
            "payer",
            json!({"message_b64": "aGk=", "extra": 1}),
            400,
            "invalid_request",
        ),
        (
            "nobody",
            json!({"message_b64": "aGk="}),
            404,
            "agent_not_found",
        ),
        (
            "Not_A_Name",
            json!({"message_b64": "aGk="}),
            400,
            "invalid_agent_name",
        ),
    ];
    for (agent, body, status, code) in cases {
        let (got, answer) = server
            .admin(
                "POST",
                &format!("/v1/agents/{agent}/sign"),
                Some(body.clone()),
            )
            .await;
        assert_eq!(
            (got, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}: {answer}"
        );
    }
    let (got, answer) = server
        .request(
            "POST",
            "/v1/agents/payer/sign",
            Some(json!({"message_b64": "aGk="})),
            Some("wrong-token"),
        )
        .await;
    assert_eq!(got, 401, "{answer}");
    assert_eq!(signature_rows(&server).await, 0);
}

async fn a_disabled_agent_may_not_sign(backends: Backends) {
    let server = Server::start(backends).await;
    common::certified_agent(&server, "payer").await;
    let sign = json!({"message_b64": "aGk="});
    let (status, _) = server
        .admin("POST", "/v1/agents/payer/sign", Some(sign.clone()))
        .await;
    assert_eq!(status, 200);
    // Disabled in the database, as another replica would: seen within the
    // signing cache's lifetime.
    server
        .sql("UPDATE agents SET status = 'disabled' WHERE name = 'payer'")
        .await;
    tokio::time::sleep(keyward::agents::cache::TTL + Duration::from_millis(200)).await;
    let (status, answer) = server
        .admin("POST", "/v1/agents/payer/sign", Some(sign))
        .await;
    assert_eq!(status, 403, "{answer}");
    assert_eq!(answer["error"]["code"], "agent_not_active");
    let (status, answer) = server
        .admin(
            "POST",
            "/v1/agents/payer/messages",
            Some(json!({"to": "payer", "intent": "x"})),
        )
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (403, Some("agent_not_active"))
    );
    assert_eq!(signature_rows(&server).await, 1);
}

/// A P-256 key and a self-signed end-entity certificate from OpenSSL:
/// a signer keyward never certified.
fn impostor(server: &Server) -> (std::path::PathBuf, String) {
    let key = server.path("impostor.key");
    let cert = server.path("impostor.pem");
    let pem = common::openssl_self_signed(
        &key,
        "/CN=impostor",
        &["basicConstraints=critical,CA:FALSE"],
        &cert,
    );
    (key, pem)
}

async fn verify_accepts_keywards_signatures_and_says_why_it_refuses_others(backends: Backends) {
    let server = Server::start(backends).await;
    let issued = common::certified_agent(&server, "payer").await;
    let certificate_pem = issued["certificate_pem"].as_str().unwrap();
    let message = B64.encode(b"pay 10 to bob");
    let (_, signed) = server
        .admin(
            "POST",
            "/v1/agents/payer/sign",
            Some(json!({"message_b64": message})),
        )
        .await;
    let der = signed["signature_der_b64"].as_str().unwrap();
    let p1363 = signed["signature_p1363_b64"].as_str().unwrap();
    let verify = |body: Value| {
        let server = &server;
        async move { server.admin("POST", "/v1/verify", Some(body)).await }
    };

    for signature in [der, p1363] {
        let (status, by_cert) = verify(json!({
            "certificate_pem": certificate_pem, "message_b64": message, "signature_b64": signature,
        }))
        .await;
        assert_eq!(status, 200);
        assert_eq!(by_cert["valid"], true, "{by_cert}");
        assert_eq!(by_cert["certificate_serial"], issued["serial"]);
        assert_eq!(by_cert["spiffe_id"], "spiffe://keyward.local/agent/payer");
        let (_, by_agent) = verify(json!({
            "agent": "payer", "message_b64": message, "signature_b64": signature,
        }))
        .await;
        assert_eq!(by_agent["valid"], true, "{by_agent}");
    }

    let other_message = B64.encode(b"pay 1000 to mallory");
    let (_, tampered) = verify(json!({
        "agent": "payer", "message_b64": other_message, "signature_b64": der,
    }))
    .await;
    assert_eq!(
        (tampered["valid"].as_bool(), tampered["reason"].as_str()),
        (Some(false), Some("bad_signature"))
    );

    // Before the certificate existed: the agent had no valid certificate,
    // and the certificate itself was not yet valid.
    let (_, early) = verify(json!({
        "agent": "payer", "message_b64": message, "signature_b64": der, "at": "2020-01-01T00:00:00Z",
    }))
    .await;
    assert_eq!(early["reason"], "no_valid_certificate", "{early}");
    let (_, early) = verify(json!({
        "certificate_pem": certificate_pem, "message_b64": message, "signature_b64": der,
        "at": "2020-01-01T00:00:00Z",
    }))
    .await;
    assert_eq!(early["reason"], "not_yet_valid", "{early}");

    // A signature by a key keyward never certified, with its own
    // self-signed certificate: it verifies, but does not chain.
    let (key, impostor_pem) = impostor(&server);
    let msg_path = write(&server, "m.txt", b"pay 10 to bob");
    let sig_path = server.path("impostor.sig");
    let (ok, out) = run(Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(&key)
        .arg("-out")
        .arg(&sig_path)
        .arg(&msg_path));
    assert!(ok, "{out}");
    let impostor_sig = B64.encode(std::fs::read(&sig_path).unwrap());
    let (_, untrusted) = verify(json!({
        "certificate_pem": impostor_pem, "message_b64": message, "signature_b64": impostor_sig,
    }))
    .await;
    assert_eq!(untrusted["reason"], "untrusted_chain", "{untrusted}");
    let (_, wrong_key) = verify(json!({
        "agent": "payer", "message_b64": message, "signature_b64": impostor_sig,
    }))
    .await;
    assert_eq!(wrong_key["reason"], "bad_signature", "{wrong_key}");
    let (_, garbage) = verify(json!({
        "agent": "payer", "message_b64": message, "signature_b64": B64.encode([0u8; 70]),
    }))
    .await;
    assert_eq!(garbage["reason"], "malformed_signature", "{garbage}");

    let before = server.row_counts().await;
    let bad = [
        (
            json!({"message_b64": message, "signature_b64": der}),
            400,
            "invalid_request",
        ),
        (
            json!({"agent": "payer", "certificate_pem": certificate_pem, "message_b64": message, "signature_b64": der}),
            400,
            "invalid_request",
        ),
        (
            json!({"agent": "payer", "signature_b64": der}),
            400,
            "invalid_request",
        ),
        (
            json!({"agent": "payer", "message_b64": message, "signature_b64": "%%%"}),
            400,
            "invalid_base64",
        ),
        (
            json!({"certificate_pem": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "message_b64": message, "signature_b64": der}),
            400,
            "invalid_certificate",
        ),
        (
            json!({"certificate_pem": "", "message_b64": message, "signature_b64": der}),
            400,
            "invalid_certificate",
        ),
        (
            json!({"agent": "payer", "message_b64": message, "signature_b64": der, "at": "yesterday"}),
            400,
            "invalid_time",
        ),
        (
            json!({"agent": "nobody", "message_b64": message, "signature_b64": der}),
            404,
            "agent_not_found",
        ),
    ];
    for (body, status, code) in bad {
        let (got, answer) = verify(body.clone()).await;
        assert_eq!(
            (got, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}: {answer}"
        );
    }
    assert_eq!(server.row_counts().await, before);
}

/// The Python verifier printed in docs/envelope.md, run as written.
fn python_verifier() -> String {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/envelope.md")).unwrap();
    let start = doc
        .find("```python\n")
        .expect("docs/envelope.md has a Python verifier")
        + 10;
    let end = start + doc[start..].find("```").unwrap();
    format!(
        "{}\nimport sys\nanchor = x509.load_pem_x509_certificate(open(sys.argv[1], 'rb').read())\n\
         print(json.dumps(verify(sys.stdin.read().strip(), anchor, sys.argv[2], int(sys.argv[3]))))\n",
        &doc[start..end]
    )
}

async fn messages_are_signed_as_the_agent_and_accepted_once_by_their_recipient(backends: Backends) {
    let server = Server::start(backends).await;
    let issued = common::certified_agent(&server, "alice").await;
    common::certified_agent(&server, "bob").await;
    let bob = "spiffe://keyward.local/agent/bob";
    let (status, message) = server
        .admin(
            "POST",
            "/v1/agents/alice/messages",
            Some(json!({"to": "bob", "intent": "refund order 42", "ttl_seconds": 120})),
        )
        .await;
    assert_eq!(status, 201, "{message}");
    assert_eq!(message["iss"], "spiffe://keyward.local/agent/alice");
    assert_eq!(message["aud"], bob);
    assert_eq!(message["certificate_serial"], issued["serial"]);
    assert_eq!(
        message["exp"].as_i64().unwrap() - message["iat"].as_i64().unwrap(),
        120
    );
    let token = message["token"].as_str().unwrap();

    // Offline, with nothing but keyward's root: the library, and Python's
    // `cryptography` running the verifier from the format's documentation.
    let root = std::fs::read_to_string(server.path("ca.pem")).unwrap();
    let anchors = keyward::pki::parse_pem_chain(&root).unwrap();
    let offline =
        keyward::agents::envelope::verify(token, &anchors, bob, std::time::SystemTime::now())
            .unwrap();
    assert_eq!(offline.intent(), "refund order 42");
    let script = write(&server, "verify_envelope.py", python_verifier().as_bytes());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut python = Command::new("python3")
        .arg(&script)
        .arg(server.path("ca.pem"))
        .arg(bob)
        .arg(now.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    python
        .stdin
        .take()
        .unwrap()
        .write_all(token.as_bytes())
        .unwrap();
    let out = python.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the documented Python verifier refuses keyward's envelope: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let claims: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(claims["intent"], "refund order 42");
    assert_eq!(claims["jti"], message["jti"]);

    // Through keyward: valid for bob once, then a replay; never for carol.
    let (_, for_carol) = server
        .admin(
            "POST",
            "/v1/messages/verify",
            Some(json!({"token": token, "to": "carol"})),
        )
        .await;
    assert_eq!(for_carol["reason"], "wrong_audience", "{for_carol}");
    let (status, first) = server
        .admin(
            "POST",
            "/v1/messages/verify",
            Some(json!({"token": token, "audience": bob})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(first["valid"], true, "{first}");
    assert_eq!(first["intent"], "refund order 42");
    assert_eq!(first["signer_serial"], issued["serial"]);
    let (_, again) = server
        .admin(
            "POST",
            "/v1/messages/verify",
            Some(json!({"token": token, "audience": bob})),
        )
        .await;
    assert_eq!(again["reason"], "replayed", "{again}");

    // One changed character in the claims breaks the signature.
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let claims_json = String::from_utf8(
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&parts[1])
            .unwrap(),
    )
    .unwrap()
    .replace("order 42", "order 43");
    parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims_json);
    let forged = parts.join(".");
    let (_, forged_answer) = server
        .admin(
            "POST",
            "/v1/messages/verify",
            Some(json!({"token": forged, "audience": bob})),
        )
        .await;
    assert_eq!(forged_answer["reason"], "bad_signature", "{forged_answer}");

    // The record says who asked whom for what.
    let recorded = server
        .sql(
            "SELECT COUNT(*) FROM signatures WHERE agent_name = 'alice' AND purpose = 'message' \
             AND message LIKE '%refund order 42%' AND message LIKE '%agent/bob%'",
        )
        .await;
    assert_eq!(recorded, Some(1));
}

async fn bad_message_requests_are_refused_and_record_nothing(backends: Backends) {
    let server = Server::start(backends).await;
    common::certified_agent(&server, "alice").await;
    let (status, _) = server
        .admin(
            "POST",
            "/v1/agents",
            Some(json!({"name": "nocert", "scopes": []})),
        )
        .await;
    assert_eq!(status, 201);
    let long_intent = "x".repeat(257);
    let cases = [
        (
            "alice",
            json!({"to": "bob", "intent": "line\nbreak"}),
            400,
            "invalid_intent",
        ),
        (
            "alice",
            json!({"to": "bob", "intent": ""}),
            400,
            "invalid_intent",
        ),
        (
            "alice",
            json!({"to": "bob", "intent": long_intent}),
            400,
            "invalid_intent",
        ),
        (
            "alice",
            json!({"to": "bob", "intent": "caf\u{e9}"}),
            400,
            "invalid_intent",
        ),
        (
            "alice",
            json!({"to": "bob", "intent": "x", "ttl_seconds": 301}),
            400,
            "invalid_ttl",
        ),
        (
            "alice",
            json!({"to": "bob", "intent": "x", "ttl_seconds": 0}),
            400,
            "invalid_ttl",
        ),
        (
            "alice",
            json!({"audience": "https://bob", "intent": "x"}),
            400,
            "invalid_audience",
        ),
        (
            "alice",
            json!({"to": "Bob!", "intent": "x"}),
            400,
            "invalid_agent_name",
        ),
        ("alice", json!({"intent": "x"}), 400, "invalid_request"),
        (
            "alice",
            json!({"to": "bob", "audience": "spiffe://keyward.local/agent/bob", "intent": "x"}),
            400,
            "invalid_request",
        ),
        ("alice", json!({"to": "bob"}), 400, "invalid_request"),
        (
            "nocert",
            json!({"to": "bob", "intent": "x"}),
            409,
            "no_certificate",
        ),
        (
            "ghost",
            json!({"to": "bob", "intent": "x"}),
            404,
            "agent_not_found",
        ),
    ];
    for (agent, body, status, code) in cases {
        let (got, answer) = server
            .admin(
                "POST",
                &format!("/v1/agents/{agent}/messages"),
                Some(body.clone()),
            )
            .await;
        assert_eq!(
            (got, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}: {answer}"
        );
    }
    let verify_cases = [
        (json!({"token": "a.b.c"}), 400, "invalid_request"),
        (
            json!({"token": "a.b.c", "audience": "bob"}),
            400,
            "invalid_audience",
        ),
        (
            json!({"audience": "spiffe://keyward.local/agent/bob"}),
            400,
            "invalid_request",
        ),
    ];
    for (body, status, code) in verify_cases {
        let (got, answer) = server
            .admin("POST", "/v1/messages/verify", Some(body.clone()))
            .await;
        assert_eq!(
            (got, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}: {answer}"
        );
    }
    let (status, junk) = server
        .admin(
            "POST",
            "/v1/messages/verify",
            Some(json!({"token": "a.b.c", "to": "bob"})),
        )
        .await;
    assert_eq!(
        (status, junk["reason"].as_str()),
        (200, Some("malformed")),
        "{junk}"
    );
    assert_eq!(signature_rows(&server).await, 0);
}

async fn the_cli_signs_and_verifies_messages(backends: Backends) {
    let server = Server::start(backends).await;
    common::certified_agent(&server, "alice").await;
    let client_args = |cmd: &mut Command| {
        cmd.arg("--url")
            .arg(&server.url)
            .arg("--data-dir")
            .arg(server.data_dir.path())
            .env_remove("KEYWARD_TOKEN");
    };
    let mut sign = Command::new(keyward_bin());
    sign.args([
        "msg",
        "sign",
        "alice",
        "--to",
        "bob",
        "--intent",
        "read report 7",
    ]);
    client_args(&mut sign);
    let (ok, token) = run(&mut sign);
    assert!(ok, "{token}");
    let token_file = write(&server, "token.jws", token.trim().as_bytes());

    let bob = "spiffe://keyward.local/agent/bob";
    let mut offline = Command::new(keyward_bin());
    offline
        .args(["msg", "verify", "--audience", bob, "--bundle"])
        .arg(server.path("ca.pem"))
        .arg("--input")
        .arg(&token_file);
    let (ok, out) = run(&mut offline);
    assert!(ok, "{out}");
    assert!(out.contains("read report 7"), "{out}");

    let mut wrong = Command::new(keyward_bin());
    wrong
        .args([
            "msg",
            "verify",
            "--audience",
            "spiffe://keyward.local/agent/eve",
            "--bundle",
        ])
        .arg(server.path("ca.pem"))
        .arg("--input")
        .arg(&token_file);
    let (ok, out) = run(&mut wrong);
    assert!(!ok && out.contains("wrong_audience"), "{out}");

    let mut online = Command::new(keyward_bin());
    online
        .args(["msg", "verify", "--audience", bob, "--input"])
        .arg(&token_file);
    client_args(&mut online);
    let (ok, out) = run(&mut online);
    assert!(ok, "{out}");
}

on_every_backend!(
    a_signature_from_the_api_verifies_independently_and_is_recorded,
    bad_sign_requests_are_refused_and_record_nothing,
    a_disabled_agent_may_not_sign,
    verify_accepts_keywards_signatures_and_says_why_it_refuses_others,
    messages_are_signed_as_the_agent_and_accepted_once_by_their_recipient,
    bad_message_requests_are_refused_and_record_nothing,
    the_cli_signs_and_verifies_messages,
);
