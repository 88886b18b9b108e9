//! `keyward bench sign|issue|agents`: the command line; the measurements
//! are in `measure`.

mod measure;

use std::path::PathBuf;

use clap::{Args, Subcommand};
use keyward::config::{default_runtime_threads, ConfigFile, KeysConfig, Overrides};

use super::serve::runtime;

#[derive(Subcommand)]
pub(crate) enum BenchCommand {
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
pub(crate) struct BenchArgs {
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
    /// A policy file (as `keyward policy apply`) the server runs under
    /// while measuring: to compare, in one binary, what a policy's
    /// settings cost (say, `[anomaly]` detectors on and off).
    #[arg(long)]
    policy: Option<PathBuf>,
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
    /// Export the server's spans over OTLP/HTTP to this collector base URL
    /// (as `serve --otlp-endpoint`), to measure what tracing costs; no
    /// log lines either way.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
}

fn parse_custodial_storage(text: &str) -> Result<keyward::keys::KeyStorage, String> {
    match text {
        "token" => Ok(keyward::keys::KeyStorage::Token),
        "wrapped" => Ok(keyward::keys::KeyStorage::Wrapped),
        _ => Err("token or wrapped".into()),
    }
}

pub(crate) fn bench_command(command: BenchCommand) -> anyhow::Result<()> {
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
    if let Some(endpoint) = &args.otlp_endpoint {
        keyward::telemetry::traces::install_alone(endpoint)?;
    }
    let json = args.json;
    let print = |results: Vec<measure::BenchResult>| -> anyhow::Result<()> {
        if json {
            let mut lines = String::new();
            for r in &results {
                lines += &(serde_json::to_string(r)? + "\n");
            }
            super::output::emit(&lines)
        } else {
            super::output::emit(&measure::table(&results))
        }
    };
    let mut options = measure::BenchOptions {
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
        policy: args
            .policy
            .as_ref()
            .map(|path| {
                std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("reading the policy {}: {e}", path.display()))
            })
            .transpose()?,
    };
    if let BenchCommand::Sign {
        tpm: Some(tcti), ..
    } = &command
    {
        options.workers = 1;
        options.modes = vec!["tpm-raw".into(), "tpm".into()];
        let threads = args.runtime_threads.unwrap_or_else(default_runtime_threads);
        return print(runtime(threads)?.block_on(measure::run_tpm(tcti, &options))?);
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
            BenchCommand::Sign { .. } => measure::run(dir.path(), &pkcs11, &options).await,
            BenchCommand::Issue { .. } => measure::run_issue(dir.path(), &pkcs11, &options).await,
            BenchCommand::Agents { step, .. } => {
                measure::run_agents(dir.path(), &pkcs11, &options, (*step).max(1)).await
            }
        }
    })?;
    // The runtime first (its tasks hold the server's pool), then the
    // pools' workers: none may still be in SoftHSM2 at exit.
    drop(rt);
    for pool in run.pools {
        pool.join_workers(std::time::Duration::from_secs(5));
    }
    keyward::telemetry::traces::shutdown();
    print(run.results)
}
