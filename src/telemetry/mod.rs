//! Logging, Prometheus metrics, and OpenTelemetry traces ([`traces`]).
//!
//! Secrets never reach a log line: PINs and tokens are `SecretString` or
//! hashes everywhere, and request bodies are not logged.

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer};

pub mod traces;

/// Installs the global tracing subscriber; `RUST_LOG` overrides the level.
/// With an OTLP endpoint, spans are also exported there ([`traces`]); the
/// log filter applies to the log lines only.
pub fn init_logging(json: bool, otlp_endpoint: Option<&str>) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,hyper=warn,rustls=warn"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json().boxed()
    } else {
        fmt.boxed()
    };
    let otel = otlp_endpoint.map(traces::layer).transpose()?;
    // A second initialization (tests) is harmless: keep the first.
    let _ = tracing_subscriber::registry()
        .with(otel)
        .with(fmt.with_filter(filter))
        .try_init();
    if let Some(endpoint) = otlp_endpoint {
        tracing::info!(url = %traces::traces_url(endpoint), "exporting traces over OTLP/HTTP");
    }
    Ok(())
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub op: &'static str,
    pub outcome: &'static str,
}

/// Metrics of the key-operation pool.
#[derive(Clone)]
pub struct PoolMetrics {
    pub queue_depth: Gauge,
    pub batch_size: Histogram,
    pub sign_latency_seconds: Histogram,
    pub operations: Family<OutcomeLabels, Counter>,
    pub breaker_open: Gauge,
    pub reconnects: Counter,
    /// The `{op="sign",outcome="ok"}` member of `operations`, resolved once:
    /// the hot path then skips the family's label lookup.
    signs_ok: Counter,
}

impl PoolMetrics {
    /// Metrics that are counted but not exported (unit tests, benchmarks).
    pub fn unregistered() -> Self {
        let operations = Family::<OutcomeLabels, Counter>::default();
        let signs_ok = operations
            .get_or_create(&OutcomeLabels {
                op: "sign",
                outcome: "ok",
            })
            .clone();
        Self {
            queue_depth: Gauge::default(),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 8)),
            sign_latency_seconds: Histogram::new(exponential_buckets(0.00005, 2.0, 16)),
            operations,
            breaker_open: Gauge::default(),
            reconnects: Counter::default(),
            signs_ok,
        }
    }

    /// `n` signatures that succeeded, counted at once.
    pub fn signs_ok_by(&self, n: u64) {
        if n > 0 {
            self.signs_ok.inc_by(n);
        }
    }

    /// One operation's outcome. Successful signatures, the common case,
    /// are counted per batch with `signs_ok_by` (the same counter).
    pub fn outcome(&self, op: &'static str, outcome: &'static str) {
        self.operations
            .get_or_create(&OutcomeLabels { op, outcome })
            .inc();
    }

    fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("keyward_pool");
        r.register(
            "queue_depth",
            "Requests waiting for a pool worker",
            self.queue_depth.clone(),
        );
        r.register(
            "batch_size",
            "Requests a worker took from the queue at once",
            self.batch_size.clone(),
        );
        r.register(
            "sign_latency_seconds",
            "Time from enqueue to signature, per sign request",
            self.sign_latency_seconds.clone(),
        );
        r.register(
            "operations",
            "Key operations by kind and outcome",
            self.operations.clone(),
        );
        r.register(
            "breaker_open",
            "1 while the circuit breaker fails fast",
            self.breaker_open.clone(),
        );
        r.register(
            "reconnects",
            "Session reopen attempts after connection failures",
            self.reconnects.clone(),
        );
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub code: String,
}

