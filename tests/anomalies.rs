//! Anomaly detection, as an attacker meets it: an agent's client
//! certificate and key copied and used from a second address, on another
//! replica, is caught and the agent quarantined until an admin resumes
//! it; an agent that only reconnects or renews is left alone.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{Db, Server};
use serde_json::{json, Value};

const QUARANTINE_POLICY: &str = r#"
[roles.worker]
actions = ["sign", "message", "issue_cert"]

[anomaly]
credential_sharing = "suspend"
"#;

fn sign_body() -> Value {
    json!({"message_b64": base64::engine::general_purpose::STANDARD.encode(b"hello")})
}

/// The agent's certificate and key in a client that connects from
/// `address`: a copy of the credential on another host.
fn client_from(server: &Server, certificate: &Value, key: &Path, address: &str) -> reqwest::Client {
    common::mtls_client_from(
        server,
        certificate["certificate_pem"].as_str().unwrap(),
        key,
        address,
    )
}

async fn sign_at(client: &reqwest::Client, base: &str, agent: &str) -> u16 {
    client
        .post(format!("{base}/v1/agents/{agent}/sign"))
        .json(&sign_body())
        .send()
        .await
        .expect("reached keyward")
        .status()
        .as_u16()
}

/// Signs through a "load balancer": `client` connects from its address
/// and says it forwards for `forwarded_for`.
async fn sign_forwarded(
    client: &reqwest::Client,
    base: &str,
    agent: &str,
    forwarded_for: &str,
) -> (u16, Value) {
    let response = client
        .post(format!("{base}/v1/agents/{agent}/sign"))
        .header("x-forwarded-for", forwarded_for)
        .json(&sign_body())
        .send()
        .await
        .expect("reached keyward");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn addresses_seen(server: &Server, agent: &str) -> Value {
    let (_, listed) = server
        .admin("GET", &format!("/v1/anomalies?agent={agent}"), None)
        .await;
    listed["anomalies"][0]["details"]["addresses"].clone()
}

async fn apply(server: &Server, policy: &str) {
    let (status, body) = server
        .admin("POST", "/v1/policies", Some(json!({"content": policy})))
        .await;
    assert_eq!(status, 201, "{body}");
}

async fn status_of(server: &Server, agent: &str) -> String {
    let (_, body) = server
        .admin("GET", &format!("/v1/agents/{agent}"), None)
        .await;
    body["status"].as_str().unwrap_or_default().to_owned()
}

async fn a_copied_certificate_used_from_a_second_address_on_another_replica_is_quarantined(_: Db) {
    let server = Server::start(Db::Postgres).await;
    apply(&server, QUARANTINE_POLICY).await;
    let replica = server.spawn_replica();
    let mut detection_ms = Vec::new();
    let mut suspended_after = Vec::new();
    let mut everywhere_after = Vec::new();
    for run in 0..10 {
        let agent = format!("victim-{run}");
        let (key, certificate) = common::enrolled_with(&server, &agent, &["worker"]).await;
        let owner = client_from(&server, &certificate, &key, "127.0.0.1");
        let thief = client_from(&server, &certificate, &key, "127.0.0.2");
        assert_eq!(sign_at(&owner, &server.url, &agent).await, 200);

        let attacked = Instant::now();
        // The first request from the copy is already refused: the
        // credential is checked before the request is served.
        assert_eq!(sign_at(&thief, &replica.url, &agent).await, 403);
        let mut status = status_of(&server, &agent).await;
        while status != "suspended" && attacked.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            status = status_of(&server, &agent).await;
        }
        assert_eq!(
            status, "suspended",
            "run {run}: not quarantined within 10 s"
        );
        suspended_after.push(attacked.elapsed().as_millis());

        // Quarantine holds for the owner too: on the replica that caught
        // the copy at once, on the other as soon as its revocation set
        // reloads (a NOTIFY away), until a human looks.
        assert_eq!(sign_at(&owner, &replica.url, &agent).await, 403);
        while sign_at(&owner, &server.url, &agent).await != 403 {
            assert!(
                attacked.elapsed() < Duration::from_secs(10),
                "run {run}: the other replica still signs"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        everywhere_after.push(attacked.elapsed().as_millis());
        let (_, listed) = server
            .admin("GET", &format!("/v1/anomalies?agent={agent}"), None)
            .await;
        let anomalies = listed["anomalies"].as_array().unwrap();
        assert_eq!(
            anomalies.len(),
            1,
            "one detection, however many replicas: {listed}"
        );
        let anomaly = &anomalies[0];
        assert_eq!(anomaly["kind"], "credential_sharing");
        assert_eq!(anomaly["response"], "suspend");
        let seen: Vec<&str> = anomaly["details"]["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(seen, ["127.0.0.1", "127.0.0.2"]);
        detection_ms.push(
            anomaly["detected_at_ms"].as_i64().unwrap()
                - anomaly["first_offense_ms"].as_i64().unwrap(),
        );

        let (status, body) = server
            .admin(
                "POST",
                &format!("/v1/agents/{agent}/resume"),
                Some(json!({})),
            )
            .await;
        assert!(status < 300, "{status} {body}");
        assert_eq!(sign_at(&owner, &server.url, &agent).await, 200);
    }
    println!(
        "time to detect (first offending request to detection), ms: {detection_ms:?}; \
         attack request sent to status suspended seen, ms: {suspended_after:?}; \
         to both replicas refusing, ms: {everywhere_after:?}"
    );

    // The KPIs count what happened: ten detections, each followed by a
    // suspension, and what was allowed.
    let (status, kpis) = server
        .admin("GET", "/v1/kpis?window_seconds=3600", None)
        .await;
    assert_eq!(status, 200, "{kpis}");
    assert_eq!(kpis["window_seconds"], 3600);
    assert_eq!(kpis["anomalies_detected"], 10, "{kpis}");
    assert_eq!(kpis["anomalies_revoked"], 10, "{kpis}");
    let mean_to_revoke = kpis["mean_time_to_revoke_seconds"].as_f64().unwrap();
    assert!((0.0..10.0).contains(&mean_to_revoke), "{kpis}");
    assert_eq!(kpis["mean_time_to_detect_seconds"].as_f64(), Some(0.0));
    // Twenty signatures, and the ten client certificates enrollment issued.
    assert_eq!(kpis["requests_allowed"], 30, "{kpis}");
    assert_eq!(kpis["policy_compliant_ratio"].as_f64(), Some(1.0));
    println!("KPIs: {kpis}");

    // Each detection is an audit entry, a metric, and a hook event type.
    let anomalies_audited = server
        .sql("SELECT COUNT(*) FROM audit_entries WHERE action = 'anomaly'")
        .await;
    assert_eq!(anomalies_audited, Some(10));
    let suspensions_by_detector = server
        .sql(
            "SELECT COUNT(*) FROM audit_entries
             WHERE action = 'agent.suspend' AND actor = 'keyward:detect'",
        )
        .await;
    assert_eq!(suspensions_by_detector, Some(10));
    let metrics = common::metrics_text(&server, &replica.url).await;
    assert!(
        metrics.contains(
            r#"keyward_anomalies_total{kind="credential_sharing",response="suspend"} 10"#
        ),
        "{metrics}"
    );
}

async fn an_agent_that_reconnects_or_renews_is_not_flagged(db: Db) {
    let server = Server::start(db).await;
    apply(&server, QUARANTINE_POLICY).await;
    let (key, certificate) = common::enrolled_with(&server, "steady", &["worker"]).await;
    // A new connection each time: a new source port, the same address.
    for _ in 0..5 {
        let client = client_from(&server, &certificate, &key, "127.0.0.1");
        assert_eq!(sign_at(&client, &server.url, "steady").await, 200);
    }
    // Renewal gives a new certificate: a new credential.
    let client = client_from(&server, &certificate, &key, "127.0.0.1");
    let (new_key, new_csr) = common::key_and_csr(server.data_dir.path(), "steady-next");
    let (status, renewed) =
        common::post(&client, &server, "/v1/renew", json!({"csr_pem": new_csr})).await;
    assert_eq!(status, 201, "{renewed}");
    let next = client_from(&server, &renewed, &new_key, "127.0.0.1");
    assert_eq!(sign_at(&next, &server.url, "steady").await, 200);
    assert_eq!(sign_at(&client, &server.url, "steady").await, 200);

    assert_eq!(status_of(&server, "steady").await, "active");
    let (status, listed) = server.admin("GET", "/v1/anomalies", None).await;
    assert_eq!(status, 200);
    assert_eq!(listed["anomalies"], json!([]), "{listed}");
}

async fn under_alert_a_shared_credential_is_listed_and_the_agent_keeps_working(db: Db) {
    let server = Server::start(db).await;
    apply(
        &server,
        "[roles.worker]\nactions = [\"sign\"]\n[anomaly]\ncredential_sharing = \"alert\"\n",
    )
    .await;
    let (key, certificate) = common::enrolled_with(&server, "watched", &["worker"]).await;
    let owner = client_from(&server, &certificate, &key, "127.0.0.1");
    let copy = client_from(&server, &certificate, &key, "127.0.0.2");
    assert_eq!(sign_at(&owner, &server.url, "watched").await, 200);
    assert_eq!(sign_at(&copy, &server.url, "watched").await, 200);
    assert_eq!(status_of(&server, "watched").await, "active");
    let (_, listed) = server
        .admin("GET", "/v1/anomalies?kind=credential_sharing", None)
        .await;
    assert_eq!(listed["anomalies"][0]["response"], "alert", "{listed}");
    assert_eq!(listed["anomalies"][0]["agent"], "watched");
}

async fn anomaly_listing_refuses_bad_queries_and_agents(db: Db) {
    let server = Server::start(db).await;
    for (query, code) in [
        ("limit=0", "invalid_limit"),
        ("limit=1001", "invalid_limit"),
        ("limit=x", "invalid_limit"),
        ("before=abc", "invalid_before"),
        ("before=-1", "invalid_before"),
        ("since=yesterday", "invalid_time"),
        ("kind=%07", "invalid_filter"),
        ("colour=red", "invalid_query"),
    ] {
        let (status, body) = server
            .admin("GET", &format!("/v1/anomalies?{query}"), None)
            .await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some(code)),
            "{query}: {body}"
        );
    }
    let (key, certificate) = common::enrolled(&server, "curious").await;
    let agent = client_from(&server, &certificate, &key, "127.0.0.1");
    let response = agent
        .get(format!("{}/v1/anomalies", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 403);
}

async fn kpis_refuse_bad_windows_and_agents(db: Db) {
    let server = Server::start(db).await;
    for query in [
        "window_seconds=0",
        "window_seconds=7776001",
        "window_seconds=x",
    ] {
        let (status, body) = server
            .admin("GET", &format!("/v1/kpis?{query}"), None)
            .await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("invalid_window")),
            "{query}: {body}"
        );
    }
    let (status, body) = server.admin("GET", "/v1/kpis?window=1", None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_query"))
    );
    // Nothing happened yet: no means to take, and they say so.
    let (status, kpis) = server.admin("GET", "/v1/kpis", None).await;
    assert_eq!(status, 200);
    assert_eq!(kpis["mean_time_to_detect_seconds"], Value::Null, "{kpis}");
    assert_eq!(kpis["window_seconds"], 86_400);
    let (key, certificate) = common::enrolled(&server, "nosy").await;
    let agent = client_from(&server, &certificate, &key, "127.0.0.1");
    let response = agent
        .get(format!("{}/v1/kpis", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 403);
}

async fn a_policy_with_a_bad_anomaly_section_is_refused(db: Db) {
    let server = Server::start(db).await;
    for policy in [
        "[anomaly]\ncredential_sharing = \"explode\"\n",
        "[anomaly]\nsharing_window_seconds = 0\n",
        "[anomaly]\nsharing_window_seconds = 86401\n",
        "[anomaly]\nshared_networks = [\"10.0.0.0/33\"]\n",
        "[anomaly]\nunknown = 1\n",
        "[anomaly]\nrate_spike = \"sometimes\"\n",
        "[anomaly]\nrate_spike_factor = 1.5\n",
        "[anomaly]\nrate_spike_factor = 1001\n",
        "[anomaly]\nrate_spike_factor = nan\n",
        "[anomaly]\nrate_spike_floor = 0\n",
        "[anomaly]\nrate_spike_floor = -3\n",
        "[anomaly]\nrate_spike_floor = inf\n",
        "[anomaly]\nrate_baseline_seconds = 59\n",
        "[anomaly]\nrate_baseline_seconds = 604801\n",
        "[anomaly]\nrate_baseline_seconds = \"an hour\"\n",
        "[anomaly]\nprobing_denials = 1\n",
        "[anomaly]\nprobing_denials = 1001\n",
    ] {
        let (status, body) = server
            .admin("POST", "/v1/policies", Some(json!({"content": policy})))
            .await;
        assert_eq!(status, 400, "{policy}: {body}");
    }
    let (_, versions) = server.admin("GET", "/v1/policies", None).await;
    assert_eq!(versions["versions"], json!([]), "nothing was applied");
}

async fn an_agent_probing_for_others_is_quarantined_at_the_threshold(db: Db) {
    let server = Server::start(db).await;
    apply(
        &server,
        "[roles.worker]\nactions = [\"sign\"]\n\
         [anomaly]\ncross_agent_probing = \"suspend\"\nprobing_denials = 5\n",
    )
    .await;
    common::register_agent_with(&server, "target", &["worker"]).await;
    let (key, certificate) = common::enrolled_with(&server, "prober", &["worker"]).await;
    let prober = client_from(&server, &certificate, &key, "127.0.0.1");
    // Four tries at another agent's key: denied, not yet probing.
    for _ in 0..4 {
        assert_eq!(sign_at(&prober, &server.url, "target").await, 403);
    }
    assert_eq!(status_of(&server, "prober").await, "active");
    assert_eq!(sign_at(&prober, &server.url, "prober").await, 200);
    // The fifth: quarantined, its own signing refused until resumed.
    assert_eq!(sign_at(&prober, &server.url, "target").await, 403);
    assert_eq!(status_of(&server, "prober").await, "suspended");
    assert_eq!(sign_at(&prober, &server.url, "prober").await, 403);
    let (_, listed) = server
        .admin("GET", "/v1/anomalies?kind=cross_agent_probing", None)
        .await;
    let anomaly = &listed["anomalies"][0];
    assert_eq!(anomaly["agent"], "prober", "{listed}");
    assert_eq!(anomaly["response"], "suspend");
    assert_eq!(anomaly["details"]["denials"]["other_agent"], 5, "{listed}");
    assert_eq!(status_of(&server, "target").await, "active");
}

/// Two agents at one request a second for the baseline's warm-up (a
/// sixth of a minute); then one of them bursts at many times that, above
/// the floor, and is quarantined; the other, as steady as before, is not.
async fn an_agent_bursting_far_above_its_own_baseline_is_quarantined(db: Db) {
    let server = Server::start(db).await;
    apply(
        &server,
        "[roles.worker]\nactions = [\"sign\"]\n\
         [anomaly]\nrate_spike = \"suspend\"\nrate_spike_floor = 2\n\
         rate_spike_factor = 5\nrate_baseline_seconds = 60\n",
    )
    .await;
    let (key, certificate) = common::enrolled_with(&server, "burster", &["worker"]).await;
    let burster = client_from(&server, &certificate, &key, "127.0.0.1");
    let (key, certificate) = common::enrolled_with(&server, "steady", &["worker"]).await;
    let steady = client_from(&server, &certificate, &key, "127.0.0.1");
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(12) {
        assert_eq!(sign_at(&burster, &server.url, "burster").await, 200);
        assert_eq!(sign_at(&steady, &server.url, "steady").await, 200);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // A hundred at once: ten a second over the measuring window, against
    // a baseline of one.
    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let (burster, url) = (burster.clone(), server.url.clone());
        burst.spawn(async move { sign_at(&burster, &url, "burster").await });
    }
    let statuses: Vec<u16> = burst.join_all().await;
    assert!(
        statuses.iter().all(|s| [200, 403].contains(s)),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&403),
        "the burst was stopped: {statuses:?}"
    );
    assert_eq!(status_of(&server, "burster").await, "suspended");
    assert_eq!(sign_at(&burster, &server.url, "burster").await, 403);
    assert_eq!(sign_at(&steady, &server.url, "steady").await, 200);
    assert_eq!(status_of(&server, "steady").await, "active");

    let (_, listed) = server
        .admin("GET", "/v1/anomalies?kind=rate_spike", None)
        .await;
    let anomalies = listed["anomalies"].as_array().unwrap();
    assert_eq!(
        anomalies.len(),
        1,
        "one anomaly, for the burster only: {listed}"
    );
    let details = &anomalies[0]["details"];
    assert_eq!(anomalies[0]["agent"], "burster");
    assert_eq!(anomalies[0]["response"], "suspend");
    let rate = details["rate_per_second"].as_f64().unwrap();
    let baseline = details["baseline_per_second"].as_f64().unwrap();
    // Two decimals, as reported: a rate just over the floor reads 2.0.
    assert!(rate >= 5.0 * baseline && rate >= 2.0, "{details}");
    assert!((0.3..2.0).contains(&baseline), "{details}");
    // An admin resumes it, and its steady rate is fine again.
    let (status, body) = server
        .admin("POST", "/v1/agents/burster/resume", Some(json!({})))
        .await;
    assert!(status < 300, "{status} {body}");
    assert_eq!(sign_at(&burster, &server.url, "burster").await, 200);
}

