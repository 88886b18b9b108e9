//! Custodial keys no agent owns, and their removal.
//!
//! A custodial key is generated on the token before the agent (or the
//! rotation) that owns it is recorded. A process killed between the two, or
//! a removal that failed after a refused registration, leaves a key on the
//! token that nothing refers to: a signing key no one can revoke or rotate,
//! in a slot a small token cannot spare.
//!
//! The janitor compares the token's agent keys with the store's. A key is
//! destroyed only when sweeps at least `grace` apart both found it unowned:
//! a registration in flight on any replica (its key generated, not yet
//! recorded) owns its key by the later sweep. The token is listed before the
//! store is read, so a key recorded in between counts as owned.
//!
//! Wrapped keys never need this: an unrecorded one is a session object that
//! goes with its session, and its blob was never stored.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use super::{AgentError, Registry};
use crate::audit::AuditEvent;
use crate::keys::KeyId;

/// Every custodial key id begins with this (`KeyId::random("agent")`).
pub const AGENT_KEY_PREFIX: &str = "agent-";

/// Keys found unowned, with when each was first found so.
#[derive(Debug)]
pub struct OrphanSuspects {
    grace: Duration,
    first_seen: HashMap<KeyId, Instant>,
}

impl OrphanSuspects {
    pub fn new(grace: Duration) -> Self {
        Self {
            grace,
            first_seen: HashMap::new(),
        }
    }

    /// Takes one sweep's unowned keys; returns those unowned for at least
    /// the grace period. A key missing from `unowned` was recorded or
    /// removed meanwhile and is no longer suspected: should it turn up
    /// unowned again, its grace starts over.
    pub fn sweep(&mut self, unowned: &[KeyId], now: Instant) -> Vec<KeyId> {
        let current: HashSet<&KeyId> = unowned.iter().collect();
        self.first_seen.retain(|id, _| current.contains(id));
        let mut due: Vec<KeyId> = unowned
            .iter()
            .filter(|id| {
                let first = *self.first_seen.entry((*id).clone()).or_insert(now);
                now.duration_since(first) >= self.grace
            })
            .cloned()
            .collect();
        due.sort();
        due
    }

    pub fn forget(&mut self, id: &KeyId) {
        self.first_seen.remove(id);
    }
}

impl Registry {
    /// Destroys custodial keys on the token that no agent has owned for the
    /// grace period, each with an audit entry. Every replica runs this; the
    /// one whose removal succeeds records it.
    pub async fn destroy_orphan_keys(&self) -> Result<usize, AgentError> {
        let started = Instant::now();
        let on_token = self.pool.key_ids(AGENT_KEY_PREFIX).await?;
        tracing::debug!(
            keys = on_token.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "listed the agent keys the key store holds"
        );
        if on_token.is_empty() {
            self.lock_orphans().sweep(&[], Instant::now());
            return Ok(0);
        }
        let owned: HashSet<String> = self.store.custodial_key_ids().await?.into_iter().collect();
        let unowned: Vec<KeyId> = on_token
            .into_iter()
            .filter(|id| !owned.contains(id.as_str()))
            .collect();
        let due = self.lock_orphans().sweep(&unowned, Instant::now());
        let mut destroyed = 0;
        for key in due {
            match self.pool.destroy(&key).await {
                Ok(()) => {}
                // Another replica removed it first, and recorded it.
                Err(e) if e.is_not_found() => {
                    self.lock_orphans().forget(&key);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(key = %key, error = %e, "destroying a key no agent owns failed");
                    continue;
                }
            }
            self.lock_orphans().forget(&key);
            tracing::warn!(key = %key, "destroyed a custodial key no agent owns");
            let audit = AuditEvent::new("keyward", "key.destroy_orphan", key.as_str())
                .with("unowned_for_at_least_seconds", self.orphan_grace.as_secs());
            self.store.append_audit_event(&audit).await?;
            destroyed += 1;
        }
        Ok(destroyed)
    }

    fn lock_orphans(&self) -> std::sync::MutexGuard<'_, OrphanSuspects> {
        self.orphans.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> KeyId {
        KeyId::parse(&format!("agent-{n:016x}")).unwrap()
    }

    const GRACE: Duration = Duration::from_secs(600);

    #[test]
    fn a_key_first_found_unowned_is_not_destroyed() {
        let mut suspects = OrphanSuspects::new(GRACE);
        assert!(suspects.sweep(&[key(1)], Instant::now()).is_empty());
    }

    #[test]
    fn a_key_unowned_for_the_whole_grace_period_is_due() {
        let mut suspects = OrphanSuspects::new(GRACE);
        let start = Instant::now();
        suspects.sweep(&[key(1), key(2)], start);
        assert!(suspects
            .sweep(&[key(1), key(2)], start + GRACE - Duration::from_secs(1))
            .is_empty());
        assert_eq!(
            suspects.sweep(&[key(2), key(1)], start + GRACE),
            vec![key(1), key(2)]
        );
    }

    #[test]
    fn a_key_recorded_between_sweeps_is_spared_and_its_grace_starts_over() {
        let mut suspects = OrphanSuspects::new(GRACE);
        let start = Instant::now();
        suspects.sweep(&[key(1)], start);
        // Its registration was recorded: the next sweep finds it owned.
        assert!(suspects.sweep(&[], start + GRACE).is_empty());
        // Unowned again later (its agent's row was removed by hand, say):
        // a full grace period again before it goes.
        assert!(suspects.sweep(&[key(1)], start + GRACE * 2).is_empty());
        assert_eq!(suspects.sweep(&[key(1)], start + GRACE * 3), vec![key(1)]);
    }

    #[test]
    fn a_key_that_appears_later_waits_its_own_grace_period() {
        let mut suspects = OrphanSuspects::new(GRACE);
        let start = Instant::now();
        suspects.sweep(&[key(1)], start);
        let later = start + GRACE;
        assert_eq!(suspects.sweep(&[key(1), key(2)], later), vec![key(1)]);
        suspects.forget(&key(1));
        assert_eq!(suspects.sweep(&[key(2)], later + GRACE), vec![key(2)]);
    }
}
