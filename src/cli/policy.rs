//! `keyward policy`: the versioned policy, through a running server.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use serde_json::json;

use super::output::{Column, Format};
use super::{client, ClientArgs};

/// A version's fields; its content is `policy show`'s.
const VERSION_FIELDS: &[&str] = &[
    "version",
    "in_force",
    "author",
    "source",
    "created_at",
    "content_sha256",
];

const HISTORY_COLUMNS: &[Column] = &[
    Column::number("VERSION", "version"),
    Column::new("CREATED", "created_at"),
    Column::new("AUTHOR", "author"),
    Column::abbreviated("SHA256", "content_sha256", 12),
    Column::new("SOURCE", "source"),
    Column::new("IN FORCE", "in_force"),
];

#[derive(Subcommand)]
pub(crate) enum PolicyCommand {
    /// Check a policy file and make it the next version.
    Apply {
        file: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        format: Format,
    },
    /// Every version: number, author, time, content hash, origin.
    History {
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        format: Format,
    },
    /// One version's content (with --json: and its record).
    Show {
        version: i64,
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        format: Format,
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
        #[command(flatten)]
        format: Format,
    },
}

pub(crate) async fn policy_command(command: PolicyCommand) -> anyhow::Result<()> {
    match command {
        PolicyCommand::Apply {
            file,
            client: args,
            format,
        } => {
            let content = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let applied = client(&args)?
                .post("/v1/policies", json!({ "content": content }))
                .await?;
            format.object(&applied, VERSION_FIELDS)
        }
        PolicyCommand::History {
            client: args,
            format,
        } => {
            let history = client(&args)?.get_all("/v1/policies", "versions").await?;
            format.list(&history, "versions", HISTORY_COLUMNS)
        }
        PolicyCommand::Show {
            version,
            client: args,
            format,
        } => {
            let v = client(&args)?
                .get(&format!("/v1/policies/{version}"))
                .await?;
            // The content as it was applied, to redirect into a file.
            format.print(&v, || v["content"].as_str().unwrap_or("").to_owned())
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
            Ok(())
        }
        PolicyCommand::Rollback {
            version,
            client: args,
            format,
        } => {
            let applied = client(&args)?
                .post("/v1/policies/rollback", json!({ "version": version }))
                .await?;
            format.object(&applied, VERSION_FIELDS)
        }
    }
}
