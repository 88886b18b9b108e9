//! The audit trail: one append-only row per security-relevant change, each
//! row chained to the one before by SHA-256, written in the same database
//! transaction as the change it records (see `store`). If the audit write
//! fails, the change fails with it.
//!
//! Never put a secret in an event: details hold names, serials, digests and
//! reasons only.

pub mod merkle;
pub mod note;
pub mod tiles;
pub mod verify;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What happened, by whom, to what. `details` is a JSON object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub details: serde_json::Value,
}

impl AuditEvent {
    pub fn new(actor: impl Into<String>, action: &str, subject: impl Into<String>) -> Self {
        Self {
            actor: actor.into(),
            action: action.to_owned(),
            subject: subject.into(),
            details: serde_json::Value::Object(Default::default()),
        }
    }

    pub fn with(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        if let serde_json::Value::Object(map) = &mut self.details {
            map.insert(key.to_owned(), value.into());
        }
        self
    }
}

/// A stored audit row.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: i64,
    pub at: i64,
    pub event: AuditEvent,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
}

/// The chain hash of one row: SHA-256 over the previous hash and the row's
/// fields, each length-prefixed so no two rows can encode alike.
pub fn chain_hash(prev_hash: &[u8; 32], seq: i64, at: i64, event: &AuditEvent) -> [u8; 32] {
    let details = event.details.to_string();
    let mut h = Sha256::new();
    h.update(b"keyward-audit-v1");
    h.update(prev_hash);
    h.update(seq.to_be_bytes());
    h.update(at.to_be_bytes());
    for field in [
        event.actor.as_str(),
        event.action.as_str(),
        event.subject.as_str(),
        &details,
    ] {
        h.update((field.len() as u64).to_be_bytes());
        h.update(field.as_bytes());
    }
    h.finalize().into()
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("audit row {seq} does not follow row {expected_prev}")]
    Gap { seq: i64, expected_prev: i64 },
    #[error("audit row {seq}: previous-hash link is broken")]
    BrokenLink { seq: i64 },
    #[error("audit row {seq}: contents do not match its hash")]
    Tampered { seq: i64 },
}

/// Checks that the rows, in order, form an unbroken chain from the genesis
/// (all-zero) hash.
pub fn verify_chain(records: &[AuditRecord]) -> Result<(), ChainError> {
    let mut prev = [0u8; 32];
    let mut prev_seq = 0;
    for r in records {
        if r.seq != prev_seq + 1 {
            return Err(ChainError::Gap {
                seq: r.seq,
                expected_prev: prev_seq,
            });
        }
        if r.prev_hash != prev {
            return Err(ChainError::BrokenLink { seq: r.seq });
        }
        if chain_hash(&r.prev_hash, r.seq, r.at, &r.event) != r.hash {
            return Err(ChainError::Tampered { seq: r.seq });
        }
        prev = r.hash;
        prev_seq = r.seq;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: i64) -> Vec<AuditRecord> {
        let mut prev = [0u8; 32];
        (1..=n)
            .map(|seq| {
                let event = AuditEvent::new("admin", "agent.create", format!("a{seq}"));
                let hash = chain_hash(&prev, seq, 1000 + seq, &event);
                let r = AuditRecord {
                    seq,
                    at: 1000 + seq,
                    event,
                    prev_hash: prev,
                    hash,
                };
                prev = hash;
                r
            })
            .collect()
    }

    #[test]
    fn an_intact_chain_verifies() {
        assert_eq!(verify_chain(&chain(5)), Ok(()));
    }

    #[test]
    fn an_edited_row_is_detected() {
        let mut rows = chain(5);
        rows[2].event.subject = "someone-else".into();
        assert_eq!(verify_chain(&rows), Err(ChainError::Tampered { seq: 3 }));
    }

    #[test]
    fn a_deleted_row_is_detected() {
        let mut rows = chain(5);
        rows.remove(1);
        assert_eq!(
            verify_chain(&rows),
            Err(ChainError::Gap {
                seq: 3,
                expected_prev: 1
            })
        );
    }
}
