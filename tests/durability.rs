//! Durability under load: whatever keyward answered (a certificate, a
//! signature) is in its database after the process is killed with
//! SIGKILL in the middle of the load, with keyward's keys on SoftHSM2 and
//! in a swtpm, on SQLite and PostgreSQL; the audit chain still verifies,
//! and the process starts again on the same key store.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{Backends, Server};
use serde_json::{json, Value};

/// What the clients were answered before the process died.
#[derive(Default)]
struct Answered {
    certificate_serials: Vec<String>,
    signature_requests: Vec<String>,
}

/// Those of `answered` that `query` (one text column) does not return.
async fn not_recorded(server: &Server, answered: &[String], query: &str) -> Vec<String> {
    let recorded: HashSet<String> = server.sql_strings(query).await.into_iter().collect();
    answered
        .iter()
        .filter(|a| !recorded.contains(*a))
        .cloned()
        .collect()
}

async fn every_answered_certificate_and_signature_survives_kill_9_under_load(backends: Backends) {
    let mut server = Server::start(backends).await;
    common::certified_agent(&server, "alpha").await;
    let stop = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for client_index in 0..8 {
        let (client, url, token, stop, answers) = (
            server.client.clone(),
            server.url.clone(),
            server.admin_token.trim().to_owned(),
            stop.clone(),
            answers.clone(),
        );
        clients.push(tokio::spawn(async move {
            let mut answered = Answered::default();
            let mut i = client_index;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let (path, body) = if i % 2 == 0 {
                    ("certificates", json!({"ttl_seconds": 600}))
                } else {
                    ("sign", json!({"message_b64": "aGk="}))
                };
                let Ok(response) = client
                    .post(format!("{url}/v1/agents/alpha/{path}"))
                    .bearer_auth(&token)
                    .json(&body)
                    .send()
                    .await
                else {
                    // The process is gone.
                    break;
                };
                let status = response.status().as_u16();
                let request_id = response
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let Ok(answer) = response.json::<Value>().await else {
                    break;
                };
                match (status, path) {
                    (201, "certificates") => answered
                        .certificate_serials
                        .push(answer["serial"].as_str().unwrap().to_owned()),
                    (200, "sign") => answered.signature_requests.push(request_id.unwrap()),
                    _ => panic!("{status} {path}: {answer}"),
                }
                answers.fetch_add(1, Ordering::Relaxed);
            }
            answered
        }));
    }
    // Killed once the load is well under way, however fast this machine
    // answers today: at least 1.5 s in, and past 200 answers.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let limit = std::time::Instant::now() + Duration::from_secs(30);
    while answers.load(Ordering::Relaxed) < 200 && std::time::Instant::now() < limit {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop(); // SIGKILL, mid-load
    stop.store(true, Ordering::Relaxed);
    let mut answered = Answered::default();
    for client in clients {
        let a = client.await.unwrap();
        answered.certificate_serials.extend(a.certificate_serials);
        answered.signature_requests.extend(a.signature_requests);
    }
    assert!(
        answered.certificate_serials.len() > 50 && answered.signature_requests.len() > 50,
        "the load ran: {} certificates, {} signatures answered",
        answered.certificate_serials.len(),
        answered.signature_requests.len()
    );

    let server = server.restart().await;
    let lost = not_recorded(
        &server,
        &answered.certificate_serials,
        "SELECT serial FROM certificates",
    )
    .await;
    assert!(lost.is_empty(), "answered certificates lost: {lost:?}");
    let lost = not_recorded(
        &server,
        &answered.signature_requests,
        "SELECT request_id FROM signatures",
    )
    .await;
    assert!(lost.is_empty(), "answered signatures lost: {lost:?}");
    let records = server
        .store()
        .await
        .audit_records(0, 1_000_000)
        .await
        .unwrap();
    keyward::audit::verify_sequence(&records).unwrap();
    eprintln!(
        "{} certificates and {} signatures answered before SIGKILL, all recorded",
        answered.certificate_serials.len(),
        answered.signature_requests.len()
    );
    // And the restarted process serves.
    let (status, signed) = server
        .admin(
            "POST",
            "/v1/agents/alpha/sign",
            Some(json!({"message_b64": "aGk="})),
        )
        .await;
    assert_eq!(status, 200, "{signed}");
}

on_every_backend!(every_answered_certificate_and_signature_survives_kill_9_under_load,);
