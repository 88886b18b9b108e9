//! Mutation fuzzing of what keyward parses from strangers: CSRs, OCSP
//! requests, certificates and chains (`POST /v1/verify`), and the
//! attestation extension's record. Seeds are genuine inputs (made by
//! OpenSSL, or issued by keyward); each mutation is one of the shapes an
//! attacker reaches for: flipped bits, truncation, trailing bytes, inserted
//! bytes, another tag in a tag's place, an OID whose arc is hundreds of
//! bits long, a length byte made indefinite or huge.
//!
//! In process, every mutation must be refused or parsed without a panic,
//! and no mutation of a genuine certificate may verify. Over HTTP, each
//! mutated CSR and certificate is a 4xx with a code (or a `valid: false`
//! verdict) and writes nothing. The run prints how many executions it
//! made; `KEYWARD_FUZZ_ITERATIONS` raises the count for a longer session.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::SystemTime;

use common::{Db, Server};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

fn iterations() -> usize {
    std::env::var("KEYWARD_FUZZ_ITERATIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(4_000)
}

/// The DER tags the mutator swaps for one another.
const TAGS: [u8; 10] = [0x30, 0x31, 0x02, 0x03, 0x04, 0x05, 0x06, 0x0c, 0xa0, 0x17];

struct Mutator {
    rng: StdRng,
}

impl Mutator {
    fn new(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// A mutation of `der` that differs from it.
    fn mutate(&mut self, der: &[u8]) -> Vec<u8> {
        loop {
            let out = self.mutate_once(der);
            if out != der {
                return out;
            }
        }
    }

    fn mutate_once(&mut self, der: &[u8]) -> Vec<u8> {
        let mut out = der.to_vec();
        let at = self.rng.gen_range(0..out.len());
        match self.rng.gen_range(0..8) {
            0 => out[at] ^= 1 << self.rng.gen_range(0..8),
            1 => out[at] = self.rng.gen(),
            2 => out.truncate(at),
            3 => {
                let n = self.rng.gen_range(1..9);
                out.extend((0..n).map(|_| self.rng.gen::<u8>()));
            }
            4 => {
                let n = self.rng.gen_range(1..5);
                for _ in 0..n {
                    out.insert(at, self.rng.gen());
                }
            }
            5 => {
                let tags: Vec<usize> = positions(&out, |b| TAGS.contains(&b));
                let i = tags[self.rng.gen_range(0..tags.len())];
                out[i] = TAGS[self.rng.gen_range(0..TAGS.len())];
            }
            6 => {
                // An OID of the same length whose content is one arc of
                // 7 bits per byte: far past 32 and 64 bits. Lengths around
                // it stay right, so only the arc is wrong.
                let oids = positions(&out, |b| b == 0x06);
                let i = oids[self.rng.gen_range(0..oids.len())];
                let len = out.get(i + 1).copied().unwrap_or(0) as usize;
                if (2..0x80).contains(&len) && i + 2 + len <= out.len() {
                    for b in &mut out[i + 2..i + 1 + len] {
                        *b = 0xff;
                    }
                    out[i + 1 + len] = 0x7f;
                }
            }
            _ => {
                // A length octet made indefinite (forbidden in DER) or a
                // four-byte length far past the input.
                let lengths = positions(&out, |b| TAGS.contains(&b));
                let i = lengths[self.rng.gen_range(0..lengths.len())] + 1;
                if i < out.len() {
                    if self.rng.gen() {
                        out[i] = 0x80;
                    } else {
                        out.splice(i..i + 1, [0x84, 0x7f, 0xff, 0xff, 0xff]);
                    }
                }
            }
        }
        out
    }
}

fn positions(der: &[u8], wanted: impl Fn(u8) -> bool) -> Vec<usize> {
    let found: Vec<usize> = (0..der.len()).filter(|&i| wanted(der[i])).collect();
    if found.is_empty() {
        vec![0]
    } else {
        found
    }
}

fn der_of(pem_text: &str) -> Vec<u8> {
    use base64::Engine;
    let body: String = pem_text
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap()
}

/// Runs `parse` on `iterations()` mutations of `seed`; a panic fails the
/// test with the input that caused it. Returns the executions made.
fn fuzz(what: &str, seed: &[u8], stream: u64, mut parse: impl FnMut(&[u8])) -> usize {
    let mut mutator = Mutator::new(stream);
    let n = iterations();
    for _ in 0..n {
        let input = mutator.mutate(seed);
        if catch_unwind(AssertUnwindSafe(|| parse(&input))).is_err() {
            panic!("{what}: a panic on {}", hex::encode(&input));
        }
    }
    n
}

/// A genuine CSR, OCSP request and certificate chain from a running
/// keyward, then thousands of mutations of each through the parsers; a
/// sample of them through the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_csrs_ocsp_requests_and_certificates_never_panic_verify_or_write() {
    let server = Server::start(Db::Sqlite).await;
    let dir = server.path("fuzz");
    std::fs::create_dir_all(&dir).unwrap();
    let issued = common::certified_agent(&server, "alpha").await;
    let (_, csr_pem) = common::key_and_csr(&dir, "own");
    let csr = der_of(&csr_pem);
    let leaf = der_of(issued["certificate_pem"].as_str().unwrap());
    let leaf_pem = issued["certificate_pem"].as_str().unwrap().to_owned();
    std::fs::write(dir.join("leaf.pem"), &leaf_pem).unwrap();
    let ocsp_request = common::openssl_ocsp_request(
        &server.path("ca.pem"),
        &dir.join("leaf.pem"),
        &dir.join("leaf.req"),
    );
    let anchors =
        keyward::pki::parse_pem_chain(&std::fs::read_to_string(server.path("ca.pem")).unwrap())
            .unwrap();
    let now = SystemTime::now();
    {
        use der::Decode;
        let genuine = keyward::pki::Certificate::from_der(&leaf).unwrap();
        keyward::pki::verify::verify_chain(&genuine, &[], &anchors, now)
            .expect("the seed verifies");
    }

    let mut executions = 0;
    executions += fuzz("CSR", &csr, 1, |input| {
        let _ = keyward::pki::csr::VerifiedCsr::from_pem(&common::pem_encode(
            "CERTIFICATE REQUEST",
            input,
        ));
    });
    executions += fuzz("OCSP request", &ocsp_request, 2, |input| {
        let _ = keyward::pki::ocsp::parse_request(input);
    });
    executions += fuzz("certificate", &leaf, 3, |input| {
        use der::Decode;
        let Ok(certificate) = keyward::pki::Certificate::from_der(input) else {
            return;
        };
        {
            assert!(
                keyward::pki::verify::verify_chain(&certificate, &[], &anchors, now).is_err(),
                "a mutated certificate verifies: {}",
                hex::encode(input)
            );
        }
        let cmw = keyward::pki::profile::ID_PE_CMW;
        let extensions = certificate.tbs_certificate.extensions.as_deref();
        if let Some(extension) = extensions
            .unwrap_or_default()
            .iter()
            .find(|e| e.extn_id == cmw)
        {
            let _ = keyward::attestation::AttestationClaims::from_extension_value(
                extension.extn_value.as_bytes(),
            );
        }
    });
    executions += fuzz("PEM chain", leaf_pem.as_bytes(), 4, |input| {
        if let Ok(text) = std::str::from_utf8(input) {
            let _ = keyward::pki::parse_pem_chain(text);
        }
    });
    eprintln!("parser fuzz: {executions} executions in process");

    // Over HTTPS: mutated CSRs are refused with a code and write nothing;
    // mutated certificates never verify. A genuine OCSP request first, so
    // the responder's certification (audited) is not counted against the
    // mutations.
    let response = server
        .client
        .post(format!("{}/v1/ocsp", server.url))
        .header("content-type", "application/ocsp-request")
        .body(ocsp_request.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let before = server.row_counts().await;
    let mut mutator = Mutator::new(5);
    let sample = (iterations() / 40).max(50);
    for _ in 0..sample {
        let mutated = mutator.mutate(&csr);
        let body = json!({"csr_pem": common::pem_encode("CERTIFICATE REQUEST", &mutated)});
        let (status, answer) = server
            .admin("POST", "/v1/agents/alpha/certificates", Some(body))
            .await;
        assert!(
            (400..500).contains(&status) && answer["error"]["code"].is_string(),
            "{status} {answer}: the CSR {} mutated into {}",
            hex::encode(&csr),
            hex::encode(&mutated)
        );
    }
    for _ in 0..sample {
        let body = json!({
            "certificate_pem": common::pem_encode("CERTIFICATE", &mutator.mutate(&leaf)),
            "message_b64": "aGk=",
            "signature_b64": "MEQCIBtFNSFmAh4OvoXjE4AiiJqsmT8VyjqvqF7N4oQmE3T2AiBJ9+rNTXqn0bS95vBoNyBq4dqnYhNNmHCtX1xBgkeGGQ==",
        });
        let (status, answer) = server.admin("POST", "/v1/verify", Some(body)).await;
        match status {
            200 => assert_eq!(answer["valid"], false, "{answer}"),
            400..=499 => assert!(answer["error"]["code"].is_string(), "{answer}"),
            _ => panic!("{status} {answer}"),
        }
    }
    for _ in 0..sample {
        let response = server
            .client
            .post(format!("{}/v1/ocsp", server.url))
            .header("content-type", "application/ocsp-request")
            .body(mutator.mutate(&ocsp_request))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "OCSP speaks in its own statuses");
    }
    assert_eq!(server.row_counts().await, before, "nothing was written");
    eprintln!("parser fuzz: {} requests over HTTPS", 3 * sample);
}

/// Found by the fuzzer above: `der`'s PEM decoder stops after the first DER
/// value in the block, so a CSR or certificate with bytes after it was read
/// as if they were not there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csr_or_certificate_with_bytes_after_its_der_is_refused() {
    let server = Server::start(Db::Sqlite).await;
    let issued = common::certified_agent(&server, "alpha").await;
    let (_, csr_pem) = common::key_and_csr(&server.path(""), "own");
    let mut csr = der_of(&csr_pem);
    csr.extend_from_slice(&[0x2d, 0xd1, 0x74, 0xc3, 0x78]);
    let before = server.row_counts().await;
    let (status, answer) = server
        .admin(
            "POST",
            "/v1/agents/alpha/certificates",
            Some(json!({"csr_pem": common::pem_encode("CERTIFICATE REQUEST", &csr)})),
        )
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (400, Some("invalid_csr")),
        "{answer}"
    );

    let mut certificate = der_of(issued["certificate_pem"].as_str().unwrap());
    certificate.extend_from_slice(&[0x05, 0x00]);
    let (status, answer) = server
        .admin(
            "POST",
            "/v1/verify",
            Some(json!({
                "certificate_pem": common::pem_encode("CERTIFICATE", &certificate),
                "message_b64": "aGk=",
                "signature_b64": "MAYCAQECAQE=",
            })),
        )
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (400, Some("invalid_certificate")),
        "{answer}"
    );
    assert_eq!(server.row_counts().await, before);
}