/// Behind a load balancer at 127.0.0.1 (`[server] trusted_proxies`), the
/// client is the address it forwarded for: one certificate forwarded for
/// two clients is sharing; a connection from elsewhere cannot choose its
/// address with the header; a header the proxy mangled is refused.
async fn behind_a_trusted_proxy_the_forwarded_client_is_the_source(db: Db) {
    let server =
        Server::start_with_config(db, "[server]\ntrusted_proxies = [\"127.0.0.1\"]\n").await;
    apply(&server, QUARANTINE_POLICY).await;

    // Forwarded for two clients: a copied certificate behind the proxy.
    let (key, certificate) = common::enrolled_with(&server, "moved", &["worker"]).await;
    let proxy = client_from(&server, &certificate, &key, "127.0.0.1");
    assert_eq!(
        sign_forwarded(&proxy, &server.url, "moved", "203.0.113.5")
            .await
            .0,
        200
    );
    // The client's own entries left of the proxy's are never read.
    let (status, _) = sign_forwarded(&proxy, &server.url, "moved", "10.6.6.6, 203.0.113.5").await;
    assert_eq!(status, 200);
    assert_eq!(status_of(&server, "moved").await, "active");
    assert_eq!(
        sign_forwarded(&proxy, &server.url, "moved", "198.51.100.9")
            .await
            .0,
        403
    );
    assert_eq!(status_of(&server, "moved").await, "suspended");
    assert_eq!(
        addresses_seen(&server, "moved").await,
        json!(["203.0.113.5", "198.51.100.9"])
    );

    // From an untrusted address the header is ignored: the copy at
    // 127.0.0.2 cannot pass for the owner's forwarded address.
    let (key, certificate) = common::enrolled_with(&server, "spoofed", &["worker"]).await;
    let proxy = client_from(&server, &certificate, &key, "127.0.0.1");
    let thief = client_from(&server, &certificate, &key, "127.0.0.2");
    assert_eq!(
        sign_forwarded(&proxy, &server.url, "spoofed", "203.0.113.5")
            .await
            .0,
        200
    );
    assert_eq!(
        sign_forwarded(&thief, &server.url, "spoofed", "203.0.113.5")
            .await
            .0,
        403
    );
    assert_eq!(status_of(&server, "spoofed").await, "suspended");
    assert_eq!(
        addresses_seen(&server, "spoofed").await,
        json!(["203.0.113.5", "127.0.0.2"])
    );

    // An entry the trusted proxy wrote that is no address: refused, and
    // nothing is signed or seen.
    let (key, certificate) = common::enrolled_with(&server, "mangled", &["worker"]).await;
    let proxy = client_from(&server, &certificate, &key, "127.0.0.1");
    let signatures = server.sql("SELECT COUNT(*) FROM signatures").await;
    for bad in ["unknown", "203.0.113", "203.0.113.5, "] {
        let (status, body) = sign_forwarded(&proxy, &server.url, "mangled", bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"]["code"], "invalid_forwarded_for", "{body}");
    }
    assert_eq!(
        server.sql("SELECT COUNT(*) FROM signatures").await,
        signatures
    );
    assert_eq!(status_of(&server, "mangled").await, "active");
    let (_, listed) = server
        .admin("GET", "/v1/anomalies?agent=mangled", None)
        .await;
    assert_eq!(listed["anomalies"], json!([]));
}

on_both_databases!(
    behind_a_trusted_proxy_the_forwarded_client_is_the_source,
    an_agent_bursting_far_above_its_own_baseline_is_quarantined,
    an_agent_probing_for_others_is_quarantined_at_the_threshold,
    an_agent_that_reconnects_or_renews_is_not_flagged,
    under_alert_a_shared_credential_is_listed_and_the_agent_keeps_working,
    anomaly_listing_refuses_bad_queries_and_agents,
    a_policy_with_a_bad_anomaly_section_is_refused,
    kpis_refuse_bad_windows_and_agents,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_a_copied_certificate_used_from_a_second_address_on_another_replica_is_quarantined(
) {
    a_copied_certificate_used_from_a_second_address_on_another_replica_is_quarantined(Db::Postgres)
        .await
}
