//! `keyward agent` and `keyward cert`: agents and their certificates,
//! through a running server (enroll and login run as the agent).

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use serde_json::{json, Value};

use super::output::{self, Column, Format};
use super::{client, ClientArgs};

/// `agent create`'s fields, in the order people look for them.
const AGENT_FIELDS: &[&str] = &[
    "name",
    "spiffe_id",
    "custody",
    "status",
    "scopes",
    "key_id",
    "attestation_digest",
    "created_at",
    "enrollment_token",
    "enrollment_token_expires_at",
];

const AGENT_COLUMNS: &[Column] = &[
    Column::new("NAME", "name"),
    Column::new("CUSTODY", "custody"),
    Column::new("STATUS", "status"),
    Column::new("SCOPES", "scopes"),
    Column::new("CREATED", "created_at"),
];

/// An issued certificate's fields; its PEM blocks are in files, named instead.
const ISSUED_FIELDS: &[&str] = &[
    "agent",
    "serial",
    "not_before",
    "not_after",
    "attestation",
    "certificate_pem",
    "chain_pem",
    "key",
];

/// `issued`, for people: where its PEM blocks were written, in their place.
fn issued_in_files(issued: &Value, written: &[(&str, String)]) -> Value {
    let mut shown = issued.clone();
    for (field, text) in written {
        shown[*field] = json!(text);
    }
    shown
}

#[derive(Subcommand)]
pub(crate) enum AgentCommand {
    /// Register an agent; its custodial key is generated on the token.
    Create {
        name: String,
        #[arg(long = "scope")]
        scopes: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        format: Format,
    },
    /// List agents.
    List {
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        format: Format,
    },
    /// Run as an agent-tpm agent: create a key in this host's TPM, prove
    /// it to keyward (EK certificate, credential activation, TPM2_Certify)
    /// and write the certificate, its chain and the key's TPM blobs to OUT.
    Enroll {
        name: String,
        /// The TPM, as a TCTI: device:/dev/tpmrm0, swtpm:host=H,port=P, tabrmd.
        #[arg(long)]
        tpm: String,
        #[arg(long, env = "KEYWARD_URL", default_value = "https://127.0.0.1:7443")]
        url: String,
        /// keyward's CA certificate(s).
        #[arg(long)]
        ca: Option<PathBuf>,
        /// File holding the enrollment token returned when the agent was
        /// registered with "custody":"agent-tpm".
        #[arg(long)]
        enrollment_token_file: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Certificate lifetime to ask for, in seconds.
        #[arg(long)]
        ttl: Option<u64>,
        #[command(flatten)]
        format: Format,
    },
    /// Print this host's TPM EK fingerprint (SHA-256 of the RSA EK's public
    /// key), the line keyward's [attestation.tpm] ek_allowlist needs to
    /// admit a TPM that has no EK certificate.
    EkFingerprint {
        /// The TPM, as a TCTI.
        #[arg(long)]
        tpm: String,
    },
    /// Run as the agent: enroll with a single-use token (a key of the
    /// agent's own, in DIR), then renew the client certificate at every
    /// half-life for as long as this runs.
    Login {
        name: String,
        /// The enrollment token (default: KEYWARD_ENROLLMENT_TOKEN).
        #[arg(long, env = "KEYWARD_ENROLLMENT_TOKEN")]
        token: Option<String>,
        /// Where key.pem, cert.pem and chain.pem are kept.
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, env = "KEYWARD_URL", default_value = "https://127.0.0.1:7443")]
        url: String,
        /// keyward's CA certificate(s).
        #[arg(long)]
        ca: PathBuf,
        /// Enroll (or renew, if DIR holds a credential) once and exit.
        #[arg(long)]
        once: bool,
        /// Certificate lifetime to ask for, in seconds.
        #[arg(long)]
        ttl: Option<u64>,
        #[command(flatten)]
        format: Format,
    },
}

#[derive(Subcommand)]
pub(crate) enum CertCommand {
    /// Issue a certificate for an agent's custodial key, or for a CSR.
    Issue {
        name: String,
        #[arg(long)]
        csr: Option<PathBuf>,
        #[arg(long)]
        ttl: Option<u64>,
        /// Directory to write <name>.pem and chain.pem into.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        format: Format,
    },
}

