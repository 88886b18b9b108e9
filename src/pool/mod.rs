//! The batched key-operation pool: the only path from keyward to its keys.
//!
//! `W` OS threads each own one logged-in session (token calls block, and a
//! PKCS#11 session must stay on one thread). Requests wait in one bounded
//! queue; a worker takes whatever is queued, up to `B` at once, and runs it
//! back to back. It never waits for a batch to fill, so an idle pool adds no
//! latency; under load, batching cuts the per-request hand-over cost.
//!
//! Wrapped keys (`keys::KeyRef::Wrapped`) have a home worker, chosen by
//! their id: their jobs wait in that worker's own queue, so a key is
//! unwrapped into one session rather than into every one (an unwrap costs
//! about twelve signatures on SoftHSM2), and a key generated there is
//! already live where it will sign. A home queue deeper than
//! `HOME_QUEUE_DEPTH` spills into the shared queue, so one busy agent still
//! gets every worker.
//!
//! Failure handling: a request whose deadline passed is answered without
//! touching the token; a lost session is reopened (and a failed device
//! re-initialized) with back-off; repeated failures open a circuit breaker
//! that answers at once until a probe connection succeeds.

mod breaker;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use p256::ecdsa::Signature;
use p256::PublicKey;
use tokio::sync::oneshot;

pub use breaker::{Breaker, BreakerState};

use crate::keys::{GeneratedKey, KeyBackend, KeyError, KeyId, KeyRef, KeySession, KeyStorage};
use crate::runtime::handoff::Handoff;
use crate::telemetry::PoolMetrics;

#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Worker threads, each with its own session. Invariant: >= 1.
    pub workers: usize,
    /// Most requests a worker takes from the queue at once. Invariant: >= 1.
    pub batch_size: usize,
    /// Requests that may wait; one more is refused with `QueueFull`.
    pub queue_capacity: usize,
    /// How long a request may wait before it is answered `DeadlineExceeded`.
    pub deadline: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            batch_size: 16,
            queue_capacity: 4096,
            deadline: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    #[error("the key-operation queue is full")]
    QueueFull { retry_after: Duration },
    #[error("the key store is unavailable")]
    Unavailable { retry_after: Duration },
    /// Expired before it reached the key store, or was not answered in
    /// time after it did.
    #[error("the key store did not answer in time")]
    DeadlineExceeded,
    #[error("the key pool has shut down")]
    ShuttingDown,
    #[error(transparent)]
    Key(#[from] KeyError),
}

impl PoolError {
    /// The key is not on the token.
    pub fn is_not_found(&self) -> bool {
        matches!(self, PoolError::Key(KeyError::NotFound(_)))
    }
}

/// Jobs waiting in a worker's own queue beyond which its wrapped-key jobs
/// go to the shared queue instead (two batches).
const HOME_QUEUE_DEPTH_BATCHES: usize = 2;

enum KeyOp {
    Sign { key: KeyRef, digest: [u8; 32] },
    Generate { key: KeyId },
    GenerateCustodial { key: KeyId, storage: KeyStorage },
    PublicKey { key: KeyId },
    Destroy { key: KeyId },
    ForgetWrapped { key: KeyId },
    ListKeys { prefix: &'static str },
    Ping,
}

impl KeyOp {
    fn name(&self) -> &'static str {
        match self {
            KeyOp::Sign { .. } => "sign",
            KeyOp::Generate { .. } | KeyOp::GenerateCustodial { .. } => "generate",
            KeyOp::PublicKey { .. } => "public_key",
            KeyOp::Destroy { .. } | KeyOp::ForgetWrapped { .. } => "destroy",
            KeyOp::ListKeys { .. } => "list",
            KeyOp::Ping => "ping",
        }
    }

    /// Whether running the operation twice is harmless, so it may be retried
    /// on a fresh session after a connection failure.
    fn is_idempotent(&self) -> bool {
        !matches!(
            self,
            KeyOp::Generate { .. } | KeyOp::GenerateCustodial { .. } | KeyOp::Destroy { .. }
        )
    }

