//! Agents that hold their key in their own TPM: attested enrollment against
//! a real swtpm whose EK certificate comes from swtpm's local CA, the
//! evidence checks one by one, and tpm2-tools as a peer nobody here wrote.

mod common;

use std::path::Path;
use std::process::Command;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use common::readers::{self, Purpose};
use common::swtpm::Swtpm;
use common::{run, Db, Server};
use der::Encode;
use keyward::attestation::tpm::evidence::CertifyEvidence;
use keyward::attestation::AttestationClaims;
use keyward::client::tpm_enrollment::{signing_key_template, AgentTpm, AgentTpmKey};
use keyward::keys::tpm::{TpmBackend, TpmConfig};
use keyward::keys::{KeyBackend, KeyId};
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use p256::pkcs8::DecodePublicKey;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::structures::Public;

/// A keyward that trusts swtpm's local CA for EK certificates.
async fn server_trusting_swtpm(db: Db) -> Server {
    let roots_parent = tempfile::tempdir().unwrap().keep();
    let roots = Swtpm::localca_roots(&roots_parent);
    Server::start_with_config(
        db,
        &format!(
            "[attestation.tpm]\nek_roots = {:?}\n",
            roots.display().to_string()
        ),
    )
    .await
}

/// Registers an agent-tpm agent; its enrollment token.
async fn agent_tpm(server: &Server, name: &str) -> String {
    let (status, body) = server
        .admin(
            "POST",
            "/v1/agents",
            Some(json!({"name": name, "scopes": [], "custody": "agent-tpm"})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["custody"], "agent-tpm");
    assert!(body["key_id"].is_null(), "keyward made no key for it");
    body["enrollment_token"].as_str().unwrap().to_owned()
}

async fn certificate_count(server: &Server) -> i64 {
    server
        .sql("SELECT COUNT(*) FROM certificates")
        .await
        .unwrap()
}

async fn challenge(server: &Server, tpm: &AgentTpm, token: &str) -> (u16, Value) {
    challenge_with(
        server,
        token,
        tpm.ek_certificate_der(),
        &tpm.ek_public().unwrap(),
        &tpm.ak_public().unwrap(),
    )
    .await
}

async fn challenge_with(
    server: &Server,
    token: &str,
    ek_certificate: Option<&[u8]>,
    ek_public: &[u8],
    ak_public: &[u8],
) -> (u16, Value) {
    server
        .request(
            "POST",
            "/v1/attestation/challenges",
            Some(json!({
                "enrollment_token": token,
                "ek_certificate_b64": ek_certificate.map(|c| B64.encode(c)),
                "ek_public_b64": B64.encode(ek_public),
                "ak_public_b64": B64.encode(ak_public),
            })),
            None,
        )
        .await
}

fn field(value: &Value, name: &str) -> Vec<u8> {
    B64.decode(value[name].as_str().unwrap()).unwrap()
}

/// Asserts that keyward refused with `status` and error `code`.
fn assert_refused(case: &str, got: (u16, Value), status: u16, code: &str) {
    assert_eq!(
        (got.0, got.1["error"]["code"].as_str().unwrap_or("")),
        (status, code),
        "{case}: {}",
        got.1
    );
}

/// What the agent computes from a challenge: the recovered secret.
fn activate(tpm: &mut AgentTpm, challenge: &Value) -> Vec<u8> {
    tpm.activate_credential(
        &field(challenge, "credential_blob_b64"),
        &field(challenge, "encrypted_secret_b64"),
    )
    .unwrap()
}

async fn present(
    server: &Server,
    token: &str,
    secret: &[u8],
    evidence: &CertifyEvidence,
) -> (u16, Value) {
    server
        .request(
            "POST",
            "/v1/attestation/tpm/certificates",
            Some(json!({
                "enrollment_token": token,
                "credential_b64": B64.encode(secret),
                "public_b64": B64.encode(&evidence.public),
                "certify_info_b64": B64.encode(&evidence.attest),
                "signature_b64": B64.encode(&evidence.signature),
                "ttl_seconds": 300,
            })),
            None,
        )
        .await
}

/// A key template like keyward's, with `fixedTPM` and `fixedParent` as
/// given: clear, the key could be duplicated out of the TPM.
fn key_template(fixed: bool) -> Public {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(fixed)
        .with_fixed_parent(fixed)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_sign_encrypt(true)
        .build()
        .unwrap();
    keyward::keys::tpm::signing_key_template_with(attributes).unwrap()
}

/// The DER of a PEM certificate. (x509-cert cannot parse it: its OID type
/// has no room for the attestation extension's 128-bit arc; x509-parser can.)
fn der_of_pem(pem: &str) -> Vec<u8> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    pem.contents
}

