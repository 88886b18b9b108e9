//! The command line: the clap definitions of every subcommand, one module
//! per command family, and the dispatch from a parsed command to its code.

mod admin;
mod agent;
mod audit;
mod bench;
mod detect;
mod msg;
mod output;
mod policy;
mod serve;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use keyward::client::{Client, ClientOptions};

use admin::{AdminCommand, ApprovalsCommand, CaCommand, KeysCommand, RevokeCommand};
use agent::{AgentCommand, CertCommand};
use audit::AuditCommand;
use bench::BenchCommand;
use detect::{AnomaliesCommand, KpisArgs};
use msg::MsgCommand;
use policy::PolicyCommand;
use serve::{cli_runtime, ServerArgs};

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
    /// The audit log: a transparency log anyone can verify.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// What anomaly detection found (docs/observability.md).
    #[command(subcommand)]
    Anomalies(AnomaliesCommand),
    /// The mission's KPIs: mean time to detect and to revoke, the
    /// policy-compliant ratio.
    Kpis(KpisArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// The key store (run on the keyward host, against its config).
    #[command(subcommand)]
    Keys(KeysCommand),
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

/// Parses the command line and runs the command.
pub(crate) fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve::serve_command(&args),
        Command::Init(args) => serve::init(&args),
        Command::Agent(command) => cli_runtime()?.block_on(agent::agent_command(command)),
        Command::Cert(command) => cli_runtime()?.block_on(agent::cert_command(command)),
        Command::Ca(command) => admin::ca_command(command),
        Command::Admin(command) => admin::admin_command(command),
        Command::Revoke(command) => cli_runtime()?.block_on(admin::revoke_command(command)),
        Command::Approvals(command) => cli_runtime()?.block_on(admin::approvals_command(command)),
        Command::Policy(command) => cli_runtime()?.block_on(policy::policy_command(command)),
        Command::Msg(command) => msg::msg(command),
        Command::Audit(command) => audit::audit_command(command),
        Command::Anomalies(command) => cli_runtime()?.block_on(detect::anomalies_command(command)),
        Command::Kpis(args) => cli_runtime()?.block_on(detect::kpis_command(args)),
        Command::Bench(command) => bench::bench_command(command),
        Command::Keys(command) => admin::keys_command(command),
    }
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
