//! An operator's SIGTERM: keyward stops accepting, then stops every
//! background task it started (janitors, refreshes, the revocation
//! listener on PostgreSQL, hook delivery, the listener certificate's
//! renewal), newest first, each within its grace, and exits 0.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{keyward_bin, private_tempdir, Db, TestDatabase};
use serde_json::Value;

async fn sigterm_stops_every_background_task_in_order_and_exits_zero(db: Db) {
    let data_dir = private_tempdir();
    let database = TestDatabase::create(db, data_dir.path()).await;
    let log = data_dir.path().join("keyward.log");
    let mut child = Command::new(keyward_bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--log-json",
        ])
        .arg("--data-dir")
        .arg(data_dir.path())
        .arg("--database-url")
        .arg(&database.url)
        .env_remove("SOFTHSM2_CONF")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("keyward listening on "), "{line:?}");

    let (ok, out) = common::run(Command::new("kill").args(["-TERM", &child.id().to_string()]));
    assert!(ok, "{out}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "keyward did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let written = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{status}: {written}");

    let stopped: Value = written
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["fields"]["message"] == "background tasks stopped")
        .unwrap_or_else(|| panic!("no shutdown record in {written}"));
    assert_eq!(stopped["fields"]["unclean"], 0, "{stopped}");
    let tasks: Vec<&str> = stopped["fields"]["tasks"]
        .as_str()
        .unwrap()
        .split(", ")
        .collect();
    // Newest first: the listener's renewal was started last, the
    // revocation set's reload first.
    assert_eq!(
        tasks.first(),
        Some(&"listener certificate renewal"),
        "{tasks:?}"
    );
    assert_eq!(
        tasks.last(),
        Some(&"reloading the revocation set"),
        "{tasks:?}"
    );
    for expected in [
        "hook delivery",
        "refreshing the policy",
        "scheduled key rotation",
        "destroying retired keys",
    ] {
        assert!(tasks.contains(&expected), "{expected} not in {tasks:?}");
    }
    assert_eq!(
        tasks.contains(&"revocation listener"),
        db == Db::Postgres,
        "the LISTEN task runs on PostgreSQL only: {tasks:?}"
    );
}

on_both_databases!(sigterm_stops_every_background_task_in_order_and_exits_zero);
