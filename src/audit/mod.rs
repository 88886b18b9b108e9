//! The audit trail as a transparency log (issue 16). Every security-relevant
//! change appends an entry, in the same database transaction as the change
//! (see `store`; if the entry cannot be written, the change fails), and
//! each entry is a leaf of an RFC 6962 Merkle tree whose checkpoints are
//! signed on the token and whose tiles anyone can fetch and check
//! (`transparency` builds and serves them; this module is the format).
//!
//! An entry is the event as UTF-8 JSON, with its leaf index and time. Never
//! put a secret in an event: details hold names, serials, digests and
//! reasons only (`tests/audit_log.rs` checks what a run writes).

pub mod context;
pub mod merkle;
pub mod note;
pub mod tiles;
pub mod verify;

use serde::{Deserialize, Serialize};

pub use context::RequestContext;

/// The largest entry an entry bundle can carry (a uint16 length prefix).
pub const MAX_ENTRY_BYTES: usize = u16::MAX as usize;

/// What happened, by whom, to what, under which decision, and the request
/// it came from. Built with [`AuditEvent::new`], which takes the request's
/// context (request id, source address, credential) from the task it runs
/// in.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// An admin (`admin:<name>`), an agent (`agent:<name>`), or keyward.
    pub actor: String,
    pub action: String,
    pub subject: String,
    /// The agent the event is about, where there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(flatten)]
    pub context: RequestContext,
    /// The policy version a decision was taken under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_version: Option<i64>,
    /// `allow`, `deny` or `hold` (waiting for approval).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A JSON object.
    pub details: serde_json::Value,
    /// The event as JSON, made once: by [`AuditEvent::prepare`] in the
    /// task that records the change, so that the one writer that numbers
    /// entries (a serialized section on SQLite) only splices in the index
    /// and time.
    #[serde(skip)]
    body: PreparedBody,
}

/// An event's JSON, once made; not part of what the event says (two
/// events that say the same are equal whether or not either was prepared).
#[derive(Clone, Debug, Default)]
struct PreparedBody(std::sync::OnceLock<String>);

impl PartialEq for PreparedBody {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl AuditEvent {
    pub fn new(actor: impl Into<String>, action: &str, subject: impl Into<String>) -> Self {
        Self {
            actor: actor.into(),
            action: action.to_owned(),
            subject: subject.into(),
            agent: None,
            context: RequestContext::current(),
            policy_version: None,
            decision: None,
            reason: None,
            details: serde_json::Value::Object(Default::default()),
            body: PreparedBody::default(),
        }
    }

    pub fn with(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        if let serde_json::Value::Object(map) = &mut self.details {
            map.insert(key.to_owned(), value.into());
        }
        self
    }

    /// The agent the event is about.
    pub fn agent(mut self, name: impl Into<String>) -> Self {
        self.agent = Some(name.into());
        self
    }

    /// The policy decision behind the change.
    pub fn decided(mut self, policy_version: i64, decision: &str, reason: Option<&str>) -> Self {
        self.policy_version = Some(policy_version);
        self.decision = Some(decision.to_owned());
        self.reason = reason.map(str::to_owned);
        self
    }

    /// The policy version in force, where no single decision was taken.
    pub fn under_policy(mut self, policy_version: i64) -> Self {
        self.policy_version = Some(policy_version);
        self
    }

    /// Makes the event's JSON now, in this task, if it is not made yet:
    /// call it before handing the event to a writer thread.
    pub fn prepare(&self) -> &str {
        self.body.0.get_or_init(|| {
            let written = serde_json::to_string(self).expect("plain data serializes");
            if written.len() + ENTRY_HEAD_BYTES <= MAX_ENTRY_BYTES {
                return written;
            }
            use sha2::Digest as _;
            let mut shortened = self.clone();
            shortened.body = PreparedBody::default();
            shortened.details = serde_json::json!({
                "truncated": true,
                "details_sha256": hex::encode(sha2::Sha256::digest(self.details.to_string())),
            });
            serde_json::to_string(&shortened).expect("plain data serializes")
        })
    }

