//! The foundation, end to end: a keyward process with its keys on a real
//! SoftHSM2 token and in a real swtpm, on SQLite and on PostgreSQL, driven
//! over HTTPS like an operator would.

mod common;

use std::process::Command;

use common::{run, Backends, Db, Keys, Server};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use x509_parser::prelude::*;

/// DER content octets of id-pe-cmw, the attestation extension's OID.
fn attestation_oid() -> Vec<u8> {
    keyward::pki::profile::ID_PE_CMW.as_bytes().to_vec()
}

async fn create_agent(server: &Server, name: &str) -> Value {
    let (status, body) = server
        .admin(
            "POST",
            "/v1/agents",
            Some(json!({"name": name, "scopes": ["orders:read"]})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    body
}

fn write(dir: &std::path::Path, name: &str, contents: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

fn openssl_verify(server: &Server, issued: &Value) -> (bool, String) {
    let dir = server.data_dir.path();
    let leaf = write(dir, "leaf.pem", issued["certificate_pem"].as_str().unwrap());
    let chain = write(dir, "chain.pem", issued["chain_pem"].as_str().unwrap());
    run(Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(server.path("ca.pem"))
        .arg("-untrusted")
        .arg(chain)
        .arg(leaf))
}

/// The default: the agent's key is generated on the token and kept wrapped
/// in the database, under a wrapping key that never leaves the token.
async fn a_registered_agent_gets_a_spiffe_id_and_a_key_wrapped_by_the_token(db: Db) {
    let server = Server::start(db).await;
    let agent = create_agent(&server, "alpha").await;
    assert_eq!(agent["spiffe_id"], "spiffe://keyward.local/agent/alpha");
    let key_id = agent["key_id"].as_str().unwrap();
    assert!(server.custodial_key_held(key_id).await);
    let listing = server.token_private_keys();
    assert!(
        !listing.contains(&format!("label:      {key_id}")),
        "a wrapped key is no token object: {listing}"
    );
    assert_service_keys_are_hardware_resident(&listing);
    // The wrapping key: on the token, private, sensitive, never
    // extractable, trusted (the one key wrapped keys may leave under).
    let secret_keys = server.token_objects("secrkey");
    let wrapping: Vec<&str> = secret_keys
        .split("Secret Key Object")
        .filter(|k| k.contains("keyward-wrapping-key"))
        .collect();
    assert_eq!(wrapping.len(), 1, "{secret_keys}");
    assert!(
        wrapping[0].contains("sensitive") && wrapping[0].contains("never extractable"),
        "{secret_keys}"
    );
    assert!(
        wrapping[0].contains("Usage:      wrap, unwrap") || wrapping[0].contains("wrap, unwrap"),
        "{secret_keys}"
    );
    assert!(
        !server
            .token_objects_without_login("secrkey")
            .contains("keyward-wrapping-key"),
        "the wrapping key is private: no session without the PIN sees it"
    );

    let (status, signed) = server
        .admin(
            "POST",
            "/v1/agents/alpha/sign",
            Some(json!({"message_b64": "aGk="})),
        )
        .await;
    assert_eq!(status, 200, "{signed}");
    assert_eq!(signed["key_id"], key_id);
    let (status, fetched) = server.admin("GET", "/v1/agents/alpha", None).await;
    assert_eq!(status, 200);
    assert_eq!(fetched["key_id"], agent["key_id"]);
    assert!(
        fetched.get("key_wrapped").is_none(),
        "the blob is not served: {fetched}"
    );
}

/// With `custodial_storage = "token"`, one token object per agent.
async fn a_registered_agent_gets_a_spiffe_id_and_a_key_on_the_token(db: Db) {
    let server = Server::start_with_config(db, common::TOKEN_STORAGE).await;
    let agent = create_agent(&server, "alpha").await;
    assert_eq!(agent["spiffe_id"], "spiffe://keyward.local/agent/alpha");
    assert!(agent["public_key_pem"]
        .as_str()
        .unwrap()
        .starts_with("-----BEGIN PUBLIC KEY-----"));
    let key_id = agent["key_id"].as_str().unwrap();

    let listing = server.token_private_keys();
    assert!(
        listing.contains(&format!("label:      {key_id}")),
        "{listing}"
    );
    assert_eq!(server.wrapped_key_count().await, 0);
    assert!(
        listing.split("Private Key Object").skip(1).count() > common::SERVICE_KEYS,
        "CA, attestation and agent keys: {listing}"
    );
    assert_service_keys_are_hardware_resident(&listing);

    let (status, listed) = server.admin("GET", "/v1/agents", None).await;
    assert_eq!(status, 200);
    assert_eq!(listed["agents"][0]["name"], "alpha");
    let (status, fetched) = server.admin("GET", "/v1/agents/alpha", None).await;
    assert_eq!(status, 200);
    assert_eq!(fetched["key_id"], agent["key_id"]);
}

/// On a TPM, the counterpart: the agent's key is a blob pair in the key
/// directory (owner-only), loadable only in that TPM, none wrapped in the
/// database; and every key there, keyward's own included, is bound to the
/// TPM and good for signing only, as `tpm2_print` (tpm2-tools, a reader
/// keyward did not write) reads its public area.
async fn a_registered_agent_gets_a_spiffe_id_and_a_key_blob_in_the_tpm_key_directory(
    backends: Backends,
) {
    use std::os::unix::fs::PermissionsExt;
    let server = Server::start(backends).await;
    let agent = create_agent(&server, "alpha").await;
    assert_eq!(agent["spiffe_id"], "spiffe://keyward.local/agent/alpha");
    let key_id = agent["key_id"].as_str().unwrap();

    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&server.tpm_key_dir()), 0o700);
    for ext in ["pub", "priv"] {
        let blob = server.tpm_key_dir().join(format!("{key_id}.{ext}"));
        assert_eq!(mode(&blob), 0o600, "{}", blob.display());
    }
    assert_eq!(server.wrapped_key_count().await, 0);
    let ids = server.key_store_ids();
    assert!(ids.contains(key_id), "{ids:?}");
    assert_eq!(ids.len(), common::SERVICE_KEYS + 1, "{ids:?}");
    for id in &ids {
        let public = server.tpm_key_dir().join(format!("{id}.pub"));
        let printed = server.tpm2("print", &["-t", "TPM2B_PUBLIC", public.to_str().unwrap()]);
        let attributes = printed
            .split("attributes:")
            .nth(1)
            .and_then(|a| a.lines().find_map(|l| l.trim().strip_prefix("value: ")))
            .unwrap_or_else(|| panic!("{id}: {printed}"));
        assert_eq!(
            attributes, "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign",
            "{id}"
        );
        assert!(printed.contains("NIST p256"), "{id}: {printed}");
    }

    let (status, signed) = server
        .admin(
            "POST",
            "/v1/agents/alpha/sign",
            Some(json!({"message_b64": "aGk="})),
        )
        .await;
    assert_eq!(status, 200, "{signed}");
    assert_eq!(signed["key_id"], key_id);
}

/// Every private key on the token, the CA's included: generated there,
/// sensitive, never extractable, and good for signing only.
fn assert_service_keys_are_hardware_resident(listing: &str) {
    let keys: Vec<&str> = listing.split("Private Key Object").skip(1).collect();
    assert!(keys.len() >= common::SERVICE_KEYS, "{listing}");
    for key in keys {
        assert!(
            key.contains("Access:     sensitive, always sensitive, never extractable, local"),
            "{key}"
        );
        assert!(key.lines().any(|l| l.trim() == "Usage:      sign"), "{key}");
    }
}

async fn a_custodial_certificate_verifies_and_follows_the_profile(backends: Backends) {
    let server = Server::start(backends).await;
    let agent = create_agent(&server, "alpha").await;
    let issued =
        common::issue_certificate_with(&server, "alpha", json!({"ttl_seconds": 600})).await;

    let (ok, out) = openssl_verify(&server, &issued);
    assert!(ok, "openssl verify: {out}");

    let pem = issued["certificate_pem"].as_str().unwrap();
    let (_, pem) = parse_x509_pem(pem.as_bytes()).unwrap();
    let cert = pem.parse_x509().unwrap();
    let serial = cert.raw_serial();
    assert_eq!(serial.len(), 16);
    assert!(serial[0] & 0x80 == 0 && serial[0] != 0);
    assert_eq!(hex::encode(serial), issued["serial"]);
    let lifetime = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert_eq!(lifetime, 630, "600 s TTL plus 30 s backdating");
    assert_eq!(cert.subject().to_string(), "CN=alpha");

    let bc = cert.basic_constraints().unwrap().unwrap();
    assert!(bc.critical && !bc.value.ca);
    let ku = cert.key_usage().unwrap().unwrap();
    assert!(ku.critical && ku.value.digital_signature() && ku.value.flags == 1);
    // A key keyward holds signs through keyward: document signing (RFC
    // 9336), never client authentication.
    let eku = cert.extended_key_usage().unwrap().unwrap();
    assert!(!eku.value.client_auth && !eku.value.server_auth && !eku.value.any);
    assert_eq!(
        eku.value.other,
        [oid_registry::Oid::from(&[1, 3, 6, 1, 5, 5, 7, 3, 36]).unwrap()]
    );
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert_eq!(san.value.general_names.len(), 1);
    assert!(matches!(san.value.general_names[0],
        GeneralName::URI(uri) if uri == "spiffe://keyward.local/agent/alpha"));
    assert!(cert
        .get_extension_unique(&oid_registry::OID_X509_EXT_SUBJECT_KEY_IDENTIFIER)
        .unwrap()
        .is_some());
    assert!(cert
        .get_extension_unique(&oid_registry::OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER)
        .unwrap()
        .is_some());

    // The attestation extension: non-critical, naming the token and the
    // digest of the evidence keyward serves.
    let ext = cert
        .extensions()
        .iter()
        .find(|e| e.oid.as_bytes() == attestation_oid().as_slice())
        .expect("attestation extension");
    assert!(!ext.critical);
    let claims = keyward::attestation::AttestationClaims::from_extension_value(ext.value).unwrap();
    let (format, device) = match backends.keys {
        Keys::SoftHsm => ("pkcs11-key-attributes", "SoftHSM".to_owned()),
        // A TPM is named by its manufacturer's strings and its TCTI.
        Keys::Swtpm => ("tpm2-key-attributes", server.tcti().unwrap()),
    };
    assert_eq!(claims.format, format);
    assert!(
        claims.key_location.contains(&device),
        "{}",
        claims.key_location
    );
    assert_eq!(claims.scopes, vec!["orders:read".to_owned()]);
    let digest = claims.evidence_sha256.clone();
    assert_eq!(issued["attestation"], digest.as_str());
    assert_eq!(agent["attestation_digest"], digest.as_str());

    let response = server
        .client
        .get(format!("{}/v1/attestations/{digest}", server.url))
        .bearer_auth(&server.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let evidence = response.bytes().await.unwrap();
    assert_eq!(
        hex::encode(Sha256::digest(&evidence)),
        digest,
        "served evidence matches the digest"
    );
    let document: Value = serde_json::from_slice(&evidence).unwrap();
    assert_eq!(document["format"], format!("keyward-{format}-v1"));
    use base64::Engine;
    let statement: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(document["statement_b64"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    let (held, not_held, storage): (&[&str], &[&str], _) = match backends.keys {
        // Kept wrapped (SoftHSM2's default): generated on the token, always
        // sensitive, and extractable only under the token's trusted
        // wrapping key; the evidence and the certificate say so.
        Keys::SoftHsm => (
            &[
                "local",
                "always_sensitive",
                "sign",
                "wrap_with_trusted",
                "extractable",
            ],
            &["never_extractable", "decrypt", "derive", "unwrap"],
            "wrapped",
        ),
        // In a TPM: generated there (sensitiveDataOrigin) and bound to it
        // (fixedTPM, fixedParent), so never extractable; its blob leaves
        // only encrypted under the TPM's own storage key, which is no
        // PKCS#11 trusted wrapping.
        Keys::Swtpm => (
            &[
                "local",
                "sensitive",
                "always_sensitive",
                "never_extractable",
                "sign",
            ],
            &[
                "extractable",
                "wrap_with_trusted",
                "decrypt",
                "derive",
                "unwrap",
            ],
            "token",
        ),
    };
    for claim in held {
        assert_eq!(statement["attributes"][claim], true, "{claim}: {statement}");
    }
    for claim in not_held {
        assert_eq!(
            statement["attributes"][claim], false,
            "{claim}: {statement}"
        );
    }
    assert_eq!(statement["storage"], storage);
    assert_eq!(
        claims.key_location.ends_with(", wrapped"),
        storage == "wrapped",
        "{}",
        claims.key_location
    );
    assert_eq!(statement["key_id"], agent["key_id"]);

    // The certificate's key is the agent's custodial key.
    let spki = cert.public_key().raw;
    assert_eq!(
        pem_body(agent["public_key_pem"].as_str().unwrap()),
        spki,
        "certificate carries the custodial key"
    );
}

fn pem_body(pem: &str) -> Vec<u8> {
    let (_, p) = parse_x509_pem(pem.as_bytes()).unwrap();
    p.contents
}

async fn a_csr_certificate_carries_the_csr_key_and_keywards_names(backends: Backends) {
    let server = Server::start(backends).await;
    create_agent(&server, "alpha").await;
    let dir = server.data_dir.path();
    let key = dir.join("own.key");
    let csr = dir.join("own.csr");
    assert!(
        run(Command::new("openssl")
            .args([
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out"
            ])
            .arg(&key))
        .0
    );
    assert!(
        run(Command::new("openssl")
            .args([
                "req",
                "-new",
                "-subj",
                "/CN=mallory",
                "-addext",
                "subjectAltName=URI:spiffe://evil/agent/x",
                "-key"
            ])
            .arg(&key)
            .arg("-out")
            .arg(&csr))
        .0
    );
    let issued = common::issue_certificate_with(
        &server,
        "alpha",
        json!({"csr_pem": std::fs::read_to_string(&csr).unwrap(), "ttl_seconds": 300}),
    )
    .await;
    assert!(
        issued["attestation"].is_null(),
        "keyward cannot vouch for a CSR key"
    );
    let (ok, out) = openssl_verify(&server, &issued);
    assert!(ok, "{out}");
    let leaf = write(
        dir,
        "csr-leaf.pem",
        issued["certificate_pem"].as_str().unwrap(),
    );
    let (_, cert_key) = run(Command::new("openssl")
        .args(["x509", "-noout", "-pubkey", "-in"])
        .arg(&leaf));
    let (_, csr_key) = run(Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&key));
    assert_eq!(cert_key, csr_key);
    let (_, text) = run(Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&leaf));
    assert!(
        text.contains("URI:spiffe://keyward.local/agent/alpha"),
        "{text}"
    );
    assert!(
        !text.contains("mallory") && !text.contains("spiffe://evil"),
        "{text}"
    );
}

/// Each bad request gets its 4xx and machine-readable code, and writes no
/// row anywhere (agents, certificates, audit).
async fn bad_input_is_refused_and_writes_nothing(backends: Backends) {
    let server = Server::start(backends).await;
    create_agent(&server, "alpha").await;
    let dir = server.data_dir.path();
    let p384_key = dir.join("p384.key");
    let p384_csr = dir.join("p384.csr");
    assert!(
        run(Command::new("openssl")
            .args(["ecparam", "-name", "secp384r1", "-genkey", "-noout", "-out"])
            .arg(&p384_key))
        .0
    );
    assert!(
        run(Command::new("openssl")
            .args(["req", "-new", "-subj", "/CN=x", "-key"])
            .arg(&p384_key)
            .arg("-out")
            .arg(&p384_csr))
        .0
    );
    let p256_key = dir.join("p256.key");
    let p256_csr = dir.join("p256.csr");
    assert!(
        run(Command::new("openssl")
            .args([
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out"
            ])
            .arg(&p256_key))
        .0
    );
    assert!(
        run(Command::new("openssl")
            .args(["req", "-new", "-subj", "/CN=x", "-key"])
            .arg(&p256_key)
            .arg("-out")
            .arg(&p256_csr))
        .0
    );
    let good_csr = std::fs::read_to_string(&p256_csr).unwrap();
    // Same request, one signature byte flipped: the signature no longer verifies.
    let tampered_csr = {
        let (_, pem) = parse_x509_pem(good_csr.as_bytes()).unwrap();
        let mut der = pem.contents.clone();
        let last = der.len() - 1;
        der[last] ^= 0x01;
        common::pem_encode("CERTIFICATE REQUEST", &der)
    };
    let before = server.row_counts().await;

    let cases: Vec<(&str, &str, Value, u16, &str)> = vec![
        (
            "unknown agent",
            "/v1/agents/nobody/certificates",
            json!({"ttl_seconds": 600}),
            404,
            "agent_not_found",
        ),
        (
            "duplicate name",
            "/v1/agents",
            json!({"name": "alpha", "scopes": []}),
            409,
            "agent_exists",
        ),
        (
            "invalid name",
            "/v1/agents",
            json!({"name": "Bad Name!", "scopes": []}),
            400,
            "invalid_agent_name",
        ),
        (
            "name too long",
            "/v1/agents",
            json!({"name": "a".repeat(64)}),
            400,
            "invalid_agent_name",
        ),
        (
            "invalid scope",
            "/v1/agents",
            json!({"name": "beta", "scopes": ["has space"]}),
            400,
            "invalid_scope",
        ),
        (
            "unknown field",
            "/v1/agents",
            json!({"name": "beta", "role": "admin"}),
            400,
            "invalid_request",
        ),
        (
            "ttl zero",
            "/v1/agents/alpha/certificates",
            json!({"ttl_seconds": 0}),
            400,
            "invalid_ttl",
        ),
        (
            "ttl above max",
            "/v1/agents/alpha/certificates",
            json!({"ttl_seconds": 3601}),
            400,
            "invalid_ttl",
        ),
        (
            "negative ttl",
            "/v1/agents/alpha/certificates",
            json!({"ttl_seconds": -5}),
            400,
            "invalid_request",
        ),
        (
            "non-PEM CSR",
            "/v1/agents/alpha/certificates",
            json!({"csr_pem": "hello"}),
            400,
            "invalid_csr",
        ),
        (
            "malformed CSR",
            "/v1/agents/alpha/certificates",
            json!({"csr_pem": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"}),
            400,
            "invalid_csr",
        ),
        (
            "CSR signature",
            "/v1/agents/alpha/certificates",
            json!({"csr_pem": tampered_csr}),
            400,
            "csr_signature_invalid",
        ),
        (
            "P-384 CSR",
            "/v1/agents/alpha/certificates",
            json!({"csr_pem": std::fs::read_to_string(&p384_csr).unwrap()}),
            400,
            "unsupported_key",
        ),
    ];
    for (what, path, body, status, code) in cases {
        let (got, answer) = server.admin("POST", path, Some(body)).await;
        assert_eq!(got, status, "{what}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{what}: {answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}"
        );
    }

    // A body over 64 KiB.
    let big = json!({"name": "beta", "scopes": ["a".repeat(200_000)]});
    let (status, answer) = server.admin("POST", "/v1/agents", Some(big)).await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (413, Some("body_too_large"))
    );
    // Not JSON at all.
    let response = server
        .client
        .post(format!("{}/v1/agents", server.url))
        .bearer_auth(&server.admin_token)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);

    // Missing and wrong admin tokens.
    let body = json!({"name": "beta", "scopes": []});
    let (status, answer) = server
        .request("POST", "/v1/agents", Some(body.clone()), None)
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (401, Some("unauthenticated"))
    );
    let (status, answer) = server
        .request("POST", "/v1/agents", Some(body.clone()), Some("wrong"))
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (401, Some("invalid_credentials"))
    );
    let almost = format!("{}x", server.admin_token.trim());
    let (status, _) = server
        .request("POST", "/v1/agents", Some(body), Some(&almost))
        .await;
    assert_eq!(status, 401);

    assert_eq!(
        server.row_counts().await,
        before,
        "a refused request wrote a row"
    );
    // alpha's key, and keyward's own: a refused request made none, in the
    // key store or wrapped.
    assert_eq!(
        server.key_counts().await,
        server.expected_key_counts(1),
        "(key store, wrapped): a refused request left a key behind"
    );
}

