//! `keyward bench sign`: signing throughput and latency, measured side by
//! side in one run on the same token and key, so the ratios hold on a noisy
//! shared machine even when the absolute numbers move.
//!
//! The modes (but `naive`, see `run`) run interleaved: the run is cut into
//! rounds, and each round gives every mode an equal slice, so a change in the machine's load
//! during the run (other tenants, frequency scaling) falls on all modes
//! alike instead of on whichever ran at the time.
//!
//! Modes: `raw` (C_Sign loops, one session per thread: the token's limit),
//! `naive` (session + login + find + sign + logout + close per signature),
//! `pool` (in-process submissions through the pool), `http` (the sign
//! endpoint over HTTPS with keep-alive clients) and `http-half` (the same at
//! half of `http`'s measured rate, for latency under moderate load). With
//! `--tpm TCTI`: `tpm-raw` and `tpm` (see `run_tpm`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use serde::Serialize;
use sha2::{Digest, Sha256};

use keyward::config::{Config, ConfigFile, Overrides};
use keyward::keys::pkcs11::{Pkcs11Backend, Pkcs11Config};
use keyward::keys::tpm::{TpmBackend, TpmConfig};
use keyward::keys::{KeyBackend, KeyId};
use keyward::pool::{KeyPool, PoolConfig};
use keyward::telemetry::PoolMetrics;

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub seconds: f64,
    pub concurrency: usize,
    pub workers: usize,
    pub batch_size: usize,
    pub modes: Vec<String>,
    /// `bench sign`: agents (each with its own key) that `http-many` spreads
    /// its signatures over.
    pub agents: usize,
    /// Where the server keeps the agents' custodial keys.
    pub custodial_storage: keyward::keys::KeyStorage,
    /// The server's database; `None`: a fresh SQLite file.
    pub database_url: Option<String>,
    /// A policy applied before measuring; `None`: the built-in one.
    pub policy: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    pub mode: String,
    pub ops: u64,
    pub seconds: f64,
    pub ops_per_sec: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub ratio_to_raw: Option<f64>,
    /// Process CPU time (every thread: token, server, clients, database
    /// writer) per operation. Unlike the rates, it hardly moves with what
    /// other tenants of the machine do, so it is the figure to compare
    /// changes by on a noisy machine.
    pub cpu_us_per_op: f64,
    pub workers: usize,
    pub concurrency: usize,
    pub errors: u64,
    /// How many agents' keys the mode spread its work over, when not one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agents: Option<usize>,
}

struct Sample {
    ops: u64,
    errors: u64,
    elapsed: Duration,
    /// Process CPU time spent while the sample ran.
    cpu: Duration,
    latencies_us: Vec<u32>,
}

impl Sample {
    fn empty() -> Self {
        Sample {
            ops: 0,
            errors: 0,
            elapsed: Duration::ZERO,
            cpu: Duration::ZERO,
            latencies_us: Vec::new(),
        }
    }

    fn add(&mut self, other: Sample) {
        self.ops += other.ops;
        self.errors += other.errors;
        self.elapsed += other.elapsed;
        self.cpu += other.cpu;
        self.latencies_us.extend(other.latencies_us);
    }

    fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    fn result(mut self, mode: &str, workers: usize, concurrency: usize) -> BenchResult {
        self.latencies_us.sort_unstable();
        let pct = |p: f64| -> u64 {
            if self.latencies_us.is_empty() {
                return 0;
            }
            let i = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
            self.latencies_us[i] as u64
        };
        let secs = self.elapsed.as_secs_f64();
        BenchResult {
            mode: mode.to_owned(),
            ops: self.ops,
            seconds: secs,
            ops_per_sec: self.ops as f64 / secs,
            p50_us: pct(0.50),
            p99_us: pct(0.99),
            ratio_to_raw: None,
            cpu_us_per_op: self.cpu.as_secs_f64() * 1e6 / (self.ops.max(1) as f64),
            workers,
            concurrency,
            errors: self.errors,
            agents: None,
        }
    }
}