    /// The wrapped key this job would rather run beside, if any.
    fn home_key(&self) -> Option<&KeyId> {
        match self {
            KeyOp::Sign {
                key: KeyRef::Wrapped { id, .. },
                ..
            }
            | KeyOp::GenerateCustodial {
                key: id,
                storage: KeyStorage::Wrapped,
            } => Some(id),
            _ => None,
        }
    }
}

enum KeyOutput {
    Signature(Signature),
    PublicKey(PublicKey),
    Generated(Box<GeneratedKey>),
    KeyIds(Vec<KeyId>),
    Done,
}

struct Job {
    op: KeyOp,
    enqueued: Instant,
    deadline: Instant,
    reply: oneshot::Sender<Result<KeyOutput, PoolError>>,
}

type Answer = crate::runtime::handoff::Answer<Result<KeyOutput, PoolError>>;

struct Shared {
    backend: Arc<dyn KeyBackend>,
    breaker: Breaker,
    metrics: PoolMetrics,
    batch_size: usize,
    workers: usize,
    /// A moving average of the time one job takes on a worker, in
    /// nanoseconds, for [`PendingSignature::expected_at`].
    job_nanos: AtomicU64,
    /// Answers go back a batch at once (see `handoff`).
    handoff: Handoff<Result<KeyOutput, PoolError>>,
}

/// Handle to the pool; cheap to clone. Workers stop when the last handle is
/// dropped and the queue is drained. Its answers are awaited with a tokio
/// timer, so on a runtime with time enabled.
#[derive(Clone)]
pub struct KeyPool {
    queue: Sender<Job>,
    /// Each worker's own queue (see the module's note on wrapped keys).
    home_queues: Arc<Vec<Sender<Job>>>,
    shared: Arc<Shared>,
    deadline: Duration,
    /// The worker threads, for an orderly end (see [`KeyPool::join_workers`]).
    workers: Arc<std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>>,
}

impl KeyPool {
    pub fn start(
        backend: Arc<dyn KeyBackend>,
        config: &PoolConfig,
        metrics: PoolMetrics,
    ) -> std::io::Result<Self> {
        let (queue, receiver) = crossbeam_channel::bounded(config.queue_capacity.max(1));
        let shared = Arc::new(Shared {
            backend,
            breaker: Breaker::new(),
            metrics,
            batch_size: config.batch_size.max(1),
            workers: config.workers.max(1),
            job_nanos: AtomicU64::new(0),
            handoff: Handoff::start(),
        });
        let mut workers = Vec::new();
        let mut home_queues = Vec::new();
        for index in 0..shared.workers {
            let shared = Arc::clone(&shared);
            let receiver = receiver.clone();
            let (home, home_receiver) =
                crossbeam_channel::bounded(shared.batch_size * HOME_QUEUE_DEPTH_BATCHES);
            home_queues.push(home);
            // A worker exits once every handle (and so the sending side of
            // the queues) is gone, closing its session on the way out.
            workers.push(
                std::thread::Builder::new()
                    .name(format!("keyward-pool-{index}"))
                    .spawn(move || Worker::new(shared).run(receiver, home_receiver))?,
            );
        }
        Ok(Self {
            queue,
            home_queues: Arc::new(home_queues),
            shared,
            deadline: config.deadline,
            workers: Arc::new(std::sync::Mutex::new(workers)),
        })
    }