async fn only_health_and_the_ca_answer_without_credentials(db: Db) {
    let server = Server::start(db).await;
    for path in ["/healthz", "/readyz", "/v1/ca/chain.pem"] {
        let (status, _) = server.request("GET", path, None, None).await;
        assert_eq!(status, 200, "{path}");
    }
    for path in [
        "/v1/agents",
        "/v1/agents/alpha",
        "/metrics",
        &format!("/v1/attestations/{}", "0".repeat(64)),
    ] {
        let (status, answer) = server.request("GET", path, None, None).await;
        assert_eq!(status, 401, "{path}: {answer}");
    }
    let (_, chain) = server.request("GET", "/v1/ca/chain.pem", None, None).await;
    let served = chain.as_str().unwrap().to_owned();
    let anchor = std::fs::read_to_string(server.path("ca.pem")).unwrap();
    assert!(
        served.contains(anchor.trim()),
        "the chain ends at the trust anchor in ca.pem"
    );
}

async fn a_restart_reuses_the_token_the_ca_and_the_database(backends: Backends) {
    let server = Server::start(backends).await;
    let agent = create_agent(&server, "alpha").await;
    let ca_before = std::fs::read_to_string(server.path("ca.pem")).unwrap();
    let token_before = server.admin_token.clone();
    let server = server.restart().await;
    assert_eq!(
        std::fs::read_to_string(server.path("ca.pem")).unwrap(),
        ca_before
    );
    assert_eq!(server.admin_token, token_before);
    let (status, fetched) = server.admin("GET", "/v1/agents/alpha", None).await;
    assert_eq!(status, 200);
    assert_eq!(fetched["key_id"], agent["key_id"]);
    let issued = common::issue_certificate_with(&server, "alpha", json!({})).await;
    let (ok, out) = openssl_verify(&server, &issued);
    assert!(ok, "{out}");
    // The custodial key, read back from the database (wrapped) or the key
    // directory (a TPM's blobs), signs in the new process.
    let (status, signed) = server
        .admin(
            "POST",
            "/v1/agents/alpha/sign",
            Some(json!({"message_b64": "aGk="})),
        )
        .await;
    assert_eq!(status, 200, "{signed}");
    // The first process destroyed its listener's key on the way out, and
    // said so; the second made its own.
    assert_eq!(server.key_counts().await, server.expected_key_counts(1));
    let records = server.store().await.audit_records(0, 1000).await.unwrap();
    let count = |action: &str| records.iter().filter(|r| r.event.action == action).count();
    assert_eq!(
        (count("server_key.create"), count("server_key.destroy")),
        (2, 1)
    );
}

