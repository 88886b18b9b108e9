//! Every list endpoint pages the same way (`limit`, `cursor`,
//! `next_cursor`), refuses bad paging input by code, and the CLI follows
//! the cursors; a keyward process on a real SoftHSM2 token, on SQLite and
//! PostgreSQL.

mod common;

use common::{agent_client, register_agent, Db, Server};
use serde_json::{json, Value};

/// Follows `next_cursor` through `path` with pages of `limit`: the items,
/// in order, and how many pages it took.
async fn all_pages(server: &Server, path: &str, items: &str, limit: usize) -> (Vec<Value>, usize) {
    let (mut all, mut pages, mut cursor) = (Vec::new(), 0, None::<String>);
    loop {
        let url = match &cursor {
            Some(c) => format!("{path}?limit={limit}&cursor={c}"),
            None => format!("{path}?limit={limit}"),
        };
        let (status, page) = server.admin("GET", &url, None).await;
        assert_eq!(status, 200, "{url}: {page}");
        let found = page[items].as_array().unwrap();
        assert!(found.len() <= limit, "{page}");
        all.extend(found.iter().cloned());
        pages += 1;
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return (all, pages),
        }
    }
}

async fn every_list_pages_through_its_cursor(db: Db) {
    let server = Server::start(db).await;
    for name in ["delta", "alpha", "echo", "charlie", "bravo"] {
        register_agent(&server, name).await;
    }
    let (agents, pages) = all_pages(&server, "/v1/agents", "agents", 2).await;
    let names: Vec<&str> = agents.iter().map(|a| a["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["alpha", "bravo", "charlie", "delta", "echo"]);
    assert_eq!(pages, 3);

    let mut issued = std::collections::BTreeSet::new();
    for _ in 0..3 {
        let serial = common::issue_certificate(&server, "alpha").await["serial"].clone();
        issued.insert(serial.as_str().unwrap().to_owned());
    }
    let (certificates, pages) =
        all_pages(&server, "/v1/agents/alpha/certificates", "certificates", 2).await;
    // Newest first, by the second of issuance: the same second's by serial.
    let listed: std::collections::BTreeSet<String> = certificates
        .iter()
        .map(|c| c["serial"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!((listed, certificates.len(), pages), (issued, 3, 2));
    let starts: Vec<&str> = certificates
        .iter()
        .map(|c| c["not_before"].as_str().unwrap())
        .collect();
    assert!(starts.windows(2).all(|w| w[0] >= w[1]), "{starts:?}");
    assert!(certificates[0]["certificate_pem"]
        .as_str()
        .unwrap()
        .starts_with("-----BEGIN CERTIFICATE-----"));

    for n in 0..3 {
        let content = format!("[roles.r{n}]\nactions = [\"sign\"]\n");
        let (status, _) = server
            .admin("POST", "/v1/policies", Some(json!({"content": content})))
            .await;
        assert_eq!(status, 201);
    }
    let (versions, _) = all_pages(&server, "/v1/policies", "versions", 2).await;
    let numbers: Vec<i64> = versions
        .iter()
        .map(|v| v["version"].as_i64().unwrap())
        .collect();
    assert_eq!(numbers, [1, 2, 3]);

    for n in 0..3 {
        let (status, _) = server
            .admin(
                "POST",
                "/v1/hooks",
                Some(json!({"url": format!("http://127.0.0.1:9/{n}")})),
            )
            .await;
        assert_eq!(status, 201);
    }
    let (hooks, _) = all_pages(&server, "/v1/hooks", "hooks", 2).await;
    assert_eq!(hooks.len(), 3);
    assert!(hooks.iter().all(|h| h.get("secret").is_none()));

    let (status, _) = server
        .admin(
            "POST",
            "/v1/policies",
            Some(json!({"content": "[roles.held]\nactions = [\"sign\"]\nrequires_approval = true\n"})),
        )
        .await;
    assert_eq!(status, 201);
    let (held, _, _) = agent_client(&server, "held", &["held"]).await;
    for _ in 0..3 {
        let (status, answer) = common::post(
            &held,
            &server,
            "/v1/agents/held/sign",
            json!({"message_b64": "aGk="}),
        )
        .await;
        assert_eq!(status, 202, "{answer}");
    }
    let (approvals, pages) = all_pages(&server, "/v1/approvals", "approvals", 2).await;
    assert_eq!((approvals.len(), pages), (3, 2));
}

async fn bad_paging_input_is_refused_by_code_after_authorization(db: Db) {
    let server = Server::start(db).await;
    register_agent(&server, "alpha").await;
    let (_, first) = server.admin("GET", "/v1/agents?limit=1", None).await;
    let agents_cursor = first["next_cursor"].as_str().map(str::to_owned);
    assert_eq!(agents_cursor, None, "one agent fills no second page");
    register_agent(&server, "bravo").await;
    let (_, first) = server.admin("GET", "/v1/agents?limit=1", None).await;
    let agents_cursor = first["next_cursor"].as_str().unwrap().to_owned();
    let before = server.row_counts().await;
    for (path, code) in [
        ("/v1/agents?limit=0".to_owned(), "invalid_limit"),
        ("/v1/agents?limit=1001".to_owned(), "invalid_limit"),
        ("/v1/agents?limit=many".to_owned(), "invalid_limit"),
        (
            "/v1/agents?cursor=not-a-cursor!".to_owned(),
            "invalid_cursor",
        ),
        (
            format!("/v1/hooks?cursor={agents_cursor}"),
            "invalid_cursor",
        ),
        ("/v1/agents?offset=10".to_owned(), "invalid_query"),
        ("/v1/policies?limit=-5".to_owned(), "invalid_limit"),
        (
            "/v1/agents/alpha/certificates?cursor=eyJ9".to_owned(),
            "invalid_cursor",
        ),
    ] {
        let (status, answer) = server.admin("GET", &path, None).await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (400, Some(code)),
            "{path}: {answer}"
        );
    }
    assert_eq!(server.row_counts().await, before);

    // A caller that may not list is told that, not what is wrong with its query.
    let (alpha, _, _) = agent_client(&server, "carol", &[]).await;
    let response = alpha
        .get(format!("{}/v1/agents?limit=0", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    let response = alpha
        .get(format!(
            "{}/v1/agents/alpha/certificates?limit=0",
            server.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    let response = alpha
        .get(format!("{}/v1/agents/carol/certificates", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        200,
        "an agent lists its own certificates"
    );
}

/// `keyward policy history` follows the cursors past the first page.
async fn the_cli_follows_cursors_to_the_last_page(db: Db) {
    let server = Server::start(db).await;
    for n in 0..1001 {
        let content = format!("# {n}\n[roles.r]\nactions = [\"sign\"]\n");
        let (status, _) = server
            .admin("POST", "/v1/policies", Some(json!({"content": content})))
            .await;
        assert_eq!(status, 201);
    }
    let history = |format: &[&str]| {
        let out = std::process::Command::new(common::keyward_bin())
            .args(["policy", "history", "--url"])
            .arg(&server.url)
            .arg("--data-dir")
            .arg(server.data_dir.path())
            .args(format)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let listed: Value = serde_json::from_str(&history(&["--json"])).unwrap();
    let versions = listed["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 1001);
    assert_eq!(versions[1000]["version"], 1001);
    assert_eq!(versions[1000]["in_force"], true);
    // The table: its header and one row a version, the last in force.
    let table = history(&[]);
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["VERSION", "CREATED", "AUTHOR", "SHA256", "SOURCE", "IN", "FORCE"]
    );
    assert_eq!(lines.clone().count(), 1001);
    let last: Vec<&str> = lines.last().unwrap().split_whitespace().collect();
    assert_eq!((last[0], last[5]), ("1001", "true"), "{last:?}");
}

on_both_databases!(
    every_list_pages_through_its_cursor,
    bad_paging_input_is_refused_by_code_after_authorization,
    the_cli_follows_cursors_to_the_last_page,
);
