//! What the `keyward` CLI prints: a table with a header row for a list and
//! `key: value` lines for one object, for people; with `--json`, the
//! server's answer as it always was, for scripts; errors on stderr with a
//! non-zero exit. A keyward process on a real SoftHSM2 token; SQLite only,
//! as what is printed does not depend on the store.

mod common;

use std::process::Command;

use common::{enrolled_with, mtls_client, post, register_agent_with, Db, Server};
use serde_json::{json, Value};

/// `keyward ARGS` as an admin on the server's host (the admin token and
/// CA from its data directory): standard output, standard error, success.
fn keyward(server: &Server, args: &[&str]) -> (String, String, bool) {
    let out = Command::new(common::keyward_bin())
        .args(args)
        .arg("--url")
        .arg(&server.url)
        .arg("--data-dir")
        .arg(server.data_dir.path())
        .env_remove("KEYWARD_TOKEN")
        .output()
        .expect("running keyward");
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
        out.status.success(),
    )
}

/// `keyward ARGS`, which must succeed: its standard output.
fn stdout_of(server: &Server, args: &[&str]) -> String {
    let (stdout, stderr, ok) = keyward(server, args);
    assert!(ok, "keyward {args:?}: {stderr}");
    stdout
}

fn json_of(server: &Server, args: &[&str]) -> Value {
    let stdout = stdout_of(server, args);
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout}"))
}

/// A table's header names and its rows.
fn table(text: &str) -> (Vec<&str>, Vec<&str>) {
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    (header.split_whitespace().collect(), lines.collect())
}

/// `key: value` lines as pairs.
fn key_values(text: &str) -> Vec<(&str, &str)> {
    text.lines()
        .map(|line| {
            let (key, value) = line
                .split_once(": ")
                .unwrap_or_else(|| panic!("not a key: value line: {line:?}\n{text}"));
            (key, value.trim())
        })
        .collect()
}

fn keys(object: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = object
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    keys
}