/// CPU time of the whole process so far, every thread included (those
/// that have ended too).
fn process_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// Runs one measurement and notes the process CPU time it took.
async fn with_cpu<F>(measurement: F) -> anyhow::Result<Sample>
where
    F: std::future::Future<Output = anyhow::Result<Sample>>,
{
    let before = process_cpu();
    let mut sample = measurement.await?;
    sample.cpu = process_cpu().saturating_sub(before);
    Ok(sample)
}

fn digest_for(i: u64) -> [u8; 32] {
    Sha256::digest(i.to_be_bytes()).into()
}

fn micros(d: Duration) -> u32 {
    d.as_micros().min(u32::MAX as u128) as u32
}

/// C_Sign in a loop on `workers` threads, each with its own session.
fn raw(
    backend: &Arc<Pkcs11Backend>,
    key: &KeyId,
    workers: usize,
    run_for: Duration,
) -> anyhow::Result<Sample> {
    let start = Instant::now();
    let deadline = start + run_for;
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            let backend = backend.clone();
            let key = key.clone();
            std::thread::spawn(move || -> anyhow::Result<(u64, Vec<u32>)> {
                let mut session = backend.open_pkcs11_session()?;
                let mut latencies = Vec::with_capacity(64 * 1024);
                let mut i = 0u64;
                while Instant::now() < deadline {
                    let digest = digest_for(i);
                    let t = Instant::now();
                    session.sign_raw(&key, &digest)?;
                    latencies.push(micros(t.elapsed()));
                    i += 1;
                }
                Ok((i, latencies))
            })
        })
        .collect();
    let mut sample = Sample::empty();
    for t in threads {
        let (ops, latencies) = t
            .join()
            .map_err(|_| anyhow::anyhow!("raw worker panicked"))??;
        sample.ops += ops;
        sample.latencies_us.extend(latencies);
    }
    sample.elapsed = start.elapsed();
    Ok(sample)
}

/// Open, log in, find, sign, log out, close: per signature, one thread.
fn naive(backend: &Pkcs11Backend, key: &KeyId, run_for: Duration) -> anyhow::Result<Sample> {
    let start = Instant::now();
    let mut sample = Sample::empty();
    while start.elapsed() < run_for {
        let t = Instant::now();
        backend.sign_naively(key, &digest_for(sample.ops))?;
        sample.latencies_us.push(micros(t.elapsed()));
        sample.ops += 1;
    }
    sample.elapsed = start.elapsed();
    Ok(sample)
}

/// `concurrency` tasks submitting to the pool as fast as it answers.
async fn pool(pool: &KeyPool, key: &KeyId, concurrency: usize, run_for: Duration) -> Sample {
    let start = Instant::now();
    let deadline = start + run_for;
    let tasks: Vec<_> = (0..concurrency)
        .map(|c| {
            let (pool, key) = (pool.clone(), key.clone());
            tokio::spawn(async move {
                let (mut ops, mut errors, mut latencies) =
                    (0u64, 0u64, Vec::with_capacity(16 * 1024));
                let mut i = (c as u64) << 40;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    match pool.sign(&key, digest_for(i)).await {
                        Ok(_) => {
                            ops += 1;
                            latencies.push(micros(t.elapsed()));
                        }
                        Err(_) => errors += 1,
                    }
                    i += 1;
                }
                (ops, errors, latencies)
            })
        })
        .collect();
    let mut sample = Sample::empty();
    for t in tasks {
        if let Ok((ops, errors, latencies)) = t.await {
            sample.ops += ops;
            sample.errors += errors;
            sample.latencies_us.extend(latencies);
        }
    }
    sample.elapsed = start.elapsed();
    sample
}

/// One HTTPS keep-alive connection with a minimal HTTP/1.1 client of its
/// own: it writes each request as one prepared buffer and reads the answer
/// by its Content-Length, in the calling task. The client shares the
/// machine's two cores with the server it measures, so every microsecond
/// it spends is one the server does not get; hyper's client, with its
/// connection task and the hand-over to it per request, cost about twice as
/// much CPU per request.
struct Connection {
    stream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    request: Vec<u8>,
    response: Vec<u8>,
    /// A request failed mid-exchange: what is left on the stream is unknown.
    broken: bool,
}

