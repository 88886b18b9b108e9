//! `keyward admin`, `ca` and `keys` (run on the keyward host, against its
//! config) and `revoke` and `approvals` (through a running server).

use std::path::PathBuf;

use clap::Subcommand;
use keyward::config::KeysConfig;
use serde_json::json;

use super::output::{Column, Format};
use super::serve::{load_config, with_keyward, ServerArgs};
use super::{client, ClientArgs};

/// `revoke cert|agent`'s answers, what was revoked first.
const REVOKED_FIELDS: &[&str] = &[
    "serial",
    "name",
    "status",
    "reason",
    "revoked_at",
    "already_revoked",
    "changed",
];

const APPROVAL_FIELDS: &[&str] = &[
    "id",
    "agent",
    "kind",
    "status",
    "approvals_required",
    "policy_version",
    "created_at",
    "expires_at",
    "request",
];

const APPROVAL_COLUMNS: &[Column] = &[
    Column::new("ID", "id"),
    Column::new("AGENT", "agent"),
    Column::new("KIND", "kind"),
    Column::new("STATUS", "status"),
    Column::number("APPROVALS", "approvals_required"),
    Column::number("POLICY", "policy_version"),
    Column::new("CREATED", "created_at"),
    Column::new("EXPIRES", "expires_at"),
];

