//! The attacks of the outside security review, each performed against a
//! keyward process with its keys on a real SoftHSM2 token and in a real
//! swtpm, on SQLite and PostgreSQL, and each shown to fail now. The caller
//! is an agent that holds its own key and certificate (or an admin who
//! holds two credentials) and tries the route the review found.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use common::{
    agent_client, enroll, enrolled_with, enrollment_token, key_and_csr, mtls_client, post,
    register_agent_with, run, Backends, Db, Keys, Server,
};
use keyward::agents::envelope::{self, Claims, Header};
use keyward::pki::Certificate;
use p256::ecdsa::signature::hazmat::PrehashSigner;
use p256::pkcs8::DecodePrivateKey;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// alice may sign and get certificates but not send messages, at most
/// 300 s; the others may do all three.
const POLICY: &str = r#"
[roles.limited]
actions = ["sign", "issue_cert"]
max_ttl_seconds = 300

[roles.full]
actions = ["sign", "message", "issue_cert"]
"#;

async fn apply(server: &Server, content: &str) -> i64 {
    let (status, applied) = server
        .admin("POST", "/v1/policies", Some(json!({"content": content})))
        .await;
    assert_eq!(status, 201, "{applied}");
    applied["version"].as_i64().unwrap()
}

/// A signing request: "hi".
fn sign_body() -> Value {
    json!({"message_b64": "aGk="})
}

fn code(answer: &Value) -> Option<&str> {
    answer["error"]["code"].as_str()
}

/// The first certificate of a PEM bundle.
fn leaf(pem: &str) -> Certificate {
    keyward::pki::parse_pem_chain(pem).unwrap().remove(0)
}

fn root(server: &Server) -> Certificate {
    leaf(&std::fs::read_to_string(server.path("ca.pem")).unwrap())
}

/// An ES256 signature over `digest` with the agent's own PKCS#8 key file,
/// as the agent itself (not keyward) makes it: r || s.
fn sign_with_own_key(key: &Path, digest: &[u8; 32]) -> [u8; 64] {
    let pem = std::fs::read_to_string(key).unwrap();
    let key = p256::ecdsa::SigningKey::from_pkcs8_pem(&pem).unwrap();
    let signature: p256::ecdsa::Signature = key.sign_prehash(digest).unwrap();
    signature.to_bytes().into()
}

/// An envelope from `from` to `to` whose signature is `sign(digest)`, with
/// `signer` as `x5c[0]`.
fn envelope_signed_by(
    server: &Server,
    signer: Certificate,
    from: &str,
    to: &str,
    intent: &str,
    sign: impl FnOnce(&[u8; 32]) -> [u8; 64],
) -> String {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let id = |agent: &str| format!("spiffe://keyward.local/agent/{agent}");
    let claims = Claims::new(&id(from), &id(to), intent, now, 120).unwrap();
    let header = Header::new(&[signer, root(server)]).unwrap();
    let input = envelope::signing_input(&header, &claims);
    envelope::assemble(&input, &sign(&envelope::signing_digest(&input)))
}

async fn verify_as(
    client: &reqwest::Client,
    server: &Server,
    token: &str,
    to: Option<&str>,
) -> (u16, Value) {
    let mut body = json!({ "token": token });
    if let Some(to) = to {
        body["to"] = json!(to);
    }
    post(client, server, "/v1/messages/verify", body).await
}

