//! Context partitioning, the whole matrix: every agent endpoint against
//! every kind of caller — the agent itself, another agent, an admin, no
//! credential, an expired certificate, a revoked certificate, and a
//! certificate from a foreign CA. With keyward's keys on SoftHSM2 and in a
//! swtpm, on SQLite and PostgreSQL.

mod common;

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use common::{enrolled, mtls_client, Backends, Server};
use serde_json::{json, Value};

/// The agent endpoints: method, path (`{a}` is the target agent), body.
fn endpoints() -> Vec<(&'static str, &'static str, Value)> {
    vec![
        (
            "POST",
            "/v1/agents/{a}/sign",
            json!({"message_b64": B64.encode(b"x")}),
        ),
        (
            "POST",
            "/v1/agents/{a}/messages",
            json!({"to": "carol", "intent": "hello"}),
        ),
        (
            "POST",
            "/v1/agents/{a}/certificates",
            json!({"ttl_seconds": 60}),
        ),
        ("GET", "/v1/agents/{a}", Value::Null),
        ("PATCH", "/v1/agents/{a}", json!({"scopes": []})),
        ("POST", "/v1/agents/{a}/enrollment-tokens", json!({})),
        (
            "POST",
            "/v1/agents/{a}/rotate-key",
            json!({"grace_seconds": 0}),
        ),
        ("POST", "/v1/agents/{a}/suspend", json!({})),
        (
            "POST",
            "/v1/agents/{a}/revoke",
            json!({"reason": "superseded"}),
        ),
        ("GET", "/v1/agents", Value::Null),
        ("POST", "/v1/agents", json!({"name": "zed", "scopes": []})),
        (
            "POST",
            "/v1/policies",
            json!({"content": "[roles.x]\nactions = [\"sign\"]"}),
        ),
        ("GET", "/v1/approvals", Value::Null),
    ]
}

/// What an agent acting for itself may do (the rest is for admins).
fn self_allowed(method: &str, path: &str) -> bool {
    matches!(
        (method, path),
        ("POST", "/v1/agents/{a}/sign")
            | ("POST", "/v1/agents/{a}/messages")
            | ("POST", "/v1/agents/{a}/certificates")
            | ("GET", "/v1/agents/{a}")
    )
}

/// Sends one request with `client` (`token` as bearer when given); the
/// status, or `None` when the TLS handshake refused the client.
async fn call(
    client: &reqwest::Client,
    server: &Server,
    (method, path, body): &(&str, &str, Value),
    target: &str,
    token: Option<&str>,
) -> (Option<u16>, Value) {
    let url = format!("{}{}", server.url, path.replace("{a}", target));
    let mut request = client.request(reqwest::Method::from_bytes(method.as_bytes()).unwrap(), url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if !body.is_null() {
        request = request.json(body);
    }
    match request.send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            (Some(status), response.json().await.unwrap_or(Value::Null))
        }
        Err(_) => (None, Value::Null),
    }
}

async fn every_agent_endpoint_answers_every_kind_of_caller_as_it_should(backends: Backends) {
    let server = Server::start(backends).await;
    let (alice_key, alice_cert) = enrolled(&server, "alice").await;
    common::register_agent(&server, "bob").await;
    common::register_agent(&server, "carol").await;
    common::issue_certificate(&server, "alice").await;
    let alice = mtls_client(
        &server,
        alice_cert["certificate_pem"].as_str().unwrap(),
        &alice_key,
    );
    let anonymous = server.client.clone();

    // A certificate that will have expired, one that will be revoked, and
    // one from a CA keyward does not know (same key and SPIFFE ID).
    common::register_agent(&server, "dave").await;
    let token = common::enrollment_token(&server, "dave").await;
    let (dave_key, dave_csr) = common::key_and_csr(server.data_dir.path(), "dave");
    let (status, dave_cert) = server
        .request(
            "POST",
            "/v1/enroll",
            Some(json!({"token": token, "csr_pem": dave_csr, "ttl_seconds": 1})),
            None,
        )
        .await;
    assert_eq!(status, 201, "{dave_cert}");
    let expired = mtls_client(
        &server,
        dave_cert["certificate_pem"].as_str().unwrap(),
        &dave_key,
    );
    let (erin_key, erin_cert) = enrolled(&server, "erin").await;
    let revoked = mtls_client(
        &server,
        erin_cert["certificate_pem"].as_str().unwrap(),
        &erin_key,
    );
    let (status, _) = server
        .admin(
            "POST",
            &format!(
                "/v1/certificates/{}/revoke",
                erin_cert["serial"].as_str().unwrap()
            ),
            Some(json!({"reason": "keyCompromise"})),
        )
        .await;
    assert_eq!(status, 200);
    let forged = server.path("forged.pem");
    common::openssl_self_signed(
        &alice_key,
        "/CN=alice",
        &["subjectAltName=URI:spiffe://keyward.local/agent/alice"],
        &forged,
    );
    let foreign = mtls_client(
        &server,
        &std::fs::read_to_string(&forged).unwrap(),
        &alice_key,
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;

    let admin_token = server.admin_token.trim().to_owned();
    for endpoint in endpoints() {
        let (method, path) = (endpoint.0, endpoint.1);
        // The agent itself.
        let (status, answer) = call(&alice, &server, &endpoint, "alice", None).await;
        let status = status.unwrap();
        if self_allowed(method, path) {
            assert!(
                status != 401 && status != 403,
                "self {path}: {status} {answer}"
            );
        } else {
            assert_eq!(
                (status, answer["error"]["code"].as_str()),
                (403, Some("admin_only")),
                "self {path}"
            );
        }
        // Another agent's resources (the collection endpoints have no target).
        let (status, answer) = call(&alice, &server, &endpoint, "bob", None).await;
        let expected = if self_allowed(method, path) {
            "other_agent"
        } else {
            "admin_only"
        };
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (Some(403), Some(expected)),
            "other {path}"
        );
        // An admin, on carol.
        let (status, answer) =
            call(&anonymous, &server, &endpoint, "carol", Some(&admin_token)).await;
        let status = status.unwrap();
        assert!(
            status != 401 && status != 403,
            "admin {path}: {status} {answer}"
        );
        // No credential, and a wrong token.
        for token in [None, Some("kwa_not-a-token")] {
            let (status, _) = call(&anonymous, &server, &endpoint, "alice", token).await;
            assert_eq!(status, Some(401), "no credential {path} {token:?}");
        }
        // Certificates that name nobody now: refused in the handshake or 401.
        for (kind, client, target) in [
            ("expired", &expired, "dave"),
            ("revoked", &revoked, "erin"),
            ("foreign", &foreign, "alice"),
        ] {
            let (status, answer) = call(client, &server, &endpoint, target, None).await;
            assert!(
                status.is_none() || status == Some(401),
                "{kind} certificate, {path}: {status:?} {answer}"
            );
        }
    }
}

on_every_backend!(every_agent_endpoint_answers_every_kind_of_caller_as_it_should,);