impl Connection {
    async fn open(
        addr: std::net::SocketAddr,
        tls: Arc<rustls::ClientConfig>,
    ) -> anyhow::Result<Self> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await?;
        Ok(Self {
            stream,
            request: Vec::with_capacity(512),
            response: Vec::with_capacity(2048),
            broken: false,
        })
    }

    fn is_open(&self) -> bool {
        !self.broken
    }

    /// Makes the `i`-th call of `call`; a status other than 2xx is an error.
    async fn call(&mut self, call: &Call, token: &str, i: u64) -> anyhow::Result<()> {
        self.broken = true;
        let status = self.exchange(call, token, i).await?;
        self.broken = false;
        anyhow::ensure!((200..300).contains(&status), "answered {status}");
        Ok(())
    }

    /// Sends one request and reads its whole answer; returns the status.
    async fn exchange(&mut self, call: &Call, token: &str, i: u64) -> anyhow::Result<u16> {
        use std::io::Write;
        use tokio::io::AsyncWriteExt;
        self.request.clear();
        let (path, body) = call.request(i);
        write!(
            self.request,
            "POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {token}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )?;
        self.stream.write_all(&self.request).await?;
        self.stream.flush().await?;

        self.response.clear();
        let (status, body_start, body_len) = loop {
            self.read_more().await?;
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut head = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(len) = head.parse(&self.response)? {
                let content_length = head
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| {
                        std::str::from_utf8(h.value)
                            .ok()?
                            .trim()
                            .parse::<usize>()
                            .ok()
                    })
                    .ok_or_else(|| anyhow::anyhow!("an answer without Content-Length"))?;
                break (head.code.unwrap_or(0), len, content_length);
            }
        };
        while self.response.len() < body_start + body_len {
            self.read_more().await?;
        }
        anyhow::ensure!(
            self.response.len() == body_start + body_len,
            "more bytes than one answer: the server does not pipeline"
        );
        Ok(status)
    }

    /// Appends what the server sent next to `response`.
    async fn read_more(&mut self) -> anyhow::Result<()> {
        use tokio::io::AsyncReadExt;
        let mut chunk = [0u8; 2048];
        let n = self.stream.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "the server closed the connection");
        self.response.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

/// What the benchmark's HTTP clients ask keyward for, again and again.
#[derive(Clone)]
enum Call {
    /// A signature over a fresh digest, by each agent in turn.
    Sign { paths: Arc<Vec<String>> },
    /// The same request body each time (a certificate).
    Post { path: Arc<str>, body: Arc<str> },
}

impl Call {
    fn sign_by(agents: &[String]) -> Self {
        Call::Sign {
            paths: Arc::new(
                agents
                    .iter()
                    .map(|a| format!("/v1/agents/{a}/sign"))
                    .collect(),
            ),
        }
    }

    /// The path and body of the `i`-th call.
    fn request(&self, i: u64) -> (&str, std::borrow::Cow<'_, str>) {
        match self {
            Call::Sign { paths } => {
                // `i` carries the client in its high bits: spread by both.
                let spread = (i ^ (i >> 40)) as usize;
                let body = format!(
                    "{{\"digest_sha256_b64\":\"{}\"}}",
                    base64::engine::general_purpose::STANDARD.encode(digest_for(i))
                );
                (&paths[spread % paths.len()], body.into())
            }
            Call::Post { path, body } => (path, std::borrow::Cow::Borrowed(body)),
        }
    }
}

