//! The `keyward` binary: a thin CLI over the library.

#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use keyward::client::{Client, ClientOptions};
use keyward::config::{default_runtime_threads, Config, ConfigFile, KeysConfig, Overrides};
use keyward::keys::KeyStoreConfig;
use serde_json::json;

/// mimalloc instead of glibc's malloc: a signing request allocates and
/// frees small objects on several threads (the HTTP stack, the pool's
/// hand-over, the signature log), and glibc's arenas spent about 6% of the
/// CPU of an `http` benchmark run there. Measured with `keyward bench sign`
/// in alternating runs: 3-4% less CPU per HTTP signature.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "keyward",
    version,
    about = "Hardware-backed identities and certificates for AI agents"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the service (creates the embedded token, CA and database on first start).
    Serve(ServerArgs),
    /// Create the token, CA, database and admin token, then exit.
    Init(ServerArgs),
    /// Manage agents through a running server.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Certificates for agents, through a running server.
    #[command(subcommand)]
    Cert(CertCommand),
    /// The issuing CA (run on the keyward host, against its config).
    #[command(subcommand)]
    Ca(CaCommand),
    /// Admin credentials (run on the keyward host, against its config).
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Revoke a certificate or an agent (with all its certificates).
    #[command(subcommand)]
    Revoke(RevokeCommand),
    /// Requests waiting for human approval.
    #[command(subcommand)]
    Approvals(ApprovalsCommand),
    /// The versioned policy: roles, what they grant, and their limits.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Signed agent-to-agent messages (docs/envelope.md).
    #[command(subcommand)]
    Msg(MsgCommand),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// The key store (run on the keyward host, against its config).
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Subcommand)]
enum KeysCommand {
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
enum ApprovalsCommand {
    /// Pending requests.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Approve a request (it runs once enough admins have).
    Approve {
        id: String,
        #[arg(long)]
        comment: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Deny a request.
    Deny {
        id: String,
        #[arg(long)]
        comment: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
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
enum PolicyCommand {
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

#[derive(Subcommand)]
enum RevokeCommand {
    /// Revoke one certificate by its serial (hex).
    Cert {
        serial: String,
        /// RFC 5280 reason: keyCompromise, superseded, cessationOfOperation, ...
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Revoke an agent: all its unexpired certificates, and its key may sign no more.
    Agent {
        name: String,
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// The recipient of a message: a SPIFFE ID or an agent of this keyward.
#[derive(Args, Clone)]
#[group(required = true, multiple = false)]
struct Recipient {
    /// The recipient's SPIFFE ID.
    #[arg(long)]
    audience: Option<String>,
    /// The recipient's agent name (this keyward's trust domain).
    #[arg(long)]
    to: Option<String>,
}

#[derive(Subcommand)]
enum MsgCommand {
    /// Sign a message as an agent; prints the token.
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
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Signatures per second and latency: raw token, naive, pool, HTTP.
    Sign {
        #[command(flatten)]
        bench: BenchArgs,
        /// Comma-separated modes (http-many is added with --agents).
        #[arg(
            long,
            default_value = "raw,naive,pool,http,http-half",
            value_delimiter = ','
        )]
        modes: Vec<String>,
        /// Mode http-many: HTTP signing spread over this many agents, each
        /// with its own key, beside http's one agent in the same run.
        #[arg(long, default_value_t = 1)]
        agents: usize,
        /// Measure a TPM instead (a TCTI, e.g. swtpm:host=127.0.0.1,port=2321):
        /// modes tpm-raw (one connection's TPM2_Sign loop) and tpm (the pool).
        #[arg(long, conflicts_with = "config")]
        tpm: Option<String>,
    },
    /// Certificates per second and latency: raw token signatures, HTTPS
    /// issuance for a custodial key (at full and half load) and for a CSR.
    Issue {
        #[command(flatten)]
        bench: BenchArgs,
        #[arg(
            long,
            default_value = "raw,http-issue,http-issue-half,http-csr",
            value_delimiter = ','
        )]
        modes: Vec<String>,
    },
    /// Registrations per second as the number of agents grows: one line
    /// per --step agents, up to --agents.
    Agents {
        #[command(flatten)]
        bench: BenchArgs,
        #[arg(long, default_value_t = 2000)]
        agents: usize,
        #[arg(long, default_value_t = 500)]
        step: usize,
    },
}

/// What every benchmark on a PKCS#11 token takes.
#[derive(Args, Clone)]
struct BenchArgs {
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Concurrent callers (pool tasks, HTTP clients).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Pool workers and raw threads (default: number of cores).
    #[arg(long)]
    workers: Option<usize>,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Threads of the runtime the pool's callers and the HTTP server run
    /// on (default: the config's `server.runtime_threads`, else half the
    /// cores, as for `serve`). The HTTP clients have a runtime of their own.
    #[arg(long)]
    runtime_threads: Option<usize>,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
    /// Use this config's PKCS#11 token instead of a fresh SoftHSM2 token.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where the benchmark's agents keep their custodial keys: `wrapped`
    /// (the embedded default) or `token` (one token object per agent).
    #[arg(long, default_value = "wrapped", value_parser = parse_custodial_storage)]
    custodial_storage: keyward::keys::KeyStorage,
    /// The server's database (default: a fresh SQLite file); it must be
    /// empty, e.g. a database just made with createdb.
    #[arg(long)]
    database_url: Option<String>,
}

fn parse_custodial_storage(text: &str) -> Result<keyward::keys::KeyStorage, String> {
    match text {
        "token" => Ok(keyward::keys::KeyStorage::Token),
        "wrapped" => Ok(keyward::keys::KeyStorage::Wrapped),
        _ => Err("token or wrapped".into()),
    }
}

#[derive(Args, Clone)]
struct ServerArgs {
    /// TOML configuration (see hsm-config/); without it, embedded defaults.
    #[arg(long, env = "KEYWARD_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long, env = "KEYWARD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:7443 (port 0 picks a free one).
    #[arg(long)]
    listen: Option<String>,
    /// sqlite://PATH or postgres://... (overrides the config file).
    #[arg(long, env = "KEYWARD_DATABASE_URL")]
    database_url: Option<String>,
    /// Pool worker threads (default: number of cores).
    #[arg(long)]
    workers: Option<usize>,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
    /// Also serve the API over plain HTTP on this loopback address, for
    /// tests and benchmarks only: no TLS, so no agent certificates either.
    #[arg(long)]
    insecure_http: Option<std::net::SocketAddr>,
    /// Directory of TPM manufacturer CA certificates that agents' EK
    /// certificates must chain to ([attestation.tpm] ek_roots).
    #[arg(long)]
    tpm_ek_roots: Option<PathBuf>,
    /// File of EK public-key SHA-256 digests admitted without an EK
    /// certificate ([attestation.tpm] ek_allowlist).
    #[arg(long)]
    tpm_ek_allowlist: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct ClientArgs {
    #[arg(long, env = "KEYWARD_URL", default_value = "https://127.0.0.1:7443")]
    url: String,
    /// CA certificate to trust (default: <data-dir>/ca.pem).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// File holding the admin token (default: KEYWARD_TOKEN, then <data-dir>/admin.token).
    #[arg(long)]
    token_file: Option<PathBuf>,
    #[arg(long, env = "KEYWARD_DATA_DIR", default_value = keyward::config::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Client certificate (admin or agent) instead of the admin token.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// Its private key.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
}

#[derive(Subcommand)]
enum AgentCommand {
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
enum CertCommand {
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

#[derive(Subcommand)]
enum CaCommand {
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

fn load_config(args: &ServerArgs) -> anyhow::Result<Config> {
    let file = match &args.config {
        Some(path) => ConfigFile::load(path)?,
        None => ConfigFile::default(),
    };
    let overrides = Overrides {
        data_dir: args.data_dir.clone(),
        listen: args.listen.clone(),
        database_url: args.database_url.clone(),
        pool_workers: args.workers,
        tpm_ek_roots: args.tpm_ek_roots.clone(),
        tpm_ek_allowlist: args.tpm_ek_allowlist.clone(),
    };
    Ok(file.validate(&overrides)?)
}

/// Resolves the key store; for the embedded token this sets SOFTHSM2_CONF,
/// so it runs before the async runtime starts any thread.
fn key_store(config: &Config) -> anyhow::Result<KeyStoreConfig> {
    Ok(match &config.keys {
        KeysConfig::EmbeddedSoftHsm => {
            KeyStoreConfig::Pkcs11(keyward::app::embedded::prepare(&config.data_dir)?)
        }
        KeysConfig::Pkcs11(p) => KeyStoreConfig::Pkcs11(p.clone()),
        KeysConfig::Tpm(t) => KeyStoreConfig::Tpm(t.clone()),
    })
}

/// What a command that runs against keyward's own state (not a server)
/// needs: logging, the validated config, the key store (the embedded token
/// prepared before any thread starts), and a runtime.
fn local(args: &ServerArgs) -> anyhow::Result<(Config, KeyStoreConfig, tokio::runtime::Runtime)> {
    keyward::telemetry::init_logging(args.log_json);
    let config = load_config(args)?;
    // Before the embedded token is prepared in it.
    keyward::app::refuse_shared_data(&config)?;
    let keys = key_store(&config)?;
    let rt = runtime(config.runtime_threads)?;
    Ok((config, keys, rt))
}

/// Runs `work` against a started keyward (no listener), then ends in
/// order: the runtime first (its tasks hold pool handles), then the pool's
/// workers, before the process exits. See `KeyPool::join_workers`.
fn with_keyward<F, Fut>(args: &ServerArgs, work: F) -> anyhow::Result<()>
where
    F: FnOnce(keyward::app::Keyward, Config) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let (config, keys, rt) = local(args)?;
    let pool = rt.block_on(async {
        let kw = keyward::app::start(&config, &keys).await?;
        let pool = kw.state.pool.clone();
        work(kw, config.clone()).await?;
        anyhow::Ok(pool)
    })?;
    drop(rt);
    pool.join_workers(std::time::Duration::from_secs(5));
    Ok(())
}

/// For the commands that only talk to a server (agent, cert, policy, ...).
fn cli_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    runtime(default_runtime_threads())
}

fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?)
}

fn main() -> anyhow::Result<()> {
    // Every file and directory keyward creates (databases, tokens, keys,
    // the embedded token's files, through SoftHSM2's own tools too) is its
    // owner's alone, whatever umask keyward was started with.
    keyward::runtime::files::private_umask();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            if let Some(addr) = args.insecure_http {
                anyhow::ensure!(
                    addr.ip().is_loopback(),
                    "--insecure-http must be a loopback address, not {addr}"
                );
            }
            let (config, keys, rt) = local(&args)?;
            let pool = rt.block_on(serve(config, keys, args.insecure_http))?;
            drop(rt);
            pool.join_workers(std::time::Duration::from_secs(5));
            Ok(())
        }
        Command::Init(args) => with_keyward(&args, |_kw, config| async move {
            println!("initialized {}", config.data_dir.display());
            Ok(())
        }),
        Command::Ca(command) => {
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
        Command::Bench(command) => bench_command(command),
        Command::Keys(KeysCommand::CreateWrappingKey {
            so_pin_env,
            so_pin_file,
            server,
        }) => {
            keyward::telemetry::init_logging(server.log_json);
            let config = load_config(&server)?;
            let KeysConfig::Pkcs11(token) = &config.keys else {
                anyhow::bail!(
                    "only a [keys] backend = \"pkcs11\" token needs this: the embedded token \
                     makes its own, and a TPM keeps its keys as blobs already"
                );
            };
            let so_pin = match (so_pin_env, so_pin_file) {
                (Some(var), None) => secrecy::SecretString::from(
                    std::env::var(&var)
                        .map_err(|_| anyhow::anyhow!("{var} (the SO PIN) is not set"))?,
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
        Command::Agent(command) => cli_runtime()?.block_on(agent_command(command)),
        Command::Cert(command) => cli_runtime()?.block_on(cert_command(command)),
        Command::Admin(AdminCommand::CertIssue {
            name,
            out,
            ttl,
            server,
        }) => {
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
        Command::Admin(AdminCommand::TokenCreate { name, out, server }) => {
            let name = keyward::identity::AgentName::parse(&name)?;
            with_keyward(&server, |kw, _config| async move {
                let id = keyward::app::admin_token_create(&kw, &name, &out).await?;
                println!("admin {name}: token {id} written to {}", out.display());
                Ok(())
            })
        }
        Command::Policy(command) => cli_runtime()?.block_on(policy_command(command)),
        Command::Approvals(command) => cli_runtime()?.block_on(async {
            let out = match command {
                ApprovalsCommand::List { client: args } => {
                    client(&args)?.get_all("/v1/approvals", "approvals").await?
                }
                ApprovalsCommand::Approve {
                    id,
                    comment,
                    client: args,
                } => vote(&args, &id, "approve", comment).await?,
                ApprovalsCommand::Deny {
                    id,
                    comment,
                    client: args,
                } => vote(&args, &id, "deny", comment).await?,
            };
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }),
        Command::Revoke(command) => cli_runtime()?.block_on(async {
            let (path, args, reason) = match command {
                RevokeCommand::Cert {
                    serial,
                    reason,
                    client,
                } => (format!("/v1/certificates/{serial}/revoke"), client, reason),
                RevokeCommand::Agent {
                    name,
                    reason,
                    client,
                } => (format!("/v1/agents/{name}/revoke"), client, reason),
            };
            let out = client(&args)?
                .post(&path, json!({ "reason": reason }))
                .await?;
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }),
        Command::Msg(command) => {
            let valid = cli_runtime()?.block_on(msg_command(command))?;
            if !valid {
                std::process::exit(1);
            }
            Ok(())
        }
    }
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

async fn policy_command(command: PolicyCommand) -> anyhow::Result<()> {
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

/// Runs a `msg` command; false when a verified message was refused.
async fn msg_command(command: MsgCommand) -> anyhow::Result<bool> {
    match command {
        MsgCommand::Sign {
            agent,
            recipient,
            intent,
            ttl,
            client: args,
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
            println!("{}", signed["token"].as_str().unwrap_or_default());
            Ok(true)
        }
        MsgCommand::Verify {
            audience,
            input,
            bundle,
            client: args,
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
            println!("{}", serde_json::to_string_pretty(&outcome)?);
            Ok(outcome["valid"] == json!(true))
        }
    }
}

fn bench_command(command: BenchCommand) -> anyhow::Result<()> {
    let (args, modes, agents) = match &command {
        BenchCommand::Sign {
            bench,
            modes,
            agents,
            ..
        } => {
            let mut modes = modes.clone();
            if *agents > 1 && !modes.iter().any(|m| m == "http-many") {
                modes.push("http-many".into());
            }
            (bench, modes, *agents)
        }
        BenchCommand::Issue { bench, modes } => (bench, modes.clone(), 1),
        BenchCommand::Agents { bench, agents, .. } => (bench, Vec::new(), *agents),
    };
    let json = args.json;
    let print = |results: Vec<keyward::bench::BenchResult>| -> anyhow::Result<()> {
        if json {
            for r in &results {
                println!("{}", serde_json::to_string(r)?);
            }
        } else {
            print!("{}", keyward::bench::table(&results));
        }
        Ok(())
    };
    let mut options = keyward::bench::BenchOptions {
        seconds: args.seconds,
        concurrency: args.concurrency.max(1),
        workers: args
            .workers
            .unwrap_or_else(|| keyward::pool::PoolConfig::default().workers)
            .max(1),
        batch_size: args.batch_size.max(1),
        modes,
        agents: agents.max(1),
        custodial_storage: args.custodial_storage,
        database_url: args.database_url.clone(),
    };
    if let BenchCommand::Sign {
        tpm: Some(tcti), ..
    } = &command
    {
        options.workers = 1;
        options.modes = vec!["tpm-raw".into(), "tpm".into()];
        let threads = args.runtime_threads.unwrap_or_else(default_runtime_threads);
        return print(runtime(threads)?.block_on(keyward::bench::run_tpm(tcti, &options))?);
    }
    let dir = tempfile::tempdir()?;
    let (pkcs11, configured_threads) = match &args.config {
        Some(path) => {
            let config = ConfigFile::load(path)?.validate(&Overrides::default())?;
            let pkcs11 = match config.keys {
                KeysConfig::Pkcs11(p) => p,
                KeysConfig::EmbeddedSoftHsm => keyward::app::embedded::prepare(dir.path())?,
                KeysConfig::Tpm(tpm) => {
                    anyhow::bail!("for a TPM, run bench sign --tpm {}", tpm.tcti)
                }
            };
            (pkcs11, config.runtime_threads)
        }
        None => (
            keyward::app::embedded::prepare(dir.path())?,
            default_runtime_threads(),
        ),
    };
    let rt = runtime(args.runtime_threads.unwrap_or(configured_threads))?;
    let run = rt.block_on(async {
        match &command {
            BenchCommand::Sign { .. } => keyward::bench::run(dir.path(), &pkcs11, &options).await,
            BenchCommand::Issue { .. } => {
                keyward::bench::run_issue(dir.path(), &pkcs11, &options).await
            }
            BenchCommand::Agents { step, .. } => {
                keyward::bench::run_agents(dir.path(), &pkcs11, &options, (*step).max(1)).await
            }
        }
    })?;
    // The runtime first (its tasks hold the server's pool), then the
    // pools' workers: none may still be in SoftHSM2 at exit.
    drop(rt);
    for pool in run.pools {
        pool.join_workers(std::time::Duration::from_secs(5));
    }
    print(run.results)
}

async fn serve(
    mut config: Config,
    pkcs11: KeyStoreConfig,
    insecure_http: Option<std::net::SocketAddr>,
) -> anyhow::Result<keyward::pool::KeyPool> {
    // Bound first, so that with port 0 the certificates' CRL and OCSP
    // pointers name the port actually in use.
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    if config.public_url.is_none() {
        config.public_url = Some(format!("https://{addr}"));
    }
    let status_listener = match config.status_listen {
        Some(status_addr) => {
            let listener = tokio::net::TcpListener::bind(status_addr)
                .await
                .with_context(|| format!("binding {status_addr}"))?;
            if config.status_url.is_none() {
                config.status_url = Some(format!("http://{}", listener.local_addr()?));
            }
            Some(listener)
        }
        None => None,
    };
    let kw = keyward::app::start(&config, &pkcs11).await?;
    if let Some(listener) = status_listener {
        let status_addr = listener.local_addr()?;
        std::fs::write(config.data_dir.join("status.addr"), status_addr.to_string())?;
        let app = keyward::api::status_router(kw.state.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "the status listener stopped");
            }
        });
        tracing::info!(%status_addr, "CRL and OCSP over plain HTTP");
    }
    if let Some(addr) = insecure_http {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let bound = listener.local_addr()?;
        std::fs::write(
            config.data_dir.join("insecure-http.addr"),
            bound.to_string(),
        )?;
        tracing::warn!(%bound, "serving the API over plain HTTP on loopback (--insecure-http)");
        let app = keyward::api::router(kw.state.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "the plain-HTTP listener stopped");
            }
        });
    }
    let listen_file = config.data_dir.join("listen.addr");
    let store_name = kw.state.store.backend_name();
    let ready = move || {
        if let Err(e) = std::fs::write(&listen_file, addr.to_string()) {
            tracing::warn!(error = %e, "writing listen.addr failed");
        }
        tracing::info!(%addr, store = store_name, "keyward listening (HTTPS)");
        println!("keyward listening on https://{addr}");
    };
    keyward::app::serve(listener, &kw, ready, shutdown_signal()).await?;
    Ok(kw.state.pool.clone())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

fn client(args: &ClientArgs) -> anyhow::Result<Client> {
    Client::new(&ClientOptions {
        url: args.url.clone(),
        ca_file: args.ca.clone(),
        token_file: args.token_file.clone(),
        data_dir: args.data_dir.clone(),
        identity: args.cert.clone().zip(args.key.clone()),
    })
}

async fn agent_command(command: AgentCommand) -> anyhow::Result<()> {
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

async fn cert_command(command: CertCommand) -> anyhow::Result<()> {
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
