//! Background work that lives as long as what it works on.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Runs `work` on `owner` every `period`, the first time one period from
/// now, until the last strong reference to `owner` is gone. The task holds
/// only a weak one, so it never keeps its owner (and the owner's token
/// sessions, connections) alive. A failure is logged as `what` failing,
/// and the next period tries again; a run longer than the period delays
/// the next instead of bunching runs up.
pub fn every<T, F, Fut, O, E>(period: Duration, owner: &Arc<T>, what: &'static str, work: F)
where
    T: ?Sized + Send + Sync + 'static,
    F: Fn(Arc<T>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<O, E>> + Send,
    E: std::fmt::Display,
{
    let owner = Arc::downgrade(owner);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(owner) = owner.upgrade() else {
                return;
            };
            if let Err(e) = work(owner).await {
                tracing::warn!(error = %e, "{what} failed");
            }
        }
    });
}