/// `concurrency` HTTPS keep-alive clients, each on its own connection
/// (kept open across slices), making `call`. With `per_client_rate`, each
/// client paces itself to that many requests per second.
async fn http(
    server: &BenchServer,
    connections: &mut Vec<Connection>,
    call: &Call,
    run_for: Duration,
    per_client_rate: Option<f64>,
) -> anyhow::Result<Sample> {
    while connections.len() < server.concurrency {
        let open = Connection::open(server.addr, server.tls.clone());
        connections.push(server.clients.spawn(open).await??);
    }
    let clients = connections.len();
    let start = Instant::now();
    let deadline = start + run_for;
    let tasks: Vec<_> = connections
        .drain(..)
        .enumerate()
        .map(|(c, mut connection)| {
            let (call, token) = (call.clone(), server.token.clone());
            server.clients.spawn(async move {
                let (mut ops, mut errors, mut latencies) =
                    (0u64, 0u64, Vec::with_capacity(16 * 1024));
                let interval = per_client_rate.map(|r| Duration::from_secs_f64(1.0 / r));
                // Paced clients start evenly spread over one interval, so
                // they do not fire in synchronized bursts.
                let mut next = Instant::now()
                    + interval.map_or(Duration::ZERO, |i| i * c as u32 / clients as u32);
                let mut i = (c as u64) << 40;
                let mut healthy = true;
                while Instant::now() < deadline {
                    if let Some(interval) = interval {
                        tokio::time::sleep_until(next.into()).await;
                        next += interval;
                    }
                    let t = Instant::now();
                    match connection.call(&call, &token, i).await {
                        Ok(()) => {
                            ops += 1;
                            latencies.push(micros(t.elapsed()));
                        }
                        Err(_) => {
                            errors += 1;
                            if !connection.is_open() {
                                // The next slice opens a fresh one.
                                healthy = false;
                                break;
                            }
                        }
                    }
                    i += 1;
                }
                (ops, errors, latencies, healthy.then_some(connection))
            })
        })
        .collect();
    let mut sample = Sample::empty();
    for t in tasks {
        if let Ok((ops, errors, latencies, connection)) = t.await {
            sample.ops += ops;
            sample.errors += errors;
            sample.latencies_us.extend(latencies);
            connections.extend(connection);
        }
    }
    sample.elapsed = start.elapsed();
    Ok(sample)
}

/// The agent every single-agent mode calls for.
const BENCH_AGENT: &str = "bench";

/// A keyward server on the benchmark's token, in this process.
struct BenchServer {
    addr: std::net::SocketAddr,
    token: String,
    /// For setting up (registering agents), not for measuring.
    setup: reqwest::Client,
    tls: Arc<rustls::ClientConfig>,
    concurrency: usize,
    clients: ClientRuntime,
    /// The server's pool, so that its workers can be joined at exit.
    pool: KeyPool,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

/// The HTTP clients' own runtime, of one thread, as a load generator in
/// another process would have: the clients share the machine's cores with
/// the server but not its scheduler, so the server's runtime serves only
/// the server, as in a deployment.
struct ClientRuntime(Option<tokio::runtime::Runtime>);

impl ClientRuntime {
    fn new() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("keyward-bench-client")
            .enable_all()
            .build()?;
        Ok(Self(Some(runtime)))
    }

    fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.0
            .as_ref()
            .expect("present until dropped")
            .spawn(future)
    }
}

impl Drop for ClientRuntime {
    fn drop(&mut self) {
        // Dropped inside the benchmark's own runtime, where waiting for
        // the threads to end is not allowed; the clients are idle by then.
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

async fn start_server(
    dir: &std::path::Path,
    pkcs11: &Pkcs11Config,
    options: &BenchOptions,
) -> anyhow::Result<BenchServer> {
    let data_dir = dir.join("server");
    let mut config: Config = ConfigFile::default().validate(&Overrides {
        data_dir: Some(data_dir.clone()),
        listen: Some("127.0.0.1:0".into()),
        database_url: options.database_url.clone(),
        pool_workers: Some(options.workers),
        tpm_ek_roots: None,
        tpm_ek_allowlist: None,
        otlp_endpoint: None,
    })?;
    config.custodial_storage = options.custodial_storage;
    let kw = keyward::app::start(
        &config,
        &keyward::keys::KeyStoreConfig::Pkcs11(pkcs11.clone()),
    )
    .await?;
    let pool = kw.state.pool.clone();
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = keyward::app::serve(listener, &kw, || {}, async {
            let _ = stop.await;
        })
        .await;
    });
    let ca = std::fs::read(data_dir.join("ca.pem"))?;
    let token = std::fs::read_to_string(data_dir.join("admin.token"))?
        .trim()
        .to_owned();

