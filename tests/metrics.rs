//! What an operator's Prometheus scrapes about the request stream: HTTP
//! durations by route template, the policy's decisions with their
//! reasons, and authentications by method and outcome.

mod common;

use base64::Engine as _;
use common::{Db, Server};
use serde_json::json;

/// The value of the sample named `name` with exactly `labels`.
fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.trim().parse().ok())
}

async fn requests_decisions_and_authentications_are_counted_by_what_they_were(db: Db) {
    let server = Server::start(db).await;
    let (status, body) = server
        .admin(
            "POST",
            "/v1/policies",
            Some(json!({"content": "[roles.signer]\nactions = [\"sign\"]\n"})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (alpha, _, _) = common::agent_client(&server, "alpha", &["signer"]).await;
    let (beta, _, _) = common::agent_client(&server, "beta", &[]).await;
    let sign = json!({"message_b64": base64::engine::general_purpose::STANDARD.encode(b"hi")});
    for _ in 0..3 {
        let (status, _) =
            common::post(&alpha, &server, "/v1/agents/alpha/sign", sign.clone()).await;
        assert_eq!(status, 200);
    }
    // beta's roles grant nothing; beta asking for alpha is partitioning's.
    let (status, _) = common::post(&beta, &server, "/v1/agents/beta/sign", sign.clone()).await;
    assert_eq!(status, 403);
    let (status, _) = common::post(&beta, &server, "/v1/agents/alpha/sign", sign.clone()).await;
    assert_eq!(status, 403);
    let refused = server
        .client
        .get(format!("{}/v1/agents", server.url))
        .bearer_auth("not-a-token")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 401);

    let text = common::metrics_text(&server, &server.url).await;
    let sign_route = r#"method="POST",route="/v1/agents/{name}/sign",status="200""#;
    assert_eq!(
        sample(
            &text,
            "http_server_request_duration_seconds_count",
            sign_route
        ),
        Some(3.0),
        "{text}"
    );
    let decisions = "keyward_policy_decisions_total";
    assert_eq!(
        sample(
            &text,
            decisions,
            r#"action="sign",decision="allow",reason="granted""#
        ),
        Some(3.0)
    );
    assert_eq!(
        sample(
            &text,
            decisions,
            r#"action="sign",decision="deny",reason="not_in_scope""#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            decisions,
            r#"action="partition",decision="deny",reason="other_agent""#
        ),
        Some(1.0)
    );
    let authentications = "keyward_authentications_total";
    assert!(
        sample(
            &text,
            authentications,
            r#"method="client_certificate",outcome="ok""#
        )
        .is_some_and(|n| n >= 5.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            authentications,
            r#"method="token",outcome="invalid_credentials""#
        ),
        Some(1.0),
        "{text}"
    );
}

on_both_databases!(requests_decisions_and_authentications_are_counted_by_what_they_were);
