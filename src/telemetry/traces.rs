//! OpenTelemetry traces over OTLP/HTTP (protobuf), off unless an endpoint
//! is configured (`--otlp-endpoint`, `OTEL_EXPORTER_OTLP_ENDPOINT`,
//! `[telemetry] otlp_endpoint`).
//!
//! The spans are ordinary `tracing` spans with the target [`TARGET`], at
//! debug level: the OpenTelemetry layer is the only one that sees them (a
//! per-layer filter), so the log output does not change, and with no
//! endpoint nothing enables them and each costs one cached callsite check.
//!
//! Sampling is decided once per request, before any span exists
//! ([`trace_request`], from the standard `OTEL_TRACES_SAMPLER` and
//! `OTEL_TRACES_SAMPLER_ARG`): the SDK samples a span only after
//! tracing-opentelemetry has built it, so an unsampled request would still
//! pay for building its spans. The SDK then keeps every span it is handed,
//! and a child span ([`TARGET`]) is built only inside a traced request.
//!
//! Off the request path: a finished span goes into the SDK's batch
//! processor, a bounded queue that its own thread drains, exporting with a
//! blocking HTTP client. A dead or slow collector only fills that queue;
//! past [`QUEUE_CAPACITY`] spans are dropped, never waited for, and counted
//! in `keyward_otlp_spans_dropped_total` with the spans of failed exports.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Duration;

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::Context;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider, Span, SpanData, SpanExporter,
    SpanProcessor,
};
use opentelemetry_sdk::Resource;
use prometheus_client::metrics::counter::Counter;
use tracing::Subscriber;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// The `tracing` target of every span exported over OTLP.
pub const TARGET: &str = "keyward::otel";

/// Spans waiting for export at most; more are dropped and counted.
pub const QUEUE_CAPACITY: usize = 2048;

/// How long a graceful stop waits for the last spans to be exported.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Spans lost: dropped when the queue was full, or in an export that
/// failed. Registered in [`super::Metrics`] as
/// `keyward_otlp_spans_dropped_total`; a process-wide counter because the
/// exporter is set up with the logging, before any `Metrics` exists.
pub static SPANS_DROPPED: LazyLock<Counter> = LazyLock::new(Counter::default);

static ENABLED: AtomicBool = AtomicBool::new(false);
static SAMPLER: OnceLock<RequestSampler> = OnceLock::new();

/// The name of the server span `api::trace` opens; the only [`TARGET`]
/// span built outside a traced request.
pub const SERVER_SPAN: &str = "request";

/// Which requests are traced: the standard `OTEL_TRACES_SAMPLER` choices
/// (`always_on`, `always_off`, `traceidratio`, and the `parentbased_`
/// three, the default being `parentbased_always_on`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RequestSampler {
    /// A caller's `traceparent` decides, when there is one.
    pub parent_based: bool,
    /// The share of the other requests traced, 0 to 1.
    pub ratio: f64,
}

impl RequestSampler {
    /// From the variables' values, as the OpenTelemetry specification
    /// reads them: an unknown sampler or a ratio that is not a number from
    /// 0 to 1 is an error (the caller warns and keeps the default).
    pub fn parse(sampler: Option<&str>, argument: Option<&str>) -> Result<Self, String> {
        let ratio = || match argument {
            None => Ok(1.0),
            Some(text) => text
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or_else(|| {
                    format!("OTEL_TRACES_SAMPLER_ARG={text:?} is not a ratio from 0 to 1")
                }),
        };
        let (parent_based, ratio) = match sampler.map(str::trim) {
            None | Some("parentbased_always_on") => (true, 1.0),
            Some("parentbased_always_off") => (true, 0.0),
            Some("parentbased_traceidratio") => (true, ratio()?),
            Some("always_on") => (false, 1.0),
            Some("always_off") => (false, 0.0),
            Some("traceidratio") => (false, ratio()?),
            Some(other) => {
                return Err(format!(
                    "OTEL_TRACES_SAMPLER={other:?} is not a sampler keyward knows"
                ))
            }
        };
        Ok(Self {
            parent_based,
            ratio,
        })
    }

