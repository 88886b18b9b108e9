//! `keyward agent` and `keyward cert`: agents and their certificates,
//! through a running server (enroll and login run as the agent).

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use serde_json::json;

use super::{client, ClientArgs};

#[derive(Subcommand)]
pub(crate) enum AgentCommand {
    /// Register an agent; its custodial key is generated on the token.
    Create {
        name: String,
        #[arg(long = "scope")]
        scopes: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List agents.
    List {
        #[command(flatten)]
        client: ClientArgs,
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
    },
}

pub(crate) async fn agent_command(command: AgentCommand) -> anyhow::Result<()> {
    let out = match command {
        AgentCommand::Create {
            name,
            scopes,
            client: args,
        } => {
            client(&args)?
                .post("/v1/agents", json!({ "name": name, "scopes": scopes }))
                .await?
        }
        AgentCommand::List { client: args } => {
            client(&args)?.get_all("/v1/agents", "agents").await?
        }
        AgentCommand::EkFingerprint { tpm } => {
            println!("{}", keyward::client::tpm_enrollment::ek_fingerprint(&tpm)?);
            return Ok(());
        }
        AgentCommand::Enroll {
            name,
            tpm,
            url,
            ca,
            enrollment_token_file,
            out,
            ttl,
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
            println!(
                "{name}: certificate {} until {}, key in the TPM (attestation {}); files in {}",
                issued["serial"].as_str().unwrap_or("?"),
                issued["not_after"].as_str().unwrap_or("?"),
                issued["attestation"].as_str().unwrap_or("?"),
                out.display()
            );
            return Ok(());
        }
        AgentCommand::Login {
            name,
            token,
            dir,
            url,
            ca,
            once,
            ttl,
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
            println!(
                "{name}: certificate {} until {}",
                issued["serial"].as_str().unwrap_or("?"),
                issued["not_after"].as_str().unwrap_or("?")
            );
            if !once {
                keyward::client::credential::keep_renewed(&options, &name).await?;
            }
            return Ok(());
        }
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

pub(crate) async fn cert_command(command: CertCommand) -> anyhow::Result<()> {
    match command {
        CertCommand::Issue {
            name,
            csr,
            ttl,
            out,
            client: args,
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
            std::fs::write(
                &cert_path,
                issued["certificate_pem"].as_str().unwrap_or_default(),
            )?;
            std::fs::write(
                out.join("chain.pem"),
                issued["chain_pem"].as_str().unwrap_or_default(),
            )?;
            println!(
                "serial {} valid until {}; wrote {}",
                issued["serial"].as_str().unwrap_or("?"),
                issued["not_after"].as_str().unwrap_or("?"),
                cert_path.display()
            );
        }
    }
    Ok(())
}
