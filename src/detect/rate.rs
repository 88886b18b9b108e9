//! Each agent's request rate against its own moving baseline, on one
//! replica: the arithmetic of the `rate_spike` detector, apart from the
//! clock so that it can be tested on any timeline.
//!
//! - **The rate** is measured over the last [`SLOT_MS`] as a sliding
//!   estimate from two fixed slots (the previous slot's count weighted by
//!   how much of it is still inside the window, plus the current slot's),
//!   so it costs two counters an agent and follows a burst within a slot.
//! - **The baseline** is an exponentially weighted mean of the agent's
//!   completed slots, idle ones included, with time constant
//!   `rate_baseline_seconds`; bias-corrected (divided by the weight
//!   accumulated so far) so that a short history is its plain mean rather
//!   than a mean pulled towards zero.
//! - **A spike** is a rate above `rate_spike_floor` and above
//!   `rate_spike_factor` times the baseline, judged only once the replica
//!   has watched the agent for a sixth of the baseline's time constant. A
//!   replica that starts, or an agent it has not seen, has no baseline
//!   yet: judging then would flag every busy agent after each restart.
//!
//! Spread over replicas by a load balancer, an agent's rate and baseline
//! both divide by the number of replicas, so the factor means the same;
//! the floor is per replica.

use std::collections::HashMap;

use crate::policy::document::AnomalyPolicy;

/// The measuring slot, and so the window the rate is measured over.
pub const SLOT_MS: i64 = 10_000;
/// Agents watched at once; past it the quietest half is forgotten (they
/// warm up again when next seen, so forgetting can miss a spike, never
/// invent one).
const MAX_AGENTS: usize = 100_000;

/// A spike, as seen when it was judged.
#[derive(Clone, Debug, PartialEq)]
pub struct Spike {
    pub rate_per_second: f64,
    pub baseline_per_second: f64,
    /// The start of the earliest slot whose requests made the spike.
    pub since_ms: i64,
}

#[derive(Debug)]
struct AgentRate {
    first_seen_ms: i64,
    /// Index of the current slot (time / SLOT_MS).
    slot: i64,
    current: u32,
    previous: u32,
    /// Exponentially weighted sum of completed slots' rates, and the
    /// weight it has accumulated (which tends to 1).
    weighted_rate: f64,
    weight: f64,
    /// No judging before this (a detection is one anomaly per window).
    quiet_until_ms: i64,
}

#[derive(Debug, Default)]
pub struct RateTracker {
    agents: HashMap<String, AgentRate>,
}

impl RateTracker {
    /// Counts a request of `agent` at `now_ms`; returns the spike it
    /// completes, if it does.
    pub fn request(&mut self, agent: &str, now_ms: i64, policy: &AnomalyPolicy) -> Option<Spike> {
        let slot = now_ms.div_euclid(SLOT_MS);
        let decay = (-(SLOT_MS as f64) / (policy.rate_baseline_seconds as f64 * 1000.0)).exp();
        let rate = match self.agents.get_mut(agent) {
            Some(rate) => rate,
            None => {
                if self.agents.len() >= MAX_AGENTS {
                    self.forget_quietest();
                }
                self.agents.entry(agent.to_owned()).or_insert(AgentRate {
                    first_seen_ms: now_ms,
                    slot,
                    current: 0,
                    previous: 0,
                    weighted_rate: 0.0,
                    weight: 0.0,
                    quiet_until_ms: 0,
                })
            }
        };
        rate.advance_to(slot, decay);
        rate.current = rate.current.saturating_add(1);

        let warm_up_ms = policy.rate_baseline_seconds as i64 * 1000 / 6;
        if now_ms - rate.first_seen_ms < warm_up_ms.max(SLOT_MS) || now_ms < rate.quiet_until_ms {
            return None;
        }
        // How much of the previous slot is still inside the window.
        let previous_share = 1.0 - (now_ms - slot * SLOT_MS) as f64 / SLOT_MS as f64;
        let in_window = f64::from(rate.previous) * previous_share + f64::from(rate.current);
        let rate_per_second = in_window * 1000.0 / SLOT_MS as f64;
        let baseline_per_second = if rate.weight > 0.0 {
            rate.weighted_rate / rate.weight
        } else {
            0.0
        };
        if rate_per_second <= policy.rate_spike_floor
            || rate_per_second <= policy.rate_spike_factor * baseline_per_second
        {
            return None;
        }
        rate.quiet_until_ms = now_ms + policy.sharing_window_seconds as i64 * 1000;
        // The spike began in the previous slot when that slot alone was
        // already past the threshold's share of a slot.
        let threshold = policy
            .rate_spike_floor
            .max(policy.rate_spike_factor * baseline_per_second);
        let previous_was_over = f64::from(rate.previous) * 1000.0 / SLOT_MS as f64 > threshold;
        let since_slot = if previous_was_over { slot - 1 } else { slot };
        Some(Spike {
            rate_per_second,
            baseline_per_second,
            since_ms: (since_slot * SLOT_MS).max(rate.first_seen_ms),
        })
    }

