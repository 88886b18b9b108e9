//! Circuit breaker for the key store: after repeated connection failures the
//! pool answers at once instead of queueing work for a token that is down.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Consecutive connection failures after which the breaker opens.
const OPEN_AFTER_FAILURES: u32 = 3;
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

pub struct Breaker {
    epoch: Instant,
    consecutive_failures: AtomicU32,
    /// Milliseconds since `epoch` before which no connection is attempted;
    /// 0 when the breaker is closed.
    open_until_ms: AtomicU64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    /// Failing fast; retry no earlier than the given duration from now.
    Open(Duration),
    /// The back-off has passed: the next connection attempt is the probe.
    HalfOpen,
}

impl Breaker {
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            consecutive_failures: AtomicU32::new(0),
            open_until_ms: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn state(&self) -> BreakerState {
        let until = self.open_until_ms.load(Ordering::Acquire);
        if until == 0 {
            return BreakerState::Closed;
        }
        let now = self.now_ms();
        if now < until {
            BreakerState::Open(Duration::from_millis(until - now))
        } else {
            BreakerState::HalfOpen
        }
    }

    pub fn record_success(&self) {
        // Cheap on the hot path: only write when something changes.
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Release);
        }
        if self.open_until_ms.load(Ordering::Relaxed) != 0 {
            self.open_until_ms.store(0, Ordering::Release);
        }
    }

    /// Records a connection failure; returns how long to wait before the
    /// next attempt.
    pub fn record_failure(&self) -> Duration {
        let failures = self.consecutive_failures.fetch_add(1, Ordering::AcqRel) + 1;
        let exponent = failures.saturating_sub(1).min(16);
        let backoff = FIRST_BACKOFF
            .saturating_mul(1u32 << exponent)
            .min(MAX_BACKOFF);
        if failures >= OPEN_AFTER_FAILURES {
            let until = self.now_ms() + backoff.as_millis() as u64;
            self.open_until_ms.store(until.max(1), Ordering::Release);
        }
        backoff
    }
}

impl Default for Breaker {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_repeated_failures_and_closes_on_success() {
        let breaker = Breaker::new();
        breaker.record_failure();
        breaker.record_failure();
        assert_eq!(breaker.state(), BreakerState::Closed);
        breaker.record_failure();
        assert!(matches!(breaker.state(), BreakerState::Open(_)));
        breaker.record_success();
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let breaker = Breaker::new();
        let waits: Vec<Duration> = (0..20).map(|_| breaker.record_failure()).collect();
        assert!(waits.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*waits.last().unwrap(), MAX_BACKOFF);
    }
}