fn certificate_of(issued: &Value) -> Vec<u8> {
    der_of_pem(issued["certificate_pem"].as_str().unwrap())
}

fn attestation_claims(certificate: &[u8]) -> AttestationClaims {
    let (_, cert) = x509_parser::parse_x509_certificate(certificate).unwrap();
    let extension = cert
        .extensions()
        .iter()
        .find(|e| e.oid.as_bytes() == keyward::pki::profile::ID_PE_CMW.as_bytes())
        .expect("the certificate carries the attestation extension");
    assert!(!extension.critical);
    AttestationClaims::from_extension_value(extension.value).unwrap()
}

fn subject_key(certificate: &[u8]) -> p256::PublicKey {
    let (_, cert) = x509_parser::parse_x509_certificate(certificate).unwrap();
    p256::PublicKey::from_public_key_der(cert.public_key().raw).unwrap()
}

/// A key made by keyward's agent code in `tpm`, under `dir`.
fn tpm_key(tpm: &mut AgentTpm, dir: &Path, fixed: bool) -> AgentTpmKey {
    let template = if fixed {
        signing_key_template().unwrap()
    } else {
        key_template(false)
    };
    tpm.create_key(dir, template)
        .unwrap_or_else(|e| panic!("{e:#}"))
}

#[tokio::test]
async fn an_agent_enrolls_with_keyward_agent_enroll_and_its_key_provably_lives_in_its_tpm() {
    let tpm = Swtpm::start_with_ek_certificates();
    let server = server_trusting_swtpm(Db::Postgres).await;
    let token = agent_tpm(&server, "tpm-agent").await;
    let (ok, output, out) = enroll_with_cli(&server, &tpm, "tpm-agent", &token);
    assert!(ok, "{output}");

    // openssl, an outside verifier, accepts the certificate under keyward's CA.
    let cert_file = out.join("cert.pem");
    let (ok, output) = run(Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(server.path("ca.pem"))
        .arg("-untrusted")
        .arg(out.join("chain.pem"))
        .arg(&cert_file));
    assert!(ok, "{output}");

    // So do Go's crypto/x509 and pyca, for TLS client authentication; Go
    // reads the same claims from id-pe-cmw without keyward's code.
    let chain_file = out.join("leaf-and-chain.pem");
    std::fs::write(
        &chain_file,
        std::fs::read_to_string(&cert_file).unwrap()
            + &std::fs::read_to_string(out.join("chain.pem")).unwrap(),
    )
    .unwrap();
    let read = readers::accept(&server.path("ca.pem"), &[(Purpose::Client, &chain_file)]);

    let certificate = der_of_pem(&std::fs::read_to_string(&cert_file).unwrap());
    let claims = attestation_claims(&certificate);
    assert_eq!(read[0]["cmw"]["payload"]["format"], "tpm2-certify");
    assert_eq!(
        read[0]["cmw"]["payload"]["evidence_sha256"],
        claims.evidence_sha256.as_str()
    );
    assert_eq!(claims.format, "tpm2-certify");
    assert!(
        claims.key_location.contains("EK certificate sha256:"),
        "{}",
        claims.key_location
    );
    assert!(
        claims.key_location.contains("model swtpm"),
        "{}",
        claims.key_location
    );

    // The evidence is stored and served under the digest the certificate names.
    let digest = claims.evidence_sha256.clone();
    let (status, evidence) = server
        .admin("GET", &format!("/v1/attestations/{digest}"), None)
        .await;
    assert_eq!(status, 200, "{evidence}");

    // The certified key is the one in the agent's TPM: the TPM signs with
    // it (through keyward's own TPM backend, from the blobs the agent
    // kept), and the certificate's key verifies the signature.
    let description: Value =
        serde_json::from_slice(&std::fs::read(out.join("tpm-key.json")).unwrap()).unwrap();
    let key_id = KeyId::parse(description["key_id"].as_str().unwrap()).unwrap();
    let backend = TpmBackend::open(&TpmConfig {
        tcti: tpm.tcti(),
        key_dir: out.join("tpm-keys"),
    })
    .unwrap();
    let mut session = backend.open_session().unwrap();
    let attributes = session.attributes(&key_id).unwrap();
    assert!(attributes.never_extractable && !attributes.extractable);
    let digest: [u8; 32] = Sha256::digest(b"proof of possession").into();
    let signature = session.sign_digest(&key_id, &digest).unwrap();
    p256::ecdsa::VerifyingKey::from(subject_key(&certificate))
        .verify_prehash(&digest, &signature)
        .expect("the certificate's key is the TPM's key");
    drop(session);

    // The token paid for one enrollment.
    let (ok, output, _) = enroll_with_cli(&server, &tpm, "tpm-agent", &token);
    assert!(!ok, "a spent token enrolled again: {output}");
    assert!(output.contains("invalid_enrollment_token"), "{output}");
}