    /// Whether to trace a request whose caller's trace was sampled
    /// (`Some(true)`), was not (`Some(false)`), or that has none.
    pub fn trace(&self, parent_sampled: Option<bool>) -> bool {
        match parent_sampled {
            Some(sampled) if self.parent_based => sampled,
            _ => self.ratio >= 1.0 || (self.ratio > 0.0 && rand::random::<f64>() < self.ratio),
        }
    }
}

impl Default for RequestSampler {
    fn default() -> Self {
        Self {
            parent_based: true,
            ratio: 1.0,
        }
    }
}

/// Whether the request is traced (see [`RequestSampler::trace`]) under
/// the sampler the environment set.
pub fn trace_request(parent_sampled: Option<bool>) -> bool {
    SAMPLER
        .get()
        .copied()
        .unwrap_or_default()
        .trace(parent_sampled)
}
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Whether spans are exported: the one check the request path makes when
/// tracing is off.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Where OTLP/HTTP traces go for a base endpoint, as the OTel spec reads
/// `OTEL_EXPORTER_OTLP_ENDPOINT`: `<endpoint>/v1/traces`.
/// (`opentelemetry-otlp`'s `with_endpoint` takes the URL as it is.)
pub fn traces_url(endpoint: &str) -> String {
    format!("{}/v1/traces", endpoint.trim_end_matches('/'))
}

/// The layer that turns [`TARGET`] spans into OpenTelemetry spans exported
/// to `endpoint` (a base URL), and installs the W3C trace-context
/// propagator. Call once, before installing the subscriber.
pub fn layer<S>(endpoint: &str) -> anyhow::Result<impl Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    let url = traces_url(endpoint);
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(url.clone())
        .build()
        .with_context(|| format!("the OTLP exporter for {url}"))?;
    let in_flight = Arc::new(AtomicUsize::new(0));
    let batch = BatchSpanProcessor::builder(CountingExporter {
        inner: exporter,
        in_flight: in_flight.clone(),
    })
    .with_batch_config(
        BatchConfigBuilder::default()
            .with_max_queue_size(QUEUE_CAPACITY)
            .build(),
    )
    .build();
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("keyward");
    }
    let sampler = RequestSampler::parse(
        std::env::var("OTEL_TRACES_SAMPLER").ok().as_deref(),
        std::env::var("OTEL_TRACES_SAMPLER_ARG").ok().as_deref(),
    )
    .unwrap_or_else(|e| {
        tracing::warn!(error = %e, "tracing every request (parentbased_always_on)");
        RequestSampler::default()
    });
    let _ = SAMPLER.set(sampler);
    let provider = SdkTracerProvider::builder()
        // Sampled already, per request (`trace_request`).
        .with_sampler(opentelemetry_sdk::trace::Sampler::AlwaysOn)
        .with_span_processor(BoundedProcessor {
            inner: batch,
            in_flight,
        })
        .with_resource(resource.build())
        .build();
    let tracer = provider.tracer("keyward");
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    PROVIDER
        .set(provider)
        .map_err(|_| anyhow::anyhow!("OTLP traces set up twice"))?;
    ENABLED.store(true, Ordering::Relaxed);
    // A child span only inside a traced request: one the sampler passed
    // over has no server span, and its children are not built either.
    // Every other callsite is ruled out once, when first hit (the
    // callsite filter), not each time it runs.
    let only_ours = tracing_subscriber::filter::dynamic_filter_fn(|meta, cx| {
        meta.name() == SERVER_SPAN || cx.lookup_current().is_some()
    })
    .with_callsite_filter(|meta| {
        if meta.is_span() && meta.target() == TARGET {
            tracing::subscriber::Interest::sometimes()
        } else {
            tracing::subscriber::Interest::never()
        }
    })
    .with_max_level_hint(tracing::Level::DEBUG);
    Ok(tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_threads(false)
        .with_location(false)
        .with_target(false)
        .with_tracked_inactivity(false)
        .with_filter(only_ours))
}

/// Installs the OTLP layer as the only subscriber: `keyward bench`, which
/// logs nothing, measuring what tracing costs the server it runs.
pub fn install_alone(endpoint: &str) -> anyhow::Result<()> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    tracing_subscriber::registry()
        .with(layer(endpoint)?)
        .try_init()
        .context("installing the OTLP layer")
}

