//! A short-lived in-memory view of what the signing hot path needs about an
//! agent: its key, its status and its newest certificate. Reading these from
//! the database on every signature costs more CPU than the signature.
//!
//! Changes made through this process invalidate the entry at once. Changes
//! made by another replica are seen within `TTL`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::attestation::AttestedKey;
use crate::identity::AgentName;
use crate::keys::KeyRef;
use crate::store::AgentRecord;

/// How long an entry is trusted without asking the database again.
pub const TTL: Duration = Duration::from_secs(1);

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
    pub fn get(&self, name: &AgentName) -> Option<Arc<SigningView>> {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        match entries.get(name) {
            Some((fetched, view)) if fetched.elapsed() < TTL => Some(view.clone()),
            _ => None,
        }
    }

    pub fn put(&self, name: &AgentName, view: SigningView) -> Arc<SigningView> {
        let view = Arc::new(view);
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
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
        self.entries
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
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