#[tokio::test]
async fn a_swtpm_whose_control_channel_is_not_at_port_plus_one_is_reached_through_a_relay() {
    // libtss2 alone refuses this TPM: it wants the control channel at
    // port + 1. keyward relays, and the TPM works in full.
    let tpm = Swtpm::start_with_control_channel_elsewhere();
    {
        use std::str::FromStr;
        let conf = tss_esapi::TctiNameConf::from_str(&tpm.tcti()).unwrap();
        assert!(
            tss_esapi::Context::new(conf).is_err(),
            "libtss2 reached this swtpm without help: the relay is not being tested"
        );
    }
    let work = tempfile::tempdir().unwrap();
    let mut agent = AgentTpm::open(&tpm.tcti()).unwrap();
    let key = tpm_key(&mut agent, work.path(), true);
    let digest: [u8; 32] = Sha256::digest(b"through the relay").into();
    let signature = agent.sign_digest(&key, &digest).unwrap();
    let public = keyward::attestation::tpm::evidence::PublicArea::parse(
        &tss_esapi::traits::Marshall::marshall(&key.public).unwrap(),
        "key",
    )
    .unwrap()
    .certifiable_key()
    .unwrap();
    p256::ecdsa::VerifyingKey::from(public)
        .verify_prehash(&digest, &signature)
        .unwrap();
}

#[tokio::test]
async fn a_tpm_key_signs_again_after_the_tpm_restarts() {
    let mut tpm = Swtpm::start_with_ek_certificates();
    let work = tempfile::tempdir().unwrap();
    let (key_id, public) = {
        let mut agent = AgentTpm::open(&tpm.tcti()).unwrap();
        let key = tpm_key(&mut agent, work.path(), true);
        let public = keyward::attestation::tpm::evidence::PublicArea::parse(
            &tss_esapi::traits::Marshall::marshall(&key.public).unwrap(),
            "key",
        )
        .unwrap()
        .certifiable_key()
        .unwrap();
        (key.key_id.clone(), public)
    };
    tpm.restart();
    let backend = TpmBackend::open(&TpmConfig {
        tcti: tpm.tcti(),
        key_dir: work.path().to_owned(),
    })
    .unwrap();
    let mut session = backend.open_session().unwrap();
    let digest: [u8; 32] = Sha256::digest(b"after restart").into();
    let signature = session.sign_digest(&key_id, &digest).unwrap();
    p256::ecdsa::VerifyingKey::from(public)
        .verify_prehash(&digest, &signature)
        .unwrap();
}

