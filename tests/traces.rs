//! OpenTelemetry traces over OTLP/HTTP, to a real receiver
//! (`tests/otlp_receiver.py`, opentelemetry-proto's decoder): a request
//! that carries a W3C `traceparent` is a server span of that trace with
//! the HTTP semantic-convention attributes and child spans, its trace id
//! is in the audit context; and with the collector down keyward serves on,
//! counting the spans it could not deliver.
//!
//! The receiver's python comes from `KEYWARD_OTLP_PYTHON`, which
//! `scripts/test.sh` installs and sets; without it these fail, not skip.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{private_tempdir, Db, Server};
use serde_json::{json, Value};

/// The OTLP receiver, killed on drop.
struct Receiver {
    child: Child,
    port: u16,
}

impl Receiver {
    fn start(spans: &Path) -> Self {
        let python = std::env::var("KEYWARD_OTLP_PYTHON").expect(
            "KEYWARD_OTLP_PYTHON names a python with opentelemetry-proto; \
             scripts/test.sh installs it and sets it",
        );
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/otlp_receiver.py");
        let mut child = Command::new(python)
            .arg(script)
            .arg(spans)
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting the OTLP receiver");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("the OTLP receiver did not start: {line:?}"));
        Self { child, port }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// keyward on SQLite and SoftHSM2, exporting to `endpoint` as its config
/// file says (`[telemetry] otlp_endpoint`; the flag and the variable are
/// checked by `config`'s unit tests and the acceptance check).
async fn keyward_exporting_to(endpoint: &str) -> Server {
    Server::start_with_config(
        Db::Sqlite,
        &format!("[telemetry]\notlp_endpoint = \"{endpoint}\"\n"),
    )
    .await
}

/// A receiver writing to a spans file, keyward exporting to it, and the
/// agent `agent` registered.
async fn traced_keyward_with(agent: &str) -> (tempfile::TempDir, PathBuf, Receiver, Server) {
    let dir = private_tempdir();
    let spans_file = dir.path().join("spans.jsonl");
    let receiver = Receiver::start(&spans_file);
    let keyward = keyward_exporting_to(&format!("http://127.0.0.1:{}", receiver.port)).await;
    let (status, body) = keyward
        .admin(
            "POST",
            "/v1/agents",
            Some(json!({"name": agent, "scopes": []})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    (dir, spans_file, receiver, keyward)
}

fn read_spans(file: &Path) -> Vec<Value> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// OTLP's SPAN_KIND_SERVER.
const SERVER: i64 = 2;

#[tokio::test]
async fn a_signing_request_continues_the_callers_trace_with_child_spans() {
    // No traceparent: a trace of its own, whose id the audit entry carries.
    let (_dir, spans_file, receiver, mut keyward) = traced_keyward_with("tracer").await;
    let (status, events) = keyward
        .admin("GET", "/v1/audit/events?agent=tracer", None)
        .await;
    assert_eq!(status, 200, "{events}");

    let trace_id = hex::encode(rand::random::<[u8; 16]>());
    let parent_id = hex::encode(rand::random::<[u8; 8]>());
    let response = keyward
        .client
        .post(format!("{}/v1/agents/tracer/sign", keyward.url))
        .bearer_auth(keyward.admin_token.trim())
        .header("traceparent", format!("00-{trace_id}-{parent_id}-01"))
        .json(&json!({"message_b64": "aGk="}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (status, body) = keyward
        .admin(
            "POST",
            "/v1/agents/nobody/sign",
            Some(json!({"message_b64": "aGk="})),
        )
        .await;
    assert_eq!(status, 404, "{body}");

    // The graceful stop exports what is still queued.
    // SIGTERM, as an operator stops it: the last spans are exported on the
    // way out.
    let exit = keyward.terminate();
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}");
    let spans = read_spans(&spans_file);
    let names: Vec<&str> = spans.iter().filter_map(|s| s["name"].as_str()).collect();

    let server: Vec<&Value> = spans
        .iter()
        .filter(|s| s["trace_id"] == trace_id.as_str())
        .filter(|s| s["name"] == "POST /v1/agents/{name}/sign")
        .collect();
    assert_eq!(server.len(), 1, "spans: {names:?}");
    let server = server[0];
    assert_eq!(server["parent_span_id"], parent_id.as_str(), "{server}");
    assert_eq!(server["kind"], SERVER, "{server}");
    let a = &server["attributes"];
    assert_eq!(a["http.request.method"], "POST", "{a}");
    assert_eq!(a["http.route"], "/v1/agents/{name}/sign", "{a}");
    assert_eq!(a["http.response.status_code"], 200, "{a}");
    assert_eq!(a["url.scheme"], "https", "{a}");
    assert_eq!(a["client.address"], "127.0.0.1", "{a}");
    assert_eq!(a["keyward.agent"], "tracer", "{a}");
    assert!(a["keyward.policy_version"].is_i64(), "{a}");
    assert!(a.get("error.type").is_none(), "{a}");

    // The policy decision, the pool's wait and signature, and the
    // signature record's commit, each a child of the server span.
    for child in ["policy decision", "pool sign", "store commit"] {
        let found = spans.iter().any(|s| {
            s["trace_id"] == trace_id.as_str()
                && s["name"] == child
                && s["parent_span_id"] == server["span_id"]
        });
        assert!(found, "no {child:?} child span; spans: {names:?}");
    }

    // A failure says what failed.
    let failed = spans
        .iter()
        .find(|s| s["attributes"]["keyward.agent"] == "nobody")
        .unwrap_or_else(|| panic!("no span for the failed request; spans: {names:?}"));
    assert_eq!(failed["attributes"]["http.response.status_code"], 404);
    assert_eq!(failed["attributes"]["error.type"], "404");
    assert!(
        failed["attributes"]["keyward.error_code"].is_string(),
        "{failed}"
    );

    // The registration's own trace is the one its audit entry names.
    let registration = spans
        .iter()
        .find(|s| s["name"] == "POST /v1/agents")
        .unwrap_or_else(|| panic!("no span for the registration; spans: {names:?}"));
    assert_eq!(registration["parent_span_id"], "", "{registration}");
    let registered_trace = registration["trace_id"].as_str().unwrap();
    assert!(
        events.to_string().contains(registered_trace),
        "the audit entry does not carry trace {registered_trace}: {events}"
    );
    drop(receiver);
}

/// Under `parentbased_always_off`, a request whose caller sampled its
/// trace is traced, children and all; every other request builds no span
/// at all, not even a child that would be exported as a trace of its own.
#[tokio::test]
async fn only_the_requests_the_sampler_chooses_are_traced_children_and_all() {
    // The keyward process inherits it; each test is a process of its own.
    std::env::set_var("OTEL_TRACES_SAMPLER", "parentbased_always_off");
    let (_dir, spans_file, receiver, mut keyward) = traced_keyward_with("sampled").await;
    let sign = |flags: &str, trace_id: &str| {
        keyward
            .client
            .post(format!("{}/v1/agents/sampled/sign", keyward.url))
            .bearer_auth(keyward.admin_token.trim())
            .header(
                "traceparent",
                format!("00-{trace_id}-{}-{flags}", hex::encode([7u8; 8])),
            )
            .json(&json!({"message_b64": "aGk="}))
            .send()
    };
    let unsampled = hex::encode(rand::random::<[u8; 16]>());
    assert_eq!(sign("00", &unsampled).await.unwrap().status(), 200);
    let sampled = hex::encode(rand::random::<[u8; 16]>());
    assert_eq!(sign("01", &sampled).await.unwrap().status(), 200);
    let exit = keyward.terminate();
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}");

    let spans = read_spans(&spans_file);
    let mut names: Vec<&str> = spans.iter().filter_map(|s| s["name"].as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "POST /v1/agents/{name}/sign",
            "policy decision",
            "pool sign",
            "store commit"
        ],
        "only the sampled request's spans: {spans:?}"
    );
    assert!(
        spans.iter().all(|s| s["trace_id"] == sampled.as_str()),
        "{spans:?}"
    );
    drop(receiver);
}

#[tokio::test]
async fn with_the_collector_down_every_request_is_served_and_lost_spans_are_counted() {
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let keyward = keyward_exporting_to(&format!("http://127.0.0.1:{port}")).await;
    let (status, body) = keyward
        .admin(
            "POST",
            "/v1/agents",
            Some(json!({"name": "busy", "scopes": []})),
        )
        .await;
    assert_eq!(status, 201, "{body}");

    let mut tasks = tokio::task::JoinSet::new();
    let client = keyward.client.clone();
    let url = format!("{}/v1/agents/busy/sign", keyward.url);
    for worker in 0..10 {
        let (client, url, token) = (
            client.clone(),
            url.clone(),
            keyward.admin_token.trim().to_owned(),
        );
        tasks.spawn(async move {
            let mut failures = Vec::new();
            for i in 0..50 {
                let response = client
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&json!({"message_b64": "aGk="}))
                    .send()
                    .await;
                match response {
                    Ok(r) if r.status() == 200 => {}
                    Ok(r) => failures.push(format!("{worker}/{i}: {}", r.status())),
                    Err(e) => failures.push(format!("{worker}/{i}: {e}")),
                }
            }
            failures
        });
    }
    let failures: Vec<String> = tasks.join_all().await.into_iter().flatten().collect();
    assert!(
        failures.is_empty(),
        "{} of 500 failed: {failures:?}",
        failures.len()
    );

    // The exporter gives up on the collector in its own thread; its loss
    // shows on /metrics.
    let dropped = |metrics: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("keyward_otlp_spans_dropped_total "))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0)
    };
    let until = std::time::Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    while std::time::Instant::now() < until {
        let (status, metrics) = keyward.admin("GET", "/metrics", None).await;
        assert_eq!(status, 200);
        last = metrics.as_str().unwrap().to_owned();
        if dropped(&last) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(dropped(&last) > 0, "no dropped spans counted: {last}");
    // Still serving.
    let (status, body) = keyward
        .admin(
            "POST",
            "/v1/agents/busy/sign",
            Some(json!({"message_b64": "aGk="})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}
