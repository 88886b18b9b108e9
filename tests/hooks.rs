//! Revocation hooks end to end: a keyward process on a real SoftHSM2
//! token, on SQLite and PostgreSQL, delivering to a receiver on loopback.

mod common;

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Db, Server};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

/// What the receiver got: the signature header, the event id header, the
/// body.
type Received = Arc<Mutex<Vec<(String, String, Value)>>>;

/// An HTTP endpoint on loopback that records every POST and answers with
/// the status in `answer`.
struct Receiver {
    url: String,
    received: Received,
    answer: Arc<AtomicU16>,
}

impl Receiver {
    async fn start() -> Self {
        use http_body_util::BodyExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let received: Received = Arc::default();
        let answer = Arc::new(AtomicU16::new(200));
        let (log, status) = (received.clone(), answer.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (log, status) = (log.clone(), status.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: hyper::Request<hyper::body::Incoming>| {
                            let (log, status) = (log.clone(), status.clone());
                            async move {
                                let header = |name: &str| {
                                    request
                                        .headers()
                                        .get(name)
                                        .and_then(|v| v.to_str().ok())
                                        .unwrap_or("")
                                        .to_owned()
                                };
                                let (signature, event_id) =
                                    (header("keyward-signature"), header("keyward-event-id"));
                                let body = request.into_body().collect().await.unwrap().to_bytes();
                                let event: Value = serde_json::from_slice(&body).unwrap();
                                // The MAC covers the bytes as sent.
                                let raw = String::from_utf8(body.to_vec()).unwrap();
                                log.lock().unwrap().push((
                                    signature,
                                    event_id,
                                    json!({"event": event, "raw": raw}),
                                ));
                                let mut response = hyper::Response::new(http_body_util::Full::new(
                                    bytes::Bytes::new(),
                                ));
                                *response.status_mut() =
                                    hyper::StatusCode::from_u16(status.load(Ordering::SeqCst))
                                        .unwrap();
                                Ok::<_, std::convert::Infallible>(response)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            url,
            received,
            answer,
        }
    }

    fn events(&self) -> Vec<(String, String, Value)> {
        self.received.lock().unwrap().clone()
    }

    /// Waits until `n` requests have arrived.
    async fn wait_for(&self, n: usize) -> Vec<(String, String, Value)> {
        let start = Instant::now();
        loop {
            let events = self.events();
            if events.len() >= n {
                return events;
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "only {} of {n} hook requests arrived: {events:?}",
                events.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Checks `keyward-signature: t=..,v1=..` as a receiver would.
fn signature_is_valid(secret: &str, header: &str, raw_body: &str) -> bool {
    let Some((t, mac_hex)) = header
        .strip_prefix("t=")
        .and_then(|rest| rest.split_once(",v1="))
    else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.{raw_body}").as_bytes());
    hex::decode(mac_hex).is_ok_and(|bytes| mac.verify_slice(&bytes).is_ok())
}

async fn register(server: &Server, url: &str) -> String {
    let (status, hook) = server
        .admin("POST", "/v1/hooks", Some(json!({"url": url})))
        .await;
    assert_eq!(status, 201, "{hook}");
    hook["secret"].as_str().unwrap().to_owned()
}

async fn a_hook_receives_every_change_signed_and_in_order(db: Db) {
    let server = Server::start(db).await;
    let receiver = Receiver::start().await;
    let secret = register(&server, &receiver.url).await;
    let first = common::certified_agent(&server, "alpha").await;
    common::certified_agent(&server, "beta").await;

    let steps = [
        (
            format!(
                "/v1/certificates/{}/revoke",
                first["serial"].as_str().unwrap()
            ),
            Some(json!({"reason": "superseded"})),
        ),
        ("/v1/agents/beta/suspend".to_owned(), None),
        ("/v1/agents/beta/resume".to_owned(), None),
        (
            "/v1/agents/alpha/revoke".to_owned(),
            Some(json!({"reason": "keyCompromise"})),
        ),
    ];
    for (path, body) in steps {
        let (status, answer) = server.admin("POST", &path, body).await;
        assert_eq!(status, 200, "{path}: {answer}");
    }
    let events = receiver.wait_for(4).await;
    let kinds: Vec<&str> = events
        .iter()
        .map(|(_, _, e)| e["event"]["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "certificate.revoke",
            "agent.suspend",
            "agent.resume",
            "agent.revoke"
        ]
    );
    for (signature, event_id, event) in &events {
        assert!(
            signature_is_valid(&secret, signature, event["raw"].as_str().unwrap()),
            "bad signature {signature} on {event}"
        );
        assert!(!signature_is_valid(
            "another secret",
            signature,
            event["raw"].as_str().unwrap()
        ));
        assert_eq!(event["event"]["event_id"].as_str(), Some(event_id.as_str()));
    }
    assert_eq!(events[0].2["event"]["agent"], "alpha");
    assert_eq!(events[0].2["event"]["details"]["reason"], "superseded");
    assert_eq!(events[3].2["event"]["details"]["reason"], "keyCompromise");
    // Nothing else comes: each event once when the receiver says 2xx.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(receiver.events().len(), 4);
    // The secret never reaches the audit trail.
    let records = server.store().await.audit_records(0, 1000).await.unwrap();
    let text =
        serde_json::to_string(&records.iter().map(|r| &r.event).collect::<Vec<_>>()).unwrap();
    assert!(!text.contains(&secret));
}

async fn an_undelivered_event_survives_a_restart_and_is_delivered(db: Db) {
    let server = Server::start(db).await;
    let receiver = Receiver::start().await;
    receiver.answer.store(503, Ordering::SeqCst);
    let secret = register(&server, &receiver.url).await;
    common::certified_agent(&server, "alpha").await;
    let (status, _) = server
        .admin(
            "POST",
            "/v1/agents/alpha/revoke",
            Some(json!({"reason": "keyCompromise"})),
        )
        .await;
    assert_eq!(status, 200);
    let refused = receiver.wait_for(1).await;
    // Until the refusal is on record: a process killed in the middle of a
    // send leaves its lease to expire first (LEASE_SECS), a slower path.
    let start = Instant::now();
    while server
        .sql("SELECT COUNT(*) FROM hook_deliveries WHERE attempts >= 1 AND lease_until IS NULL")
        .await
        != Some(1)
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the failed attempt was not recorded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // keyward stops with the event undelivered, and starts again.
    let server = server.restart().await;
    receiver.answer.store(200, Ordering::SeqCst);
    let start = Instant::now();
    let delivered = loop {
        let pending = server
            .sql("SELECT COUNT(*) FROM hook_deliveries WHERE delivered_at IS NULL")
            .await;
        if pending == Some(0) {
            break receiver.events();
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "not delivered after the restart: {:?}",
            receiver.events()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let last = delivered.last().unwrap();
    assert_eq!(last.1, refused[0].1, "the same event, redelivered");
    assert!(signature_is_valid(
        &secret,
        &last.0,
        last.2["raw"].as_str().unwrap()
    ));
    let (_, metrics) = server.admin("GET", "/metrics", None).await;
    let metrics = metrics.as_str().unwrap().to_owned();
    assert!(
        metrics.contains("keyward_hook_deliveries_total 1"),
        "{metrics}"
    );
}

async fn bad_hook_registrations_are_refused_and_write_nothing(db: Db) {
    let server = Server::start(db).await;
    register(&server, "http://127.0.0.1:9/hook").await;
    let before = server.row_counts().await;
    let cases = [
        (
            json!({"url": "ftp://127.0.0.1/hook"}),
            400,
            "invalid_hook_url",
        ),
        (json!({"url": "not a url"}), 400, "invalid_hook_url"),
        (
            json!({"url": "http://hooks.example.com/x"}),
            400,
            "invalid_hook_url",
        ),
        (
            json!({"url": "http://169.254.169.254/latest"}),
            400,
            "invalid_hook_url",
        ),
        (
            json!({"url": "http://user:pw@127.0.0.1/x"}),
            400,
            "invalid_hook_url",
        ),
        (
            json!({"url": "http://127.0.0.1:9/hook"}),
            409,
            "hook_exists",
        ),
        (
            json!({"url": "http://127.0.0.1/x", "secret": "mine"}),
            400,
            "invalid_request",
        ),
    ];
    for (body, status, code) in cases {
        let (got, answer) = server.admin("POST", "/v1/hooks", Some(body.clone())).await;
        assert_eq!(
            (got, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}: {answer}"
        );
    }
    let (got, answer) = server.admin("DELETE", "/v1/hooks/999", None).await;
    assert_eq!(
        (got, answer["error"]["code"].as_str()),
        (404, Some("hook_not_found"))
    );
    let (got, answer) = server.admin("DELETE", "/v1/hooks/abc", None).await;
    assert_eq!(
        (got, answer["error"]["code"].as_str()),
        (400, Some("invalid_hook_id"))
    );
    let (got, _) = server
        .request(
            "POST",
            "/v1/hooks",
            Some(json!({"url": "http://127.0.0.1/y"})),
            None,
        )
        .await;
    assert_eq!(got, 401);
    assert_eq!(server.row_counts().await, before);
    assert_eq!(server.sql("SELECT COUNT(*) FROM hooks").await, Some(1));
    // The listing never shows secrets.
    let (_, listed) = server.admin("GET", "/v1/hooks", None).await;
    assert_eq!(listed["hooks"].as_array().unwrap().len(), 1);
    assert!(listed["hooks"][0].get("secret").is_none(), "{listed}");
}

on_both_databases!(
    a_hook_receives_every_change_signed_and_in_order,
    an_undelivered_event_survives_a_restart_and_is_delivered,
    bad_hook_registrations_are_refused_and_write_nothing,
);