#[tokio::test]
async fn each_kind_of_bad_evidence_is_refused_with_its_own_code_and_issues_nothing() {
    let swtpm = Swtpm::start_with_ek_certificates();
    let server = server_trusting_swtpm(Db::Sqlite).await;
    let keys = tempfile::tempdir().unwrap();
    // swtpm serves one connection at a time: read this before the agent's.
    let other_ek = other_ek_public(&swtpm.tcti());
    let mut tpm = AgentTpm::open(&swtpm.tcti()).unwrap();
    let token = agent_tpm(&server, "alice").await;
    let before = certificate_count(&server).await;

    let expect = assert_refused;

    // Challenges that must not be issued.
    let (status, body) = server
        .request(
            "POST",
            "/v1/attestation/challenges",
            Some(
                json!({"enrollment_token": "kwe_00", "ek_certificate_b64": "AA==",
                        "ek_public_b64": "AA==", "ak_public_b64": "AA=="}),
            ),
            None,
        )
        .await;
    expect(
        "unknown token",
        (status, body),
        401,
        "invalid_enrollment_token",
    );
    let ek_cert = tpm.ek_certificate_der().unwrap().to_vec();
    let ek_public = tpm.ek_public().unwrap();
    let ak_public = tpm.ak_public().unwrap();
    let got = challenge_with(
        &server,
        &token,
        Some(&ek_cert),
        &ek_public,
        b"not a public area",
    )
    .await;
    expect("garbage AK", got, 400, "tpm_evidence_malformed");
    let (status, body) = server
        .request(
            "POST",
            "/v1/attestation/challenges",
            Some(
                json!({"enrollment_token": token, "ek_certificate_b64": "***",
                        "ek_public_b64": "AA==", "ak_public_b64": "AA=="}),
            ),
            None,
        )
        .await;
    expect("bad base64", (status, body), 400, "invalid_base64");

    // An AK that is not restricted could sign anything, so its signature
    // would prove nothing: here, an ordinary signing key poses as the AK.
    let plain = tpm_key(&mut tpm, keys.path(), true);
    let plain_public = tss_esapi::traits::Marshall::marshall(&plain.public).unwrap();
    let got = challenge_with(&server, &token, Some(&ek_cert), &ek_public, &plain_public).await;
    expect("unrestricted AK", got, 403, "ak_not_restricted");

    // The EK public area of another EK (the TCG P-256 template) with this
    // TPM's RSA EK certificate.
    let got = challenge_with(&server, &token, Some(&ek_cert), &other_ek, &ak_public).await;
    expect("EK key mismatch", got, 403, "ek_key_mismatch");

    // Challenges are bounded per agent: eight open ones at most.
    let tokens_before = server
        .sql("SELECT COUNT(*) FROM tpm_challenges")
        .await
        .unwrap();
    for _ in 0..8 {
        let (status, body) = challenge(&server, &tpm, &token).await;
        assert_eq!(status, 201, "{body}");
    }
    let (status, body) = challenge(&server, &tpm, &token).await;
    assert_refused(
        "too many challenges",
        (status, body),
        429,
        "too_many_challenges",
    );
    assert_eq!(
        server.sql("SELECT COUNT(*) FROM tpm_challenges").await,
        Some(tokens_before + 8)
    );
    server.sql("UPDATE tpm_challenges SET expires_at = 1").await;

    // The happy challenge, to build the evidence cases on.
    let (status, ch) = challenge(&server, &tpm, &token).await;
    assert_eq!(status, 201, "{ch}");
    let nonce = field(&ch, "nonce_b64");
    assert_eq!(nonce.len(), 32);
    let secret = activate(&mut tpm, &ch);
    let key = tpm_key(&mut tpm, keys.path(), true);
    let good = tpm.certify(&key, &nonce).unwrap();

    expect(
        "wrong secret",
        present(&server, &token, &[7u8; 32], &good).await,
        403,
        "credential_secret_mismatch",
    );

    let mut other_key_public = good.clone();
    other_key_public.public = plain_public.clone();
    expect(
        "certify info for a different key",
        present(&server, &token, &secret, &other_key_public).await,
        403,
        "certified_name_mismatch",
    );

    let mut tampered = good.clone();
    let last = tampered.attest.len() - 1;
    tampered.attest[last] ^= 0x01;
    expect(
        "tampered attest bytes",
        present(&server, &token, &secret, &tampered).await,
        403,
        "attest_signature_invalid",
    );

    let mut not_tpm = good.clone();
    not_tpm.attest[0] = 0x00;
    expect(
        "attest without TPM_GENERATED_VALUE",
        present(&server, &token, &secret, &not_tpm).await,
        403,
        "attest_not_tpm_generated",
    );

    let duplicable = tpm_key(&mut tpm, keys.path(), false);
    let duplicable_evidence = tpm.certify(&duplicable, &nonce).unwrap();
    expect(
        "duplicable key (fixedTPM clear)",
        present(&server, &token, &secret, &duplicable_evidence).await,
        403,
        "key_duplicable",
    );

    let stale = tpm.certify(&key, &[0x00, 0xff, 0x55, 0xaa]).unwrap();
    expect(
        "unknown qualifying data",
        present(&server, &token, &secret, &stale).await,
        403,
        "stale_nonce",
    );

    // Another agent's nonce, presented with this agent's token.
    let bob_token = agent_tpm(&server, "bob").await;
    let bob_tpm_keys = tempfile::tempdir().unwrap();
    let (bob_evidence, bob_secret) = {
        drop(tpm);
        let mut bob = AgentTpm::open(&swtpm.tcti()).unwrap();
        let (status, bob_ch) = challenge(&server, &bob, &bob_token).await;
        assert_eq!(status, 201, "{bob_ch}");
        let bob_secret = activate(&mut bob, &bob_ch);
        let bob_key = tpm_key(&mut bob, bob_tpm_keys.path(), true);
        let evidence = bob.certify(&bob_key, &field(&bob_ch, "nonce_b64")).unwrap();
        (evidence, bob_secret)
    };
    expect(
        "nonce issued to another agent",
        present(&server, &token, &bob_secret, &bob_evidence).await,
        403,
        "nonce_other_agent",
    );

    // Nothing above wrote a certificate.
    assert_eq!(certificate_count(&server).await, before);

    // The good evidence is accepted once...
    let (status, issued) = present(&server, &token, &secret, &good).await;
    assert_eq!(status, 201, "{issued}");
    let certificate = certificate_of(&issued);
    assert_eq!(attestation_claims(&certificate).format, "tpm2-certify");
    assert_eq!(certificate_count(&server).await, before + 1);

    // ...and replayed, even with a fresh token, is refused.
    let fresh = common::enrollment_token(&server, "alice").await;
    expect(
        "replayed evidence",
        present(&server, &fresh, &secret, &good).await,
        409,
        "nonce_replayed",
    );

    // An expired nonce: the challenge's clock is moved past its end.
    let mut tpm = AgentTpm::open(&swtpm.tcti()).unwrap();
    let (status, ch) = challenge(&server, &tpm, &fresh).await;
    assert_eq!(status, 201, "{ch}");
    let secret = activate(&mut tpm, &ch);
    let expiring = tpm.certify(&key, &field(&ch, "nonce_b64"));
    server
        .sql("UPDATE tpm_challenges SET expires_at = 1 WHERE used_at IS NULL")
        .await;
    let expiring = expiring.unwrap();
    expect(
        "expired nonce",
        present(&server, &fresh, &secret, &expiring).await,
        403,
        "nonce_expired",
    );
    // The janitor's sweep forgets long-expired challenges; their evidence
    // is then stale, and still refused.
    let swept = server
        .store()
        .await
        .delete_expired_tpm_challenges(2)
        .await
        .unwrap();
    assert!(swept >= 1, "{swept}");
    expect(
        "evidence for a swept challenge",
        present(&server, &fresh, &secret, &expiring).await,
        403,
        "stale_nonce",
    );
    assert_eq!(certificate_count(&server).await, before + 1);

    // An agent-tpm agent's token is no use on the CSR route, and trying
    // does not spend it; nor does an admin issue it a certificate directly.
    let (_, csr) = common::key_and_csr(keys.path(), "alice");
    let (status, body) = common::enroll(&server, &fresh, &csr).await;
    assert_refused(
        "attestation required",
        (status, body),
        403,
        "attestation_required",
    );
    let (status, body) = server
        .admin(
            "POST",
            "/v1/agents/alice/certificates",
            Some(json!({"csr_pem": csr})),
        )
        .await;
    assert_refused(
        "attestation required",
        (status, body),
        403,
        "attestation_required",
    );
    assert_eq!(certificate_count(&server).await, before + 1);
}

