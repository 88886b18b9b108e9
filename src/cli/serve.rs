//! `keyward serve` and `keyward init`, and what every command that runs
//! against keyward's own state (not a server) shares: the config, the key
//! store, a started keyward, and the runtimes.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use keyward::config::{default_runtime_threads, Config, ConfigFile, KeysConfig, Overrides};
use keyward::keys::KeyStoreConfig;

#[derive(Args, Clone)]
pub(crate) struct ServerArgs {
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
    pub(crate) log_json: bool,
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
    /// Export traces over OTLP/HTTP to this collector base URL (spans go
    /// to <URL>/v1/traces), e.g. http://127.0.0.1:4318 ([telemetry]
    /// otlp_endpoint). Default: no traces.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
}

pub(crate) fn load_config(args: &ServerArgs) -> anyhow::Result<Config> {
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
        otlp_endpoint: args.otlp_endpoint.clone(),
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
    let config = load_config(args)?;
    keyward::telemetry::init_logging(args.log_json, config.otlp_endpoint.as_deref())?;
    // Before the embedded token is prepared in it.
    keyward::app::refuse_shared_data(&config)?;
    let keys = key_store(&config)?;
    let rt = runtime(config.runtime_threads)?;
    Ok((config, keys, rt))
}

/// Runs `work` against a started keyward (no listener), then ends in
/// order: the runtime first (its tasks hold pool handles), then the pool's
/// workers, before the process exits. See `KeyPool::join_workers`.
pub(crate) fn with_keyward<F, Fut>(args: &ServerArgs, work: F) -> anyhow::Result<()>
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
pub(crate) fn cli_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    runtime(default_runtime_threads())
}

pub(crate) fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?)
}

/// `keyward serve`.
pub(crate) fn serve_command(args: &ServerArgs) -> anyhow::Result<()> {
    if let Some(addr) = args.insecure_http {
        anyhow::ensure!(
            addr.ip().is_loopback(),
            "--insecure-http must be a loopback address, not {addr}"
        );
    }
    let (config, keys, rt) = local(args)?;
    let pool = rt.block_on(serve(config, keys, args.insecure_http))?;
    drop(rt);
    pool.join_workers(std::time::Duration::from_secs(5));
    // The last spans, those of the requests served before the stop.
    keyward::telemetry::traces::shutdown();
    Ok(())
}

/// `keyward init`.
pub(crate) fn init(args: &ServerArgs) -> anyhow::Result<()> {
    with_keyward(args, |_kw, config| async move {
        println!("initialized {}", config.data_dir.display());
        Ok(())
    })
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
        kw.tasks
            .spawn("status listener", move |mut stop| async move {
                let stopping = async move { stop.stopped().await };
                if let Err(e) = axum::serve(listener, app)
                    .with_graceful_shutdown(stopping)
                    .await
                {
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
        // No console here: its cookie is Secure, and its pages are for
        // the HTTPS listener only.
        let app = keyward::api::router(kw.state.clone(), axum::Router::new());
        kw.tasks
            .spawn("plain-HTTP listener", move |mut stop| async move {
                let stopping = async move { stop.stopped().await };
                if let Err(e) = axum::serve(listener, app)
                    .with_graceful_shutdown(stopping)
                    .await
                {
                    tracing::error!(error = %e, "the plain-HTTP listener stopped");
                }
            });
    }
    let listen_file = config.data_dir.join("listen.addr");
    let store_name = kw.store.backend_name();
    let ready = move || {
        if let Err(e) = std::fs::write(&listen_file, addr.to_string()) {
            tracing::warn!(error = %e, "writing listen.addr failed");
        }
        tracing::info!(%addr, store = store_name, "keyward listening (HTTPS)");
        println!("keyward listening on https://{addr}");
    };
    let shutdown = shutdown_signal()?;
    keyward::app::serve(listener, &kw, ready, shutdown).await?;
    kw.shutdown().await;
    Ok(kw.state.pool.clone())
}

/// Resolves on Ctrl-C or SIGTERM. The handlers are installed here, before
/// keyward says it is listening: a SIGTERM that arrives between that line
/// and the first poll of the returned future must not kill the process by
/// the signal's default action, skipping the shutdown.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
    })
}