async fn every_change_is_an_entry_of_the_audit_log(backends: Backends) {
    let server = Server::start(backends).await;
    create_agent(&server, "alpha").await;
    create_agent(&server, "beta").await;
    let issued = common::issue_certificate_with(&server, "alpha", json!({"ttl_seconds": 60})).await;
    let records = server.store().await.audit_records(0, 1000).await.unwrap();
    keyward::audit::verify_sequence(&records).unwrap();
    let actions: Vec<&str> = records.iter().map(|r| r.event.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "ca.create",
            "service_key.create",
            "service_key.create",
            "service_key.create",
            "admin_token.create",
            "server_key.create",
            "agent.create",
            "agent.create",
            "certificate.issue"
        ]
    );
    let last = records.last().unwrap();
    assert_eq!(last.event.details["serial"], issued["serial"]);
    assert_eq!(last.event.policy_version, Some(0));
    assert_eq!(last.event.agent.as_deref(), Some("alpha"));
    // No secret reaches the audit trail.
    let text =
        serde_json::to_string(&records.iter().map(|r| &r.event).collect::<Vec<_>>()).unwrap();
    assert!(!text.contains(server.admin_token.trim()));
    // A TPM's keys take no PIN here (empty authValues); the token's does.
    if backends.keys == Keys::SoftHsm {
        let pin = std::fs::read_to_string(server.path("softhsm/user.pin")).unwrap();
        assert!(!text.contains(pin.trim()));
    }
}

