//! The key-operation pool against a real SoftHSM2 token in this process:
//! a stress run, and faults injected under load.
//!
//! SoftHSM2 reads SOFTHSM2_CONF once per process, so each test needs a
//! process of its own: the suite runs under cargo nextest (scripts/test.sh).

// The one `unsafe` block of the project: C_CloseAllSessions for fault
// injection, which cryptoki does not wrap (see `close_all_sessions`).
#![allow(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyward::agents::cache::AgentCache;
use keyward::agents::signing::AgentSigner;
use keyward::audit::AuditEvent;
use keyward::identity::{AgentName, TrustDomain};
use keyward::keys::pkcs11::{load_module, Pkcs11Backend, Pkcs11Config};
use keyward::keys::{KeyBackend, KeyId};
use keyward::pki::{Authority, TtlLimits};
use keyward::pool::{BreakerState, KeyPool, PoolConfig, PoolError};
use keyward::revocation::RevocationSet;
use keyward::store::{AgentRecord, SignatureLog};
use keyward::telemetry::{PoolMetrics, RevocationMetrics};
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use p256::ecdsa::VerifyingKey;
use sha2::{Digest, Sha256};

static TOKEN_CREATED: AtomicBool = AtomicBool::new(false);

/// A fresh SoftHSM2 token in a temp dir, this process's only one.
fn token() -> (tempfile::TempDir, Pkcs11Config) {
    assert!(
        !TOKEN_CREATED.swap(true, Ordering::SeqCst),
        "one SoftHSM2 token per process: run these tests with cargo nextest"
    );
    let dir = tempfile::tempdir().unwrap();
    let config = keyward::app::embedded::prepare(dir.path()).unwrap();
    (dir, config)
}

fn start_pool(config: &Pkcs11Config, workers: usize) -> (KeyPool, PoolMetrics) {
    let backend: Arc<dyn KeyBackend> = Arc::new(Pkcs11Backend::open(config).unwrap());
    let metrics = PoolMetrics::unregistered();
    let pool = KeyPool::start(
        backend,
        &PoolConfig {
            workers,
            ..PoolConfig::default()
        },
        metrics.clone(),
    )
    .unwrap();
    (pool, metrics)
}

/// Ends the pool's workers before the test's process exits: a worker still
/// inside SoftHSM2 during the library's own teardown crashes the process
/// (seen as a SIGSEGV after a passing test).
fn stop(pool: KeyPool) {
    pool.join_workers(Duration::from_secs(5));
}

