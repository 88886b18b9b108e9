//! Custodial keys in the key store (token objects on SoftHSM2, blobs in a
//! TPM's key directory) that no agent owns (left by a process killed
//! between generating a key and recording its agent, or by a removal that
//! failed) are destroyed by keyward's janitor, with an audit entry, once
//! they have been unowned for the grace period; every key an agent owns,
//! current or retired, and every key keyward did not name as an agent's,
//! stays.

mod common;

use std::time::Duration;

use common::{Backends, Db, Server};
use serde_json::json;

const ORPHAN: &str = "agent-00000000000000aa";

/// Token-object custodial keys, and a one-second grace period so the test
/// need not wait ten minutes.
fn config() -> String {
    format!(
        "{}[maintenance]\norphan_key_grace_seconds = 1\n",
        common::TOKEN_STORAGE
    )
}

/// The janitor's audit entries for `key_id`, once there is one (it is
/// written just after the key is destroyed) or after ten seconds.
async fn orphan_audit_entries(server: &Server, key_id: &str) -> Option<i64> {
    let query = format!(
        "SELECT COUNT(*) FROM audit_entries
         WHERE action = 'key.destroy_orphan' AND actor = 'keyward'
           AND entry LIKE '%\"subject\":\"{key_id}\"%'"
    );
    let until = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let entries = server.sql(&query).await;
        if entries != Some(0) || std::time::Instant::now() > until {
            return entries;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn a_token_key_no_agent_owns_is_destroyed_with_an_audit_entry(db: Db) {
    let server = Server::start_with_config(db, &config()).await;
    let alpha = common::register_agent(&server, "alpha").await;
    let beta = common::register_agent(&server, "beta").await;
    let (status, rotated) = server
        .admin(
            "POST",
            "/v1/agents/beta/rotate-key",
            Some(json!({"reason": "superseded", "retention_seconds": 3600})),
        )
        .await;
    assert_eq!(status, 200, "{rotated}");
    let owned = [
        alpha["key_id"].as_str().unwrap().to_owned(),
        beta["key_id"].as_str().unwrap().to_owned(),
        rotated["new_key_id"].as_str().unwrap().to_owned(),
    ];

    server.generate_token_key_outside_keyward(ORPHAN);
    // Not named as an agent's key: an operator's own object on a shared
    // token is none of keyward's business.
    server.generate_token_key_outside_keyward("operator-signing-key");
    assert!(server.custodial_key_held(ORPHAN).await);

    let gone = server
        .eventually(Duration::from_secs(20), || {
            !server
                .token_private_keys()
                .contains(&format!("label:      {ORPHAN}"))
        })
        .await;
    assert!(gone, "the orphan is still on the token");
    let objects = server.token_objects("pubkey");
    assert!(
        !objects.contains(ORPHAN),
        "its public half stays: {objects}"
    );
    assert_eq!(orphan_audit_entries(&server, ORPHAN).await, Some(1));

    for key in &owned {
        assert!(server.custodial_key_held(key).await, "{key} was destroyed");
    }
    assert!(server
        .token_private_keys()
        .contains("label:      operator-signing-key"));
    assert_eq!(
        server.token_private_key_count(),
        common::SERVICE_KEYS + owned.len() + 1,
        "the service keys, the agents' current and retired keys, the operator's key"
    );
    // The agents still sign with their keys.
    for agent in ["alpha", "beta"] {
        let (status, signed) = server
            .admin(
                "POST",
                &format!("/v1/agents/{agent}/sign"),
                Some(json!({"message_b64": "aGVsbG8="})),
            )
            .await;
        assert_eq!(status, 200, "{signed}");
    }
}

async fn a_public_half_left_alone_is_removed_too(db: Db) {
    let server = Server::start_with_config(db, &config()).await;
    server.generate_token_key_outside_keyward(ORPHAN);
    server.delete_token_object_outside_keyward("privkey", ORPHAN);
    assert!(server.token_objects("pubkey").contains(ORPHAN));

    let gone = server
        .eventually(Duration::from_secs(20), || {
            !server.token_objects("pubkey").contains(ORPHAN)
        })
        .await;
    assert!(gone, "the public half of the orphan is still on the token");
    assert_eq!(orphan_audit_entries(&server, ORPHAN).await, Some(1));
}

/// A listener's TLS key is named for its creation time; one older than two
/// certificate lifetimes belongs to a process that died without shutting
/// down (a live one replaces its key every half lifetime), and goes. The
/// running listener's own key stays, and it still shakes hands.
async fn tls_keys_of_listeners_that_did_not_shut_down_are_destroyed(db: Db) {
    let server = Server::start_with_config(db, &config()).await;
    let three_days_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 3 * 86_400;
    let stale = format!("tls-{three_days_ago}-00000000000000bb");
    // Listed before the stale key is made: with a second's grace the
    // janitor can destroy it before a listing after (seen under load).
    let live_before: Vec<String> = tls_key_labels(&server);
    assert_eq!(live_before.len(), 1, "{live_before:?}");
    server.generate_token_key_outside_keyward(&stale);

    let gone = server
        .eventually(Duration::from_secs(20), || {
            !server.token_private_keys().contains(&stale)
        })
        .await;
    assert!(gone, "the stale listener key is still on the token");
    assert_eq!(orphan_audit_entries(&server, &stale).await, Some(1));
    assert_eq!(tls_key_labels(&server), live_before);
    let (status, _) = server.admin("GET", "/v1/agents", None).await;
    assert_eq!(
        status, 200,
        "a new connection's handshake is signed on the token"
    );
}

fn tls_key_labels(server: &Server) -> Vec<String> {
    server
        .token_private_keys()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("label:"))
        .map(|l| l.trim().to_owned())
        .filter(|l| l.starts_with("tls-"))
        .collect()
}

/// On a TPM the custodial keys are blobs in keyward's key directory: one no
/// agent owns (both files, or a half left by an interrupted removal) goes
/// after the grace period; the agents' and keyward's own stay.
async fn key_blobs_no_agent_owns_leave_the_key_directory(backends: Backends) {
    let server =
        Server::start_with_config(backends, "[maintenance]\norphan_key_grace_seconds = 1\n").await;
    let alpha = common::register_agent(&server, "alpha").await;
    let alpha_key = alpha["key_id"].as_str().unwrap();
    let key_dir = server.tpm_key_dir();
    let before = server.key_store_ids();
    for (orphan, halves) in [
        ("agent-00000000000000aa", &["pub", "priv"][..]),
        ("agent-00000000000000bb", &["pub"][..]),
    ] {
        for ext in halves {
            std::fs::copy(
                key_dir.join(format!("{alpha_key}.{ext}")),
                key_dir.join(format!("{orphan}.{ext}")),
            )
            .unwrap();
        }
    }

    let gone = server
        .eventually(Duration::from_secs(20), || server.key_store_ids() == before)
        .await;
    let left: Vec<_> = std::fs::read_dir(&key_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(gone, "orphan blobs are still there: {left:?}");
    assert!(left.contains(&format!("{alpha_key}.priv")), "{left:?}");
    for orphan in ["agent-00000000000000aa", "agent-00000000000000bb"] {
        assert_eq!(
            orphan_audit_entries(&server, orphan).await,
            Some(1),
            "{orphan}"
        );
    }
    let (status, signed) = server
        .admin(
            "POST",
            "/v1/agents/alpha/sign",
            Some(json!({"message_b64": "aGVsbG8="})),
        )
        .await;
    assert_eq!(status, 200, "{signed}");
}

/// The TPM's counterpart of the stale listener key: blobs named for a
/// listener three days old go; the live listener's stay.
async fn tls_key_blobs_of_listeners_that_did_not_shut_down_are_destroyed(backends: Backends) {
    let server =
        Server::start_with_config(backends, "[maintenance]\norphan_key_grace_seconds = 1\n").await;
    let key_dir = server.tpm_key_dir();
    let tls_keys = |server: &Server| -> Vec<String> {
        server
            .key_store_ids()
            .into_iter()
            .filter(|id| id.starts_with("tls-"))
            .collect()
    };
    let live = tls_keys(&server);
    assert_eq!(live.len(), 1, "{live:?}");
    let three_days_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 3 * 86_400;
    let stale = format!("tls-{three_days_ago}-00000000000000bb");
    for ext in ["pub", "priv"] {
        std::fs::copy(
            key_dir.join(format!("{}.{ext}", live[0])),
            key_dir.join(format!("{stale}.{ext}")),
        )
        .unwrap();
    }

    let gone = server
        .eventually(Duration::from_secs(20), || tls_keys(&server) == live)
        .await;
    assert!(
        gone,
        "the stale listener key is still there: {:?}",
        tls_keys(&server)
    );
    assert_eq!(orphan_audit_entries(&server, &stale).await, Some(1));
    let (status, _) = server.admin("GET", "/v1/agents", None).await;
    assert_eq!(
        status, 200,
        "a new connection's handshake is signed in the TPM"
    );
}

on_every_backend!(
    swtpm only: key_blobs_no_agent_owns_leave_the_key_directory,
    tls_key_blobs_of_listeners_that_did_not_shut_down_are_destroyed,
);

on_both_databases!(
    a_token_key_no_agent_owns_is_destroyed_with_an_audit_entry,
    a_public_half_left_alone_is_removed_too,
    tls_keys_of_listeners_that_did_not_shut_down_are_destroyed,
);
