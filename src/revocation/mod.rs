//! The revocation set: which certificates are revoked and which agents may
//! not act, held in memory by every replica and consulted on every
//! authorization (docs/architecture.md, "Revocation and rotation").
//!
//! The database is the truth. A replica reloads the whole set when it
//! revokes something itself (before the call returns), when PostgreSQL
//! announces a revocation committed by another replica (LISTEN/NOTIFY), and
//! every `RELOAD_INTERVAL` as a safety net for a missed notification — the
//! only mechanism on SQLite, which has one process. A full reload is a scan
//! of revoked unexpired certificates and inactive agents: small, and it
//! cannot drift the way incremental updates can.

pub mod hooks;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::runtime::supervisor::Supervisor;
use crate::store::{RevocationSnapshot, Store, StoreError, REVOCATION_CHANNEL};
use crate::telemetry::RevocationMetrics;

/// How often the set is reloaded without being told to.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(10);

/// A revoked certificate as the set knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revoked {
    pub revoked_at: i64,
    pub reason: String,
}

/// One reading of the set. A request that makes several checks takes one
/// (`RevocationSet::current`), so that its checks agree with each other
/// even if a reload lands in between.
#[derive(Default)]
pub struct RevocationView {
    certificates: HashMap<String, Revoked>,
    /// Agents that may not act, with their status.
    inactive_agents: HashMap<String, String>,
    retired_keys: std::collections::HashSet<String>,
    compromised_keys: std::collections::HashSet<String>,
}

impl RevocationView {
    fn from_snapshot(snapshot: RevocationSnapshot) -> Self {
        Self {
            certificates: snapshot
                .certificates
                .into_iter()
                .map(|c| {
                    (
                        c.serial,
                        Revoked {
                            revoked_at: c.revoked_at,
                            reason: c.reason,
                        },
                    )
                })
                .collect(),
            inactive_agents: snapshot.inactive_agents.into_iter().collect(),
            retired_keys: snapshot.retired_keys.into_iter().collect(),
            compromised_keys: snapshot.compromised_keys.into_iter().collect(),
        }
    }

    /// The agent's status when it is not `active`; `None` when it may act.
    pub fn inactive_status(&self, agent: &str) -> Option<&str> {
        self.inactive_agents.get(agent).map(String::as_str)
    }

    /// Whether a rotation retired this key (it is nobody's current key).
    pub fn key_retired(&self, key_id: &str) -> bool {
        self.retired_keys.contains(key_id)
    }

    /// Whether a keyCompromise revocation reported this custodial key.
    pub fn key_compromised(&self, key_id: &str) -> bool {
        self.compromised_keys.contains(key_id)
    }

    /// The certificate's revocation, if it is revoked (or on hold).
    pub fn certificate(&self, serial: &str) -> Option<&Revoked> {
        self.certificates.get(serial)
    }
}

pub struct RevocationSet {
    store: Arc<dyn Store>,
    state: RwLock<Arc<RevocationView>>,
    /// Bumped on every reload that changed the set: the CRL is rebuilt when
    /// it moves.
    generation: AtomicU64,
    metrics: RevocationMetrics,
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

impl RevocationSet {
    pub async fn load(
        store: Arc<dyn Store>,
        metrics: RevocationMetrics,
    ) -> Result<Arc<Self>, StoreError> {
        let snapshot = store.revocation_snapshot(unix_now()).await?;
        Ok(Arc::new(Self {
            store,
            state: RwLock::new(Arc::new(RevocationView::from_snapshot(snapshot))),
            generation: AtomicU64::new(1),
            metrics,
        }))
    }

    /// The set as it stands now.
    pub fn current(&self) -> Arc<RevocationView> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reads the set again from the database.
    pub async fn reload(&self) -> Result<(), StoreError> {
        let snapshot = self.store.revocation_snapshot(unix_now()).await?;
        let fresh = RevocationView::from_snapshot(snapshot);
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        if state.certificates != fresh.certificates
            || state.inactive_agents != fresh.inactive_agents
            || state.retired_keys != fresh.retired_keys
            || state.compromised_keys != fresh.compromised_keys
        {
            self.generation.fetch_add(1, Ordering::SeqCst);
        }
        *state = Arc::new(fresh);
        self.metrics.reloads.inc();
        Ok(())
    }

    /// The certificate's revocation, if it is revoked (or on hold), for a
    /// caller with this one check to make.
    pub fn certificate(&self, serial: &str) -> Option<Revoked> {
        self.current().certificate(serial).cloned()
    }

    /// Counts a revocation, suspension or resumption made here, and makes
    /// it visible to this replica before the call that made it returns.
    pub async fn changed_here(&self) -> Result<(), StoreError> {
        self.metrics.revocations.inc();
        self.reload().await
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Keeps the set current for as long as the process runs: a reload
    /// every `RELOAD_INTERVAL`, and on PostgreSQL one on every announced
    /// revocation.
    pub fn watch(self: &Arc<Self>, tasks: &Supervisor, database_url: &str) {
        tasks.every(
            "reloading the revocation set",
            RELOAD_INTERVAL,
            self,
            |set| async move { set.reload().await },
        );
        if database_url.starts_with("postgres") {
            let listening = Arc::downgrade(self);
            let url = database_url.to_owned();
            tasks.spawn("revocation listener", move |mut stop| async move {
                tokio::select! {
                    _ = stop.stopped() => {}
                    _ = listen(listening, url) => {}
                }
            });
        }
    }
}

/// Follows PostgreSQL's announcements of committed revocations, connecting
/// again after a failure (and reloading then, since announcements made while
/// disconnected are lost).
async fn listen(set: std::sync::Weak<RevocationSet>, url: String) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut listener = match sqlx::postgres::PgListener::connect(&url).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "revocation listener cannot connect");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        if let Err(e) = listener.listen(REVOCATION_CHANNEL).await {
            tracing::warn!(error = %e, "LISTEN failed");
            tokio::time::sleep(backoff).await;
            continue;
        }
        backoff = Duration::from_millis(100);
        let Some(current) = set.upgrade() else { return };
        let _ = current.reload().await;
        drop(current);
        loop {
            match listener.recv().await {
                Ok(notification) => {
                    let Some(current) = set.upgrade() else { return };
                    if let Err(e) = current.reload().await {
                        tracing::warn!(error = %e, "reloading the revocation set failed");
                        continue;
                    }
                    // The payload is the revocation's commit-side time in
                    // unix ms: how long it took to be enforced here.
                    if let Ok(at_ms) = notification.payload().parse::<i64>() {
                        let now_ms = (time::OffsetDateTime::now_utc().unix_timestamp_nanos()
                            / 1_000_000) as i64;
                        let seconds = (now_ms - at_ms).max(0) as f64 / 1000.0;
                        current.metrics.propagation_seconds.observe(seconds);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "revocation listener lost its connection");
                    break;
                }
            }
        }
    }
}
