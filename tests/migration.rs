//! Upgrading a database written before the audit trail became a Merkle log
//! (migration 0014): the hash chain's rows become entries, numbered from 0,
//! that keyward reads as it reads its own.

mod common;

use std::path::PathBuf;

use common::{Db, TestDatabase};
use keyward::audit::AuditEntry;

/// The dialect's migration files in order, split at `first_new`.
fn migrations(dialect: &str, first_new: &str) -> (Vec<String>, Vec<String>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(dialect);
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let (old, new): (Vec<PathBuf>, Vec<PathBuf>) = files
        .into_iter()
        .partition(|f| f.file_name().unwrap().to_str().unwrap() < first_new);
    let read = |files: Vec<PathBuf>| {
        files
            .iter()
            .map(|f| std::fs::read_to_string(f).unwrap())
            .collect()
    };
    (read(old), read(new))
}

const OLD_ROWS: &str = "INSERT INTO audit_events
    (seq, at, actor, action, subject, details, prev_hash, hash) VALUES
    (1, 1765000000, 'keyward', 'ca.create', 'ca-key', '{}', X'00', X'01'),
    (2, 1765000001, 'admin:ops', 'agent.create', 'alpha', '{\"scopes\":[\"payments\"]}', X'01', X'02');
    UPDATE audit_head SET seq = 2, hash = X'02'";

async fn the_hash_chain_becomes_entries_keyward_reads(db: Db) {
    let dir = common::private_tempdir();
    let database = TestDatabase::create(db, dir.path()).await;
    let (dialect, rows) = match db {
        Db::Sqlite => ("sqlite", OLD_ROWS.to_owned()),
        Db::Postgres => (
            "postgres",
            OLD_ROWS
                .replace("X'00'", "'\\x00'::bytea")
                .replace("X'01'", "'\\x01'::bytea")
                .replace("X'02'", "'\\x02'::bytea"),
        ),
    };
    let (before, upgrade) = migrations(dialect, "0014");
    let entries: Vec<(i64, i64, String, Option<String>)> = {
        use sqlx::Connection;
        let select = "SELECT idx, at_ms, entry, agent FROM audit_entries ORDER BY idx";
        macro_rules! upgrade {
            ($c:expr) => {{
                for sql in &before {
                    sqlx::raw_sql(sql).execute(&mut $c).await.unwrap();
                }
                sqlx::raw_sql(&rows).execute(&mut $c).await.unwrap();
                for sql in &upgrade {
                    sqlx::raw_sql(sql).execute(&mut $c).await.unwrap();
                }
                assert_eq!(
                    sqlx::query_scalar::<_, i64>("SELECT seq FROM audit_head")
                        .fetch_one(&mut $c)
                        .await
                        .unwrap(),
                    2,
                    "the head still counts the entries"
                );
                sqlx::query_as(select).fetch_all(&mut $c).await.unwrap()
            }};
        }
        match db {
            Db::Sqlite => {
                let options: sqlx::sqlite::SqliteConnectOptions = database.url.parse().unwrap();
                let mut c = sqlx::SqliteConnection::connect_with(&options.create_if_missing(true))
                    .await
                    .unwrap();
                upgrade!(c)
            }
            Db::Postgres => {
                let mut c = sqlx::PgConnection::connect(&database.url).await.unwrap();
                upgrade!(c)
            }
        }
    };
    assert_eq!(entries.len(), 2);
    let (index, at_ms, entry, agent) = &entries[1];
    assert_eq!(
        (*index, *at_ms, agent.as_deref()),
        (1, 1_765_000_001_000, None)
    );
    let parsed: AuditEntry = serde_json::from_str(entry).unwrap();
    assert_eq!(parsed.index, 1);
    assert_eq!(parsed.time, "2025-12-06T05:46:41.000Z");
    assert_eq!(
        (
            parsed.event.actor.as_str(),
            parsed.event.action.as_str(),
            parsed.event.subject.as_str()
        ),
        ("admin:ops", "agent.create", "alpha")
    );
    assert_eq!(parsed.event.details["scopes"][0], "payments");
    let first: AuditEntry = serde_json::from_str(&entries[0].2).unwrap();
    assert_eq!((first.index, first.event.action.as_str()), (0, "ca.create"));
}

on_both_databases!(the_hash_chain_becomes_entries_keyward_reads);