/// The public area of the TCG-template P-256 EK: a real EK of this TPM,
/// but not the one the RSA EK certificate certifies.
fn other_ek_public(tcti: &str) -> Vec<u8> {
    use std::str::FromStr;
    let mut ctx =
        tss_esapi::Context::new(tss_esapi::TctiNameConf::from_str(tcti).unwrap()).unwrap();
    let ek = tss_esapi::abstraction::ek::create_ek_object(
        &mut ctx,
        tss_esapi::interface_types::algorithm::AsymmetricAlgorithm::Ecc,
        tss_esapi::abstraction::DefaultKey,
    )
    .unwrap();
    let (public, _, _) = ctx.read_public(ek).unwrap();
    ctx.flush_context(ek.into()).unwrap();
    tss_esapi::traits::Marshall::marshall(&public).unwrap()
}

#[tokio::test]
async fn an_ek_certificate_from_an_untrusted_root_or_no_roots_at_all_gets_no_challenge() {
    let swtpm = Swtpm::start_with_ek_certificates();
    let tpm = AgentTpm::open(&swtpm.tcti()).unwrap();

    // Roots that are not swtpm's: another CA altogether.
    let unrelated = Server::start(Db::Sqlite).await;
    let roots = tempfile::tempdir().unwrap();
    std::fs::copy(unrelated.path("ca.pem"), roots.path().join("other.pem")).unwrap();
    let server = Server::start_with_config(
        Db::Sqlite,
        &format!(
            "[attestation.tpm]\nek_roots = {:?}\n",
            roots.path().display().to_string()
        ),
    )
    .await;
    let token = agent_tpm(&server, "mallory").await;
    let (status, body) = challenge(&server, &tpm, &token).await;
    assert_refused("ek untrusted", (status, body), 403, "ek_untrusted");

    // No roots configured: TPM enrollment is off.
    let token = agent_tpm(&unrelated, "mallory").await;
    let (status, body) = challenge(&unrelated, &tpm, &token).await;
    assert_refused(
        "ek roots not configured",
        (status, body),
        403,
        "ek_roots_not_configured",
    );
    for keyward in [&server, &unrelated] {
        assert_eq!(
            keyward.sql("SELECT COUNT(*) FROM tpm_challenges").await,
            Some(0)
        );
    }
}