    /// Lets go of this handle and waits, up to `limit`, for the workers to
    /// close their sessions and end. Call it last, once every other handle
    /// is gone (the runtime dropped): a process that exits while a worker is
    /// still inside the PKCS#11 library races the library's own teardown,
    /// which SoftHSM2 answers with a crash.
    pub fn join_workers(self, limit: Duration) {
        let handles = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|p| p.into_inner()));
        drop(self);
        let deadline = Instant::now() + limit;
        for handle in handles {
            while !handle.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if handle.is_finished() {
                let _ = handle.join();
            }
        }
    }

    pub fn breaker_state(&self) -> BreakerState {
        self.shared.breaker.state()
    }

    pub fn queue_depth(&self) -> usize {
        self.queue.len() + self.home_queues.iter().map(Sender::len).sum::<usize>()
    }

    /// The worker a wrapped key lives on.
    fn home_of(&self, key: &KeyId) -> &Sender<Job> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut hasher);
        &self.home_queues[(hasher.finish() % self.home_queues.len() as u64) as usize]
    }

    async fn submit(&self, op: KeyOp, deadline: Duration) -> Result<KeyOutput, PoolError> {
        Self::answer(self.enqueue(op, deadline)?).await
    }

    async fn answer(answer: Answering) -> Result<KeyOutput, PoolError> {
        match tokio::time::timeout_at(answer.give_up_at.into(), answer.receiver).await {
            Ok(answered) => answered.map_err(|_| PoolError::ShuttingDown)?,
            Err(_) => {
                // Every caller of a hung worker comes here: one line a
                // minute, not one per request.
                static LAST_WARNED_SECS: AtomicU64 = AtomicU64::new(0);
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                if now >= LAST_WARNED_SECS.load(Ordering::Relaxed) + 60 {
                    LAST_WARNED_SECS.store(now, Ordering::Relaxed);
                    tracing::error!(
                        "key operations are not answered in time: a call to the key store may be hung"
                    );
                }
                Err(PoolError::DeadlineExceeded)
            }
        }
    }

    /// Queues `op`, or refuses it at once (open breaker, full queue).
    fn enqueue(&self, op: KeyOp, deadline: Duration) -> Result<Answering, PoolError> {
        if let BreakerState::Open(retry_after) = self.shared.breaker.state() {
            self.shared.metrics.outcome(op.name(), "unavailable");
            return Err(PoolError::Unavailable { retry_after });
        }
        let (reply, receiver) = oneshot::channel();
        let now = Instant::now();
        // A job may start as late as its deadline; it then has as long
        // again to be answered. A worker inside a call that never returns
        // (a hung module) answers nobody, and its callers must not wait
        // for ever.
        let answer = Answering {
            receiver,
            give_up_at: now + 2 * deadline,
        };
        let job = Job {
            op,
            enqueued: now,
            deadline: now + deadline,
            reply,
        };
        // Home first, the shared queue when home is busy.
        let job = match job.op.home_key().map(|key| self.home_of(key)) {
            Some(home) => match home.try_send(job) {
                Ok(()) => return Ok(answer),
                Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => job,
            },
            None => job,
        };
        match self.queue.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(job)) => {
                self.shared.metrics.outcome(job.op.name(), "queue_full");
                return Err(PoolError::QueueFull {
                    retry_after: Duration::from_secs(1),
                });
            }
            Err(TrySendError::Disconnected(_)) => return Err(PoolError::ShuttingDown),
        }
        Ok(answer)
    }

    /// What kind of key store the pool serves.
    pub fn backend_kind(&self) -> crate::keys::BackendKind {
        self.shared.backend.kind()
    }

    /// Queues a signature and returns at once, or refuses it as `sign`
    /// would; `PendingSignature::wait` gives the result. For callers with
    /// something else to do while the token works.
    pub fn start_sign(&self, key: KeyRef, digest: [u8; 32]) -> Result<PendingSignature, PoolError> {
        let expected_at = self.expected_completion();
        let answer = self.enqueue(KeyOp::Sign { key, digest }, self.deadline)?;
        Ok(PendingSignature {
            answer,
            expected_at,
        })
    }

    /// When a job queued now can be expected back: the jobs ahead of it
    /// shared among the workers, then its own. A rough figure: it does not
    /// know how far the workers are into their current batches.
    fn expected_completion(&self) -> Instant {
        let job = Duration::from_nanos(self.shared.job_nanos.load(Ordering::Relaxed));
        let rounds = self.queue_depth() / self.shared.workers + 1;
        Instant::now() + job * rounds as u32
    }

    /// Signs a SHA-256 digest with the key; the signature is low-S.
    pub async fn sign(&self, key: &KeyId, digest: [u8; 32]) -> Result<Signature, PoolError> {
        self.sign_within(key, digest, self.deadline).await
    }

    pub async fn sign_within(
        &self,
        key: &KeyId,
        digest: [u8; 32],
        deadline: Duration,
    ) -> Result<Signature, PoolError> {
        match self
            .submit(
                KeyOp::Sign {
                    key: KeyRef::Token(key.clone()),
                    digest,
                },
                deadline,
            )
            .await?
        {
            KeyOutput::Signature(s) => Ok(s),
            _ => unreachable!("a sign job is answered with a signature"),
        }
    }

    /// Generates a P-256 signing key on the token.
    pub async fn generate(&self, key: &KeyId) -> Result<PublicKey, PoolError> {
        match self
            .submit(
                KeyOp::Generate { key: key.clone() },
                self.key_creation_deadline(),
            )
            .await?
        {
            KeyOutput::PublicKey(k) => Ok(k),
            _ => unreachable!("a generate job is answered with a public key"),
        }
    }

    pub async fn public_key(&self, key: &KeyId) -> Result<PublicKey, PoolError> {
        match self
            .submit(KeyOp::PublicKey { key: key.clone() }, self.deadline)
            .await?
        {
            KeyOutput::PublicKey(k) => Ok(k),
            _ => unreachable!("a public-key job is answered with a public key"),
        }
    }

    /// How long the jobs of creating a key (generating it, reading back
    /// its attributes, signing its evidence) may wait: longer than a
    /// signature's, since a token may create objects one at a time and
    /// make everything else wait meanwhile (`keys::pkcs11`), and a burst of
    /// registrations must not time out behind each other.
    pub fn key_creation_deadline(&self) -> Duration {
        self.deadline * 5
    }

    /// Generates an agent's custodial key, kept in `storage`, with the
    /// token's account of it as generated.
    pub async fn generate_custodial(
        &self,
        key: &KeyId,
        storage: KeyStorage,
    ) -> Result<GeneratedKey, PoolError> {
        match self
            .submit(
                KeyOp::GenerateCustodial {
                    key: key.clone(),
                    storage,
                },
                self.key_creation_deadline(),
            )
            .await?
        {
            KeyOutput::Generated(k) => Ok(*k),
            _ => unreachable!("a custodial generate job is answered with the key"),
        }
    }

    pub async fn destroy(&self, key: &KeyId) -> Result<(), PoolError> {
        self.submit(KeyOp::Destroy { key: key.clone() }, self.deadline)
            .await
            .map(|_| ())
    }

    /// Destroys a custodial key: a token object on the token; a wrapped
    /// key's live copies in every session (its blob is the caller's).
    pub async fn destroy_custodial(&self, key: &KeyRef) -> Result<(), PoolError> {
        let op = match key {
            KeyRef::Token(id) => KeyOp::Destroy { key: id.clone() },
            KeyRef::Wrapped { id, .. } => KeyOp::ForgetWrapped { key: id.clone() },
        };
        self.submit(op, self.deadline).await.map(|_| ())
    }

    /// The keys the key store holds itself (token objects, TPM blobs) whose
    /// ids begin with `prefix`.
    pub async fn key_ids(&self, prefix: &'static str) -> Result<Vec<KeyId>, PoolError> {
        // Not latency-bound; it must not lose to a burst of registrations.
        let deadline = self.key_creation_deadline();
        match self.submit(KeyOp::ListKeys { prefix }, deadline).await? {
            KeyOutput::KeyIds(ids) => Ok(ids),
            _ => unreachable!("a list job is answered with key ids"),
        }
    }

    /// Succeeds when a worker can reach the token.
    pub async fn ping(&self) -> Result<(), PoolError> {
        self.submit(KeyOp::Ping, self.deadline).await.map(|_| ())
    }
}