/// Piped, as to grep or a file: plain columns, no colour, no lines drawn.
fn assert_plain(text: &str) {
    assert!(!text.contains(['\u{1b}', '|', '│', '─', '┌']), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_list_prints_a_table_by_default_and_json_with_flag() {
    let server = Server::start(Db::Sqlite).await;
    register_agent_with(&server, "alpha", &["orders:read", "payments"]).await;
    register_agent_with(&server, "beta-with-a-longer-name", &[]).await;

    let text = stdout_of(&server, &["agent", "list"]);
    assert_plain(&text);
    let (header, rows) = table(&text);
    assert_eq!(header, ["NAME", "CUSTODY", "STATUS", "SCOPES", "CREATED"]);
    assert_eq!(rows.len(), 2, "{text}");
    let custody_at = text.lines().next().unwrap().find("CUSTODY").unwrap();
    for (row, name) in rows.iter().zip(["alpha", "beta-with-a-longer-name"]) {
        assert!(row.starts_with(&format!("{name} ")), "{text}");
        assert_eq!(row.find("custodial"), Some(custody_at), "aligned: {text}");
        assert!(row.contains(" active "), "{text}");
    }
    assert!(rows[0].contains("orders:read, payments"), "{text}");

    // The JSON scripts read: the API's agents, every field, in one list.
    let listed = json_of(&server, &["agent", "list", "--json"]);
    assert_eq!(keys(&listed), ["agents"]);
    let (status, api) = server.admin("GET", "/v1/agents", None).await;
    assert_eq!(status, 200);
    assert_eq!(listed["agents"], api["agents"]);
    assert_eq!(
        keys(&listed["agents"][0]),
        [
            "attestation_digest",
            "created_at",
            "custody",
            "key_id",
            "name",
            "public_key_pem",
            "scopes",
            "spiffe_id",
            "status"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_object_prints_as_key_value_lines_by_default_and_json_with_flag() {
    let server = Server::start(Db::Sqlite).await;

    let text = stdout_of(&server, &["agent", "create", "gamma", "--scope", "s1"]);
    assert_plain(&text);
    let fields = key_values(&text);
    assert_eq!(
        &fields[..4],
        [
            ("name", "gamma"),
            ("spiffe_id", "spiffe://keyward.local/agent/gamma"),
            ("custody", "custodial"),
            ("status", "active"),
        ]
    );
    assert!(fields.contains(&("scopes", "s1")), "{text}");
    // A PEM block would break the one-line-per-field form: --json has it.
    assert!(
        fields.contains(&("public_key_pem", "(4 lines: --json prints them)")),
        "{text}"
    );

    let created = json_of(
        &server,
        &["agent", "create", "delta", "--scope", "s1", "--json"],
    );
    assert_eq!(created["name"], "delta");
    assert_eq!(created["scopes"], json!(["s1"]));
    assert!(created["public_key_pem"]
        .as_str()
        .unwrap()
        .starts_with("-----BEGIN PUBLIC KEY-----"));

    // A revocation answer the same two ways.
    let issued = common::issue_certificate(&server, "gamma").await;
    let serial = issued["serial"].as_str().unwrap();
    let text = stdout_of(
        &server,
        &["revoke", "cert", serial, "--reason", "superseded"],
    );
    let fields = key_values(&text);
    assert_eq!(fields[0], ("serial", serial), "{text}");
    assert!(fields.contains(&("reason", "superseded")), "{text}");
    assert!(fields.contains(&("already_revoked", "false")), "{text}");
    let again = json_of(
        &server,
        &["revoke", "cert", serial, "--reason", "superseded", "--json"],
    );
    assert_eq!(
        keys(&again),
        ["already_revoked", "reason", "revoked_at", "serial"]
    );
    assert_eq!(again["already_revoked"], true);
    assert!(again["revoked_at"].is_i64(), "{again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_list_prints_a_table_by_default_and_json_with_flag() {
    let server = Server::start(Db::Sqlite).await;
    let (key, cert) = enrolled_with(&server, "alice", &["treasury"]).await;
    let alice = mtls_client(&server, cert["certificate_pem"].as_str().unwrap(), &key);
    let (status, _) = server
        .admin(
            "POST",
            "/v1/policies",
            Some(json!({"content": "[roles.treasury]\nactions = [\"sign\"]\nrequires_approval = true\n"})),
        )
        .await;
    assert_eq!(status, 201);
    let mut held = Vec::new();
    for message in ["d2lyZQ==", "cGF5"] {
        let (status, pending) = post(
            &alice,
            &server,
            "/v1/agents/alice/sign",
            json!({"message_b64": message}),
        )
        .await;
        assert_eq!(status, 202, "{pending}");
        held.push(pending["id"].as_str().unwrap().to_owned());
    }

    let text = stdout_of(&server, &["approvals", "list"]);
    assert_plain(&text);
    let (header, rows) = table(&text);
    assert_eq!(
        header,
        [
            "ID",
            "AGENT",
            "KIND",
            "STATUS",
            "APPROVALS",
            "POLICY",
            "CREATED",
            "EXPIRES"
        ]
    );
    assert_eq!(rows.len(), 2, "{text}");
    for id in &held {
        let row = rows.iter().find(|r| r.starts_with(id.as_str())).unwrap();
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            &cells[1..6],
            ["alice", "sign", "pending", "1", "1"],
            "{text}"
        );
    }

    let listed = json_of(&server, &["approvals", "list", "--json"]);
    assert_eq!(keys(&listed), ["approvals"]);
    let (_, api) = server.admin("GET", "/v1/approvals", None).await;
    assert_eq!(listed["approvals"], api["approvals"]);

    let text = stdout_of(&server, &["approvals", "approve", &held[0]]);
    let fields = key_values(&text);
    assert_eq!(fields[0], ("id", held[0].as_str()), "{text}");
    assert!(fields.contains(&("status", "completed")), "{text}");
    assert!(
        fields.contains(&("request.message_b64", "d2lyZQ==")),
        "{text}"
    );
    let denied = json_of(&server, &["approvals", "deny", &held[1], "--json"]);
    assert_eq!(
        (denied["id"].as_str(), denied["status"].as_str()),
        (Some(held[1].as_str()), Some("denied"))
    );
    assert_eq!(denied["request"]["message_b64"], "cGF5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_go_to_stderr_with_a_nonzero_exit_whatever_the_format() {
    let server = Server::start(Db::Sqlite).await;
    for extra in [None, Some("--json")] {
        let mut args = vec!["revoke", "cert", "0abc", "--reason", "superseded"];
        args.extend(extra);
        let (stdout, stderr, ok) = keyward(&server, &args);
        assert!(!ok);
        assert_eq!(stdout, "");
        assert!(stderr.contains("certificate_not_found"), "{stderr}");
    }
}

/// `keyward bench ...` with a short run on a fresh token.
fn bench(args: &[&str]) -> String {
    let out = Command::new(common::keyward_bin())
        .arg("bench")
        .args(args)
        .args(["--seconds", "0.3", "--concurrency", "4", "--workers", "1"])
        .env_remove("SOFTHSM2_CONF")
        .env("RUST_LOG", "warn")
        .output()
        .expect("running keyward bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "keyward bench {args:?}: {stderr}");
    String::from_utf8(out.stdout).unwrap()
}

/// What `bench sign|issue --json` prints and the acceptance checks (and
/// scripts/bench-sign-set.sh) parse: one object a line, by mode.
const BENCH_FIELDS: [&str; 11] = [
    "concurrency",
    "cpu_us_per_op",
    "errors",
    "mode",
    "ops",
    "ops_per_sec",
    "p50_us",
    "p99_us",
    "ratio_to_raw",
    "seconds",
    "workers",
];

fn bench_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

#[test]
fn bench_sign_prints_a_table_by_default_and_json_lines_with_flag() {
    let text = bench(&["sign", "--modes", "raw,pool"]);
    assert_plain(&text);
    let (header, rows) = table(&text);
    assert_eq!(
        header,
        ["MODE", "OPS/S", "P50", "US", "P99", "US", "VS", "RAW", "CPU", "US/OP", "ERRORS", "W/C"]
    );
    assert_eq!(rows.len(), 2, "{text}");
    assert!(rows[0].starts_with("raw "), "{text}");
    assert!(rows[1].starts_with("pool "), "{text}");

    let lines = bench_lines(&bench(&["sign", "--modes", "raw,pool", "--json"]));
    let modes: Vec<&str> = lines.iter().map(|l| l["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["raw", "pool"]);
    for line in &lines {
        assert_eq!(keys(line), BENCH_FIELDS, "{line}");
        assert!(line["ops_per_sec"].as_f64().unwrap() > 0.0, "{line}");
    }
}

#[test]
fn bench_issue_json_has_the_modes_and_fields_the_scale_check_reads() {
    let lines = bench_lines(&bench(&[
        "issue",
        "--modes",
        "raw,http-issue,http-issue-half",
        "--json",
    ]));
    let modes: Vec<&str> = lines.iter().map(|l| l["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["raw", "http-issue", "http-issue-half"]);
    for line in &lines {
        assert_eq!(keys(line), BENCH_FIELDS, "{line}");
        assert_eq!(line["errors"], 0, "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_events_print_a_table_or_json_lines_and_export_follows_every_page() {
    let server = Server::start(Db::Sqlite).await;
    register_agent_with(&server, "alpha", &[]).await;
    register_agent_with(&server, "beta", &[]).await;

    let text = stdout_of(&server, &["audit", "events", "--action", "agent.create"]);
    assert_plain(&text);
    let (header, rows) = table(&text);
    assert_eq!(
        header,
        ["INDEX", "TIME", "ACTOR", "ACTION", "SUBJECT", "AGENT", "DECISION"]
    );
    assert_eq!(rows.len(), 2, "{text}");
    assert!(
        rows[0].contains("agent.create") && rows[0].contains("alpha"),
        "{text}"
    );

    // JSON lines: each the entry as the log holds it.
    let lines = stdout_of(&server, &["audit", "events", "--agent", "beta", "--json"]);
    let events: Vec<Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 1, "{lines}");
    assert_eq!(events[0]["action"], "agent.create");
    let (_, api) = server
        .admin("GET", "/v1/audit/events?agent=beta", None)
        .await;
    assert_eq!(events[0], api["events"][0]);

    // A page at a time: the table says where the next starts.
    let text = stdout_of(&server, &["audit", "events", "--limit", "1"]);
    assert!(text.trim_end().ends_with("(more: --after 0)"), "{text}");

    // The export holds every event from --since on, in order.
    let out = server.path("export.jsonl");
    let (_, stderr, ok) = keyward(
        &server,
        &[
            "audit",
            "export",
            "--since",
            "0",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(ok, "{stderr}");
    let exported: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let total = server
        .sql("SELECT COUNT(*) FROM audit_entries")
        .await
        .unwrap();
    assert_eq!(exported.len() as i64, total);
    for (i, event) in exported.iter().enumerate() {
        assert_eq!(event["index"], i as u64);
    }
    assert!(
        stderr.contains(&format!("exported {total} events")),
        "{stderr}"
    );

    // Bad input is the server's 400, on stderr, with a failing exit.
    let (_, stderr, ok) = keyward(&server, &["audit", "events", "--since", "yesterday"]);
    assert!(!ok);
    assert!(stderr.contains("invalid_time"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anomalies_list_and_kpis_print_what_detection_found() {
    let server = Server::start(Db::Sqlite).await;
    let policy =
        "[roles.worker]\nactions = [\"sign\"]\n[anomaly]\ncredential_sharing = \"alert\"\n";
    let (status, _) = server
        .admin("POST", "/v1/policies", Some(json!({"content": policy})))
        .await;
    assert_eq!(status, 201);
    let (key, certificate) = enrolled_with(&server, "shared", &["worker"]).await;
    for address in ["127.0.0.1", "127.0.0.2"] {
        let client = common::mtls_client_from(
            &server,
            certificate["certificate_pem"].as_str().unwrap(),
            &key,
            address,
        );
        let (status, _) = post(
            &client,
            &server,
            "/v1/agents/shared/sign",
            json!({"message_b64": "aGk="}),
        )
        .await;
        assert_eq!(status, 200);
    }

    let text = stdout_of(&server, &["anomalies", "list"]);
    assert_plain(&text);
    let (header, rows) = table(&text);
    assert_eq!(
        header,
        [
            "ID",
            "KIND",
            "AGENT",
            "CREDENTIAL",
            "RESPONSE",
            "DETECTED_AT_MS"
        ]
    );
    assert_eq!(rows.len(), 1, "{text}");
    assert!(rows[0].contains("credential_sharing") && rows[0].contains("shared"));
    let listed = json_of(
        &server,
        &[
            "anomalies",
            "list",
            "--kind",
            "credential_sharing",
            "--json",
        ],
    );
    assert_eq!(listed["anomalies"][0]["response"], "alert");

    let text = stdout_of(&server, &["kpis", "--window-seconds", "3600"]);
    let fields = key_values(&text);
    assert_eq!(fields[0], ("window_seconds", "3600"), "{text}");
    assert_eq!(fields[1].0, "mean_time_to_detect_seconds");
    let kpis = json_of(&server, &["kpis", "--json"]);
    assert_eq!(kpis["anomalies_detected"], 1, "{kpis}");
}
