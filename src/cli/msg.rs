//! `keyward msg`: signed agent-to-agent messages (docs/envelope.md).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::json;

use super::output::Format;
use super::serve::cli_runtime;
use super::{client, ClientArgs};

/// A verdict's fields: whether, then why not, then what the message says.
const VERDICT_FIELDS: &[&str] = &[
    "valid",
    "reason",
    "iss",
    "aud",
    "intent",
    "iat",
    "exp",
    "jti",
    "signer_serial",
];

/// The recipient of a message: a SPIFFE ID or an agent of this keyward.
#[derive(Args, Clone)]
#[group(required = true, multiple = false)]
pub(crate) struct Recipient {
    /// The recipient's SPIFFE ID.
    #[arg(long)]
    audience: Option<String>,
    /// The recipient's agent name (this keyward's trust domain).
    #[arg(long)]
    to: Option<String>,
}

#[derive(Subcommand)]
pub(crate) enum MsgCommand {
    /// Sign a message as an agent; prints the token (with --json: the
    /// whole answer).
    Sign {
        /// The sending agent.
        agent: String,
        #[command(flatten)]
        recipient: Recipient,
        /// What the message asks for (printable ASCII, at most 256 characters).
        #[arg(long)]
        intent: String,
        /// Lifetime in seconds (1 to 300; default 60).
        #[arg(long)]
        ttl: Option<i64>,
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        format: Format,
    },
    /// Verify a token read from standard input (or --input). Exits 0 when
    /// it is valid, 1 when not. With --bundle it is verified here, offline,
    /// against that PEM trust bundle; otherwise by the server.
    Verify {
        /// The verifier's own SPIFFE ID: messages to anyone else are refused.
        #[arg(long)]
        audience: String,
        /// File holding the token (default: standard input).
        #[arg(long)]
        input: Option<PathBuf>,
        /// Trust bundle (PEM roots) for offline verification.
        #[arg(long)]
        bundle: Option<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        format: Format,
    },
}

/// `keyward msg`: exits 1 when a verified message was refused.
pub(crate) fn msg(command: MsgCommand) -> anyhow::Result<()> {
    let valid = cli_runtime()?.block_on(msg_command(command))?;
    if !valid {
        std::process::exit(1);
    }
    Ok(())
}

/// Runs a `msg` command; false when a verified message was refused.
async fn msg_command(command: MsgCommand) -> anyhow::Result<bool> {
    match command {
        MsgCommand::Sign {
            agent,
            recipient,
            intent,
            ttl,
            client: args,
            format,
        } => {
            let mut body = json!({ "intent": intent });
            if let Some(audience) = recipient.audience {
                body["audience"] = json!(audience);
            }
            if let Some(to) = recipient.to {
                body["to"] = json!(to);
            }
            if let Some(ttl) = ttl {
                body["ttl_seconds"] = json!(ttl);
            }
            let signed = client(&args)?
                .post(&format!("/v1/agents/{agent}/messages"), body)
                .await?;
            // Just the token by default: it is what gets piped on.
            format.print(&signed, || {
                format!("{}\n", signed["token"].as_str().unwrap_or_default())
            })?;
            Ok(true)
        }
        MsgCommand::Verify {
            audience,
            input,
            bundle,
            client: args,
            format,
        } => {
            let token = match input {
                Some(path) => std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?,
                None => std::io::read_to_string(std::io::stdin()).context("reading stdin")?,
            };
            let token = token.trim();
            let outcome = match bundle {
                Some(path) => {
                    let pem = std::fs::read_to_string(&path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    let anchors = keyward::pki::parse_pem_chain(&pem)?;
                    match keyward::agents::envelope::verify(
                        token,
                        &anchors,
                        &audience,
                        std::time::SystemTime::now(),
                    ) {
                        Ok(m) => json!({
                            "valid": true, "reason": null, "iss": m.iss(), "aud": m.aud(),
                            "iat": m.iat(), "exp": m.exp(), "jti": m.jti(),
                            "intent": m.intent(), "signer_serial": m.signer_serial(),
                        }),
                        Err(e) => json!({ "valid": false, "reason": e.reason() }),
                    }
                }
                None => {
                    client(&args)?
                        .post(
                            "/v1/messages/verify",
                            json!({ "token": token, "audience": audience }),
                        )
                        .await?
                }
            };
            format.object(&outcome, VERDICT_FIELDS)?;
            Ok(outcome["valid"] == json!(true))
        }
    }
}
