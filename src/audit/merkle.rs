//! RFC 6962 Merkle tree proofs (SHA-256; leaf `0x00 || entry`, node
//! `0x01 || left || right`), the ground the audit log's checkpoints and
//! tiles (issue 16) stand on. The arithmetic is `tlog_tiles`' (a port of
//! Go's `golang.org/x/mod/sumdb/tlog`, which the Go checksum database
//! runs on), not keyward's own; this module gives it keyward's types and
//! turns every refusal, including malformed input, into an error. It is
//! checked against transparency-dev/merkle's proof vectors
//! (`tests/merkle_vectors.rs`).

use tlog_tiles::tlog::{self, Hash};

/// A SHA-256 node of the tree.
pub type NodeHash = [u8; 32];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProofError {
    #[error("the proof does not lead to the tree's root")]
    Invalid,
    #[error("the proof's sizes or indexes are impossible: {0}")]
    Input(String),
}

fn refused(e: tlog::Error) -> ProofError {
    match e {
        tlog::Error::InvalidProof => ProofError::Invalid,
        other => ProofError::Input(other.to_string()),
    }
}

/// The leaf hash of `entry`: SHA-256 of `0x00 || entry`.
pub fn leaf_hash(entry: &[u8]) -> NodeHash {
    tlog::record_hash(entry).0
}

/// Checks that `proof` shows the leaf `leaf_index` with hash `leaf` in the
/// tree of `tree_size` leaves whose root is `root`.
pub fn verify_inclusion(
    leaf_index: u64,
    tree_size: u64,
    leaf: &NodeHash,
    proof: &[NodeHash],
    root: &NodeHash,
) -> Result<(), ProofError> {
    let proof: Vec<Hash> = proof.iter().map(|h| Hash(*h)).collect();
    tlog::check_record(&proof, tree_size, Hash(*root), leaf_index, Hash(*leaf)).map_err(refused)
}

/// Checks that `proof` shows the tree of `old_size` leaves with root
/// `old_root` to be a prefix of the tree of `new_size` leaves with root
/// `new_root`. Equal sizes need an empty proof and equal roots. An empty
/// old tree proves nothing (every tree extends it) and is refused, as
/// RFC 9162 and transparency-dev/merkle do.
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &NodeHash,
    new_root: &NodeHash,
    proof: &[NodeHash],
) -> Result<(), ProofError> {
    if old_size == 0 || old_size > new_size {
        return Err(ProofError::Input(format!(
            "a consistency proof is from a non-empty tree to one at least as large, not {old_size} to {new_size}"
        )));
    }
    if old_size == new_size {
        return if proof.is_empty() && old_root == new_root {
            Ok(())
        } else {
            Err(ProofError::Invalid)
        };
    }
    let proof: Vec<Hash> = proof.iter().map(|h| Hash(*h)).collect();
    tlog::check_tree(&proof, new_size, Hash(*new_root), old_size, Hash(*old_root)).map_err(refused)
}