/// Finding 1: an agent whose role forbids messages signs an envelope with
/// its own client key (which keyward never held), or has keyward sign an
/// envelope's digest as a raw signature. Neither is a keyward message.
async fn an_agent_cannot_forge_a_message_with_its_own_key_or_a_raw_signature(backends: Backends) {
    let server = Server::start(backends).await;
    apply(&server, POLICY).await;
    let (alice, alice_key, alice_cert) = agent_client(&server, "alice", &["limited"]).await;
    let (bob, _, _) = agent_client(&server, "bob", &["full"]).await;
    let (status, answer) = post(
        &alice,
        &server,
        "/v1/agents/alice/messages",
        json!({"to": "bob", "intent": "transfer all funds"}),
    )
    .await;
    assert_eq!((status, code(&answer)), (403, Some("not_in_scope")));

    // Her own client key, her enrolled certificate in x5c.
    let client_cert = leaf(alice_cert["certificate_pem"].as_str().unwrap());
    let forged = envelope_signed_by(
        &server,
        client_cert,
        "alice",
        "bob",
        "transfer all funds",
        |d| sign_with_own_key(&alice_key, d),
    );
    let (status, verdict) = verify_as(&bob, &server, &forged, Some("bob")).await;
    assert_eq!(status, 200, "{verdict}");
    assert_eq!(
        (verdict["valid"].as_bool(), verdict["reason"].as_str()),
        (Some(false), Some("wrong_key_purpose"))
    );
    // Offline, with only keyward's root, the same.
    let (ok, out) = run(Command::new(common::keyward_bin())
        .args([
            "msg",
            "verify",
            "--audience",
            "spiffe://keyward.local/agent/bob",
            "--bundle",
        ])
        .arg(server.path("ca.pem"))
        .arg("--input")
        .arg({
            let path = server.path("forged.jws");
            std::fs::write(&path, &forged).unwrap();
            path
        }));
    assert!(!ok && out.contains("wrong_key_purpose"), "{out}");

    // A raw signature by her client key, checked as hers.
    let message = b"pay 10 to mallory";
    let signature = sign_with_own_key(&alice_key, &Sha256::digest(message).into());
    for signer in [
        json!({"agent": "alice"}),
        json!({"certificate_pem": alice_cert["certificate_pem"]}),
    ] {
        let mut body = json!({
            "message_b64": B64.encode(message),
            "signature_b64": B64.encode(signature),
        });
        body.as_object_mut()
            .unwrap()
            .extend(signer.as_object().unwrap().clone());
        let (status, verdict) = server.admin("POST", "/v1/verify", Some(body)).await;
        assert_eq!(status, 200, "{verdict}");
        assert_eq!(verdict["valid"], false, "{signer}: {verdict}");
    }

    // Her custodial key (she may sign, and get a certificate for it) over
    // an envelope's digest: a raw signature, not a message.
    let (status, custodial) =
        post(&alice, &server, "/v1/agents/alice/certificates", json!({})).await;
    assert_eq!(status, 201, "{custodial}");
    let custodial_cert = leaf(custodial["certificate_pem"].as_str().unwrap());
    let mut raw_signature = None;
    let assembled = envelope_signed_by(
        &server,
        custodial_cert,
        "alice",
        "bob",
        "transfer all funds",
        |d| {
            raw_signature = Some(*d);
            [0; 64]
        },
    );
    let digest = raw_signature.unwrap();
    let (status, signed) = post(
        &alice,
        &server,
        "/v1/agents/alice/sign",
        json!({"digest_sha256_b64": B64.encode(digest)}),
    )
    .await;
    assert_eq!(status, 200, "{signed}");
    let (signing_input, _) = assembled.rsplit_once('.').unwrap();
    let p1363: [u8; 64] = B64
        .decode(signed["signature_p1363_b64"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let smuggled = envelope::assemble(signing_input, &p1363);
    let (status, verdict) = verify_as(&bob, &server, &smuggled, None).await;
    assert_eq!(status, 200, "{verdict}");
    assert_eq!(
        (verdict["valid"].as_bool(), verdict["reason"].as_str()),
        (Some(false), Some("unrecorded_signature")),
        "keyward recorded that signature as a raw one, not as a message"
    );
    // What keyward certifies tells the two kinds of key apart.
    assert_eq!(
        extended_key_usages(custodial["certificate_pem"].as_str().unwrap()),
        ["1.3.6.1.5.5.7.3.36"]
    );
    assert_eq!(
        extended_key_usages(alice_cert["certificate_pem"].as_str().unwrap()),
        ["1.3.6.1.5.5.7.3.2"]
    );

    // Through keyward, a message from an agent allowed to send one is one.
    issue_custodial(&server, "bob").await;
    let (status, sent) = post(
        &bob,
        &server,
        "/v1/agents/bob/messages",
        json!({"to": "alice", "intent": "refund 42"}),
    )
    .await;
    assert_eq!(status, 201, "{sent}");
    let (_, verdict) = verify_as(&alice, &server, sent["token"].as_str().unwrap(), None).await;
    assert_eq!(verdict["valid"], true, "{verdict}");
}

fn extended_key_usages(pem: &str) -> Vec<String> {
    use x509_parser::prelude::*;
    let (_, pem) = parse_x509_pem(pem.as_bytes()).unwrap();
    let cert = pem.parse_x509().unwrap();
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    let mut oids: Vec<String> = eku.other.iter().map(|o| o.to_id_string()).collect();
    if eku.client_auth {
        oids.push("1.3.6.1.5.5.7.3.2".into());
    }
    if eku.server_auth {
        oids.push("1.3.6.1.5.5.7.3.1".into());
    }
    oids
}

async fn issue_custodial(server: &Server, agent: &str) -> Value {
    let (status, issued) = server
        .admin(
            "POST",
            &format!("/v1/agents/{agent}/certificates"),
            Some(json!({"ttl_seconds": 600})),
        )
        .await;
    assert_eq!(status, 201, "{issued}");
    issued
}

fn lifetime(issued: &Value) -> i64 {
    let at = |field: &str| {
        time::OffsetDateTime::parse(
            issued[field].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
        .unix_timestamp()
    };
    at("not_after") - at("not_before")
}

/// Finding 2: renewal and enrollment past the role's TTL cap, and renewal
/// at any rate; the certificates recorded under policy version 0.
async fn renewal_and_enrollment_go_through_the_policy(backends: Backends) {
    let server = Server::start(backends).await;
    let version = apply(&server, POLICY).await;
    register_agent_with(&server, "alice", &["limited"]).await;
    let token = enrollment_token(&server, "alice").await;
    let (key, csr) = key_and_csr(server.data_dir.path(), "alice");
    let (status, answer) = server
        .request(
            "POST",
            "/v1/enroll",
            Some(json!({"token": token, "csr_pem": csr, "ttl_seconds": 3600})),
            None,
        )
        .await;
    assert_eq!(
        (status, code(&answer)),
        (400, Some("invalid_ttl")),
        "{answer}"
    );
    // Refused before the token was spent: it still enrolls, capped.
    let (status, enrolled) = enroll(&server, &token, &csr).await;
    assert_eq!(status, 201, "{enrolled}");
    assert_eq!(
        lifetime(&enrolled),
        300 + 30,
        "the default is lowered to the cap"
    );
    let alice = mtls_client(&server, enrolled["certificate_pem"].as_str().unwrap(), &key);

    let (status, answer) = post(
        &alice,
        &server,
        "/v1/renew",
        json!({"csr_pem": csr, "ttl_seconds": 3600}),
    )
    .await;
    assert_eq!(
        (status, code(&answer)),
        (400, Some("invalid_ttl")),
        "{answer}"
    );
    let (status, renewed) = post(
        &alice,
        &server,
        "/v1/renew",
        json!({"csr_pem": csr, "ttl_seconds": 200}),
    )
    .await;
    assert_eq!(status, 201, "{renewed}");
    assert_eq!(lifetime(&renewed), 200 + 30);
    let recorded = server
        .sql(&format!(
            "SELECT COUNT(*) FROM certificates WHERE agent_name = 'alice' AND policy_version = {version}"
        ))
        .await;
    assert_eq!(
        recorded,
        Some(2),
        "both certificates carry the version in force"
    );

    // Renewal is rate-limited by the agent's roles, in a bucket of its own.
    apply(
        &server,
        "[roles.limited]\nactions = [\"sign\", \"issue_cert\"]\nmax_ttl_seconds = 300\n\
         rate_per_second = 0.01\nburst = 2\n",
    )
    .await;
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let (status, _) = post(&alice, &server, "/v1/renew", json!({"csr_pem": csr})).await;
        statuses.push(status);
    }
    assert_eq!(statuses, [201, 201, 429]);
    let (status, _) = post(&alice, &server, "/v1/agents/alice/sign", sign_body()).await;
    assert_eq!(status, 200, "signing has its own bucket");
}

/// Finding 3: renewals racing a revocation. Over 20 rounds, 6 clients
/// renew as fast as keyward answers while an admin revokes the agent;
/// afterwards no certificate of the agent is unrevoked, every one is in
/// the CRL, and the newest authenticates nothing.
async fn no_certificate_issued_while_an_agent_is_revoked_survives_it(backends: Backends) {
    use std::sync::{Arc, Mutex};
    const ROUNDS: usize = 20;
    const CLIENTS: usize = 6;
    let server = Arc::new(Server::start(backends).await);
    let mut issued_in_all = Vec::new();
    let mut refused_after = 0;
    for round in 0..ROUNDS {
        let name = format!("erin-{round}");
        let (key, enrolled) = enrolled_with(&server, &name, &[]).await;
        let (_, csr) = key_and_csr(server.data_dir.path(), &format!("{name}-csr"));
        let issued = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Vec::new();
        for _ in 0..CLIENTS {
            let client = mtls_client(&server, enrolled["certificate_pem"].as_str().unwrap(), &key);
            let (server, issued, stop, csr) =
                (server.clone(), issued.clone(), stop.clone(), csr.clone());
            tasks.push(tokio::spawn(async move {
                let mut refused = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let response = client
                        .post(format!("{}/v1/renew", server.url))
                        .json(&json!({"csr_pem": csr, "ttl_seconds": 300}))
                        .send()
                        .await;
                    let Ok(response) = response else { continue };
                    let status = response.status().as_u16();
                    let body: Value = response.json().await.unwrap_or(Value::Null);
                    match status {
                        201 => issued.lock().unwrap().push((
                            body["serial"].as_str().unwrap().to_owned(),
                            body["certificate_pem"].as_str().unwrap().to_owned(),
                        )),
                        401 | 403 => refused += 1,
                        other => panic!("renewal answered {other}: {body}"),
                    }
                }
                refused
            }));
        }
        // Revoke once the renewals are in full flow, whatever the load.
        let flowing = std::time::Instant::now();
        while issued.lock().unwrap().len() < CLIENTS {
            assert!(
                flowing.elapsed() < Duration::from_secs(30),
                "round {round}: no renewals"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (status, revoked) = server
            .admin(
                "POST",
                &format!("/v1/agents/{name}/revoke"),
                Some(json!({"reason": "keyCompromise"})),
            )
            .await;
        assert_eq!(status, 200, "{revoked}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for task in tasks {
            refused_after += task.await.unwrap();
        }
        let issued = issued.lock().unwrap().clone();
        let standing = server
            .sql(&format!(
                "SELECT COUNT(*) FROM certificates WHERE agent_name = '{name}' AND revoked_at IS NULL"
            ))
            .await;
        assert_eq!(
            standing,
            Some(0),
            "round {round}: a certificate outlived the revocation"
        );
        let (_, newest) = issued.last().unwrap();
        let (status, answer) = post(
            &mtls_client(&server, newest, &server.path(&format!("{name}-csr.key"))),
            &server,
            "/v1/renew",
            json!({"csr_pem": csr}),
        )
        .await;
        assert_eq!(status, 401, "round {round}: {answer}");
        issued_in_all.extend(issued.into_iter().map(|(serial, _)| serial));
    }
    assert!(
        refused_after > 0,
        "some renewals were refused once the revocation landed"
    );
    let crl = server
        .client
        .get(format!("{}/v1/crl", server.url))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let (_, crl) = x509_parser::parse_x509_crl(&crl).unwrap();
    let listed: std::collections::HashSet<String> = crl
        .iter_revoked_certificates()
        .map(|r| hex::encode(r.raw_serial()))
        .collect();
    let missing: Vec<&String> = issued_in_all
        .iter()
        .filter(|s| !listed.contains(*s))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} certificates issued while their agent was revoked are not in the CRL",
        missing.len(),
        issued_in_all.len()
    );
    eprintln!(
        "{ROUNDS} rounds: {} certificates issued, all revoked and in the CRL; {refused_after} \
         renewals refused once the revocation landed",
        issued_in_all.len()
    );
}

/// Finding 4: an agent holding a message meant for someone else verifies
/// it "as" the recipient and so spends it.
async fn a_third_party_cannot_spend_a_message_meant_for_another(backends: Backends) {
    let server = Server::start(backends).await;
    apply(&server, POLICY).await;
    let (alice, _, _) = agent_client(&server, "alice", &["limited"]).await;
    let (bob, _, _) = agent_client(&server, "bob", &["full"]).await;
    let (frank, _, _) = agent_client(&server, "frank", &["full"]).await;
    issue_custodial(&server, "bob").await;
    let (status, sent) = post(
        &bob,
        &server,
        "/v1/agents/bob/messages",
        json!({"to": "alice", "intent": "refund order 42"}),
    )
    .await;
    assert_eq!(status, 201, "{sent}");
    let token = sent["token"].as_str().unwrap();

    let (status, answer) = verify_as(&frank, &server, token, Some("alice")).await;
    assert_eq!(
        (status, code(&answer)),
        (403, Some("other_agent")),
        "{answer}"
    );
    let (status, answer) = post(
        &frank,
        &server,
        "/v1/messages/verify",
        json!({"token": token, "audience": "spiffe://keyward.local/agent/alice"}),
    )
    .await;
    assert_eq!(
        (status, code(&answer)),
        (403, Some("other_agent")),
        "{answer}"
    );
    let (_, verdict) = verify_as(&frank, &server, token, None).await;
    assert_eq!(verdict["reason"], "wrong_audience", "{verdict}");

    let (_, verdict) = verify_as(&alice, &server, token, None).await;
    assert_eq!(
        verdict["valid"], true,
        "the recipient still has it: {verdict}"
    );
    let (_, verdict) = verify_as(&alice, &server, token, Some("alice")).await;
    assert_eq!(verdict["reason"], "replayed");
}

/// Finding 5: a keyCompromise revocation of one certificate left the
/// key's other certificates standing and the key certifiable.
async fn key_compromise_revokes_every_certificate_of_the_key(backends: Backends) {
    let server = Server::start(backends).await;
    let (frank, key, enrolled) = agent_client(&server, "frank", &[]).await;
    let csr = std::fs::read_to_string(server.path("frank.csr")).unwrap();
    let mut renewed = Vec::new();
    for _ in 0..2 {
        let (status, issued) = post(
            &frank,
            &server,
            "/v1/renew",
            json!({"csr_pem": csr, "ttl_seconds": 300}),
        )
        .await;
        assert_eq!(status, 201, "{issued}");
        renewed.push(issued);
    }
    let (status, answer) = server
        .admin(
            "POST",
            &format!(
                "/v1/certificates/{}/revoke",
                renewed[0]["serial"].as_str().unwrap()
            ),
            Some(json!({"reason": "keyCompromise"})),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let mut also: Vec<&str> = answer["also_revoked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    also.sort();
    let mut expected = vec![
        enrolled["serial"].as_str().unwrap(),
        renewed[1]["serial"].as_str().unwrap(),
    ];
    expected.sort();
    assert_eq!(also, expected);
    let sibling = mtls_client(
        &server,
        renewed[1]["certificate_pem"].as_str().unwrap(),
        &key,
    );
    let response = sibling
        .get(format!("{}/v1/agents/frank", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        401,
        "the sibling certificate authenticates nothing"
    );
    let (status, answer) = server
        .admin(
            "POST",
            "/v1/agents/frank/certificates",
            Some(json!({"csr_pem": csr})),
        )
        .await;
    assert_eq!(
        (status, code(&answer)),
        (403, Some("key_compromised")),
        "{answer}"
    );
    // The agent itself may go on with a new key.
    let (_, fresh_csr) = key_and_csr(server.data_dir.path(), "frank-next");
    let (status, answer) = server
        .admin(
            "POST",
            "/v1/agents/frank/certificates",
            Some(json!({"csr_pem": fresh_csr})),
        )
        .await;
    assert_eq!(status, 201, "{answer}");

    // A custodial key reported compromised signs no more, until rotated.
    let custodial = issue_custodial(&server, "frank").await;
    let (status, _) = server
        .admin(
            "POST",
            &format!(
                "/v1/certificates/{}/revoke",
                custodial["serial"].as_str().unwrap()
            ),
            Some(json!({"reason": "keyCompromise"})),
        )
        .await;
    assert_eq!(status, 200);
    let (status, answer) = server
        .admin("POST", "/v1/agents/frank/sign", Some(sign_body()))
        .await;
    assert_eq!(
        (status, code(&answer)),
        (403, Some("key_compromised")),
        "{answer}"
    );
    let (status, answer) = server
        .admin(
            "POST",
            "/v1/agents/frank/rotate-key",
            Some(json!({"reason": "keyCompromise"})),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = server
        .admin("POST", "/v1/agents/frank/sign", Some(sign_body()))
        .await;
    assert_eq!(status, 200, "{answer}");
}

/// Signs `digest` with the custodial key `key_id` in the server's key
/// store, outside keyward, as a thief who got there would: what a key
/// compromise means. On SoftHSM2 with the token's PIN (`pkcs11-tool`, the
/// key a token object); on a TPM with the key's blobs and the TPM itself
/// (tpm2-tools, beside a stopped keyward: see `Server::beside`). The
/// signature as r || s.
async fn sign_in_the_key_store_outside_keyward(
    server: &mut Server,
    key_id: &str,
    digest: &[u8; 32],
) -> Vec<u8> {
    let input = server.path("stolen-digest.bin");
    let output = server.path("stolen-signature.bin");
    std::fs::write(&input, digest).unwrap();
    match server.keys {
        Keys::SoftHsm => {
            let pin = std::fs::read_to_string(server.path("softhsm/user.pin")).unwrap();
            let (ok, out) = run(Command::new("pkcs11-tool")
                .arg("--module")
                .arg(keyward::app::embedded::find_softhsm_module().unwrap())
                .args([
                    "--login",
                    "--pin",
                    pin.trim(),
                    "--sign",
                    "--mechanism",
                    "ECDSA",
                ])
                // keyward's CKA_ID is the key id's bytes; pkcs11-tool
                // selects by it.
                .args(["--id", &hex::encode(key_id)])
                .arg("--input-file")
                .arg(&input)
                .arg("--output-file")
                .arg(&output)
                .env("SOFTHSM2_CONF", server.path("softhsm/softhsm2.conf")));
            assert!(ok, "{out}");
        }
        Keys::Swtpm => {
            let blob = |ext: &str| {
                let path = server.tpm_key_dir().join(format!("{key_id}.{ext}"));
                path.to_str().unwrap().to_owned()
            };
            let (public, private) = (blob("pub"), blob("priv"));
            let (input, output) = (input.to_str().unwrap(), output.to_str().unwrap());
            server
                .beside(|server| {
                    // keyward's storage primary, which the TPM derives again
                    // from its owner seed and this template (keys::tpm).
                    server.tpm2(
                        "createprimary",
                        &[
                            "-Q", "-C", "o", "-g", "sha256", "-G", "ecc256:aes128cfb",
                            "-a", "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda|restricted|decrypt",
                            "-c", "stolen-primary.ctx",
                        ],
                    );
                    server.tpm2("flushcontext", &["-t"]);
                    server.tpm2(
                        "load",
                        &["-Q", "-C", "stolen-primary.ctx", "-u", &public, "-r", &private, "-c", "stolen-key.ctx"],
                    );
                    server.tpm2("flushcontext", &["-t"]);
                    server.tpm2(
                        "sign",
                        &["-c", "stolen-key.ctx", "-g", "sha256", "-d", "-f", "plain", "-o", output, input],
                    );
                    server.tpm2("flushcontext", &["-t"]);
                })
                .await;
            // tpm2-tools' plain ECDSA signature is DER.
            let der = std::fs::read(output).unwrap();
            let signature = p256::ecdsa::Signature::from_der(&der).unwrap();
            return signature.to_bytes().to_vec();
        }
    }
    std::fs::read(output).unwrap()
}

fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// Finding 6: a signature made with a compromised key, checked "as of"
/// a time before the revocation.
async fn a_backdated_time_does_not_save_a_signature_by_a_compromised_key(backends: Backends) {
    // The thief signs in the key store itself, so on SoftHSM2 the key is a
    // token object; a TPM's keys are always its blobs.
    let config = match backends.keys {
        Keys::SoftHsm => common::TOKEN_STORAGE,
        Keys::Swtpm => "",
    };
    let mut server = Server::start_with_config(backends, config).await;
    let agent = register_agent_with(&server, "alpha", &[]).await;
    let certificate = issue_custodial(&server, "alpha").await;
    let before = time::OffsetDateTime::now_utc().unix_timestamp();
    let genuine = b"pay 10 to bob";
    let (status, signed) = server
        .admin(
            "POST",
            "/v1/agents/alpha/sign",
            Some(json!({"message_b64": B64.encode(genuine)})),
        )
        .await;
    assert_eq!(status, 200, "{signed}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, _) = server
        .admin(
            "POST",
            &format!(
                "/v1/certificates/{}/revoke",
                certificate["serial"].as_str().unwrap()
            ),
            Some(json!({"reason": "keyCompromise"})),
        )
        .await;
    assert_eq!(status, 200);

    let stolen = b"pay 1000 to mallory";
    let forged = sign_in_the_key_store_outside_keyward(
        &mut server,
        agent["key_id"].as_str().unwrap(),
        &Sha256::digest(stolen).into(),
    )
    .await;
    // A signature by the agent's key indeed, or "revoked" below would say
    // nothing.
    {
        use p256::ecdsa::signature::hazmat::PrehashVerifier;
        use p256::pkcs8::DecodePublicKey;
        let key = p256::ecdsa::VerifyingKey::from_public_key_pem(
            agent["public_key_pem"].as_str().unwrap(),
        )
        .unwrap();
        let signature = p256::ecdsa::Signature::from_slice(&forged).unwrap();
        key.verify_prehash(&Sha256::digest(stolen), &signature)
            .expect("the thief's signature is the agent key's");
    }
    let check = |message: &[u8], signature: &[u8], at: Option<i64>| {
        let mut body = json!({
            "agent": "alpha",
            "message_b64": B64.encode(message),
            "signature_b64": B64.encode(signature),
        });
        if let Some(at) = at {
            body["at"] = json!(rfc3339(at));
        }
        let server = &server;
        async move { server.admin("POST", "/v1/verify", Some(body)).await.1 }
    };
    let verdict = check(stolen, &forged, Some(before)).await;
    assert_eq!(
        (verdict["valid"].as_bool(), verdict["reason"].as_str()),
        (Some(false), Some("revoked")),
        "{verdict}"
    );
    assert_eq!(check(stolen, &forged, None).await["reason"], "revoked");
    // What keyward itself signed before the report still stands.
    let der = B64
        .decode(signed["signature_der_b64"].as_str().unwrap())
        .unwrap();
    let verdict = check(genuine, &der, Some(before)).await;
    assert_eq!(verdict["valid"], true, "{verdict}");
    let verdict = check(genuine, &der, None).await;
    assert_eq!(
        verdict["valid"], true,
        "whatever time is asked about: {verdict}"
    );
}

/// Finding 7: `rate_per_second = 1e-300` passed validation and the next
/// request panicked.
async fn a_policy_number_cannot_crash_a_request(db: Db) {
    let server = Server::start(db).await;
    let before = server.row_counts().await;
    for rate in ["1e-300", "5e-324", "1e300", "nan", "inf", "0.000001"] {
        let (status, answer) = server
            .admin(
                "POST",
                "/v1/policies",
                Some(json!({"content": format!("[roles.tiny]\nactions = [\"sign\"]\nrate_per_second = {rate}\nburst = 1\n")})),
            )
            .await;
        assert_eq!(
            (status, code(&answer)),
            (400, Some("invalid_policy")),
            "{rate}: {answer}"
        );
    }
    assert_eq!(
        server.row_counts().await,
        before,
        "a refused policy writes nothing"
    );
    // The slowest rate a policy may set: one a day.
    apply(
        &server,
        "[roles.tiny]\nactions = [\"sign\"]\nrate_per_second = 0.0000116\nburst = 1\n",
    )
    .await;
    let (tiny, _, _) = agent_client(&server, "tiny", &["tiny"]).await;
    let sign = || {
        tiny.post(format!("{}/v1/agents/tiny/sign", server.url))
            .json(&sign_body())
            .send()
    };
    assert_eq!(sign().await.unwrap().status(), 200);
    let refused = sign().await.unwrap();
    assert_eq!(refused.status(), 429);
    let retry: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((86_000..=86_400).contains(&retry), "{retry}");
    let (status, _) = server.request("GET", "/healthz", None, None).await;
    assert_eq!(status, 200);
}

/// Finding 8: an existing data directory open to other users was used as
/// it was, and the database was created 0644.
async fn keyward_refuses_a_data_directory_others_can_read(backends: Backends) {
    use std::os::unix::fs::PermissionsExt;
    let mut server = Server::start(backends).await;
    // Everything keyward made is its owner's alone, whatever the umask.
    let mut shared = Vec::new();
    for entry in walk(server.data_dir.path()) {
        let mode = std::fs::metadata(&entry).unwrap().permissions().mode();
        let ours = entry.ends_with("config.toml");
        if mode & 0o077 != 0 && !ours {
            shared.push(format!("{} {:o}", entry.display(), mode & 0o777));
        }
    }
    assert!(shared.is_empty(), "{shared:?}");
    server.stop();

    let dir = server.data_dir.path().to_owned();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let refused = start_and_wait(&dir, &server.database.url);
    assert!(
        !refused.status.success()
            && refused.text.contains("refusing to start")
            && refused.text.contains("chmod 700"),
        "{}",
        refused.text
    );
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    if backends.db == Db::Sqlite {
        let database = dir.join("keyward.db");
        std::fs::set_permissions(&database, std::fs::Permissions::from_mode(0o644)).unwrap();
        let refused = start_and_wait(&dir, &server.database.url);
        assert!(
            !refused.status.success() && refused.text.contains("keyward.db"),
            "{}",
            refused.text
        );
        std::fs::set_permissions(&database, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let server = server.restart().await;
    let (status, _) = server.request("GET", "/healthz", None, None).await;
    assert_eq!(status, 200, "a private directory starts as before");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![dir.to_owned()];
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

struct Exited {
    status: std::process::ExitStatus,
    text: String,
}

/// `keyward serve` on `dir`, expected to stop by itself.
fn start_and_wait(dir: &Path, database_url: &str) -> Exited {
    let mut child = Command::new(common::keyward_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .arg("--database-url")
        .arg(database_url)
        .args(common::config_args(dir))
        .env_remove("SOFTHSM2_CONF")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            return Exited {
                status: out.status,
                text: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    panic!("keyward started on a data directory others can read");
}

/// Finding 9: a request refused for bad input still spent a rate token.
async fn a_refused_request_costs_the_agent_no_rate(db: Db) {
    let server = Server::start(db).await;
    apply(
        &server,
        "[roles.slow]\nactions = [\"sign\", \"message\", \"issue_cert\"]\nmax_ttl_seconds = 300\nrate_per_second = 0.01\nburst = 1\n",
    )
    .await;
    let (alice, _, _) = agent_client(&server, "alice", &["slow"]).await;
    register_agent_with(&server, "bob", &[]).await;
    for (path, body, expected) in [
        (
            "/v1/agents/alice/sign",
            json!({"message_b64": "not base64!"}),
            "invalid_base64",
        ),
        (
            "/v1/agents/alice/sign",
            json!({"digest_sha256_b64": "AAAA"}),
            "invalid_digest",
        ),
        (
            "/v1/agents/alice/messages",
            json!({"to": "bob", "intent": "hi", "ttl_seconds": 0}),
            "invalid_ttl",
        ),
        (
            "/v1/agents/alice/messages",
            json!({"to": "bob", "intent": "caf\u{e9}"}),
            "invalid_intent",
        ),
        (
            "/v1/agents/alice/messages",
            json!({"to": "Bob!", "intent": "hi"}),
            "invalid_agent_name",
        ),
        (
            "/v1/agents/alice/certificates",
            json!({"ttl_seconds": 0}),
            "invalid_ttl",
        ),
        (
            "/v1/agents/alice/certificates",
            json!({"ttl_seconds": 600}),
            "invalid_ttl",
        ),
        (
            "/v1/agents/alice/certificates",
            json!({"csr_pem": "junk"}),
            "invalid_csr",
        ),
    ] {
        let (status, answer) = post(&alice, &server, path, body).await;
        assert_eq!(
            (status, code(&answer)),
            (400, Some(expected)),
            "{path}: {answer}"
        );
    }
    let (status, answer) = post(&alice, &server, "/v1/agents/alice/sign", sign_body()).await;
    assert_eq!(status, 200, "the one token is still there: {answer}");
    let (status, _) = post(&alice, &server, "/v1/agents/alice/sign", sign_body()).await;
    assert_eq!(status, 429, "and now it is spent");
}

/// Finding 10: one admin holding an admin token and an admin certificate
/// counted as two approvers.
async fn one_admin_with_two_credentials_is_one_approver(backends: Backends) {
    let mut server = Server::start(backends).await;
    // The bootstrap token is the admin "admin"'s; so is this certificate.
    let cert_dir = server.path("admin-cert");
    let (ok, out) = server
        .operator_beside([
            "admin",
            "cert-issue",
            "admin",
            "--out",
            cert_dir.to_str().unwrap(),
        ])
        .await;
    assert!(ok, "{out}");
    // And a second person's token.
    let (server, carol) = common::with_admin_token(server, "carol").await;
    let admin_by_cert = mtls_client(
        &server,
        &std::fs::read_to_string(cert_dir.join("cert.pem")).unwrap(),
        &cert_dir.join("key.pem"),
    );

    apply(
        &server,
        "[roles.guarded]\nactions = [\"sign\"]\nrequires_approval = true\napprovals_required = 2\n",
    )
    .await;
    let (alice, _, _) = agent_client(&server, "alice", &["guarded"]).await;
    let (status, held) = post(&alice, &server, "/v1/agents/alice/sign", sign_body()).await;
    assert_eq!(status, 202, "{held}");
    let approve = format!("/v1/approvals/{}/approve", held["id"].as_str().unwrap());

    let (status, first) = server.admin("POST", &approve, None).await;
    assert_eq!(
        (status, first["status"].as_str()),
        (200, Some("pending")),
        "{first}"
    );
    let (status, again) = post(&admin_by_cert, &server, &approve, json!({})).await;
    assert_eq!(
        (status, code(&again)),
        (409, Some("already_voted")),
        "the same person's certificate: {again}"
    );
    let (status, done) = server
        .request("POST", &approve, None, Some(carol.trim()))
        .await;
    assert_eq!(
        (status, done["status"].as_str()),
        (200, Some("completed")),
        "{done}"
    );
    let votes = server
        .sql("SELECT COUNT(DISTINCT admin) FROM approval_votes")
        .await;
    assert_eq!(votes, Some(2));
}

on_every_backend!(
    an_agent_cannot_forge_a_message_with_its_own_key_or_a_raw_signature,
    renewal_and_enrollment_go_through_the_policy,
    no_certificate_issued_while_an_agent_is_revoked_survives_it,
    a_third_party_cannot_spend_a_message_meant_for_another,
    key_compromise_revokes_every_certificate_of_the_key,
    keyward_refuses_a_data_directory_others_can_read,
    one_admin_with_two_credentials_is_one_approver,
    a_backdated_time_does_not_save_a_signature_by_a_compromised_key,
);

on_both_databases!(
    a_policy_number_cannot_crash_a_request,
    a_refused_request_costs_the_agent_no_rate,
);
