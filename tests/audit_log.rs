//! The audit trail as a transparency log, end to end: a keyward process on
//! a real token and database, read as an outsider reads it (checkpoint,
//! audit key, tiles, entry bundles over HTTPS; `keyward audit verify`), and
//! attacked as an operator with database access would attack it: one
//! entry edited, one deleted, the whole history rewritten consistently.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Backends, Db, Keys, Server};
use keyward::audit::note;
use keyward::audit::tiles::{TilePath, TreeEdge};
use serde_json::{json, Value};

/// Self-checks every second, so an edit is found while the test waits.
const CHECK_OFTEN: &str = "[audit]\nself_check_interval_seconds = 1\n";

async fn get_bytes(server: &Server, path: &str, token: Option<&str>) -> (u16, Vec<u8>, String) {
    let mut request = server.client.get(format!("{}{path}", server.url));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let cache = response
        .headers()
        .get("cache-control")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, response.bytes().await.unwrap().to_vec(), cache)
}

fn audit_key(pem: &[u8]) -> p256::PublicKey {
    use p256::pkcs8::DecodePublicKey;
    p256::PublicKey::from_public_key_pem(std::str::from_utf8(pem).unwrap()).unwrap()
}

/// Waits until a checkpoint covers every entry appended so far; returns
/// the checkpoint.
async fn sealed(server: &Server) -> Vec<u8> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let size = server.sql("SELECT seq FROM audit_head").await.unwrap() as u64;
        let (status, checkpoint, _) = get_bytes(server, "/v1/audit/checkpoint", None).await;
        if status == 200 {
            let text = String::from_utf8(checkpoint.clone()).unwrap();
            let sealed: u64 = text.lines().nth(1).unwrap().parse().unwrap();
            if sealed >= size {
                return checkpoint;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint covers the log's {size} entries"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `keyward audit verify` against the server, as an auditor runs it.
fn audit_verify(server: &Server, old_checkpoint: Option<&Path>) -> (bool, String) {
    let dir = server.data_dir.path();
    let key = dir.join("audit-test.pub");
    if !key.exists() {
        let pem = std::process::Command::new("curl")
            .args(["-sf", "--cacert"])
            .arg(dir.join("ca.pem"))
            .arg(format!("{}/v1/audit/public-key.pem", server.url))
            .output()
            .unwrap();
        assert!(pem.status.success(), "curl fetched the audit key");
        std::fs::write(&key, pem.stdout).unwrap();
    }
    let mut command = std::process::Command::new(common::keyward_bin());
    command
        .args(["audit", "verify", "--url", &server.url, "--ca"])
        .arg(dir.join("ca.pem"))
        .arg("--key")
        .arg(&key)
        .arg("--token-file")
        .arg(dir.join("admin.token"));
    if let Some(old) = old_checkpoint {
        command.arg("--checkpoint").arg(old);
    }
    common::run(&mut command)
}

async fn readiness(server: &Server) -> (u16, Value) {
    server.request("GET", "/readyz", None, None).await
}

/// Waits for `/readyz` to say the log is inconsistent.
async fn fails_closed(server: &Server) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = readiness(server).await;
        if status == 503 && body["code"] == "audit_log_inconsistent" {
            return body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the self-check did not find the change: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Some history: two agents, a certificate, signatures, a revocation.
async fn history(server: &Server) -> Value {
    common::register_agent(server, "alpha").await;
    common::register_agent(server, "beta").await;
    let issued = common::issue_certificate(server, "alpha").await;
    for _ in 0..3 {
        let (status, body) = server
            .admin(
                "POST",
                "/v1/agents/alpha/sign",
                Some(json!({"message_b64": "aGk="})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    issued
}

async fn an_outsider_verifies_the_checkpoint_tiles_and_entries(backends: Backends) {
    let server = Server::start(backends).await;
    let issued = history(&server).await;
    let first = sealed(&server).await;

    // No credential for the checkpoint, the key or the hash tiles.
    let (status, pem, _) = get_bytes(&server, "/v1/audit/public-key.pem", None).await;
    assert_eq!(status, 200);
    let key = audit_key(&pem);
    let (_, checkpoint, cache) = get_bytes(&server, "/v1/audit/checkpoint", None).await;
    assert_eq!(cache, "no-store");
    let verified = note::verify_checkpoint(&checkpoint, &key, None).unwrap();
    assert_eq!(verified.origin, "keyward.local/audit");

    // Every entry is JSON that hashes to its level-0 tile, and the tiles
    // give the signed root.
    let mut edge = TreeEdge::new();
    let mut entries = Vec::new();
    for bundle in 0..verified.size.div_ceil(256) {
        let width = (verified.size - bundle * 256).min(256) as u16;
        let path = |kind| {
            TilePath {
                kind,
                index: bundle,
                width,
            }
            .to_path()
        };
        let (status, bytes, cache) = get_bytes(
            &server,
            &format!(
                "/v1/audit/tile/{}",
                path(keyward::audit::tiles::TileKind::Entries)
            ),
            Some(server.admin_token.trim()),
        )
        .await;
        assert_eq!(
            (status, cache.as_str()),
            (200, "private, max-age=31536000, immutable")
        );
        let (status, tile, cache) = get_bytes(
            &server,
            &format!(
                "/v1/audit/tile/{}",
                path(keyward::audit::tiles::TileKind::Hashes { level: 0 })
            ),
            None,
        )
        .await;
        assert_eq!(
            (status, cache.as_str()),
            (200, "public, max-age=31536000, immutable")
        );
        let mut at = 0;
        let mut i = 0;
        while at < bytes.len() {
            let len = u16::from_be_bytes([bytes[at], bytes[at + 1]]) as usize;
            let entry = &bytes[at + 2..at + 2 + len];
            let leaf = keyward::audit::merkle::leaf_hash(entry);
            assert_eq!(
                &tile[32 * i..32 * i + 32],
                leaf,
                "entry {}",
                bundle * 256 + i as u64
            );
            edge.push(leaf, |_| {});
            entries.push(serde_json::from_slice::<Value>(entry).unwrap());
            at += 2 + len;
            i += 1;
        }
        assert_eq!(i, usize::from(width));
    }
    assert_eq!(edge.root().unwrap(), verified.root);
    for (index, entry) in entries.iter().enumerate() {
        assert_eq!(entry["index"], index as u64);
        assert!(entry["time"].as_str().unwrap().ends_with('Z'));
    }
    // The issuance says who asked, from where, with what, under which
    // policy.
    let issue = entries
        .iter()
        .find(|e| e["action"] == "certificate.issue")
        .unwrap();
    assert_eq!(issue["agent"], "alpha");
    assert_eq!(issue["decision"], "allow");
    assert_eq!(issue["policy_version"], 0);
    assert!(issue["credential"].as_str().unwrap().starts_with("token:"));
    assert!(issue["source"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert_eq!(issue["request_id"].as_str().unwrap().len(), 16);
    assert_eq!(issue["details"]["serial"], issued["serial"]);

    // The log only grows, and the tool says so too.
    let old = server.path("checkpoint-1");
    std::fs::write(&old, &first).unwrap();
    let (status, _) = server
        .admin(
            "POST",
            &format!(
                "/v1/certificates/{}/revoke",
                issued["serial"].as_str().unwrap()
            ),
            Some(json!({"reason": "keyCompromise"})),
        )
        .await;
    assert_eq!(status, 200);
    let second = sealed(&server).await;
    let newer = note::verify_checkpoint(&second, &key, None).unwrap();
    assert!(newer.size > verified.size);
    let (ok, out) = audit_verify(&server, Some(&old));
    assert!(ok, "{out}");
    let (status, ready) = readiness(&server).await;
    assert_eq!((status, ready["audit_log"].as_str()), (200, Some("ok")));
}

/// Replaces `alpha` with `alphb` in one entry, as a database user would.
async fn edit_one_entry(server: &Server) -> i64 {
    let index = server
        .sql("SELECT MIN(idx) FROM audit_entries WHERE agent = 'alpha'")
        .await
        .unwrap();
    server
        .sql(&format!(
            "UPDATE audit_entries SET entry = REPLACE(entry, 'alpha', 'alphb') WHERE idx = {index}"
        ))
        .await;
    index
}

async fn an_edited_entry_is_named_by_audit_verify_and_fails_the_log_closed(db: Db) {
    let server = Server::start_with_config(db, CHECK_OFTEN).await;
    history(&server).await;
    let old = server.path("checkpoint-old");
    std::fs::write(&old, sealed(&server).await).unwrap();

    let index = edit_one_entry(&server).await;

    let (ok, out) = audit_verify(&server, Some(&old));
    assert!(!ok, "audit verify accepted an edited entry: {out}");
    assert!(
        out.contains(&format!("entry {index}")),
        "the first bad entry is named: {out}"
    );
    let ready = fails_closed(&server).await;
    assert!(
        ready["reason"]
            .as_str()
            .unwrap()
            .contains(&format!("entry {index}")),
        "{ready}"
    );
    // Nothing more is sealed over the edited log.
    let before = server.sql("SELECT MAX(size) FROM audit_checkpoints").await;
    common::register_agent(&server, "gamma").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        server.sql("SELECT MAX(size) FROM audit_checkpoints").await,
        before
    );
    let (_, metrics) = server.admin("GET", "/metrics", None).await;
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains("keyward_audit_log_inconsistent 1"),
        "{metrics}"
    );
    // It keeps refusing across a restart, which checks at once.
    let server = server.restart().await;
    fails_closed(&server).await;
}

async fn a_deleted_entry_is_caught(db: Db) {
    let server = Server::start_with_config(db, CHECK_OFTEN).await;
    history(&server).await;
    let old = server.path("checkpoint-old");
    std::fs::write(&old, sealed(&server).await).unwrap();

    server.sql("DELETE FROM audit_entries WHERE idx = 3").await;

    let (ok, out) = audit_verify(&server, Some(&old));
    assert!(!ok, "audit verify accepted a deleted entry: {out}");
    assert!(
        out.contains("entries, not "),
        "the short bundle is named: {out}"
    );
    let ready = fails_closed(&server).await;
    assert!(
        ready["reason"].as_str().unwrap().contains("entry 3"),
        "{ready}"
    );
}

/// The attacker's best without the audit key: every entry rewritten, and
/// every tile recomputed from the rewritten entries, so the stored log is
/// consistent with itself; then, the signed checkpoints deleted, so
/// keyward would sign the rewritten history as if it were the original.
async fn a_history_rewritten_consistently_is_caught(db: Db) {
    let server = Server::start_with_config(db, CHECK_OFTEN).await;
    history(&server).await;
    let old = server.path("checkpoint-old");
    std::fs::write(&old, sealed(&server).await).unwrap();

    server
        .sql("UPDATE audit_entries SET entry = REPLACE(entry, 'alpha', 'alphb')")
        .await;
    let url = server.database.url.clone();
    let rewritten: Vec<(i64, String)> = {
        use sqlx::Connection;
        let sql = "SELECT idx, entry FROM audit_entries ORDER BY idx";
        if url.starts_with("sqlite") {
            let mut c = sqlx::SqliteConnection::connect(&url).await.unwrap();
            sqlx::query_as(sql).fetch_all(&mut c).await.unwrap()
        } else {
            let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
            sqlx::query_as(sql).fetch_all(&mut c).await.unwrap()
        }
    };
    let mut tiles = Vec::new();
    let mut edge = TreeEdge::new();
    for (_, entry) in &rewritten {
        edge.push(keyward::audit::merkle::leaf_hash(entry.as_bytes()), |t| {
            tiles.push(t)
        });
    }
    tiles.extend(edge.partial_tiles());
    for tile in &tiles {
        server
            .sql(&format!(
                "UPDATE audit_tiles SET hashes = {} WHERE level = {} AND idx = {}",
                if url.starts_with("sqlite") {
                    format!("X'{}'", hex::encode(&tile.hashes))
                } else {
                    format!("'\\x{}'::bytea", hex::encode(&tile.hashes))
                },
                tile.level,
                tile.index
            ))
            .await;
    }
    // Consistent with itself, but not with what the audit key signed.
    let ready = fails_closed(&server).await;
    assert!(
        ready["reason"]
            .as_str()
            .unwrap()
            .contains("root of the signed checkpoint"),
        "{ready}"
    );
    let (ok, out) = audit_verify(&server, Some(&old));
    assert!(!ok, "audit verify accepted a rewritten history: {out}");
    assert!(
        out.contains("does not extend the checkpoint of size"),
        "{out}"
    );

    // With the checkpoints gone too, keyward finds tiles no checkpoint
    // signed, and still refuses.
    server.sql("DELETE FROM audit_checkpoints").await;
    let server = server.restart().await;
    let ready = fails_closed(&server).await;
    assert!(
        ready["reason"]
            .as_str()
            .unwrap()
            .contains("no signed checkpoint"),
        "{ready}"
    );
}

async fn two_replicas_append_one_log_without_forks_or_gaps(_: Db) {
    let server = Server::start(Db::Postgres).await;
    let replica = server.spawn_replica();
    for name in ["alpha", "beta"] {
        common::register_agent(&server, name).await;
    }
    // 1,000 issuances, half on each replica, 16 at a time.
    let bases = [server.url.clone(), replica.url.clone()];
    let token = server.admin_token.trim().to_owned();
    let mut tasks = Vec::new();
    for worker in 0..16usize {
        let client = server.client.clone();
        let base = bases[worker % 2].clone();
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..1000 / 16 + usize::from(worker < 1000 % 16) {
                let agent = ["alpha", "beta"][(worker + i) % 2];
                let response = client
                    .post(format!("{base}/v1/agents/{agent}/certificates"))
                    .bearer_auth(&token)
                    .json(&json!({"ttl_seconds": 600}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status().as_u16(), 201);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let checkpoint = sealed(&server).await;
    let size = server
        .sql("SELECT COUNT(*) FROM audit_entries")
        .await
        .unwrap();
    assert_eq!(
        server.sql("SELECT MAX(idx) + 1 FROM audit_entries").await,
        Some(size),
        "no gaps"
    );
    assert_eq!(
        server
            .sql("SELECT COUNT(*) FROM audit_entries WHERE action = 'certificate.issue'")
            .await,
        Some(1000)
    );
    // Both replicas serve the one log, and it verifies from the start.
    let (status, from_replica) = server
        .request_at(&replica.url, "GET", "/v1/audit/checkpoint", None, None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        from_replica.as_str(),
        Some(String::from_utf8(checkpoint).unwrap().as_str())
    );
    let (ok, out) = audit_verify(&server, None);
    assert!(ok, "{out}");
}

async fn no_secret_reaches_the_log(backends: Backends) {
    let server = Server::start(backends).await;
    history(&server).await;
    let (status, tpm_agent) = server
        .admin(
            "POST",
            "/v1/agents",
            Some(json!({"name": "enrollee", "custody": "agent-tpm"})),
        )
        .await;
    assert_eq!(status, 201, "{tpm_agent}");
    let enrollment_token = common::enrollment_token(&server, "beta").await;
    let (status, hook) = server
        .admin(
            "POST",
            "/v1/hooks",
            Some(json!({"url": "http://127.0.0.1:9/hook"})),
        )
        .await;
    assert_eq!(status, 201, "{hook}");
    let entries = server
        .sql_strings("SELECT entry FROM audit_entries ORDER BY idx")
        .await
        .join("\n");
    let mut secrets = vec![
        server.admin_token.trim().to_owned(),
        enrollment_token,
        hook["secret"].as_str().unwrap().to_owned(),
        tpm_agent["enrollment_token"].as_str().unwrap().to_owned(),
    ];
    if backends.keys == Keys::SoftHsm {
        secrets.push(
            std::fs::read_to_string(server.path("softhsm/user.pin"))
                .unwrap()
                .trim()
                .to_owned(),
        );
    }
    for secret in &secrets {
        assert!(secret.len() >= 8);
        assert!(!entries.contains(secret.as_str()), "a secret is in the log");
    }
}

async fn bad_reads_of_the_log_are_refused_with_a_code(db: Db) {
    let server = Server::start(db).await;
    history(&server).await;
    sealed(&server).await;
    let token = server.admin_token.trim().to_owned();
    for (path, auth, status, code) in [
        ("/v1/audit/tile/0/0", None, 400, "invalid_tile_path"),
        ("/v1/audit/tile/0/x000/001", None, 400, "invalid_tile_path"),
        ("/v1/audit/tile/0/000.p/256", None, 400, "invalid_tile_path"),
        ("/v1/audit/tile/64/000", None, 400, "invalid_tile_path"),
        ("/v1/audit/tile/data/000", None, 400, "invalid_tile_path"),
        ("/v1/audit/tile/0/x001/000", None, 404, "tile_not_found"),
        ("/v1/audit/tile/3/000.p/1", None, 404, "tile_not_found"),
        (
            "/v1/audit/tile/entries/000.p/1",
            None,
            401,
            "unauthenticated",
        ),
        ("/v1/audit/events", None, 401, "unauthenticated"),
        (
            "/v1/audit/events?limit=0",
            Some(&token),
            400,
            "invalid_limit",
        ),
        (
            "/v1/audit/events?limit=1001",
            Some(&token),
            400,
            "invalid_limit",
        ),
        (
            "/v1/audit/events?after=-1",
            Some(&token),
            400,
            "invalid_after",
        ),
        (
            "/v1/audit/events?since=yesterday",
            Some(&token),
            400,
            "invalid_time",
        ),
        (
            "/v1/audit/events?agent=",
            Some(&token),
            400,
            "invalid_filter",
        ),
        (
            "/v1/audit/events?colour=red",
            Some(&token),
            400,
            "invalid_query",
        ),
    ] {
        let (got, body) = server
            .request("GET", path, None, auth.map(String::as_str))
            .await;
        assert_eq!(
            (got, body["error"]["code"].as_str()),
            (status, Some(code)),
            "{path}: {body}"
        );
    }
}

async fn events_are_searchable_and_an_agent_reads_only_its_own(db: Db) {
    let server = Server::start(db).await;
    history(&server).await;
    // alpha: created, then certified (signature batches name no agent).
    let (status, page) = server
        .admin("GET", "/v1/audit/events?agent=alpha&limit=1", None)
        .await;
    assert_eq!(status, 200, "{page}");
    let first = &page["events"][0];
    assert_eq!(
        (first["agent"].as_str(), first["action"].as_str()),
        (Some("alpha"), Some("agent.create"))
    );
    let (_, rest) = server
        .admin(
            "GET",
            &format!("/v1/audit/events?agent=alpha&after={}", page["next"]),
            None,
        )
        .await;
    let rest = rest["events"].as_array().unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0]["action"], "certificate.issue");
    assert!(rest[0]["index"].as_u64() > first["index"].as_u64());
    let (_, creations) = server
        .admin("GET", "/v1/audit/events?action=agent.create", None)
        .await;
    assert_eq!(creations["events"].as_array().unwrap().len(), 2);
    assert_eq!(creations["next"], Value::Null);
    let (_, future) = server
        .admin("GET", "/v1/audit/events?since=2100-01-01T00:00:00Z", None)
        .await;
    assert_eq!(future["events"], json!([]));

    // An agent on its own certificate: its events, never another's.
    let (client, _, _) = common::agent_client(&server, "gamma", &[]).await;
    let own = client
        .get(format!("{}/v1/audit/events", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(own.status().as_u16(), 200);
    let own: Value = own.json().await.unwrap();
    assert!(!own["events"].as_array().unwrap().is_empty());
    assert!(own["events"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["agent"] == "gamma"));
    let other = client
        .get(format!("{}/v1/audit/events?agent=alpha", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status().as_u16(), 403);
    let bundle = client
        .get(format!("{}/v1/audit/tile/entries/000.p/1", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(bundle.status().as_u16(), 403);
}

on_every_backend!(
    an_outsider_verifies_the_checkpoint_tiles_and_entries,
    no_secret_reaches_the_log,
);

on_both_databases!(
    an_edited_entry_is_named_by_audit_verify_and_fails_the_log_closed,
    a_deleted_entry_is_caught,
    a_history_rewritten_consistently_is_caught,
    bad_reads_of_the_log_are_refused_with_a_code,
    events_are_searchable_and_an_agent_reads_only_its_own,
);

mod replicas {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_replicas_append_one_log_without_forks_or_gaps() {
        super::two_replicas_append_one_log_without_forks_or_gaps(super::Db::Postgres).await
    }
}