/// Exports what is still queued and stops the exporter (a graceful stop).
/// Blocks for at most a few seconds; call it outside the async runtime.
pub fn shutdown() {
    if let Some(provider) = PROVIDER.get() {
        ENABLED.store(false, Ordering::Relaxed);
        if let Err(e) = provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
            tracing::warn!(error = %e, "flushing the last spans over OTLP failed");
        }
    }
}

/// Records `keyward.policy_version` on the current span (the request's
/// server span, where the policy decides); nothing when tracing is off.
pub fn record_policy_version(version: i64) {
    if enabled() {
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        tracing::Span::current().set_attribute("keyward.policy_version", version);
    }
}

/// The batch processor behind an admission count, so that drops can be
/// counted: the SDK's processor counts its queue-full drops only
/// internally (a log line at the first, the total at shutdown).
///
/// Invariant: `in_flight` counts the spans handed to `inner` and not yet
/// through an export; it is at least the number in `inner`'s queue, whose
/// capacity is [`QUEUE_CAPACITY`], so `inner` never finds its queue full:
/// the drop happens, and is counted, here.
#[derive(Debug)]
struct BoundedProcessor {
    inner: BatchSpanProcessor,
    in_flight: Arc<AtomicUsize>,
}

impl SpanProcessor for BoundedProcessor {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        // The batch processor ignores unsampled spans: they never reach
        // the exporter that gives their count back.
        if !span.span_context.is_sampled() {
            return;
        }
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= QUEUE_CAPACITY {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            SPANS_DROPPED.inc();
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The OTLP exporter, giving back each batch's admission and counting the
/// spans of a failed export as dropped.
#[derive(Debug)]
struct CountingExporter<E> {
    inner: E,
    in_flight: Arc<AtomicUsize>,
}

/// Settles a batch when its export ends, however it ends.
struct Settle {
    spans: usize,
    exported: bool,
    in_flight: Arc<AtomicUsize>,
}

impl Drop for Settle {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(self.spans, Ordering::AcqRel);
        if !self.exported {
            SPANS_DROPPED.inc_by(self.spans as u64);
        }
    }
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let mut settle = Settle {
            spans: batch.len(),
            exported: false,
            in_flight: self.in_flight.clone(),
        };
        let result = self.inner.export(batch).await;
        settle.exported = result.is_ok();
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sampler_reads_the_standard_variables() {
        let parse = |s: Option<&str>, a: Option<&str>| RequestSampler::parse(s, a);
        assert_eq!(parse(None, None), Ok(RequestSampler::default()));
        let ratio = parse(Some("parentbased_traceidratio"), Some("0.25")).unwrap();
        assert!(ratio.parent_based && ratio.ratio == 0.25);
        let ratio = parse(Some("traceidratio"), Some("0.5")).unwrap();
        assert!(!ratio.parent_based && ratio.ratio == 0.5);
        assert_eq!(parse(Some("always_off"), None).unwrap().ratio, 0.0);
        for (s, a) in [
            (Some("sometimes"), None),
            (Some("traceidratio"), Some("1.5")),
            (Some("traceidratio"), Some("NaN")),
            (Some("traceidratio"), Some("-0.1")),
        ] {
            assert!(parse(s, a).is_err(), "{s:?} {a:?}");
        }
    }

    #[test]
    fn a_parent_based_sampler_follows_the_caller_and_samples_the_rest() {
        let never_alone = RequestSampler {
            parent_based: true,
            ratio: 0.0,
        };
        assert!(never_alone.trace(Some(true)));
        assert!(!never_alone.trace(Some(false)));
        assert!(!never_alone.trace(None));
        let always = RequestSampler {
            parent_based: false,
            ratio: 1.0,
        };
        assert!(always.trace(Some(false)));
        let tenth = RequestSampler {
            parent_based: false,
            ratio: 0.1,
        };
        let traced = (0..100_000).filter(|_| tenth.trace(None)).count();
        // 10,000 expected; 9,400 to 10,600 is over six standard deviations.
        assert!((9_400..=10_600).contains(&traced), "{traced}");
    }

    #[test]
    fn a_base_endpoint_gets_the_traces_path() {
        assert_eq!(
            traces_url("http://127.0.0.1:4318"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://collector:4318/otlp/"),
            "http://collector:4318/otlp/v1/traces"
        );
    }
}
