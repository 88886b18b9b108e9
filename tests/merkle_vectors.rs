//! keyward's RFC 6962 proof checks (`keyward::audit::merkle`) against every
//! inclusion and consistency vector of transparency-dev/merkle
//! (`tests/data/merkle`, Apache-2.0, see its README): each valid proof is
//! accepted and each corrupted one refused, without a panic.

use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use keyward::audit::merkle::{verify_consistency, verify_inclusion, NodeHash};
use serde_json::Value;

fn vectors(kind: &str) -> Vec<(PathBuf, Value)> {
    let mut found = Vec::new();
    let mut dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/merkle")
        .join(kind)];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "json") {
                let text = std::fs::read_to_string(&path).unwrap();
                found.push((path, serde_json::from_str(&text).unwrap()));
            }
        }
    }
    found
}

/// A hash as the vectors give it; `None` when it is not 32 bytes of
/// base64 (such a vector expects an error).
fn hash(value: &Value) -> Option<NodeHash> {
    B64.decode(value.as_str()?).ok()?.try_into().ok()
}

/// A root of the consistency vectors. The `additional` set checks size
/// rules with placeholder roots ("don't care"), compared only for
/// equality; they become 32 bytes by hashing, which keeps that equality.
fn root(value: &Value) -> Option<NodeHash> {
    use sha2::{Digest, Sha256};
    let bytes = B64.decode(value.as_str()?).ok()?;
    match <NodeHash>::try_from(bytes.as_slice()) {
        Ok(hash) => Some(hash),
        Err(_) => Some(Sha256::digest(&bytes).into()),
    }
}

fn hashes(value: &Value) -> Option<Vec<NodeHash>> {
    match value {
        Value::Null => Some(Vec::new()),
        Value::Array(items) => items.iter().map(hash).collect(),
        _ => None,
    }
}

/// Runs `check` on every vector of `kind` (`None`: the vector's hashes are
/// malformed, which counts as refused) and holds it to the vector's
/// `wantErr`; both outcomes must occur, so neither can pass vacuously.
fn each_vector_as_expected(kind: &str, check: impl Fn(&Value) -> Option<bool>) {
    let all = vectors(kind);
    assert!(all.len() > 80, "{} {kind} vectors", all.len());
    let (mut accepted, mut refused) = (0, 0);
    for (path, v) in all {
        let checked = check(&v).unwrap_or(false);
        assert_eq!(
            checked,
            !v["wantErr"].as_bool().unwrap(),
            "{}: {}",
            path.display(),
            v["desc"]
        );
        if checked {
            accepted += 1
        } else {
            refused += 1
        }
    }
    assert!(
        accepted > 5 && refused > 50,
        "{accepted} accepted, {refused} refused"
    );
}

#[test]
fn every_inclusion_vector_is_accepted_or_refused_as_expected() {
    each_vector_as_expected("inclusion", |v| {
        let verified = verify_inclusion(
            v["leafIdx"].as_u64().unwrap(),
            v["treeSize"].as_u64().unwrap(),
            &hash(&v["leafHash"])?,
            &hashes(&v["proof"])?,
            &hash(&v["root"])?,
        );
        Some(verified.is_ok())
    });
}

#[test]
fn every_consistency_vector_is_accepted_or_refused_as_expected() {
    each_vector_as_expected("consistency", |v| {
        let verified = verify_consistency(
            v["size1"].as_u64().unwrap(),
            v["size2"].as_u64().unwrap(),
            &root(&v["root1"])?,
            &root(&v["root2"])?,
            &hashes(&v["proof"])?,
        );
        Some(verified.is_ok())
    });
}

#[test]
fn a_leaf_hash_is_sha256_of_zero_then_the_entry() {
    use sha2::{Digest, Sha256};
    let entry = br#"{"action":"agent.create"}"#;
    let mut prefixed = vec![0u8];
    prefixed.extend_from_slice(entry);
    let expected: NodeHash = Sha256::digest(&prefixed).into();
    assert_eq!(keyward::audit::merkle::leaf_hash(entry), expected);
    // RFC 6962's empty-string leaf, as the vectors' tree of one leaf has it.
    assert_eq!(
        hex::encode(keyward::audit::merkle::leaf_hash(b"")),
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    );
}