    // An ordinary client sets up; the lean one measures.
    let setup = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca)?)
        .build()?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca.as_slice()) {
        roots.add(cert?)?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let server = BenchServer {
        addr,
        token,
        setup,
        tls: Arc::new(tls),
        concurrency: options.concurrency,
        clients: ClientRuntime::new()?,
        pool,
        _shutdown: shutdown,
    };
    if let Some(policy) = &options.policy {
        let response = server
            .setup
            .post(format!("https://{addr}/v1/policies"))
            .bearer_auth(&server.token)
            .json(&serde_json::json!({ "content": policy }))
            .send()
            .await?;
        anyhow::ensure!(
            response.status().is_success(),
            "the policy was refused: {} {}",
            response.status(),
            response.text().await.unwrap_or_default()
        );
    }
    server.register(BENCH_AGENT).await?;
    Ok(server)
}

impl BenchServer {
    /// `POST /v1/agents`: a custodial key on the token.
    async fn register(&self, name: &str) -> anyhow::Result<()> {
        register(&self.setup, self.addr, &self.token, name).await
    }

    /// Registers `names`, `clients` at a time; how many were refused.
    async fn register_all(&self, names: &[String], clients: usize) -> u64 {
        let queue = Arc::new(std::sync::Mutex::new(
            names
                .iter()
                .cloned()
                .collect::<std::collections::VecDeque<_>>(),
        ));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..clients.max(1) {
            let (setup, addr, token) = (self.setup.clone(), self.addr, self.token.clone());
            let queue = queue.clone();
            tasks.spawn(async move {
                let mut refused = 0u64;
                loop {
                    let next = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
                    let Some(name) = next else { return refused };
                    if register(&setup, addr, &token, &name).await.is_err() {
                        refused += 1;
                    }
                }
            });
        }
        let mut refused = 0;
        while let Some(done) = tasks.join_next().await {
            refused += done.unwrap_or(0);
        }
        refused
    }
}

async fn register(
    client: &reqwest::Client,
    addr: std::net::SocketAddr,
    token: &str,
    name: &str,
) -> anyhow::Result<()> {
    let created = client
        .post(format!("https://{addr}/v1/agents"))
        .bearer_auth(token)
        .json(&serde_json::json!({ "name": name, "scopes": [] }))
        .send()
        .await?;
    anyhow::ensure!(
        created.status().is_success(),
        "registering agent {name}: {}",
        created.status()
    );
    Ok(())
}

/// What a run measured, and the pools it started: the caller joins their
/// workers once the runtime is gone, so that no worker is still inside the
/// PKCS#11 module when the process exits.
pub struct BenchRun {
    pub results: Vec<BenchResult>,
    pub pools: Vec<KeyPool>,
}

/// The token the `raw` mode signs on, opened apart from any server, and a
/// key on it.
fn raw_key(pkcs11: &Pkcs11Config) -> anyhow::Result<(Arc<Pkcs11Backend>, KeyId)> {
    use keyward::keys::KeySession;
    let backend = Arc::new(Pkcs11Backend::open(pkcs11)?);
    let key = KeyId::random("bench");
    backend.open_pkcs11_session()?.generate(&key)?;
    Ok((backend, key))
}

/// One slice of `raw` on `workers` threads, with its CPU time.
async fn raw_slice(
    backend: &Arc<Pkcs11Backend>,
    key: &KeyId,
    workers: usize,
    slice: Duration,
) -> anyhow::Result<Sample> {
    let (b, k) = (backend.clone(), key.clone());
    with_cpu(async { tokio::task::spawn_blocking(move || raw(&b, &k, workers, slice)).await? })
        .await
}

/// Cuts a run of `seconds` per mode into rounds of short slices. Short
/// slices spread every mode evenly over the run: the load other tenants put
/// on a shared machine drifts over seconds, and a mode measured in one
/// long stretch would take whatever that stretch brought.
fn rounds_and_slice(seconds: f64) -> (u32, Duration) {
    let rounds = ((seconds / 0.25) as u32).clamp(1, 40);
    (rounds, Duration::from_secs_f64(seconds / f64::from(rounds)))
}