/// Metrics of revocation hook deliveries.
/// The audit transparency log.
#[derive(Clone, Debug, Default)]
pub struct AuditMetrics {
    /// Entries this replica sealed into checkpoints (summed over replicas:
    /// every entry appended, once).
    pub appended: Counter,
    /// The tree size of the latest checkpoint this replica knows.
    pub size: Gauge,
    pub checkpoint_failures: Counter,
    /// 1 while the stored log does not match its signed checkpoint.
    pub inconsistent: Gauge,
    /// When the latest known checkpoint was signed (Unix ms); the age is
    /// computed from it at each scrape.
    pub signed_at_ms: Arc<std::sync::atomic::AtomicI64>,
    checkpoint_age: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl AuditMetrics {
    fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("keyward_audit");
        r.register(
            "entries_appended",
            "Audit entries sealed into signed checkpoints by this replica",
            self.appended.clone(),
        );
        r.register(
            "log_size",
            "Entries in the latest signed checkpoint",
            self.size.clone(),
        );
        r.register(
            "checkpoint_failures",
            "Checkpoint rounds that failed (signing on the token, or the store)",
            self.checkpoint_failures.clone(),
        );
        r.register(
            "log_inconsistent",
            "1 while the stored audit log does not match its latest signed checkpoint",
            self.inconsistent.clone(),
        );
        r.register(
            "checkpoint_age_seconds",
            "Seconds since the latest checkpoint was signed",
            self.checkpoint_age.clone(),
        );
    }

    fn refresh_age(&self) {
        let signed = self.signed_at_ms.load(std::sync::atomic::Ordering::Relaxed);
        if signed > 0 {
            let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
            self.checkpoint_age
                .set((now as i64 - signed) as f64 / 1000.0);
        }
    }
}

#[derive(Clone)]
pub struct HookMetrics {
    pub delivered: Counter,
    pub failed: Counter,
    pub pending: Gauge,
}

impl HookMetrics {
    pub fn unregistered() -> Self {
        Self {
            delivered: Counter::default(),
            failed: Counter::default(),
            pending: Gauge::default(),
        }
    }

    fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("keyward_hook");
        r.register(
            "deliveries",
            "Hook events delivered (2xx)",
            self.delivered.clone(),
        );
        r.register(
            "failures",
            "Hook delivery attempts that failed (retried with backoff)",
            self.failed.clone(),
        );
        r.register(
            "pending",
            "Hook events not yet delivered, all replicas",
            self.pending.clone(),
        );
    }
}

/// Metrics of revocation: how fast a revocation made elsewhere is enforced
/// here ("time to revoke"), and how often the set is reloaded.
#[derive(Clone)]
pub struct RevocationMetrics {
    pub propagation_seconds: Histogram,
    pub reloads: Counter,
    pub revocations: Counter,
}

impl RevocationMetrics {
    pub fn unregistered() -> Self {
        Self {
            // 1 ms to ~16 s.
            propagation_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            reloads: Counter::default(),
            revocations: Counter::default(),
        }
    }

    fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("keyward_revocation");
        r.register(
            "propagation_seconds",
            "From a revocation's commit on another replica to its enforcement here",
            self.propagation_seconds.clone(),
        );
        r.register(
            "reloads",
            "Reloads of the in-memory revocation set",
            self.reloads.clone(),
        );
        r.register(
            "revocations",
            "Revocations, suspensions and resumptions made by this replica",
            self.revocations.clone(),
        );
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub action: &'static str,
    /// `allow`, `deny` or `held`.
    pub decision: &'static str,
    pub reason: &'static str,
}

/// The policy's decisions on what agents ask for (`keyward_policy_decisions_total`).
#[derive(Clone, Default)]
pub struct PolicyMetrics {
    pub decisions: Family<DecisionLabels, Counter>,
}