/// What a job came to, for the metrics (`Worker::record_batch`).
struct Served {
    op: &'static str,
    outcome: &'static str,
    /// From enqueueing to the answer, for signatures.
    latency: Option<Duration>,
}

impl Served {
    fn outcome(op: &'static str, outcome: &'static str) -> Self {
        Self {
            op,
            outcome,
            latency: None,
        }
    }
}

struct Worker {
    shared: Arc<Shared>,
    /// The session and the backend generation it was opened under.
    session: Option<(Box<dyn KeySession>, u64)>,
}

impl Worker {
    fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            session: None,
        }
    }

    fn run(mut self, queue: Receiver<Job>, home: Receiver<Job>) {
        let mut batch = Vec::with_capacity(self.shared.batch_size);
        let mut served = Vec::with_capacity(self.shared.batch_size);
        // Both receives fail only when every KeyPool handle is gone and the
        // queues are empty: the pool is shutting down.
        while let Some(first) = Self::next_job(&queue, &home) {
            let started = Instant::now();
            batch.push(first);
            for source in [&home, &queue] {
                while batch.len() < self.shared.batch_size {
                    match source.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
            }
            let batch_len = batch.len();
            let answers: Vec<Answer> = batch
                .drain(..)
                .filter_map(|job| self.serve(job, &mut served))
                .collect();
            // Before the answers, so that a caller sees the average its
            // own job moved.
            self.note_job_time(started.elapsed() / batch_len as u32);
            // The whole batch at once (see `handoff`). A lone request is a
            // batch of one, so an idle pool adds no latency.
            self.shared.handoff.deliver(answers);
            self.record_batch(batch_len, queue.len(), &mut served);
        }
    }

    /// The next job from either queue, waiting for one; `None` once both
    /// are closed and empty.
    fn next_job(queue: &Receiver<Job>, home: &Receiver<Job>) -> Option<Job> {
        if let Ok(job) = home.try_recv() {
            return Some(job);
        }
        let mut open = [true, true];
        while open.iter().any(|o| *o) {
            crossbeam_channel::select! {
                recv(home) -> job => match job {
                    Ok(job) => return Some(job),
                    Err(_) => open[0] = false,
                },
                recv(queue) -> job => match job {
                    Ok(job) => return Some(job),
                    Err(_) => open[1] = false,
                },
            }
            // A closed queue is always ready: wait on the other alone.
            if !open[0] {
                return queue.recv().ok();
            }
            if !open[1] {
                return home.recv().ok();
            }
        }
        None
    }

    /// Moves the average time per job an eighth of the way to `job`.
    /// Workers update it without coordinating; a lost update only leaves
    /// an estimate a little staler.
    fn note_job_time(&self, job: Duration) {
        let job = u64::try_from(job.as_nanos()).unwrap_or(u64::MAX);
        let average = self.shared.job_nanos.load(Ordering::Relaxed);
        let updated = if average == 0 {
            job
        } else {
            average - average / 8 + job / 8
        };
        self.shared.job_nanos.store(updated, Ordering::Relaxed);
    }

    /// Metrics for a batch, after its answers are out. They are shared by
    /// every worker, so they are written once per batch where possible:
    /// an atomic that two cores update per signature moves its cache line
    /// between them each time.
    fn record_batch(&self, batch_len: usize, queue_len: usize, served: &mut Vec<Served>) {
        let metrics = &self.shared.metrics;
        metrics.batch_size.observe(batch_len as f64);
        metrics.queue_depth.set(queue_len as i64);
        let mut signs_ok = 0;
        let mut any_ok = false;
        for s in served.drain(..) {
            any_ok |= s.outcome == "ok";
            if s.op == "sign" && s.outcome == "ok" {
                signs_ok += 1;
            } else {
                metrics.outcome(s.op, s.outcome);
            }
            if let Some(latency) = s.latency {
                metrics.sign_latency_seconds.observe(latency.as_secs_f64());
            }
        }
        metrics.signs_ok_by(signs_ok);
        if any_ok && self.shared.breaker.state() == BreakerState::Closed {
            metrics.breaker_open.set(0);
        }
    }

    /// Runs one job; returns where and what to answer, and notes for the
    /// metrics what happened.
    fn serve(&mut self, job: Job, served: &mut Vec<Served>) -> Option<Answer> {
        let op = job.op.name();
        if job.reply.is_closed() {
            served.push(Served::outcome(op, "abandoned"));
            return None;
        }
        if Instant::now() >= job.deadline {
            served.push(Served::outcome(op, "deadline_exceeded"));
            return Some((job.reply, Err(PoolError::DeadlineExceeded)));
        }
        let result = self.execute(&job.op);
        let outcome = match &result {
            Ok(_) => "ok",
            Err(PoolError::Unavailable { .. }) => "unavailable",
            Err(_) => "error",
        };
        served.push(Served {
            op,
            outcome,
            latency: matches!(job.op, KeyOp::Sign { .. }).then(|| job.enqueued.elapsed()),
        });
        Some((job.reply, result))
    }

    fn execute(&mut self, op: &KeyOp) -> Result<KeyOutput, PoolError> {
        let attempts = if op.is_idempotent() { 2 } else { 1 };
        let mut last_failure = None;
        for _ in 0..attempts {
            let (session, generation) = self.connected_session()?;
            match run_op(session, op) {
                Ok(output) => {
                    self.shared.breaker.record_success();
                    return Ok(output);
                }
                Err(e) if e.is_connection_failure() => {
                    tracing::warn!(error = %e, "key store connection failed; reconnecting");
                    self.session = None;
                    if matches!(e, KeyError::DeviceFailure { .. }) {
                        if let Err(err) = self.shared.backend.recover(generation) {
                            tracing::warn!(error = %err, "re-initializing the key store failed");
                        }
                    }
                    self.note_failure();
                    last_failure = Some(e);
                }
                Err(e) => return Err(PoolError::Key(e)),
            }
        }
        let retry_after = match self.shared.breaker.state() {
            BreakerState::Open(d) => d,
            _ => Duration::from_secs(1),
        };
        if let Some(e) = last_failure {
            tracing::debug!(error = %e, "giving up on this request");
        }
        Err(PoolError::Unavailable { retry_after })
    }

    fn note_failure(&self) {
        let backoff = self.shared.breaker.record_failure();
        if matches!(self.shared.breaker.state(), BreakerState::Open(_)) {
            self.shared.metrics.breaker_open.set(1);
        }
        self.shared.metrics.reconnects.inc();
        // Back off on this worker too, so a dead token is not hammered.
        std::thread::sleep(backoff.min(Duration::from_millis(200)));
    }

    fn connected_session(&mut self) -> Result<(&mut dyn KeySession, u64), PoolError> {
        if self.session.is_none() {
            if let BreakerState::Open(retry_after) = self.shared.breaker.state() {
                return Err(PoolError::Unavailable { retry_after });
            }
            let generation = self.shared.backend.generation();
            match self.shared.backend.open_session() {
                Ok(session) => self.session = Some((session, generation)),
                Err(e) => {
                    tracing::warn!(error = %e, "opening a key store session failed");
                    if matches!(e, KeyError::DeviceFailure { .. }) {
                        let _ = self.shared.backend.recover(generation);
                    }
                    self.note_failure();
                    let retry_after = match self.shared.breaker.state() {
                        BreakerState::Open(d) => d,
                        _ => Duration::from_secs(1),
                    };
                    return Err(PoolError::Unavailable { retry_after });
                }
            }
        }
        let (session, generation) = self.session.as_mut().expect("connected just above");
        Ok((session.as_mut(), *generation))
    }
}