/// 200 registrations from 16 concurrent clients all succeed, each with
/// one key: wrapped in the database, and none on the token besides
/// keyward's own (`common::SERVICE_KEYS`), on SoftHSM2; one blob pair each
/// beside keyward's own, and none wrapped, on a TPM.
async fn concurrent_registrations_all_succeed_and_leave_no_stray_key(backends: Backends) {
    let server = Server::start(backends).await;
    register_200_concurrently(&server).await;
    assert_eq!(server.key_counts().await, server.expected_key_counts(200));
}

/// With token objects, the token holds exactly one key per agent besides
/// keyward's own: none failed half-way, none was left behind. SoftHSM2
/// refused a second concurrent C_GenerateKeyPair (7 of 300 registrations
/// answered 503 before key creation was serialized).
async fn concurrent_registrations_of_token_keys_all_succeed_and_leave_no_stray_key(db: Db) {
    let server = Server::start_with_config(db, common::TOKEN_STORAGE).await;
    register_200_concurrently(&server).await;
    assert_eq!(server.wrapped_key_count().await, 0);
    assert_eq!(server.token_private_key_count(), 200 + common::SERVICE_KEYS);
}

async fn register_200_concurrently(server: &Server) {
    let ca = std::fs::read(server.path("ca.pem")).unwrap();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..16 {
        // Each client on connections of its own, as separate callers are.
        let client = common::https_client(&ca);
        let (url, token, next) = (server.url.clone(), server.admin_token.clone(), next.clone());
        clients.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= 200 {
                    return failures;
                }
                let response = client
                    .post(format!("{url}/v1/agents"))
                    .bearer_auth(token.trim())
                    .json(&json!({"name": format!("agent-{i}"), "scopes": []}))
                    .send()
                    .await
                    .unwrap();
                if response.status() != 201 {
                    failures.push(format!(
                        "{} {}",
                        response.status(),
                        response.text().await.unwrap_or_default()
                    ));
                }
            }
        }));
    }
    let mut failures = Vec::new();
    for client in clients {
        failures.extend(client.await.unwrap());
    }
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    assert_eq!(server.sql("SELECT COUNT(*) FROM agents").await, Some(200));
}

