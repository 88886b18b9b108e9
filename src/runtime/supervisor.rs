//! One owner for every background task of a running keyward: the periodic
//! janitors, the policy and revocation-set refreshes, the PostgreSQL
//! revocation listener, the hook deliverer, the listener certificate's
//! renewal and the side listeners. Each is started with a name, sees the
//! same stop signal, and is stopped in the reverse order of its start, so a
//! task never outlives one started before it that it may use.
//!
//! Tasks scoped to one request or one connection are not background tasks
//! and are not here: they end with what they serve.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Handed to every task: resolves once shutdown has begun.
#[derive(Clone)]
pub struct StopSignal(watch::Receiver<bool>);

impl StopSignal {
    /// Waits until the supervisor asks its tasks to stop.
    pub async fn stopped(&mut self) {
        // An error means the supervisor is gone: stop as well.
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    pub fn is_stopped(&self) -> bool {
        *self.0.borrow()
    }
}

struct Task {
    name: &'static str,
    handle: JoinHandle<()>,
}

pub struct Supervisor {
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<Task>>,
}

/// How a task ended at shutdown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// It returned after the stop signal (or before it).
    Stopped,
    /// It did not return within the grace period and was aborted.
    Aborted,
    /// It panicked.
    Panicked,
}

impl Default for Supervisor {
    fn default() -> Self {
        Self::new()
    }
}

impl Supervisor {
    pub fn new() -> Self {
        Self {
            stop: watch::channel(false).0,
            tasks: Mutex::new(Vec::new()),
        }
    }

    /// Starts `task` under `name`. The task gets the stop signal and is
    /// expected to return soon after it fires.
    pub fn spawn<F, Fut>(&self, name: &'static str, task: F)
    where
        F: FnOnce(StopSignal) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let signal = StopSignal(self.stop.subscribe());
        let handle = tokio::spawn(task(signal));
        tracing::debug!(task = name, "background task started");
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Task { name, handle });
    }

    /// The names of the tasks started, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|t| t.name)
            .collect()
    }

    /// Signals every task to stop, then waits for each, newest first, up to
    /// `grace` apiece; one that is still running then is aborted. Returns
    /// how each ended, in the order they were stopped.
    pub async fn shutdown(&self, grace: Duration) -> Vec<(&'static str, Ended)> {
        let _ = self.stop.send(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        let mut ended = Vec::with_capacity(tasks.len());
        for Task { name, mut handle } in tasks.into_iter().rev() {
            let how = match tokio::time::timeout(grace, &mut handle).await {
                Ok(Ok(())) => Ended::Stopped,
                Ok(Err(e)) if e.is_panic() => Ended::Panicked,
                Ok(Err(_)) => Ended::Aborted,
                Err(_) => {
                    handle.abort();
                    Ended::Aborted
                }
            };
            match how {
                Ended::Stopped => tracing::debug!(task = name, "background task stopped"),
                _ => {
                    tracing::warn!(task = name, ended = ?how, "background task did not stop cleanly")
                }
            }
            ended.push((name, how));
        }
        let unclean = ended
            .iter()
            .filter(|(_, how)| *how != Ended::Stopped)
            .count();
        let names: Vec<&str> = ended.iter().map(|(name, _)| *name).collect();
        tracing::info!(
            stopped = ended.len() - unclean,
            unclean,
            tasks = %names.join(", "),
            "background tasks stopped"
        );
        ended
    }

    /// Runs `work` on `owner` every `period`, the first time one period
    /// from now, until shutdown or until the last strong reference to
    /// `owner` is gone. The task holds only a weak one, so it never keeps
    /// its owner (and the owner's token sessions, connections) alive. A
    /// failure is logged as `name` failing, and the next period tries
    /// again; a run longer than the period delays the next instead of
    /// bunching runs up. A run under way when shutdown begins finishes.
    pub fn every<T, F, Fut, O, E>(
        &self,
        name: &'static str,
        period: Duration,
        owner: &std::sync::Arc<T>,
        work: F,
    ) where
        T: ?Sized + Send + Sync + 'static,
        F: Fn(std::sync::Arc<T>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<O, E>> + Send,
        E: std::fmt::Display,
    {
        let owner = std::sync::Arc::downgrade(owner);
        self.spawn(name, move |mut stop| async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.stopped() => return,
                    _ = tick.tick() => {}
                }
                let Some(owner) = owner.upgrade() else {
                    return;
                };
                if let Err(e) = work(owner).await {
                    tracing::warn!(error = %e, "{name} failed");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn tasks_are_stopped_newest_first_and_a_stuck_one_is_aborted() {
        let supervisor = Supervisor::new();
        let order = Arc::new(Mutex::new(Vec::new()));
        for name in ["first", "second"] {
            let order = order.clone();
            supervisor.spawn(name, move |mut stop| async move {
                stop.stopped().await;
                order.lock().unwrap().push(name);
            });
        }
        supervisor.spawn("stuck", |_stop| async {
            std::future::pending::<()>().await;
        });
        assert_eq!(supervisor.names(), ["first", "second", "stuck"]);

        let ended = supervisor.shutdown(Duration::from_millis(200)).await;
        assert_eq!(
            ended,
            [
                ("stuck", Ended::Aborted),
                ("second", Ended::Stopped),
                ("first", Ended::Stopped),
            ]
        );
        assert!(supervisor.names().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_periodic_task_runs_each_period_until_shutdown() {
        let supervisor = Supervisor::new();
        let owner = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        supervisor.every(
            "counting",
            Duration::from_secs(1),
            &owner,
            |owner| async move {
                owner.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok::<_, std::convert::Infallible>(())
            },
        );
        tokio::time::sleep(Duration::from_millis(3500)).await;
        assert_eq!(owner.load(std::sync::atomic::Ordering::SeqCst), 3);
        let ended = supervisor.shutdown(Duration::from_secs(1)).await;
        assert_eq!(ended, [("counting", Ended::Stopped)]);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(owner.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_periodic_task_ends_with_its_owner() {
        let supervisor = Supervisor::new();
        let owner = Arc::new(());
        supervisor.every("owned", Duration::from_secs(1), &owner, |_| async {
            Ok::<_, std::convert::Infallible>(())
        });
        drop(owner);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let ended = supervisor.shutdown(Duration::from_millis(1)).await;
        assert_eq!(ended, [("owned", Ended::Stopped)]);
    }
}