fn run_op(session: &mut dyn KeySession, op: &KeyOp) -> Result<KeyOutput, KeyError> {
    Ok(match op {
        KeyOp::Sign {
            key: KeyRef::Token(key),
            digest,
        } => KeyOutput::Signature(session.sign_digest(key, digest)?),
        KeyOp::Sign {
            key:
                KeyRef::Wrapped {
                    id,
                    blob,
                    public_key,
                },
            digest,
        } => KeyOutput::Signature(session.sign_wrapped(id, blob, public_key, digest)?),
        KeyOp::Generate { key } => KeyOutput::PublicKey(session.generate(key)?),
        KeyOp::GenerateCustodial { key, storage } => {
            KeyOutput::Generated(Box::new(session.generate_custodial(key, *storage)?))
        }
        KeyOp::PublicKey { key } => KeyOutput::PublicKey(session.public_key(key)?),
        KeyOp::ForgetWrapped { key } => {
            session.forget_wrapped(key)?;
            KeyOutput::Done
        }
        KeyOp::Destroy { key } => {
            session.destroy(key)?;
            KeyOutput::Done
        }
        KeyOp::ListKeys { prefix } => KeyOutput::KeyIds(session.key_ids(prefix)?),
        KeyOp::Ping => {
            session.ping()?;
            KeyOutput::Done
        }
    })
}

