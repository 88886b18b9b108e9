//! A short-lived in-memory view of what the signing hot path needs about an
//! agent: its key, its status and its newest certificate. Reading these from
//! the database on every signature costs more CPU than the signature.
//!
//! Changes made through this process invalidate the entry at once. Changes
//! made by another replica are seen within `TTL`.
//!
//! A signing view is renewed before it expires: a hit on an entry older
//! than `REFRESH_AFTER` lets its caller start one reload in the background
//! (`claim_refresh`). Without that, every request for a busy agent missed
//! at once each time its entry expired, each read the database, and all
//! of them waited for those reads together.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::attestation::AttestedKey;
use crate::identity::AgentName;
use crate::keys::KeyRef;
use crate::store::AgentRecord;

/// How long an entry is trusted without asking the database again.
pub const TTL: Duration = Duration::from_secs(1);

/// Past this age a hit starts a reload of the signing view, well before
/// it expires.
pub const REFRESH_AFTER: Duration = Duration::from_millis(500);

#[derive(Clone, Debug)]
pub struct SigningView {
    /// The custodial key, with its blob when it is kept wrapped.
    pub key: Option<KeyRef>,
    pub status: String,
    /// The agent's scopes: its roles under the policy.
    pub scopes: Vec<String>,
    pub certificate_serial: Option<String>,
    /// Unix seconds after which `certificate_serial` is expired.
    pub certificate_not_after: i64,
}

#[derive(Default)]
pub struct AgentCache {
    entries: RwLock<HashMap<AgentName, (Instant, Arc<SigningView>)>>,
    /// Agents whose signing view is being reloaded in the background.
    refreshing: Mutex<HashSet<AgentName>>,
    /// Counts invalidations: a view read from the database before one is
    /// not cached after it (it may predate the change).
    generation: AtomicU64,
    /// Agents' records as issuance reads them. A stale status costs at most
    /// a wasted CA signature: the certificate's row is written only for an
    /// agent active under the lock a revocation takes (`CertificateInsert`).
    records: RwLock<HashMap<AgentName, (Instant, Arc<AgentRecord>)>>,
    /// Attestation evidence by digest: content-addressed, so never stale.
    evidence: RwLock<HashMap<String, Arc<AttestedKey>>>,
}

/// Entries a map holds before the expired ones are dropped (or, for the
/// evidence, all of them).
const MAX_ENTRIES: usize = 100_000;

impl AgentCache {
    /// The agent's signing view, if cached and younger than `TTL`, with
    /// its age (for `claim_refresh`).
    pub fn get(&self, name: &AgentName) -> Option<(Arc<SigningView>, Duration)> {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        match entries.get(name) {
            Some((fetched, view)) if fetched.elapsed() < TTL => {
                Some((view.clone(), fetched.elapsed()))
            }
            _ => None,
        }
    }

    /// Whether the caller should reload the agent's signing view in the
    /// background: its entry (of `age`, from `get`) is past `REFRESH_AFTER`
    /// and no reload is under way. A `true` must be followed by
    /// `refresh_done`.
    pub fn claim_refresh(&self, name: &AgentName, age: Duration) -> bool {
        age >= REFRESH_AFTER
            && self
                .refreshing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name.clone())
    }

    pub fn refresh_done(&self, name: &AgentName) {
        self.refreshing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }

    /// Read before the database, passed to `put`.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Caches a view read from the database after `generation` was read,
    /// unless something was invalidated since; returns it either way.
    pub fn put(&self, name: &AgentName, view: SigningView, generation: u64) -> Arc<SigningView> {
        let view = Arc::new(view);
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        // Checked under the lock `certificate_issued` takes to remove.
        if self.generation.load(Ordering::Acquire) != generation {
            return view;
        }
        if entries.len() > MAX_ENTRIES {
            entries.retain(|_, (fetched, _)| fetched.elapsed() < TTL);
        }
        entries.insert(name.clone(), (Instant::now(), view.clone()));
        view
    }

    /// Forgets what is cached about the agent after a change to it.
    pub fn invalidate(&self, name: &AgentName) {
        self.certificate_issued(name);
        self.records
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }

    /// The signing view names the newest certificate: it is read again.
    pub fn certificate_issued(&self, name: &AgentName) {
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        entries.remove(name);
    }

    pub fn record(&self, name: &AgentName) -> Option<Arc<AgentRecord>> {
        let records = self.records.read().unwrap_or_else(|p| p.into_inner());
        match records.get(name) {
            Some((fetched, record)) if fetched.elapsed() < TTL => Some(record.clone()),
            _ => None,
        }
    }

    pub fn put_record(&self, name: &AgentName, record: AgentRecord) -> Arc<AgentRecord> {
        let record = Arc::new(record);
        let mut records = self.records.write().unwrap_or_else(|p| p.into_inner());
        if records.len() > MAX_ENTRIES {
            records.retain(|_, (fetched, _)| fetched.elapsed() < TTL);
        }
        records.insert(name.clone(), (Instant::now(), record.clone()));
        record
    }

    pub fn evidence(&self, digest: &str) -> Option<Arc<AttestedKey>> {
        self.evidence
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(digest)
            .cloned()
    }

    pub fn put_evidence(&self, attested: AttestedKey) -> Arc<AttestedKey> {
        let attested = Arc::new(attested);
        let mut evidence = self.evidence.write().unwrap_or_else(|p| p.into_inner());
        if evidence.len() > MAX_ENTRIES {
            evidence.clear();
        }
        evidence.insert(attested.evidence.digest.clone(), attested.clone());
        attested
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(status: &str) -> SigningView {
        SigningView {
            key: None,
            status: status.to_owned(),
            scopes: Vec::new(),
            certificate_serial: None,
            certificate_not_after: 0,
        }
    }

    fn alpha() -> AgentName {
        AgentName::parse("alpha").unwrap()
    }

    #[test]
    fn a_view_read_before_an_invalidation_is_not_cached_after_it() {
        let cache = AgentCache::default();
        let before = cache.generation();
        cache.invalidate(&alpha());
        let answered = cache.put(&alpha(), view("active"), before);
        assert_eq!(answered.status, "active", "the reader still gets its view");
        assert!(cache.get(&alpha()).is_none());

        cache.put(&alpha(), view("suspended"), cache.generation());
        assert_eq!(cache.get(&alpha()).unwrap().0.status, "suspended");
    }

    #[test]
    fn a_young_entry_needs_no_refresh_and_an_aging_one_gets_exactly_one() {
        let cache = AgentCache::default();
        cache.put(&alpha(), view("active"), cache.generation());
        let (_, age) = cache.get(&alpha()).unwrap();
        assert!(!cache.claim_refresh(&alpha(), age));

        std::thread::sleep(REFRESH_AFTER);
        let (_, age) = cache.get(&alpha()).expect("still served meanwhile");
        assert!(cache.claim_refresh(&alpha(), age));
        assert!(!cache.claim_refresh(&alpha(), age), "one reload at a time");
        cache.refresh_done(&alpha());
        assert!(
            cache.claim_refresh(&alpha(), age),
            "claimable again once done"
        );
    }
}