    /// Forgets agents not seen for `idle_ms` (their baseline has decayed
    /// to nothing a spike could be measured against that a floor does not
    /// already cover).
    pub fn prune(&mut self, now_ms: i64, idle_ms: i64) {
        let oldest_slot = (now_ms - idle_ms).div_euclid(SLOT_MS);
        self.agents.retain(|_, rate| rate.slot >= oldest_slot);
    }

    fn forget_quietest(&mut self) {
        let mut last_slots: Vec<i64> = self.agents.values().map(|r| r.slot).collect();
        let middle = last_slots.len() / 2;
        let (_, median, _) = last_slots.select_nth_unstable(middle);
        let cut = *median;
        self.agents.retain(|_, rate| rate.slot > cut);
        if self.agents.len() >= MAX_AGENTS {
            // Every agent was seen in the same slot: start afresh.
            self.agents.clear();
        }
    }
}

impl AgentRate {
    /// Moves the slots on to `slot`, folding each completed slot (idle
    /// ones as zero) into the baseline.
    fn advance_to(&mut self, slot: i64, decay: f64) {
        let elapsed = slot - self.slot;
        if elapsed <= 0 {
            return;
        }
        let slot_rate = |count: u32| f64::from(count) * 1000.0 / SLOT_MS as f64;
        // The slot just completed.
        self.weighted_rate = decay * self.weighted_rate + (1.0 - decay) * slot_rate(self.current);
        self.weight = decay * self.weight + (1.0 - decay);
        // Idle slots after it, folded in at once: each multiplies the
        // weighted rate by `decay` and adds (1 - decay) to the weight.
        let idle = (elapsed - 1).min(i64::from(i32::MAX)) as i32;
        if idle > 0 {
            let kept = decay.powi(idle);
            self.weighted_rate *= kept;
            self.weight = 1.0 - (1.0 - self.weight) * kept;
        }
        self.previous = if elapsed == 1 { self.current } else { 0 };
        self.current = 0;
        self.slot = slot;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(floor: f64, factor: f64, baseline_seconds: u64) -> AnomalyPolicy {
        AnomalyPolicy {
            rate_spike_floor: floor,
            rate_spike_factor: factor,
            rate_baseline_seconds: baseline_seconds,
            ..AnomalyPolicy::default()
        }
    }

    /// Sends `per_second` requests a second, evenly, from `from_ms` for
    /// `seconds`; returns the first spike judged.
    fn steady(
        tracker: &mut RateTracker,
        agent: &str,
        per_second: u32,
        from_ms: i64,
        seconds: i64,
        policy: &AnomalyPolicy,
    ) -> Option<Spike> {
        let mut first = None;
        for second in 0..seconds {
            for i in 0..per_second {
                let at = from_ms + second * 1000 + i64::from(i) * 1000 / i64::from(per_second);
                let spike = tracker.request(agent, at, policy);
                first = first.or(spike);
            }
        }
        first
    }

    #[test]
    fn a_steady_agent_is_never_a_spike_however_busy() {
        let policy = policy(10.0, 10.0, 3600);
        let mut tracker = RateTracker::default();
        assert_eq!(
            steady(&mut tracker, "busy", 200, 0, 3 * 3600, &policy),
            None
        );
    }

    #[test]
    fn a_burst_far_above_the_baseline_and_the_floor_is_a_spike_within_a_slot() {
        let policy = policy(10.0, 10.0, 3600);
        let mut tracker = RateTracker::default();
        let start = 1_000_000;
        assert_eq!(steady(&mut tracker, "a", 5, start, 3600, &policy), None);
        let burst_at = start + 3600 * 1000;
        let spike = steady(&mut tracker, "a", 400, burst_at, 10, &policy).expect("a spike");
        assert!((4.0..6.0).contains(&spike.baseline_per_second), "{spike:?}");
        assert!(spike.rate_per_second > 50.0, "{spike:?}");
        // Judged on the request that crossed 10 x 5 a second over the
        // window: within a slot of the burst's start.
        assert!(spike.since_ms >= burst_at - SLOT_MS && spike.since_ms <= burst_at);
    }

    #[test]
    fn a_rate_above_the_baseline_but_under_the_floor_is_not_a_spike() {
        let policy = policy(50.0, 10.0, 3600);
        let mut tracker = RateTracker::default();
        assert_eq!(steady(&mut tracker, "a", 1, 0, 3600, &policy), None);
        // 40 a second is forty times the baseline, but under the floor.
        assert_eq!(steady(&mut tracker, "a", 40, 3_600_000, 60, &policy), None);
    }

    #[test]
    fn a_rate_above_the_floor_but_within_the_factor_is_not_a_spike() {
        let policy = policy(10.0, 10.0, 3600);
        let mut tracker = RateTracker::default();
        assert_eq!(steady(&mut tracker, "a", 20, 0, 3600, &policy), None);
        assert_eq!(steady(&mut tracker, "a", 150, 3_600_000, 60, &policy), None);
    }

    #[test]
    fn nothing_is_judged_while_the_baseline_warms_up() {
        // A replica that restarts meets its agents at their usual rate
        // with no baseline; they must not all look like spikes.
        let policy = policy(10.0, 10.0, 3600);
        let mut tracker = RateTracker::default();
        // Ten minutes is a sixth of the hour.
        assert_eq!(steady(&mut tracker, "a", 300, 0, 599, &policy), None);
        let mut other = RateTracker::default();
        assert_eq!(steady(&mut other, "b", 1, 0, 600, &policy), None);
        assert!(steady(&mut other, "b", 300, 600_000, 10, &policy).is_some());
    }

    #[test]
    fn an_idle_agent_that_bursts_is_measured_against_its_decayed_baseline() {
        let policy = policy(10.0, 10.0, 600);
        let mut tracker = RateTracker::default();
        assert_eq!(steady(&mut tracker, "a", 5, 0, 600, &policy), None);
        // Silent for an hour: six time constants, the baseline is ~0.
        let spike = steady(&mut tracker, "a", 30, 4_200_000, 10, &policy).expect("a spike");
        assert!(spike.baseline_per_second < 0.05, "{spike:?}");
        // After the same silence, a rate under the floor is still nothing.
        let mut quiet = RateTracker::default();
        steady(&mut quiet, "a", 5, 0, 600, &policy);
        assert_eq!(steady(&mut quiet, "a", 9, 4_200_000, 30, &policy), None);
    }

    #[test]
    fn a_spike_is_judged_once_per_window_and_the_baseline_then_moves() {
        let policy = AnomalyPolicy {
            sharing_window_seconds: 60,
            ..policy(10.0, 10.0, 600)
        };
        let mut tracker = RateTracker::default();
        steady(&mut tracker, "a", 2, 0, 600, &policy);
        let mut spikes = 0;
        for second in 0..59 {
            for i in 0..100 {
                let at = 600_000 + second * 1000 + i * 10;
                spikes += usize::from(tracker.request("a", at, &policy).is_some());
            }
        }
        assert_eq!(spikes, 1);
        // Kept up for long enough, the new rate is the agent's normal.
        assert_eq!(
            steady(&mut tracker, "a", 100, 659_000, 3 * 600, &policy),
            None
        );
    }

    #[test]
    fn agents_are_judged_apart() {
        let policy = policy(10.0, 10.0, 600);
        let mut tracker = RateTracker::default();
        steady(&mut tracker, "quiet", 1, 0, 600, &policy);
        steady(&mut tracker, "busy", 200, 0, 600, &policy);
        // The busy agent's rate is not a spike of the quiet one's, nor
        // the reverse.
        assert_eq!(
            steady(&mut tracker, "busy", 200, 600_000, 30, &policy),
            None
        );
        assert_eq!(steady(&mut tracker, "quiet", 1, 600_000, 30, &policy), None);
        assert!(steady(&mut tracker, "quiet", 200, 630_000, 10, &policy).is_some());
    }

    #[test]
    fn prune_forgets_idle_agents_only() {
        let policy = policy(10.0, 10.0, 600);
        let mut tracker = RateTracker::default();
        tracker.request("old", 0, &policy);
        tracker.request("new", 7_200_000, &policy);
        tracker.prune(7_200_000, 3_600_000);
        assert_eq!(tracker.agents.len(), 1);
        assert!(tracker.agents.contains_key("new"));
    }
}
