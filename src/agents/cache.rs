//! A short-lived in-memory view of what the signing hot path needs about an
//! agent: its key, its status and its newest certificate. Reading these from
//! the database on every signature costs more CPU than the signature.
//!
//! Changes made through this process invalidate the entry at once. Changes
//! made by another replica are seen within `TTL`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::identity::AgentName;
use crate::keys::KeyRef;

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
}

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
        if entries.len() > 100_000 {
            entries.retain(|_, (fetched, _)| fetched.elapsed() < TTL);
        }
        entries.insert(name.clone(), (Instant::now(), view.clone()));
        view
    }

    pub fn invalidate(&self, name: &AgentName) {
        self.entries
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }
}