#[tokio::test]
async fn evidence_inside_a_csr_takes_the_same_checks_and_gets_a_certificate() {
    use x509_cert::attr::Attribute;
    use x509_cert::request::{CertReq, CertReqInfo};

    let swtpm = Swtpm::start_with_ek_certificates();
    let server = server_trusting_swtpm(Db::Sqlite).await;
    let token = agent_tpm(&server, "csr-agent").await;
    let keys = tempfile::tempdir().unwrap();
    let mut tpm = AgentTpm::open(&swtpm.tcti()).unwrap();
    let (status, ch) = challenge(&server, &tpm, &token).await;
    assert_eq!(status, 201, "{ch}");
    let secret = activate(&mut tpm, &ch);
    let key = tpm_key(&mut tpm, keys.path(), true);
    let evidence = tpm.certify(&key, &field(&ch, "nonce_b64")).unwrap();

    // A PKCS#10 request signed in the TPM by the key itself, carrying the
    // evidence in its id-aa-attestation attribute.
    let public = keyward::attestation::tpm::evidence::PublicArea::parse(&evidence.public, "key")
        .unwrap()
        .certifiable_key()
        .unwrap();
    let spki = keyward::pki::profile::spki_of(&public);
    let value = keyward::attestation::tpm::csr::attestation_attribute_value(&evidence).unwrap();
    let info = CertReqInfo {
        version: x509_cert::request::Version::V1,
        subject: "CN=csr-agent".parse().unwrap(),
        public_key: spki,
        attributes: vec![Attribute {
            oid: keyward::attestation::tpm::csr::ID_AA_ATTESTATION,
            values: vec![value].try_into().unwrap(),
        }]
        .try_into()
        .unwrap(),
    };
    let digest: [u8; 32] = Sha256::digest(info.to_der().unwrap()).into();
    let signature = tpm.sign_digest(&key, &digest).unwrap();
    let csr = CertReq {
        info,
        algorithm: keyward::pki::profile::ecdsa_with_sha256(),
        signature: der::asn1::BitString::from_bytes(signature.to_der().as_bytes()).unwrap(),
    };
    let csr_pem = der::EncodePem::to_pem(&csr, der::pem::LineEnding::LF).unwrap();
    let (status, issued) = server
        .request(
            "POST",
            "/v1/attestation/tpm/certificates",
            Some(json!({
                "enrollment_token": token,
                "credential_b64": B64.encode(&secret),
                "csr_pem": csr_pem,
            })),
            None,
        )
        .await;
    assert_eq!(status, 201, "{issued}");
    let certificate = certificate_of(&issued);
    assert_eq!(subject_key(&certificate), public);
    assert_eq!(attestation_claims(&certificate).format, "tpm2-certify");
}

/// Runs a tpm2-tools program against `tcti` in `dir`, then flushes what it
/// left loaded: without a resource manager, swtpm keeps transient objects
/// across connections and has three slots.
fn tpm2(tcti: &str, dir: &Path, program: &str, args: &[&str]) {
    let (ok, output) = run(Command::new(program)
        .args(args)
        .current_dir(dir)
        .env("TPM2TOOLS_TCTI", tcti));
    assert!(ok, "{program} {args:?}: {output}");
    let (ok, output) = run(Command::new("tpm2_flushcontext")
        .arg("-t")
        .current_dir(dir)
        .env("TPM2TOOLS_TCTI", tcti));
    assert!(ok, "tpm2_flushcontext -t: {output}");
}

/// tpm2-tools' credential file: magic, version, TPM2B_ID_OBJECT,
/// TPM2B_ENCRYPTED_SECRET.
fn tpm2_tools_credential(challenge: &Value) -> Vec<u8> {
    let mut file = 0xBADC_C0DEu32.to_be_bytes().to_vec();
    file.extend(1u32.to_be_bytes());
    for name in ["credential_blob_b64", "encrypted_secret_b64"] {
        let part = field(challenge, name);
        file.extend((part.len() as u16).to_be_bytes());
        file.extend(part);
    }
    file
}