/// Runs the benchmark on the token described by `pkcs11` (which must
/// already be initialized); `dir` holds the HTTP mode's server state.
pub async fn run(
    dir: &std::path::Path,
    pkcs11: &Pkcs11Config,
    options: &BenchOptions,
) -> anyhow::Result<BenchRun> {
    let (backend, key) = raw_key(pkcs11)?;
    let wants = |m: &str| options.modes.iter().any(|x| x == m);
    let (w, c) = (options.workers, options.concurrency);
    let (rounds, slice) = rounds_and_slice(options.seconds);

    // Naive runs alone, before anything else holds a session: its C_Logout
    // would log out every session of this process (PKCS#11 login state is
    // per application), and its C_Login fails while another is logged in.
    let mut naive_s = Sample::empty();
    if wants("naive") {
        let (b, k) = (backend.clone(), key.clone());
        let run_for = Duration::from_secs_f64(options.seconds);
        naive_s =
            with_cpu(async { tokio::task::spawn_blocking(move || naive(&b, &k, run_for)).await? })
                .await?;
    }

    let pool_handle = if wants("pool") {
        let config = PoolConfig {
            workers: w,
            batch_size: options.batch_size,
            ..PoolConfig::default()
        };
        let dyn_backend: Arc<dyn KeyBackend> = backend.clone();
        Some(KeyPool::start(
            dyn_backend,
            &config,
            PoolMetrics::unregistered(),
        )?)
    } else {
        None
    };
    let one = Call::sign_by(&[BENCH_AGENT.to_owned()]);
    let (mut connections, mut many_connections) = (Vec::new(), Vec::new());
    let mut many = None;
    let server = if wants("http") || wants("http-half") || wants("http-many") {
        let server = start_server(dir, pkcs11, options).await?;
        // Warm up (caches, allocator) outside the measurement.
        http(
            &server,
            &mut connections,
            &one,
            Duration::from_millis(300),
            None,
        )
        .await?;
        if wants("http-many") {
            let names: Vec<String> = (0..options.agents).map(|i| format!("agent-{i}")).collect();
            let refused = server.register_all(&names, 16).await;
            anyhow::ensure!(
                refused == 0,
                "{refused} of {} registrations refused",
                names.len()
            );
            many = Some(Call::sign_by(&names));
        }
        Some(server)
    } else {
        None
    };

    let (mut raw_s, mut pool_s, mut http_s, mut half_s, mut many_s) = (
        Sample::empty(),
        Sample::empty(),
        Sample::empty(),
        Sample::empty(),
        Sample::empty(),
    );
    for _ in 0..rounds {
        if wants("raw") {
            raw_s.add(raw_slice(&backend, &key, w, slice).await?);
        }
        if let Some(pool_handle) = &pool_handle {
            pool_s.add(with_cpu(async { Ok(pool(pool_handle, &key, c, slice).await) }).await?);
        }
        if let Some(server) = &server {
            // The peak is needed for http-half's rate even if not reported.
            http_s.add(with_cpu(http(server, &mut connections, &one, slice, None)).await?);
            if wants("http-half") {
                let rate = (http_s.rate() / 2.0).max(1.0);
                let paced = http(server, &mut connections, &one, slice, Some(rate / c as f64));
                half_s.add(with_cpu(paced).await?);
            }
            if let Some(many) = &many {
                let spread = http(server, &mut many_connections, many, slice, None);
                many_s.add(with_cpu(spread).await?);
            }
        }
    }

    let mut results = Vec::new();
    if wants("raw") {
        results.push(raw_s.result("raw", w, w));
    }
    if wants("naive") {
        results.push(naive_s.result("naive", 1, 1));
    }
    if pool_handle.is_some() {
        results.push(pool_s.result("pool", w, c));
    }
    if wants("http") {
        results.push(http_s.result("http", w, c));
    }
    if wants("http-half") {
        results.push(half_s.result("http-half", w, c));
    }
    if many.is_some() {
        let mut result = many_s.result("http-many", w, c);
        result.agents = Some(options.agents);
        results.push(result);
    }
    with_ratios_to_raw(&mut results);
    let pools = pool_handle
        .into_iter()
        .chain(server.map(|s| s.pool))
        .collect();
    Ok(BenchRun { results, pools })
}