fn digest(task: u64, i: u64) -> [u8; 32] {
    Sha256::digest([task.to_be_bytes(), i.to_be_bytes()].concat()).into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_signatures_from_many_tasks_all_verify_and_are_all_recorded() {
    const TASKS: u64 = 64;
    const PER_TASK: u64 = 100_000 / TASKS + 1;
    let (dir, config) = token();
    let url = format!("sqlite://{}", dir.path().join("keyward.db").display());
    let store = keyward::store::connect(&url).await.unwrap();
    let (pool, metrics) = start_pool(&config, 2);
    let key = KeyId::parse("agent-stress").unwrap();
    let verifier = VerifyingKey::from(&pool.generate(&key).await.unwrap());
    let agent = AgentName::parse("stress").unwrap();
    let record = AgentRecord {
        name: agent.to_string(),
        spiffe_id: "spiffe://keyward.local/agent/stress".into(),
        custody: "custodial".into(),
        key_id: Some(key.to_string()),
        public_key_der: None,
        key_wrapped: None,
        attestation_digest: None,
        scopes: vec![],
        status: "active".into(),
        created_at: 0,
    };
    store
        .insert_agent(
            &record,
            None,
            None,
            &AuditEvent::new("test", "agent.create", "stress"),
        )
        .await
        .unwrap();
    let log = SignatureLog::start(&url).await.unwrap();
    let ca = Authority::create_root(&pool, Duration::from_secs(3600))
        .await
        .unwrap();
    let authority = Authority::load(
        pool.clone(),
        keyward::store::CertificateLog::start(store.clone(), &url).unwrap(),
        &ca,
        TrustDomain::parse("keyward.local").unwrap(),
        TtlLimits::default(),
    )
    .await
    .unwrap();
    let signer = Arc::new(AgentSigner::new(
        pool.clone(),
        store.clone(),
        Arc::new(authority),
        log,
        Arc::new(AgentCache::default()),
        RevocationSet::load(store.clone(), RevocationMetrics::unregistered())
            .await
            .unwrap(),
    ));

    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let (signer, agent, verifier) = (signer.clone(), agent.clone(), verifier);
            tokio::spawn(async move {
                for i in 0..PER_TASK {
                    let d = digest(t, i);
                    // Each request loads its agent, as the service does.
                    let signing = signer.signing_agent(&agent).await.unwrap();
                    let signed = signer
                        .sign(&signing, d, &format!("{t}-{i}"), 0, None)
                        .await
                        .unwrap();
                    // Every signature the pool hands out is checked: a wrong
                    // one must never reach a caller.
                    verifier.verify_prehash(&d, &signed.signature).unwrap();
                    assert!(signed.signature.normalize_s().is_none(), "low-S");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let total = (TASKS * PER_TASK) as i64;
    assert!(total >= 100_000);

    use sqlx::Connection;
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    let (rows, digests): (i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), COUNT(DISTINCT digest) FROM signatures WHERE agent_name = 'stress'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        (rows, digests),
        (total, total),
        "every signature recorded once"
    );
    let audit = store.audit_records(0, i64::MAX).await.unwrap();
    keyward::audit::verify_sequence(&audit).unwrap();
    let batched: i64 = audit
        .iter()
        .filter(|r| r.event.action == "signature.batch")
        .map(|r| r.event.details["count"].as_i64().unwrap())
        .sum();
    assert_eq!(batched, total, "audit batches cover every row");
    let batch_sizes: Vec<i64> = audit
        .iter()
        .filter(|r| r.event.action == "signature.batch")
        .map(|r| r.event.details["count"].as_i64().unwrap())
        .collect();
    assert!(
        (batch_sizes.len() as i64) < total && batch_sizes.iter().any(|n| *n > 1),
        "group commit put several signatures in one transaction ({} transactions)",
        batch_sizes.len()
    );
    assert_eq!(
        metrics.reconnects.get(),
        0,
        "no session was lost in a fault-free run"
    );
    stop(pool);
}

/// Calls C_CloseAllSessions on the token's slot, from this process, through
/// a second handle on the module: the fault "every session closed
/// underneath the pool". cryptoki does not wrap this function.
fn close_all_sessions(module: &Path, label: &str) {
    let ctx = load_module(module).unwrap();
    let slot = ctx
        .get_slots_with_initialized_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label().trim_end() == label)
        .unwrap();
    // SAFETY: test-only fault injection. The library is the same module the
    // pool already loaded and initialized (dlopen returns the same handle);
    // C_CloseAllSessions takes only a slot id and is thread-safe under the
    // OS locking the pool initialized the module with.
    let rv = unsafe {
        let lib = cryptoki_sys::Pkcs11::new(module).unwrap();
        lib.C_CloseAllSessions(slot.id())
    };
    assert_eq!(rv, cryptoki_sys::CKR_OK);
}

/// What a load run saw.
#[derive(Debug, Default)]
struct LoadReport {
    ok_before: u64,
    ok_after_recovery: u64,
    unavailable: u64,
    other_errors: Vec<String>,
}

/// Signs from `tasks` tasks for `run_for`, calling `fault` once at
/// `fault_at`. Every signature is verified.
async fn sign_under_load(
    pool: &KeyPool,
    key: &KeyId,
    verifier: VerifyingKey,
    run_for: Duration,
    fault_at: Duration,
    fault: impl FnOnce() + Send + 'static,
) -> LoadReport {
    let start = Instant::now();
    let injector = tokio::spawn(async move {
        tokio::time::sleep(fault_at).await;
        tokio::task::spawn_blocking(fault).await.unwrap();
        Instant::now()
    });
    let tasks: Vec<_> = (0..16u64)
        .map(|t| {
            let (pool, key) = (pool.clone(), key.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut i = 0;
                while start.elapsed() < run_for {
                    let d = digest(t, i);
                    let result = pool.sign(&key, d).await;
                    if let Ok(signature) = &result {
                        verifier.verify_prehash(&d, signature).unwrap();
                    }
                    seen.push((Instant::now(), result));
                    i += 1;
                    if seen.last().is_some_and(|(_, r)| r.is_err()) {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                seen
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.extend(t.await.unwrap());
    }
    let fault_time = injector.await.unwrap();
    let mut report = LoadReport::default();
    let last_error = outcomes
        .iter()
        .filter(|(_, r)| r.is_err())
        .map(|(t, _)| *t)
        .max();
    for (at, result) in outcomes {
        match result {
            Ok(_) if at < fault_time => report.ok_before += 1,
            Ok(_) if last_error.is_none_or(|e| at > e) => report.ok_after_recovery += 1,
            Ok(_) => {}
            // Both are answered 503 (key_store_unavailable, key_store_timeout).
            Err(PoolError::Unavailable { .. } | PoolError::DeadlineExceeded) => {
                report.unavailable += 1
            }
            Err(e) => report.other_errors.push(e.to_string()),
        }
    }
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_every_session_under_load_is_survived_without_a_restart() {
    let (_dir, config) = token();
    let (pool, metrics) = start_pool(&config, 2);
    let key = KeyId::parse("agent-fault").unwrap();
    let verifier = VerifyingKey::from(&pool.generate(&key).await.unwrap());
    let module = config.module.clone();
    let report = sign_under_load(
        &pool,
        &key,
        verifier,
        Duration::from_secs(3),
        Duration::from_secs(1),
        move || close_all_sessions(&module, "keyward"),
    )
    .await;
    // Shown with --no-capture: the figures for the record.
    eprintln!("{report:?}; reconnects {}", metrics.reconnects.get());
    assert!(
        metrics.reconnects.get() > 0,
        "the fault reached the pool's sessions"
    );
    assert!(
        report.other_errors.is_empty(),
        "only 503-class errors: {:?}",
        report.other_errors
    );
    assert!(
        report.ok_before > 100 && report.ok_after_recovery > 100,
        "signing resumed: {}",
        report.ok_after_recovery
    );
    assert_eq!(pool.breaker_state(), BreakerState::Closed);
    stop(pool);
}

/// `p11-kit server` exporting the token over a unix socket: a stand-in for a
/// network HSM. Killed on drop.
struct RemoteToken {
    server: Child,
    socket: PathBuf,
}

impl RemoteToken {
    fn start(dir: &Path, softhsm: &Path) -> Self {
        let socket = dir.join("p11kit.sock");
        let server = Command::new("p11-kit")
            .args(["server", "-f", "-n"])
            .arg(&socket)
            .arg("--provider")
            .arg(softhsm)
            .arg("pkcs11:token=keyward")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("p11-kit (package p11-kit) is installed by the test command");
        for _ in 0..100 {
            if socket.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(socket.exists(), "p11-kit server did not create its socket");
        Self { server, socket }
    }

    /// The processes serving open connections (the server forks one per
    /// client).
    fn connection_processes(&self) -> Vec<String> {
        let pid = self.server.id();
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
        let children: Vec<String> = children.split_whitespace().map(str::to_owned).collect();
        assert!(!children.is_empty(), "no connection process");
        children
    }

    /// Kills the connection processes, as when a network HSM's connection
    /// drops.
    fn drop_connections(&self) {
        self.signal_connections("-KILL");
    }

    /// Stops the connection processes: the HSM keeps its connections open
    /// and answers nothing, as a wedged appliance does.
    fn stop_answering(&self) {
        self.signal_connections("-STOP");
    }

    fn answer_again(&self) {
        self.signal_connections("-CONT");
    }

    fn signal_connections(&self, signal: &str) {
        for child in self.connection_processes() {
            Command::new("kill")
                .args([signal, &child])
                .status()
                .unwrap();
        }
    }
}

impl Drop for RemoteToken {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

const P11_KIT_CLIENT: &str = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so";

/// A token served by p11-kit's server, and the configuration of a client
/// that reaches it over a socket, as keyward reaches a network HSM.
fn remote_token() -> (tempfile::TempDir, Arc<RemoteToken>, Pkcs11Config) {
    let (dir, local) = token();
    let remote = Arc::new(RemoteToken::start(dir.path(), &local.module));
    // The client module finds the server through this variable; set before
    // the module is loaded, while the only other threads are the runtime's.
    std::env::set_var(
        "P11_KIT_SERVER_ADDRESS",
        format!("unix:path={}", remote.socket.display()),
    );
    let config = Pkcs11Config {
        module: PathBuf::from(P11_KIT_CLIENT),
        ..local
    };
    (dir, remote, config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_hsm_whose_connection_drops_is_reinitialized_and_recovers() {
    let (_dir, remote, config) = remote_token();
    let (pool, metrics) = start_pool(&config, 2);
    let key = KeyId::parse("agent-remote").unwrap();
    let verifier = VerifyingKey::from(&pool.generate(&key).await.unwrap());
    let fault = remote.clone();
    let report = sign_under_load(
        &pool,
        &key,
        verifier,
        Duration::from_secs(4),
        Duration::from_secs(1),
        move || fault.drop_connections(),
    )
    .await;
    // Shown with --no-capture: the figures for the record.
    eprintln!("{report:?}; reconnects {}", metrics.reconnects.get());
    assert!(
        metrics.reconnects.get() > 0,
        "the dropped connection reached the pool"
    );
    assert!(
        report.other_errors.is_empty(),
        "only 503-class errors: {:?}",
        report.other_errors
    );
    assert!(
        report.ok_before > 50,
        "signed before the fault: {}",
        report.ok_before
    );
    assert!(
        report.ok_after_recovery > 50,
        "signing resumed after re-initialization: {}",
        report.ok_after_recovery
    );
    assert_eq!(pool.breaker_state(), BreakerState::Closed);
    stop(pool);
}

/// A call into the module that does not return (a wedged network HSM) holds
/// its worker, but no caller waits for it for ever: each is answered
/// `DeadlineExceeded` (HTTP 503 key_store_timeout) within twice the pool's
/// deadline, and signing resumes once the HSM answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_hsm_that_stops_answering_times_callers_out_and_serves_again_when_it_answers() {
    let (_dir, remote, config) = remote_token();
    let deadline = Duration::from_millis(500);
    let backend: Arc<dyn KeyBackend> = Arc::new(Pkcs11Backend::open(&config).unwrap());
    let pool = KeyPool::start(
        backend,
        &PoolConfig {
            workers: 2,
            deadline,
            ..PoolConfig::default()
        },
        PoolMetrics::unregistered(),
    )
    .unwrap();
    let key = KeyId::parse("agent-wedged").unwrap();
    let verifier = VerifyingKey::from(&pool.generate(&key).await.unwrap());
    pool.sign(&key, digest(0, 0)).await.unwrap();

    remote.stop_answering();
    let asked = Instant::now();
    let callers: Vec<_> = (0..4)
        .map(|i| {
            let (pool, key) = (pool.clone(), key.clone());
            tokio::spawn(async move { pool.sign(&key, digest(1, i)).await })
        })
        .collect();
    for caller in callers {
        let answer = caller.await.unwrap();
        assert!(
            matches!(answer, Err(PoolError::DeadlineExceeded)),
            "a wedged HSM's caller is told it did not answer in time: {answer:?}"
        );
    }
    // Twice the deadline, and slack for a loaded machine; without the
    // bound the callers waited for ever.
    assert!(
        asked.elapsed() < 2 * deadline + Duration::from_secs(3),
        "answered after {:?}",
        asked.elapsed()
    );

    remote.answer_again();
    let mut signed = None;
    for i in 0..100 {
        if let Ok(signature) = pool.sign(&key, digest(2, i)).await {
            signed = Some((i, signature));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (i, signature) = signed.expect("signing resumed once the HSM answered");
    verifier.verify_prehash(&digest(2, i), &signature).unwrap();
}

/// A key's handle is looked up once for the whole application, not once
/// per session: a key generated in one session signs in every other, and
/// still does after every session closed (SoftHSM2 then forgets all
/// handles, and the backend finds the key again).
#[test]
fn a_key_signs_in_every_session_and_after_every_session_closed() {
    use keyward::keys::KeySession;
    let (_dir, config) = token();
    let backend = Pkcs11Backend::open(&config).unwrap();
    let key = KeyId::random("agent");
    let public = backend
        .open_pkcs11_session()
        .unwrap()
        .generate(&key)
        .unwrap();
    let verifier = VerifyingKey::from(&public);
    for round in 0..3u64 {
        // Each round's sessions are the only ones open, and close at its end.
        let mut first = backend.open_pkcs11_session().unwrap();
        let mut second = backend.open_pkcs11_session().unwrap();
        for (n, session) in [&mut first, &mut second].into_iter().enumerate() {
            let digest = digest(round, n as u64);
            let signature = session.sign_digest(&key, &digest).unwrap();
            verifier.verify_prehash(&digest, &signature).unwrap();
        }
    }
    let mut session = backend.open_pkcs11_session().unwrap();
    session.destroy(&key).unwrap();
    assert!(matches!(
        session.sign_digest(&key, &digest(9, 9)),
        Err(keyward::keys::KeyError::NotFound(_))
    ));
}