#[tokio::test]
async fn tpm2_tools_make_the_ek_ak_activation_and_key_and_keyward_verifies_them() {
    let swtpm = Swtpm::start_with_ek_certificates();
    let tcti = swtpm.tcti();
    let server = server_trusting_swtpm(Db::Sqlite).await;
    let token = agent_tpm(&server, "peer").await;
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();

    // EK, its certificate and an AK, by tpm2-tools.
    tpm2(
        &tcti,
        dir,
        "tpm2_createek",
        &["-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub"],
    );
    tpm2(
        &tcti,
        dir,
        "tpm2_createak",
        &[
            "-C", "ek.ctx", "-c", "ak.ctx", "-G", "ecc", "-g", "sha256", "-s", "ecdsa", "-u",
            "ak.pub", "-n", "ak.name",
        ],
    );
    tpm2(&tcti, dir, "tpm2_nvread", &["0x01c00002", "-o", "ek.der"]);
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
    let (status, ch) = challenge_with(
        &server,
        &token,
        Some(&read("ek.der")),
        &read("ek.pub"),
        &read("ak.pub"),
    )
    .await;
    assert_eq!(status, 201, "{ch}");

    // tpm2_activatecredential recovers keyward's secret: the software
    // MakeCredential agrees with a TPM nobody here programmed.
    std::fs::write(dir.join("cred.file"), tpm2_tools_credential(&ch)).unwrap();
    tpm2(
        &tcti,
        dir,
        "tpm2_startauthsession",
        &["--policy-session", "-S", "session.ctx"],
    );
    tpm2(
        &tcti,
        dir,
        "tpm2_policysecret",
        &["-S", "session.ctx", "-c", "e"],
    );
    tpm2(
        &tcti,
        dir,
        "tpm2_activatecredential",
        &[
            "-c",
            "ak.ctx",
            "-C",
            "ek.ctx",
            "-i",
            "cred.file",
            "-o",
            "secret.out",
            "-P",
            "session:session.ctx",
        ],
    );
    tpm2(&tcti, dir, "tpm2_flushcontext", &["session.ctx"]);
    let secret = read("secret.out");

    // The new key, by tpm2-tools; it and the AK are made persistent so
    // that keyward's certify code can reach them by handle.
    tpm2(
        &tcti,
        dir,
        "tpm2_createprimary",
        &["-C", "o", "-c", "srk.ctx"],
    );
    tpm2(
        &tcti,
        dir,
        "tpm2_create",
        &[
            "-C",
            "srk.ctx",
            "-G",
            "ecc256:ecdsa-sha256",
            "-a",
            "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign",
            "-u",
            "key.pub",
            "-r",
            "key.priv",
        ],
    );
    tpm2(
        &tcti,
        dir,
        "tpm2_load",
        &[
            "-C", "srk.ctx", "-u", "key.pub", "-r", "key.priv", "-c", "key.ctx",
        ],
    );
    tpm2(
        &tcti,
        dir,
        "tpm2_evictcontrol",
        &["-C", "o", "-c", "ak.ctx", "0x81010101"],
    );
    tpm2(
        &tcti,
        dir,
        "tpm2_evictcontrol",
        &["-C", "o", "-c", "key.ctx", "0x81010102"],
    );

    // Only the certify step is keyward's: tpm2_certify cannot set the
    // qualifying data.
    let (attest, signature) = {
        use std::str::FromStr;
        use tss_esapi::handles::{PersistentTpmHandle, TpmHandle};
        let mut ctx =
            tss_esapi::Context::new(tss_esapi::TctiNameConf::from_str(&tcti).unwrap()).unwrap();
        let mut handle = |raw: u32| {
            ctx.tr_from_tpm_public(TpmHandle::Persistent(
                PersistentTpmHandle::new(raw).unwrap(),
            ))
            .unwrap()
        };
        let ak = handle(0x8101_0101);
        let key = handle(0x8101_0102);
        keyward::client::tpm_enrollment::certify_object(
            &mut ctx,
            key,
            ak.into(),
            &field(&ch, "nonce_b64"),
        )
        .unwrap()
    };
    let evidence = CertifyEvidence {
        public: read("key.pub"),
        attest,
        signature,
    };
    let (status, issued) = present(&server, &token, &secret, &evidence).await;
    assert_eq!(status, 201, "{issued}");
    let certified = keyward::attestation::tpm::evidence::PublicArea::parse(&read("key.pub"), "key")
        .unwrap()
        .certifiable_key()
        .unwrap();
    assert_eq!(subject_key(&certificate_of(&issued)), certified);

    // tpm2_certify's own output carries the fixed qualifying data 00ff55aa:
    // stale, whatever else is right about it.
    tpm2(
        &tcti,
        dir,
        "tpm2_certify",
        &[
            "-C",
            "0x81010101",
            "-c",
            "0x81010102",
            "-g",
            "sha256",
            "-o",
            "attest.out",
            "-s",
            "sig.out",
        ],
    );
    let from_tpm2_certify = CertifyEvidence {
        public: read("key.pub"),
        attest: read("attest.out"),
        signature: read("sig.out"),
    };
    assert_eq!(&from_tpm2_certify.attest[..4], b"\xffTCG");
    let fresh = common::enrollment_token(&server, "peer").await;
    let (status, body) = present(&server, &fresh, &secret, &from_tpm2_certify).await;
    assert_refused("stale nonce", (status, body), 403, "stale_nonce");
}

