//! Custodial keys on the token that no agent owns (left by a process killed
//! between generating a key and recording its agent, or by a removal that
//! failed) are destroyed by keyward's janitor, with an audit entry, once
//! they have been unowned for the grace period; every key an agent owns,
//! current or retired, and every key keyward did not name as an agent's,
//! stays.

mod common;

use std::time::Duration;

use common::{Db, Server};
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
        "SELECT COUNT(*) FROM audit_events
         WHERE action = 'key.destroy_orphan' AND subject = '{key_id}' AND actor = 'keyward'"
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
    server.generate_token_key_outside_keyward(&stale);
    let live_before: Vec<String> = tls_key_labels(&server);
    assert_eq!(live_before.len(), 2, "{live_before:?}");

    let gone = server
        .eventually(Duration::from_secs(20), || {
            !server.token_private_keys().contains(&stale)
        })
        .await;
    assert!(gone, "the stale listener key is still on the token");
    assert_eq!(orphan_audit_entries(&server, &stale).await, Some(1));
    let live_after = tls_key_labels(&server);
    assert_eq!(live_after.len(), 1, "{live_after:?}");
    assert!(live_before.contains(&live_after[0]));
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

on_both_databases!(
    a_token_key_no_agent_owns_is_destroyed_with_an_audit_entry,
    a_public_half_left_alone_is_removed_too,
    tls_keys_of_listeners_that_did_not_shut_down_are_destroyed,
);
