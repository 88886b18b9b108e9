//! Every kind of certificate keyward issues is read and verified by the PKI
//! stacks its users run (Go's crypto/x509, OpenSSL, Python's
//! `cryptography`), and the attestation extension (id-pe-cmw, RFC 9999)
//! decoded by Go without keyward's code points at the evidence keyward
//! serves. The TPM-attested kind is checked in `tests/tpm_attestation.rs`,
//! beside its swtpm.
//!
//! SQLite only: a certificate's bytes do not depend on the database.

mod common;

use common::readers::{self, Purpose};
use common::{Backends, Db, Keys, Server};
use serde_json::json;

/// With keyward's keys in a TPM the CA's signatures come from the TPM, and
/// the custodial key's evidence is the TPM's: both key backends.
mod softhsm {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn go_openssl_and_pyca_verify_every_certificate_kind_and_read_its_attestation() {
        super::every_certificate_kind(super::Keys::SoftHsm).await
    }
}

mod swtpm {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn go_openssl_and_pyca_verify_every_certificate_kind_and_read_its_attestation() {
        super::every_certificate_kind(super::Keys::Swtpm).await
    }
}

async fn every_certificate_kind(keys: Keys) {
    let mut server = Server::start(Backends {
        keys,
        db: Db::Sqlite,
    })
    .await;
    let dir = server.path("readers");
    std::fs::create_dir_all(&dir).unwrap();

    common::register_agent(&server, "alpha").await;
    let custodial =
        common::issue_certificate_with(&server, "alpha", json!({"ttl_seconds": 600})).await;
    let (_, csr) = common::key_and_csr(&dir, "own");
    let by_csr = common::issue_certificate_with(
        &server,
        "alpha",
        json!({"csr_pem": csr, "ttl_seconds": 300}),
    )
    .await;
    let (_, enrolled) = common::enrolled(&server, "bravo").await;
    let admin_dir = dir.join("admin");
    let (ok, out) = server
        .operator_beside([
            "admin",
            "cert-issue",
            "ops",
            "--out",
            admin_dir.to_str().unwrap(),
        ])
        .await;
    assert!(ok, "{out}");

    let chains = [
        (
            Purpose::Signing,
            readers::chain_file(&dir, "custodial", &custodial),
        ),
        (Purpose::Client, readers::chain_file(&dir, "csr", &by_csr)),
        (
            Purpose::Client,
            readers::chain_file(&dir, "enrolled", &enrolled),
        ),
        (Purpose::Client, admin_dir.join("cert.pem")),
    ];
    let chains: Vec<_> = chains.iter().map(|(p, f)| (*p, f.as_path())).collect();
    let read = readers::accept(&server.path("ca.pem"), &chains);
    readers::lint_clean(&server.path("ca.pem"));

    assert_eq!(
        read[0]["uris"],
        json!(["spiffe://keyward.local/agent/alpha"])
    );
    assert_eq!(read[3]["uris"], json!(["spiffe://keyward.local/admin/ops"]));
    // A custodial key's certificate says where the key is, and Go's reading
    // of it names the evidence keyward serves.
    let cmw = &read[0]["cmw"];
    assert_eq!(cmw["type"], "application/vnd.keyward.key-attestation+json");
    let format = match keys {
        Keys::SoftHsm => "pkcs11-key-attributes",
        Keys::Swtpm => "tpm2-key-attributes",
    };
    assert_eq!(cmw["payload"]["format"], format);
    assert_eq!(cmw["payload"]["evidence_sha256"], custodial["attestation"]);
    let digest = custodial["attestation"].as_str().unwrap();
    let (status, evidence) = server
        .admin("GET", &format!("/v1/attestations/{digest}"), None)
        .await;
    assert_eq!(status, 200, "{evidence}");
    // Keys keyward cannot vouch for carry no claim about their custody.
    for (i, kind) in [(1, "CSR"), (2, "enrolled"), (3, "admin")] {
        assert!(
            read[i]["cmw"].is_null(),
            "the {kind} certificate: {}",
            read[i]
        );
    }
}