/// Issuance reads agents from a short-lived cache: a change made through
/// keyward shows in the very next certificate, and a revoked agent gets
/// none, however recently its record was read.
async fn a_certificate_right_after_a_change_reflects_it(backends: Backends) {
    let server = Server::start(backends).await;
    create_agent(&server, "alpha").await;
    common::issue_certificate_with(&server, "alpha", json!({"ttl_seconds": 600})).await;
    let (status, answer) = server
        .admin(
            "PATCH",
            "/v1/agents/alpha",
            Some(json!({"scopes": ["orders:write"]})),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let issued =
        common::issue_certificate_with(&server, "alpha", json!({"ttl_seconds": 600})).await;
    let pem = issued["certificate_pem"].as_str().unwrap();
    let (_, pem) = parse_x509_pem(pem.as_bytes()).unwrap();
    let cert = pem.parse_x509().unwrap();
    let ext = cert
        .extensions()
        .iter()
        .find(|e| e.oid.as_bytes() == attestation_oid().as_slice())
        .expect("attestation extension");
    let claims = keyward::attestation::AttestationClaims::from_extension_value(ext.value).unwrap();
    assert_eq!(claims.scopes, vec!["orders:write".to_owned()]);

    let (status, _) = server
        .admin(
            "POST",
            "/v1/agents/alpha/revoke",
            Some(json!({"reason": "keyCompromise"})),
        )
        .await;
    assert_eq!(status, 200);
    let (status, answer) = server
        .admin(
            "POST",
            "/v1/agents/alpha/certificates",
            Some(json!({"ttl_seconds": 600})),
        )
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (403, Some("agent_not_active")),
        "{answer}"
    );
}

on_every_backend!(
    a_certificate_right_after_a_change_reflects_it,
    concurrent_registrations_all_succeed_and_leave_no_stray_key,
    a_custodial_certificate_verifies_and_follows_the_profile,
    a_csr_certificate_carries_the_csr_key_and_keywards_names,
    bad_input_is_refused_and_writes_nothing,
    a_restart_reuses_the_token_the_ca_and_the_database,
    every_change_is_an_entry_of_the_audit_log;
    swtpm only: a_registered_agent_gets_a_spiffe_id_and_a_key_blob_in_the_tpm_key_directory,
);

on_both_databases!(
    concurrent_registrations_of_token_keys_all_succeed_and_leave_no_stray_key,
    a_registered_agent_gets_a_spiffe_id_and_a_key_wrapped_by_the_token,
    a_registered_agent_gets_a_spiffe_id_and_a_key_on_the_token,
    only_health_and_the_ca_answer_without_credentials,
);