#[derive(Subcommand)]
pub(crate) enum AdminCommand {
    /// Issue an admin client certificate (SAN spiffe://<td>/admin/<name>)
    /// for a key made here: <out>/key.pem (0600) and <out>/cert.pem. Use it
    /// with --cert/--key, or curl --cert/--key.
    CertIssue {
        name: String,
        #[arg(long)]
        out: PathBuf,
        /// Lifetime in seconds (at most a day).
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Create an admin token for the admin NAME (the two-person rule counts
    /// names: one person's tokens and certificates are one admin). Servers
    /// accept it after a restart.
    TokenCreate {
        /// The admin it belongs to (the same name as their admin
        /// certificate, if they have one).
        #[arg(long)]
        name: String,
        /// Where to write the token (created 0600).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(Subcommand)]
pub(crate) enum CaCommand {
    /// Write a PKCS#10 request for the CA key, for an external root to sign.
    Csr {
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Replace the issuing CA with a new self-signed root on the token; the
    /// current CA stays trusted for what it issued. Restart keyward after.
    Rotate {
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Install the externally signed CA certificate and its chain (root last).
    Import {
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        chain: PathBuf,
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(Subcommand)]
pub(crate) enum KeysCommand {
    /// Create the token's wrapping key for `custodial_storage = "wrapped"`
    /// (AES-256, trusted, private, never extractable), as the token's
    /// security officer. Does nothing if the token has one. The embedded
    /// token gets its own on first start.
    CreateWrappingKey {
        /// Environment variable holding the security officer's PIN.
        #[arg(long, conflicts_with = "so_pin_file")]
        so_pin_env: Option<String>,
        /// File (0600) holding the security officer's PIN.
        #[arg(long)]
        so_pin_file: Option<PathBuf>,
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(Subcommand)]
pub(crate) enum RevokeCommand {
    /// Revoke one certificate by its serial (hex).
    Cert {
        serial: String,
        /// RFC 5280 reason: keyCompromise, superseded, cessationOfOperation, ...
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        format: Format,
    },
    /// Revoke an agent: all its unexpired certificates, and its key may sign no more.
    Agent {
        name: String,
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        format: Format,
    },
}

#[derive(Subcommand)]
pub(crate) enum ApprovalsCommand {
    /// Pending requests.
    List {
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        format: Format,
    },
    /// Approve a request (it runs once enough admins have).
    Approve {
        id: String,
        #[arg(long)]
        comment: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        format: Format,
    },
    /// Deny a request.
    Deny {
        id: String,
        #[arg(long)]
        comment: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        format: Format,
    },
}

/// `keyward admin`.
pub(crate) fn admin_command(command: AdminCommand) -> anyhow::Result<()> {
    match command {
        AdminCommand::CertIssue {
            name,
            out,
            ttl,
            server,
        } => {
            anyhow::ensure!((1..=86_400).contains(&ttl), "--ttl must be 1 to 86400");
            let name = keyward::identity::AgentName::parse(&name)?;
            with_keyward(&server, |kw, _config| async move {
                let serial = keyward::app::admin_cert_issue(
                    &kw,
                    &name,
                    std::time::Duration::from_secs(ttl),
                    &out,
                )
                .await?;
                println!("admin {name}: certificate {serial} in {}", out.display());
                Ok(())
            })
        }
        AdminCommand::TokenCreate { name, out, server } => {
            let name = keyward::identity::AgentName::parse(&name)?;
            with_keyward(&server, |kw, _config| async move {
                let id = keyward::app::admin_token_create(&kw, &name, &out).await?;
                println!("admin {name}: token {id} written to {}", out.display());
                Ok(())
            })
        }
    }
}

/// `keyward ca`.
pub(crate) fn ca_command(command: CaCommand) -> anyhow::Result<()> {
    let args = match &command {
        CaCommand::Csr { server, .. }
        | CaCommand::Import { server, .. }
        | CaCommand::Rotate { server } => server.clone(),
    };
    with_keyward(&args, |kw, config| async move {
        match command {
            CaCommand::Csr { out, .. } => {
                std::fs::write(&out, keyward::app::ca_csr(&kw).await?)?;
                println!("wrote {}", out.display());
            }
            CaCommand::Rotate { .. } => {
                let key = keyward::app::ca_rotate(&kw, &config).await?;
                println!(
                    "new CA key {key} is the issuing CA from the next start; ca.pem holds both roots"
                );
            }
            CaCommand::Import { cert, chain, .. } => {
                let cert = std::fs::read_to_string(cert)?;
                let chain = std::fs::read_to_string(chain)?;
                keyward::app::ca_import(&kw, &config, &cert, &chain).await?;
                println!("installed the CA certificate; restart keyward to serve it");
            }
        }
        Ok(())
    })
}

/// `keyward keys`.
pub(crate) fn keys_command(command: KeysCommand) -> anyhow::Result<()> {
    let KeysCommand::CreateWrappingKey {
        so_pin_env,
        so_pin_file,
        server,
    } = command;
    let config = load_config(&server)?;
    keyward::telemetry::init_logging(server.log_json, None)?;
    let KeysConfig::Pkcs11(token) = &config.keys else {
        anyhow::bail!(
            "only a [keys] backend = \"pkcs11\" token needs this: the embedded token \
             makes its own, and a TPM keeps its keys as blobs already"
        );
    };
    let so_pin = match (so_pin_env, so_pin_file) {
        (Some(var), None) => secrecy::SecretString::from(
            std::env::var(&var).map_err(|_| anyhow::anyhow!("{var} (the SO PIN) is not set"))?,
        ),
        (None, Some(file)) => keyward::config::read_secret_file(&file)?,
        _ => anyhow::bail!("give --so-pin-env or --so-pin-file"),
    };
    let ctx = keyward::keys::pkcs11::load_module(&token.module)?;
    let created = keyward::keys::pkcs11::create_wrapping_key(
        &ctx,
        &token.token_label,
        &so_pin,
        &token.user_pin,
    )?;
    println!(
        "{} {}",
        keyward::keys::pkcs11::WRAPPING_KEY_LABEL,
        if created {
            "created"
        } else {
            "already on the token"
        }
    );
    Ok(())
}

/// `keyward revoke`.
pub(crate) async fn revoke_command(command: RevokeCommand) -> anyhow::Result<()> {
    let (path, args, reason, format) = match command {
        RevokeCommand::Cert {
            serial,
            reason,
            client,
            format,
        } => (
            format!("/v1/certificates/{serial}/revoke"),
            client,
            reason,
            format,
        ),
        RevokeCommand::Agent {
            name,
            reason,
            client,
            format,
        } => (format!("/v1/agents/{name}/revoke"), client, reason, format),
    };
    let out = client(&args)?
        .post(&path, json!({ "reason": reason }))
        .await?;
    format.object(&out, REVOKED_FIELDS)
}

/// `keyward approvals`.
pub(crate) async fn approvals_command(command: ApprovalsCommand) -> anyhow::Result<()> {
    let (args, id, decision, comment, format) = match command {
        ApprovalsCommand::List {
            client: args,
            format,
        } => {
            let pending = client(&args)?.get_all("/v1/approvals", "approvals").await?;
            return format.list(&pending, "approvals", APPROVAL_COLUMNS);
        }
        ApprovalsCommand::Approve {
            id,
            comment,
            client: args,
            format,
        } => (args, id, "approve", comment, format),
        ApprovalsCommand::Deny {
            id,
            comment,
            client: args,
            format,
        } => (args, id, "deny", comment, format),
    };
    let decided = vote(&args, &id, decision, comment).await?;
    format.object(&decided, APPROVAL_FIELDS)
}

/// `keyward approvals approve|deny`: one admin's vote.
async fn vote(
    args: &ClientArgs,
    id: &str,
    decision: &str,
    comment: Option<String>,
) -> anyhow::Result<serde_json::Value> {
    client(args)?
        .post(
            &format!("/v1/approvals/{id}/{decision}"),
            json!({ "comment": comment }),
        )
        .await
}