/// `keyward bench issue`: certificates per second and latency, side by side
/// with the token's own signing rate in one run. Modes: `raw` (C_Sign loops,
/// as in `bench sign`: every certificate costs the CA key one signature),
/// `http-issue` (`POST /v1/agents/{name}/certificates` for the custodial
/// key, keep-alive HTTPS clients), `http-issue-half` (the same at half of
/// its measured rate), `http-csr` (the same with a CSR).
pub async fn run_issue(
    dir: &std::path::Path,
    pkcs11: &Pkcs11Config,
    options: &BenchOptions,
) -> anyhow::Result<BenchRun> {
    let (backend, key) = raw_key(pkcs11)?;
    let wants = |m: &str| options.modes.iter().any(|x| x == m);
    let (w, c) = (options.workers, options.concurrency);
    let (rounds, slice) = rounds_and_slice(options.seconds);
    let server = start_server(dir, pkcs11, options).await?;
    let path: Arc<str> = format!("/v1/agents/{BENCH_AGENT}/certificates").into();
    let custodial = Call::Post {
        path: path.clone(),
        body: r#"{"ttl_seconds":600}"#.into(),
    };
    let (_, csr) = keyward::client::credential::key_and_csr(BENCH_AGENT)?;
    let with_csr = Call::Post {
        path,
        body: serde_json::json!({ "csr_pem": csr, "ttl_seconds": 600 })
            .to_string()
            .into(),
    };
    let (mut connections, mut csr_connections) = (Vec::new(), Vec::new());
    http(
        &server,
        &mut connections,
        &custodial,
        Duration::from_millis(300),
        None,
    )
    .await?;

    let (mut raw_s, mut issue_s, mut half_s, mut csr_s) = (
        Sample::empty(),
        Sample::empty(),
        Sample::empty(),
        Sample::empty(),
    );
    for _ in 0..rounds {
        if wants("raw") {
            raw_s.add(raw_slice(&backend, &key, w, slice).await?);
        }
        issue_s.add(with_cpu(http(&server, &mut connections, &custodial, slice, None)).await?);
        if wants("http-issue-half") {
            let rate = (issue_s.rate() / 2.0).max(1.0);
            let paced = http(
                &server,
                &mut connections,
                &custodial,
                slice,
                Some(rate / c as f64),
            );
            half_s.add(with_cpu(paced).await?);
        }
        if wants("http-csr") {
            csr_s.add(with_cpu(http(&server, &mut csr_connections, &with_csr, slice, None)).await?);
        }
    }
    let mut results = Vec::new();
    for (mode, sample, workers, callers) in [
        ("raw", raw_s, w, w),
        ("http-issue", issue_s, w, c),
        ("http-issue-half", half_s, w, c),
        ("http-csr", csr_s, w, c),
    ] {
        if wants(mode) {
            results.push(sample.result(mode, workers, callers));
        }
    }
    with_ratios_to_raw(&mut results);
    Ok(BenchRun {
        results,
        pools: vec![server.pool.clone()],
    })
}

/// Sets each result's rate relative to `raw`'s, when `raw` ran.
fn with_ratios_to_raw(results: &mut [BenchResult]) {
    let raw_rate = results
        .iter()
        .find(|r| r.mode == "raw")
        .map(|r| r.ops_per_sec);
    for r in results {
        r.ratio_to_raw = raw_rate.map(|raw| r.ops_per_sec / raw);
    }
}

/// `keyward bench agents`: the registration rate as the number of agents
/// grows, `clients` registrations at a time, one line per `step` agents.
pub async fn run_agents(
    dir: &std::path::Path,
    pkcs11: &Pkcs11Config,
    options: &BenchOptions,
    step: usize,
) -> anyhow::Result<BenchRun> {
    let server = start_server(dir, pkcs11, options).await?;
    let mut results = Vec::new();
    let mut registered = 1;
    while registered < options.agents {
        let names: Vec<String> = (registered..(registered + step).min(options.agents))
            .map(|i| format!("agent-{i}"))
            .collect();
        let start = Instant::now();
        let cpu = process_cpu();
        let refused = server.register_all(&names, options.concurrency).await;
        let elapsed = start.elapsed();
        registered += names.len();
        let sample = Sample {
            ops: names.len() as u64 - refused,
            errors: refused,
            elapsed,
            cpu: process_cpu().saturating_sub(cpu),
            latencies_us: Vec::new(),
        };
        let mut result = sample.result("agents", options.workers, options.concurrency);
        result.agents = Some(registered);
        results.push(result);
    }
    Ok(BenchRun {
        results,
        pools: vec![server.pool.clone()],
    })
}