pub(crate) async fn agent_command(command: AgentCommand) -> anyhow::Result<()> {
    match command {
        AgentCommand::Create {
            name,
            scopes,
            client: args,
            format,
        } => {
            let created = client(&args)?
                .post("/v1/agents", json!({ "name": name, "scopes": scopes }))
                .await?;
            format.object(&created, AGENT_FIELDS)
        }
        AgentCommand::List {
            client: args,
            format,
        } => {
            let listed = client(&args)?.get_all("/v1/agents", "agents").await?;
            format.list(&listed, "agents", AGENT_COLUMNS)
        }
        AgentCommand::EkFingerprint { tpm } => {
            println!("{}", keyward::client::tpm_enrollment::ek_fingerprint(&tpm)?);
            Ok(())
        }
        AgentCommand::Enroll {
            name,
            tpm,
            url,
            ca,
            enrollment_token_file,
            out,
            ttl,
            format,
        } => {
            let token = std::fs::read_to_string(&enrollment_token_file)
                .with_context(|| format!("reading {}", enrollment_token_file.display()))?;
            std::fs::create_dir_all(&out)?;
            let issued = keyward::client::tpm_enrollment::enroll(
                &keyward::client::tpm_enrollment::EnrollOptions {
                    url: url.trim_end_matches('/').to_owned(),
                    ca_file: ca,
                    tcti: tpm,
                    token: token.trim().to_owned(),
                    out: out.clone(),
                    ttl_seconds: ttl,
                },
            )
            .await?;
            let shown = issued_in_files(
                &issued,
                &[
                    ("agent", name),
                    (
                        "certificate_pem",
                        out.join("cert.pem").display().to_string(),
                    ),
                    ("chain_pem", out.join("chain.pem").display().to_string()),
                    (
                        "key",
                        format!("in the TPM, {}", out.join("tpm-key.json").display()),
                    ),
                ],
            );
            format.print(&issued, || output::fields(&shown, ISSUED_FIELDS))
        }
        AgentCommand::Login {
            name,
            token,
            dir,
            url,
            ca,
            once,
            ttl,
            format,
        } => {
            let options = keyward::client::credential::LoginOptions {
                url: url.trim_end_matches('/').to_owned(),
                ca_file: ca,
                dir,
                ttl_seconds: ttl,
            };
            let issued = if options.dir.join("cert.pem").exists() {
                keyward::client::credential::renew(&options, &name).await?
            } else {
                let token = token.context("no credential yet: give --token")?;
                keyward::client::credential::enroll(&options, &name, &token).await?
            };
            let shown = issued_in_files(
                &issued,
                &[
                    ("agent", name.clone()),
                    (
                        "certificate_pem",
                        options.dir.join("cert.pem").display().to_string(),
                    ),
                    (
                        "chain_pem",
                        options.dir.join("chain.pem").display().to_string(),
                    ),
                    ("key", options.dir.join("key.pem").display().to_string()),
                ],
            );
            format.print(&issued, || output::fields(&shown, ISSUED_FIELDS))?;
            if !once {
                keyward::client::credential::keep_renewed(&options, &name).await?;
            }
            Ok(())
        }
    }
}

pub(crate) async fn cert_command(command: CertCommand) -> anyhow::Result<()> {
    match command {
        CertCommand::Issue {
            name,
            csr,
            ttl,
            out,
            client: args,
            format,
        } => {
            let mut body = json!({});
            if let Some(ttl) = ttl {
                body["ttl_seconds"] = json!(ttl);
            }
            if let Some(csr) = csr {
                body["csr_pem"] = json!(std::fs::read_to_string(&csr)
                    .with_context(|| format!("reading {}", csr.display()))?);
            }
            let issued = client(&args)?
                .post(&format!("/v1/agents/{name}/certificates"), body)
                .await?;
            std::fs::create_dir_all(&out)?;
            let cert_path = out.join(format!("{name}.pem"));
            let chain_path = out.join("chain.pem");
            std::fs::write(
                &cert_path,
                issued["certificate_pem"].as_str().unwrap_or_default(),
            )?;
            std::fs::write(
                &chain_path,
                issued["chain_pem"].as_str().unwrap_or_default(),
            )?;
            let shown = issued_in_files(
                &issued,
                &[
                    ("agent", name),
                    ("certificate_pem", cert_path.display().to_string()),
                    ("chain_pem", chain_path.display().to_string()),
                ],
            );
            format.print(&issued, || output::fields(&shown, ISSUED_FIELDS))
        }
    }
}