impl PolicyMetrics {
    pub fn decided(&self, action: &'static str, decision: &'static str, reason: &'static str) {
        self.decisions
            .get_or_create(&DecisionLabels {
                action,
                decision,
                reason,
            })
            .inc();
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: &'static str,
    /// The route template (`/v1/agents/{name}/sign`), never the path: a
    /// label per agent name would grow without bound.
    pub route: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthenticationLabels {
    /// `client_certificate` or `token`.
    pub method: &'static str,
    /// `ok`, or the refusal's code.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AnomalyLabels {
    pub kind: &'static str,
    pub response: &'static str,
}

/// Anomaly detection (`detect`).
#[derive(Clone)]
pub struct DetectMetrics {
    pub anomalies: Family<AnomalyLabels, Counter>,
    /// From the first offending request to the detection.
    pub detection_seconds: Histogram,
}

impl Default for DetectMetrics {
    fn default() -> Self {
        Self {
            anomalies: Family::default(),
            // 1 ms to about 65 s.
            detection_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
        }
    }
}

impl DetectMetrics {
    pub fn detected(&self, kind: &'static str, response: &'static str, after_seconds: f64) {
        self.anomalies
            .get_or_create(&AnomalyLabels { kind, response })
            .inc();
        self.detection_seconds.observe(after_seconds);
    }

    fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("keyward");
        r.register(
            "anomalies",
            "Anomalies detected, by kind and the response taken",
            self.anomalies.clone(),
        );
        r.register(
            "anomaly_detection_seconds",
            "Time from the first offending request to the detection",
            self.detection_seconds.clone(),
        );
    }
}

/// Every metric keyward exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub pool: PoolMetrics,
    pub revocation: RevocationMetrics,
    pub hooks: HookMetrics,
    pub audit: AuditMetrics,
    pub detect: DetectMetrics,
    pub policy: PolicyMetrics,
    /// `http_server_request_duration_seconds`, as OpenTelemetry's HTTP
    /// semantic conventions name it.
    pub http_requests: Family<RequestLabels, Histogram>,
    pub authentications: Family<AuthenticationLabels, Counter>,
    pub certificates_issued: Counter,
    pub agents_created: Counter,
    pub api_errors: Family<HttpLabels, Counter>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let pool = PoolMetrics::unregistered();
        pool.register(&mut registry);
        let revocation = RevocationMetrics::unregistered();
        revocation.register(&mut registry);
        let hooks = HookMetrics::unregistered();
        hooks.register(&mut registry);
        let audit = AuditMetrics::default();
        audit.register(&mut registry);
        let detect = DetectMetrics::default();
        detect.register(&mut registry);
        let policy = PolicyMetrics::default();
        let http_requests = Family::<RequestLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.0005, 2.0, 16))) as fn() -> Histogram,
        );
        let authentications = Family::<AuthenticationLabels, Counter>::default();
        registry.register(
            "http_server_request_duration_seconds",
            "Duration of HTTP requests served, by method, route template and status",
            http_requests.clone(),
        );
        let certificates_issued = Counter::default();
        let agents_created = Counter::default();
        let api_errors = Family::<HttpLabels, Counter>::default();
        let r = registry.sub_registry_with_prefix("keyward");
        r.register(
            "certificates_issued",
            "Certificates issued",
            certificates_issued.clone(),
        );
        r.register(
            "agents_created",
            "Agents registered",
            agents_created.clone(),
        );
        r.register(
            "api_errors",
            "API error answers by machine-readable code",
            api_errors.clone(),
        );
        r.register(
            "policy_decisions",
            "The policy's decisions on agents' requests: allow, deny or held, with the reason",
            policy.decisions.clone(),
        );
        r.register(
            "authentications",
            "Callers authenticated or refused, by method and outcome",
            authentications.clone(),
        );
        r.register(
            "otlp_spans_dropped",
            "Trace spans not exported: the OTLP queue was full or the export failed",
            traces::SPANS_DROPPED.clone(),
        );
        Self {
            registry: Arc::new(registry),
            pool,
            revocation,
            hooks,
            audit,
            detect,
            policy,
            http_requests,
            authentications,
            certificates_issued,
            agents_created,
            api_errors,
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.audit.refresh_age();
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_counted_per_batch_and_one_by_one_land_in_the_same_series() {
        let metrics = PoolMetrics::unregistered();
        metrics.signs_ok_by(3);
        metrics.outcome("sign", "ok");
        metrics.outcome("sign", "error");
        let count = |outcome| {
            metrics
                .operations
                .get_or_create(&OutcomeLabels {
                    op: "sign",
                    outcome,
                })
                .get()
        };
        assert_eq!(count("ok"), 4);
        assert_eq!(count("error"), 1);
    }
}
