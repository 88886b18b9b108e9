//! `keyward policy`: the versioned policy, through a running server.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use serde_json::json;

use super::{client, ClientArgs};

#[derive(Subcommand)]
pub(crate) enum PolicyCommand {
    /// Check a policy file and make it the next version.
    Apply {
        file: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Every version: number, author, time, content hash, origin.
    History {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// One version's content.
    Show {
        version: i64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// What changed from version A to version B.
    Diff {
        a: i64,
        b: i64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Make an earlier version's content the next version.
    Rollback {
        version: i64,
        #[command(flatten)]
        client: ClientArgs,
    },
}

pub(crate) async fn policy_command(command: PolicyCommand) -> anyhow::Result<()> {
    match command {
        PolicyCommand::Apply { file, client: args } => {
            let content = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let applied = client(&args)?
                .post("/v1/policies", json!({ "content": content }))
                .await?;
            println!(
                "policy version {} in force (sha256 {})",
                applied["version"], applied["content_sha256"]
            );
        }
        PolicyCommand::History { client: args } => {
            let history = client(&args)?.get_all("/v1/policies", "versions").await?;
            for v in history["versions"].as_array().into_iter().flatten() {
                println!(
                    "{:>4} {} {} {} {}{}",
                    v["version"],
                    v["created_at"],
                    v["author"].as_str().unwrap_or(""),
                    &v["content_sha256"].as_str().unwrap_or("")
                        [..12.min(v["content_sha256"].as_str().unwrap_or("").len())],
                    v["source"].as_str().unwrap_or(""),
                    if v["in_force"] == json!(true) {
                        "  (in force)"
                    } else {
                        ""
                    }
                );
            }
        }
        PolicyCommand::Show {
            version,
            client: args,
        } => {
            let v = client(&args)?
                .get(&format!("/v1/policies/{version}"))
                .await?;
            print!("{}", v["content"].as_str().unwrap_or(""));
        }
        PolicyCommand::Diff { a, b, client: args } => {
            let c = client(&args)?;
            let old = c.get(&format!("/v1/policies/{a}")).await?;
            let new = c.get(&format!("/v1/policies/{b}")).await?;
            print!(
                "{}",
                keyward::policy::diff_lines(
                    old["content"].as_str().unwrap_or(""),
                    new["content"].as_str().unwrap_or("")
                )
            );
        }
        PolicyCommand::Rollback {
            version,
            client: args,
        } => {
            let applied = client(&args)?
                .post("/v1/policies/rollback", json!({ "version": version }))
                .await?;
            println!(
                "policy version {} (the content of version {version}) in force",
                applied["version"]
            );
        }
    }
    Ok(())
}