/// A table for people: the rates, latencies and CPU figures to compare
/// modes by; `--json` has every field.
pub fn table(results: &[BenchResult]) -> String {
    let rows = results
        .iter()
        .map(|r| {
            vec![
                r.mode.clone(),
                format!("{:.0}", r.ops_per_sec),
                r.p50_us.to_string(),
                r.p99_us.to_string(),
                r.ratio_to_raw.map_or("-".into(), |x| format!("{x:.2}")),
                format!("{:.1}", r.cpu_us_per_op),
                r.errors.to_string(),
                format!("{}/{}", r.workers, r.concurrency),
            ]
        })
        .collect();
    crate::cli::output::grid(
        Some(vec![
            "MODE",
            "OPS/S",
            "P50 US",
            "P99 US",
            "VS RAW",
            "CPU US/OP",
            "ERRORS",
            "W/C",
        ]),
        rows,
        &[1, 2, 3, 4, 5, 6, 7],
    )
}

/// TPM2_Sign on one long-lived connection, one thread: the TPM's limit.
fn tpm_raw(backend: &TpmBackend, key: &KeyId, run_for: Duration) -> anyhow::Result<Sample> {
    use keyward::keys::KeySession;
    let mut session = backend.open_tpm_session()?;
    // The key's first load is setup, not signing.
    session.sign_digest(key, &digest_for(0))?;
    let start = Instant::now();
    let mut sample = Sample::empty();
    while start.elapsed() < run_for {
        let t = Instant::now();
        session.sign_digest(key, &digest_for(sample.ops))?;
        sample.latencies_us.push(micros(t.elapsed()));
        sample.ops += 1;
    }
    sample.elapsed = start.elapsed();
    Ok(sample)
}

/// `keyward bench sign --tpm TCTI`: `tpm-raw` (TPM2_Sign in a loop on one
/// long-lived connection) against `tpm` (the pool's single TPM worker with
/// `concurrency` callers), on one key in that TPM. swtpm serves one
/// connection at a time, so the two cannot run at once: each round runs
/// `tpm-raw` on its own connection, then a pool that is started, warmed
/// up (its connection and the key loaded) and stopped again.
pub async fn run_tpm(tcti: &str, options: &BenchOptions) -> anyhow::Result<Vec<BenchResult>> {
    use keyward::keys::KeySession;
    let dir = tempfile::tempdir()?;
    let backend = Arc::new(TpmBackend::open(&TpmConfig {
        tcti: tcti.to_owned(),
        key_dir: dir.path().join("keys"),
    })?);
    let key = KeyId::random("bench");
    backend.open_tpm_session()?.generate(&key)?;
    let c = options.concurrency;
    let rounds = ((options.seconds / 0.5) as u32).clamp(1, 5);
    let slice = Duration::from_secs_f64(options.seconds / f64::from(rounds));
    let (mut raw_s, mut pool_s) = (Sample::empty(), Sample::empty());
    for _ in 0..rounds {
        let (b, k) = (backend.clone(), key.clone());
        raw_s.add(
            with_cpu(async { tokio::task::spawn_blocking(move || tpm_raw(&b, &k, slice)).await? })
                .await?,
        );

        let config = PoolConfig {
            workers: 1,
            batch_size: options.batch_size,
            ..PoolConfig::default()
        };
        let dyn_backend: Arc<dyn KeyBackend> = backend.clone();
        let handle = KeyPool::start(dyn_backend, &config, PoolMetrics::unregistered())?;
        handle.sign(&key, digest_for(0)).await?;
        pool_s.add(with_cpu(async { Ok(pool(&handle, &key, c, slice).await) }).await?);
        tokio::task::spawn_blocking(move || handle.join_workers(Duration::from_secs(10))).await?;
    }
    let mut results = vec![raw_s.result("tpm-raw", 1, 1), pool_s.result("tpm", 1, c)];
    let raw_rate = results[0].ops_per_sec;
    for r in &mut results {
        r.ratio_to_raw = Some(r.ops_per_sec / raw_rate);
    }
    Ok(results)
}