/// Where a queued job's answer comes, and when to stop waiting for it.
struct Answering {
    receiver: oneshot::Receiver<Result<KeyOutput, PoolError>>,
    give_up_at: Instant,
}

/// A signature the pool has queued (`KeyPool::start_sign`).
pub struct PendingSignature {
    answer: Answering,
    expected_at: Instant,
}

impl PendingSignature {
    /// When the signature can be expected, estimated from the queue ahead
    /// of it and the recent time per job. Neither a promise nor a deadline:
    /// for work that may as well wait until about then.
    pub fn expected_at(&self) -> Instant {
        self.expected_at
    }

    pub async fn wait(self) -> Result<Signature, PoolError> {
        match KeyPool::answer(self.answer).await? {
            KeyOutput::Signature(s) => Ok(s),
            _ => unreachable!("a sign job is answered with a signature"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::soft::SoftwareBackend;
    use p256::ecdsa::signature::hazmat::PrehashVerifier;
    use p256::ecdsa::VerifyingKey;

    fn pool(config: PoolConfig) -> KeyPool {
        KeyPool::start(
            Arc::new(SoftwareBackend::new()),
            &config,
            PoolMetrics::unregistered(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn signatures_from_many_tasks_all_verify() {
        let pool = pool(PoolConfig {
            workers: 2,
            ..PoolConfig::default()
        });
        let key = KeyId::parse("k-1").unwrap();
        let public = pool.generate(&key).await.unwrap();
        let verifier = VerifyingKey::from(&public);
        let mut tasks = Vec::new();
        for i in 0..64u8 {
            let (pool, key) = (pool.clone(), key.clone());
            tasks.push(tokio::spawn(async move {
                let digest = [i; 32];
                (digest, pool.sign(&key, digest).await.unwrap())
            }));
        }
        for task in tasks {
            let (digest, signature) = task.await.unwrap();
            verifier.verify_prehash(&digest, &signature).unwrap();
        }
    }

    #[tokio::test]
    async fn a_pool_started_on_a_runtime_hands_each_batch_to_a_dispatcher_task() {
        let pool = pool(PoolConfig {
            workers: 1,
            ..PoolConfig::default()
        });
        assert!(matches!(pool.shared.handoff, Handoff::Dispatcher(_)));
        let key = KeyId::parse("k-d").unwrap();
        let verifier = VerifyingKey::from(&pool.generate(&key).await.unwrap());
        // All queued before any is awaited: the worker takes them in
        // batches, and the dispatcher must route each answer to its caller.
        let pending: Vec<_> = (0..16u8)
            .map(|i| {
                (
                    [i; 32],
                    pool.start_sign(KeyRef::Token(key.clone()), [i; 32])
                        .unwrap(),
                )
            })
            .collect();
        for (digest, signature) in pending {
            verifier
                .verify_prehash(&digest, &signature.wait().await.unwrap())
                .unwrap();
        }
    }

    #[test]
    fn a_pool_started_outside_a_runtime_answers_from_its_workers() {
        let pool = pool(PoolConfig::default());
        assert!(matches!(pool.shared.handoff, Handoff::Direct));
        // With timers: every wait for an answer is bounded (`answer`).
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            let key = KeyId::parse("k-o").unwrap();
            let verifier = VerifyingKey::from(&pool.generate(&key).await.unwrap());
            let signature = pool.sign(&key, [9; 32]).await.unwrap();
            verifier.verify_prehash(&[9; 32], &signature).unwrap();
        });
    }

    #[tokio::test]
    async fn an_expired_request_never_reaches_the_token() {
        let pool = pool(PoolConfig::default());
        let key = KeyId::parse("k-2").unwrap();
        pool.generate(&key).await.unwrap();
        let result = pool.sign_within(&key, [0; 32], Duration::ZERO).await;
        assert!(matches!(result, Err(PoolError::DeadlineExceeded)));
    }

    #[tokio::test]
    async fn a_full_queue_is_refused_with_retry_after() {
        let pool = pool(PoolConfig {
            workers: 1,
            queue_capacity: 1,
            ..PoolConfig::default()
        });
        let key = KeyId::parse("k-3").unwrap();
        pool.generate(&key).await.unwrap();
        let results = futures_join_all((0..200).map(|_| pool.sign(&key, [7; 32])).collect()).await;
        assert!(results
            .iter()
            .any(|r| matches!(r, Err(PoolError::QueueFull { .. }))));
        assert!(results.iter().any(|r| r.is_ok()));
    }

    #[tokio::test]
    async fn an_unknown_key_is_a_key_error_not_an_outage() {
        let pool = pool(PoolConfig::default());
        let result = pool.sign(&KeyId::parse("missing").unwrap(), [0; 32]).await;
        assert!(matches!(result, Err(PoolError::Key(KeyError::NotFound(_)))));
        assert_eq!(pool.breaker_state(), BreakerState::Closed);
    }

    #[tokio::test]
    async fn an_idle_pool_expects_a_signature_one_average_job_from_now() {
        let pool = pool(PoolConfig::default());
        let key = KeyId::parse("k-4").unwrap();
        pool.generate(&key).await.unwrap();
        pool.sign(&key, [1; 32]).await.unwrap();
        let job = Duration::from_nanos(pool.shared.job_nanos.load(Ordering::Relaxed));
        assert!(job > Duration::ZERO, "served jobs are timed");

        let before = Instant::now();
        let pending = pool
            .start_sign(KeyRef::Token(key.clone()), [2; 32])
            .unwrap();
        let after = Instant::now();
        assert!(pending.expected_at() >= before + job);
        assert!(pending.expected_at() <= after + job);
        pending.wait().await.unwrap();
    }

    #[test]
    fn the_average_job_time_moves_an_eighth_of_the_way_to_each_batch() {
        let shared = Arc::new(Shared {
            backend: Arc::new(SoftwareBackend::new()),
            breaker: Breaker::new(),
            metrics: PoolMetrics::unregistered(),
            batch_size: 16,
            workers: 2,
            job_nanos: AtomicU64::new(0),
            handoff: Handoff::Direct,
        });
        let worker = Worker::new(Arc::clone(&shared));
        worker.note_job_time(Duration::from_micros(800));
        assert_eq!(
            shared.job_nanos.load(Ordering::Relaxed),
            800_000,
            "the first batch sets it"
        );
        worker.note_job_time(Duration::from_micros(1_600));
        assert_eq!(shared.job_nanos.load(Ordering::Relaxed), 900_000);
    }

    async fn futures_join_all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
        let mut out = Vec::new();
        let pinned: Vec<_> = futures.into_iter().map(Box::pin).collect();
        // Poll all at once so they are queued together.
        let mut pending: Vec<_> = pinned.into_iter().map(Some).collect();
        std::future::poll_fn(|cx| {
            let mut all_done = true;
            for slot in pending.iter_mut() {
                if let Some(f) = slot.as_mut() {
                    match f.as_mut().poll(cx) {
                        std::task::Poll::Ready(v) => {
                            out.push(v);
                            *slot = None;
                        }
                        std::task::Poll::Pending => all_done = false,
                    }
                }
            }
            if all_done {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await;
        out
    }
}