    /// The leaf bytes of this event as entry `index` at `time` (see
    /// [`entry_time`]): `{"index":…,"time":…,` and the event's own fields.
    /// An event too large for an entry bundle keeps its fields and gives
    /// its details' digest instead of the details.
    pub fn to_entry(&self, index: u64, time: &str) -> String {
        let body = self.prepare();
        let fields = body.strip_prefix('{').unwrap_or(body);
        format!("{{\"index\":{index},\"time\":\"{time}\",{fields}")
    }
}

/// Room the index and time take in an entry: `{"index":<20 digits>,
/// "time":"<24>",`, rounded up.
const ENTRY_HEAD_BYTES: usize = 64;

/// An entry's `time`: RFC 3339 with milliseconds, UTC, from Unix ms.
pub fn entry_time(at_ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at_ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// What `GET /v1/audit/events` asks for: entries after `after` (an index),
/// oldest first, matching every filter given.
#[derive(Clone, Debug, Default)]
pub struct AuditQuery {
    pub agent: Option<String>,
    pub action: Option<String>,
    pub actor: Option<String>,
    /// Unix milliseconds, inclusive.
    pub since_ms: Option<i64>,
    /// Unix milliseconds, exclusive.
    pub until_ms: Option<i64>,
    pub after: Option<u64>,
    pub limit: u32,
}

/// One entry of the log as its leaf bytes hold it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Its leaf index, from 0.
    pub index: u64,
    /// RFC 3339, milliseconds, UTC.
    pub time: String,
    #[serde(flatten)]
    pub event: AuditEvent,
}

/// A stored entry: its leaf bytes and what they say.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditRecord {
    pub index: u64,
    pub at_ms: i64,
    /// The leaf's bytes, exactly as hashed.
    pub entry: String,
    pub event: AuditEvent,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SequenceError {
    #[error("audit entry {found} where entry {expected} was expected")]
    Gap { expected: u64, found: u64 },
    #[error("audit entry {index} says it is entry {says}")]
    Misnumbered { index: u64, says: String },
}

/// Checks that `records` are the log's first entries, in order, each
/// numbered as it is stored. (That they hash to the signed root is the
/// verifier's part: `verify`.)
pub fn verify_sequence(records: &[AuditRecord]) -> Result<(), SequenceError> {
    for (expected, record) in records.iter().enumerate() {
        let expected = expected as u64;
        if record.index != expected {
            return Err(SequenceError::Gap {
                expected,
                found: record.index,
            });
        }
        let says: serde_json::Value = serde_json::from_str(&record.entry).unwrap_or_default();
        if says["index"].as_u64() != Some(expected) {
            return Err(SequenceError::Misnumbered {
                index: expected,
                says: says["index"].to_string(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_json_with_its_index_time_and_every_field() {
        let event = AuditEvent::new("admin:ops", "certificate.issue", "alpha")
            .agent("alpha")
            .decided(3, "allow", None)
            .with("serial", "01ab");
        let entry = event.to_entry(41, &entry_time(1_765_000_000_123));
        let parsed: serde_json::Value = serde_json::from_str(&entry).unwrap();
        assert_eq!(parsed["index"], 41);
        assert_eq!(parsed["time"], "2025-12-06T05:46:40.123Z");
        assert_eq!(parsed["actor"], "admin:ops");
        assert_eq!(parsed["agent"], "alpha");
        assert_eq!(parsed["policy_version"], 3);
        assert_eq!(parsed["decision"], "allow");
        assert_eq!(parsed["details"]["serial"], "01ab");
        let back: AuditEntry = serde_json::from_str(&entry).unwrap();
        assert_eq!((back.index, back.event), (41, event));
    }

    #[test]
    fn an_event_too_large_for_a_bundle_gives_its_details_digest() {
        let event =
            AuditEvent::new("keyward", "policy.apply", "policy").with("source", "x".repeat(70_000));
        let entry = event.to_entry(0, &entry_time(0));
        assert!(entry.len() <= MAX_ENTRY_BYTES);
        let parsed: serde_json::Value = serde_json::from_str(&entry).unwrap();
        assert_eq!(parsed["details"]["truncated"], true);
        assert_eq!(parsed["action"], "policy.apply");
    }

    fn record(index: u64, says: u64) -> AuditRecord {
        let event = AuditEvent::new("keyward", "x", "y");
        AuditRecord {
            index,
            at_ms: 0,
            entry: event.to_entry(says, &entry_time(0)),
            event,
        }
    }

    #[test]
    fn a_missing_or_misnumbered_entry_breaks_the_sequence() {
        assert_eq!(verify_sequence(&[record(0, 0), record(1, 1)]), Ok(()));
        assert_eq!(
            verify_sequence(&[record(0, 0), record(2, 2)]),
            Err(SequenceError::Gap {
                expected: 1,
                found: 2
            })
        );
        assert!(matches!(
            verify_sequence(&[record(0, 0), record(1, 7)]),
            Err(SequenceError::Misnumbered { index: 1, .. })
        ));
    }
}