/// keyward on an allow-list only: the TPM's EK fingerprint, as `keyward
/// agent ek-fingerprint` prints it, is the whole trust decision.
async fn server_with_allowlist(fingerprints: &[&str]) -> Server {
    let dir = tempfile::tempdir().unwrap().keep();
    let file = dir.join("ek-allowlist");
    std::fs::write(&file, format!("# lab TPMs\n{}\n", fingerprints.join("\n"))).unwrap();
    Server::start_with_config(
        Db::Sqlite,
        &format!(
            "[attestation.tpm]\nek_allowlist = {:?}\n",
            file.display().to_string()
        ),
    )
    .await
}

fn enroll_with_cli(
    server: &Server,
    tpm: &Swtpm,
    name: &str,
    token: &str,
) -> (bool, String, std::path::PathBuf) {
    let work = tempfile::tempdir().unwrap().keep();
    let token_file = work.join("token");
    // With a trailing newline, as `echo` or an editor leaves it.
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let out = work.join("out");
    let (ok, output) = run(Command::new(common::keyward_bin())
        .args(["agent", "enroll", name, "--tpm", &tpm.tcti()])
        .args(["--url", &server.url])
        .arg("--ca")
        .arg(server.path("ca.pem"))
        .arg("--enrollment-token-file")
        .arg(&token_file)
        .arg("--out")
        .arg(&out));
    (ok, output, out)
}

#[tokio::test]
async fn a_tpm_without_an_ek_certificate_enrolls_only_if_its_ek_is_on_the_allow_list() {
    let listed = Swtpm::start();
    let unlisted = Swtpm::start();
    let (ok, fingerprint) = run(Command::new(common::keyward_bin()).args([
        "agent",
        "ek-fingerprint",
        "--tpm",
        &listed.tcti(),
    ]));
    assert!(ok, "{fingerprint}");
    let fingerprint = fingerprint.trim().to_owned();
    // The same digest as tpm2-tools and openssl compute for the TCG EK.
    let work = tempfile::tempdir().unwrap();
    tpm2(
        &listed.tcti(),
        work.path(),
        "tpm2_createek",
        &["-c", "ek.ctx", "-G", "rsa", "-u", "ek.pem", "-f", "pem"],
    );
    let (ok, der) = run(Command::new("openssl")
        .args(["pkey", "-pubin", "-outform", "DER", "-in"])
        .arg(work.path().join("ek.pem"))
        .arg("-out")
        .arg(work.path().join("ek.der")));
    assert!(ok, "{der}");
    let expected = hex::encode(Sha256::digest(
        std::fs::read(work.path().join("ek.der")).unwrap(),
    ));
    assert_eq!(fingerprint, expected);
    let server = server_with_allowlist(&[&fingerprint]).await;

    let token = agent_tpm(&server, "listed").await;
    let (ok, output, out) = enroll_with_cli(&server, &listed, "listed", &token);
    assert!(ok, "{output}");
    let certificate = der_of_pem(&std::fs::read_to_string(out.join("cert.pem")).unwrap());
    let claims = attestation_claims(&certificate);
    assert_eq!(claims.format, "tpm2-certify");
    assert!(
        claims.key_location.contains(&format!(
            "allow-listed EK, EK public key sha256:{fingerprint}"
        )),
        "{}",
        claims.key_location
    );

    let before = certificate_count(&server).await;
    let token = agent_tpm(&server, "unlisted").await;
    let (ok, output, _) = enroll_with_cli(&server, &unlisted, "unlisted", &token);
    assert!(!ok && output.contains("ek_not_allowed"), "{output}");
    assert_eq!(certificate_count(&server).await, before);
}

#[tokio::test]
async fn with_roots_only_a_tpm_without_an_ek_certificate_is_told_it_needs_one() {
    let swtpm = Swtpm::start();
    let server = server_trusting_swtpm(Db::Sqlite).await;
    let token = agent_tpm(&server, "nocert").await;
    let (ok, output, _) = enroll_with_cli(&server, &swtpm, "nocert", &token);
    assert!(
        !ok && output.contains("ek_certificate_required"),
        "{output}"
    );
    assert_eq!(
        server.sql("SELECT COUNT(*) FROM tpm_challenges").await,
        Some(0)
    );
}
