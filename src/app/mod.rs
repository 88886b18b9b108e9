//! Wiring: key backend -> pool -> store -> CA -> API state, and the HTTPS
//! listener.

pub mod embedded;
pub mod server_identity;

use crate::pki::CertificateText;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use der::Decode;
use der::Encode;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

use crate::agents::cache::AgentCache;
use crate::agents::requests::AgentRequests;
use crate::agents::signing::AgentSigner;
use crate::agents::verification::Verifier;
use crate::agents::Registry;
use crate::api::{self, AdminTokens, AppState};
use crate::app::server_identity::{ServerIdentity, ServerNames};
use crate::attestation::pkcs11::EvidenceSigner;
use crate::audit::AuditEvent;
use crate::config::Config;
use crate::keys::KeyStoreConfig;
use crate::keys::{KeyId, KeyRef, KeyStorage};
use crate::pki::status::StatusPublisher;
use crate::pki::Authority;
use crate::pool::KeyPool;
use crate::revocation::RevocationSet;
use crate::runtime::files::{private_dir, write_private_file};
use crate::runtime::supervisor::Supervisor;
use tower::Layer;

/// How often keys due for a scheduled rotation are looked for.
const SCHEDULED_ROTATION_SWEEP: std::time::Duration = std::time::Duration::from_secs(2);
/// How often retired keys past their retention are looked for.
const RETIRED_KEY_SWEEP: std::time::Duration = std::time::Duration::from_secs(2);
use crate::store::{self, CaRecord, ServiceKeyRecord, SignatureLog, Store, StoreError};
use crate::telemetry::Metrics;

/// Lifetime of the attestation key's certificate.
const SERVICE_CERT_LIFETIME: Duration = Duration::from_secs(365 * 86_400);

/// A started keyward: everything the API needs, and the TLS identity.
pub struct Keyward {
    pub state: Arc<AppState>,
    /// For the operator's commands (admin credentials, CA changes) and the
    /// listener's key; requests reach the store through the domain.
    pub store: Arc<dyn Store>,
    pub authority: Arc<Authority>,
    /// The names the HTTPS listener's certificate carries; its key is made
    /// on the token when `serve` starts (CLI commands start keyward too,
    /// and need none).
    pub server_names: ServerNames,
    /// Every background task, stopped in order by [`Keyward::shutdown`].
    pub tasks: Arc<Supervisor>,
}

/// How long each background task gets to stop before it is aborted.
const TASK_STOP_GRACE: Duration = Duration::from_secs(5);

impl Keyward {
    /// Stops the background tasks, newest first.
    pub async fn shutdown(&self) {
        self.tasks.shutdown(TASK_STOP_GRACE).await;
    }
}

/// Opens the token, starts the pool, opens the database, and makes sure the
/// CA, the attestation key and an admin token exist.
pub async fn start(config: &Config, keys: &KeyStoreConfig) -> anyhow::Result<Keyward> {
    private_dir(&config.data_dir).context("creating the data directory")?;
    let metrics = Metrics::new();
    let backend = keys.open().context("opening the key store")?;
    let mut pool_config = config.pool.clone();
    if let Some(max) = keys.max_workers() {
        pool_config.workers = pool_config.workers.min(max);
    }
    let pool = KeyPool::start(backend, &pool_config, metrics.pool.clone())?;
    let store = store::connect(&config.database_url)
        .await
        .context("opening the database")?;

    let ca_record = match store.active_ca().await? {
        Some(record) => record,
        None => {
            let record = Authority::create_root(&pool, config.ca_validity).await?;
            let audit = AuditEvent::new("keyward", "ca.create", &record.key_id);
            match store.install_ca(&record, false, &audit).await {
                Ok(()) => {
                    tracing::info!(key = %record.key_id, "created a new self-signed CA");
                    record
                }
                Err(StoreError::Conflict(_)) => {
                    // Another replica installed a CA first: use it, drop ours.
                    let _ = pool.destroy(&KeyId::parse(&record.key_id)?).await;
                    store
                        .active_ca()
                        .await?
                        .context("the winning CA disappeared")?
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    let authority = Arc::new(
        Authority::load(
            pool.clone(),
            crate::store::CertificateLog::start(store.clone(), &config.database_url)?,
            &ca_record,
            config.trust_domain.clone(),
            config.ttl,
        )
        .await
        .context("loading the CA")?
        .with_public_url(
            config
                .status_url
                .clone()
                .or_else(|| config.public_url.clone()),
        )
        .with_previous(&previous_cas(store.as_ref(), config).await?)
        .await
        .context("loading the previous CAs")?,
    );
    let evidence_signer =
        ensure_service_key(&pool, store.as_ref(), &authority, ServiceKey::Attestation).await?;
    let ocsp_responder = {
        let key = ensure_service_key(&pool, store.as_ref(), &authority, ServiceKey::OcspResponder)
            .await?
            .key;
        let public_key = pool.public_key(&key).await?;
        crate::pki::responder::OcspResponder::new(key, public_key)
    };
    let audit_log = {
        let key = ensure_service_key(&pool, store.as_ref(), &authority, ServiceKey::AuditLog)
            .await?
            .key;
        let public_key = pool.public_key(&key).await?;
        Arc::new(crate::transparency::AuditLog::new(
            store.clone(),
            pool.clone(),
            key,
            public_key,
            config.audit.origin.clone(),
            metrics.audit.clone(),
        ))
    };
    let admin_tokens = ensure_admin_token(store.as_ref(), &config.data_dir).await?;
    write_trust_anchor(&config.data_dir, &authority)?;

    let tasks = Arc::new(Supervisor::new());
    let agent_cache = Arc::new(AgentCache::default());
    let revocations = RevocationSet::load(store.clone(), metrics.revocation.clone())
        .await
        .context("loading the revocation set")?;
    revocations.watch(&tasks, &config.database_url);
    check_custodial_storage(&pool, config.custodial_storage).await?;
    let registry = Arc::new(
        Registry::new(
            pool.clone(),
            store.clone(),
            authority.clone(),
            evidence_signer,
            agent_cache.clone(),
            revocations.clone(),
            config.custodial_storage,
        )
        .with_orphan_key_grace(config.orphan_key_grace),
    );
    let signature_log = SignatureLog::start(&config.database_url)
        .await
        .context("starting the signature log")?;
    let signer = Arc::new(AgentSigner::new(
        pool.clone(),
        store.clone(),
        authority.clone(),
        signature_log,
        agent_cache,
        revocations.clone(),
    ));
    let verifier = Arc::new(Verifier::new(store.clone(), authority.clone()));
    let status = Arc::new(StatusPublisher::new(
        authority.clone(),
        store.clone(),
        revocations.clone(),
        ocsp_responder,
    ));
    tasks.every(
        "destroying retired keys",
        RETIRED_KEY_SWEEP,
        &registry,
        |registry| async move { registry.destroy_retired_keys().await },
    );
    // A day past expiry a challenge can only be refused as unknown (stale)
    // instead of expired: the difference no longer matters to anyone.
    tasks.every(
        "deleting expired TPM challenges",
        RETIRED_KEY_SWEEP,
        &store,
        |store| async move {
            let day_ago = time::OffsetDateTime::now_utc().unix_timestamp() - 86_400;
            store.delete_expired_tpm_challenges(day_ago).await
        },
    );
    // Twice per grace period, so a key goes between one and one and a half
    // periods after it was first found unowned.
    tasks.every(
        "looking for keys no agent owns",
        (config.orphan_key_grace / 2).max(std::time::Duration::from_secs(1)),
        &registry,
        |registry| async move { registry.destroy_orphan_keys().await },
    );
    // With the custodial-key janitor's cadence, which tests can shorten.
    let listener_keys = pool.clone();
    tasks.every(
        "looking for TLS keys of listeners that did not shut down",
        (config.orphan_key_grace / 2).max(std::time::Duration::from_secs(1)),
        &store,
        move |store| {
            let pool = listener_keys.clone();
            async move {
                crate::app::server_identity::destroy_stale_listener_keys(&pool, store.as_ref())
                    .await
            }
        },
    );
    let sealing = audit_log.clone();
    let (seal_every, check_every) = (
        config.audit.checkpoint_interval,
        config.audit.self_check_interval,
    );
    tasks.spawn("sealing audit checkpoints", move |stop| {
        sealing.run(seal_every, check_every, stop)
    });
    let hooks = crate::revocation::hooks::Deliverer::new(
        store.clone(),
        config.hook_allowed_hosts.clone(),
        metrics.hooks.clone(),
    )
    .context("building the hook client")?;
    hooks.start(&tasks);
    let policy = crate::policy::engine::PolicyEngine::load(store.clone(), metrics.policy.clone())
        .await
        .context("loading the policy")?;
    policy.watch(&tasks);
    let scheduled = Arc::downgrade(&policy);
    tasks.every(
        "scheduled key rotation",
        SCHEDULED_ROTATION_SWEEP,
        &registry,
        move |registry| {
            let policy = scheduled.upgrade();
            async move {
                match policy {
                    Some(policy) => registry.rotate_due_keys(&policy).await,
                    None => Ok(0),
                }
            }
        },
    );
    let ek_roots = match &config.tpm_ek_roots {
        Some(dir) => {
            let roots = crate::attestation::tpm::ek::EkRoots::load_dir(dir).map_err(|e| {
                anyhow::anyhow!("[attestation.tpm] ek_roots {}: {e}", dir.display())
            })?;
            anyhow::ensure!(
                roots.anchor_count() > 0,
                "[attestation.tpm] ek_roots {} holds no self-signed root certificate",
                dir.display()
            );
            tracing::info!(dir = %dir.display(), roots = roots.anchor_count(), "TPM EK roots loaded");
            roots
        }
        None => crate::attestation::tpm::ek::EkRoots::from_certificates(Vec::new()),
    };
    let ek_allowlist = match &config.tpm_ek_allowlist {
        Some(file) => {
            let list = crate::attestation::tpm::allowlist::EkAllowList::load(file)
                .map_err(|e| anyhow::anyhow!("[attestation.tpm] ek_allowlist: {e}"))?;
            tracing::info!(file = %file.display(), eks = list.len(), "TPM EK allow-list loaded");
            list
        }
        None => Default::default(),
    };
    let tpm = Arc::new(crate::attestation::tpm::TpmVerifier::new(
        ek_roots,
        ek_allowlist,
        config.tpm_challenge_ttl,
    ));
    let detector = Arc::new(crate::detect::Detector::new(
        store.clone(),
        policy.clone(),
        registry.clone(),
        metrics.detect.clone(),
    ));
    tasks.every(
        "forgetting old credential sightings",
        std::time::Duration::from_secs(60),
        &detector,
        |detector| async move { detector.prune().await },
    );
    let approvals = Arc::new(crate::approvals::Approvals::new(store.clone()));
    let requests = Arc::new(AgentRequests::new(
        registry.clone(),
        signer,
        policy.clone(),
        approvals.clone(),
        store.clone(),
        tpm,
    ));
    let state = Arc::new(AppState {
        registry,
        requests,
        verifier,
        status,
        hooks,
        policy,
        approvals,
        pool,
        admin_tokens,
        admin_token_enabled: config.admin_token_enabled,
        metrics,
        audit_log,
        detector,
        trusted_proxies: config.trusted_proxies.clone(),
    });
    Ok(Keyward {
        state,
        store,
        authority,
        server_names: ServerNames::for_config(config),
        tasks,
    })
}

/// Fails at start, not at the first registration, when the token cannot
/// keep custodial keys as configured (no wrapping key, or one that could let
/// keys out): a key is generated (the backend refuses one whose attributes
/// are wrong) and let go of.
async fn check_custodial_storage(pool: &KeyPool, storage: KeyStorage) -> anyhow::Result<()> {
    if storage == KeyStorage::Token {
        return Ok(());
    }
    let probe = KeyId::random("probe");
    let generated = pool
        .generate_custodial(&probe, storage)
        .await
        .with_context(|| format!("custodial_storage = \"{}\"", storage.as_str()))?;
    if let Some(blob) = generated.wrapped {
        let key = KeyRef::Wrapped {
            id: probe,
            blob: blob.into(),
            public_key: generated.public_key,
        };
        pool.destroy_custodial(&key).await?;
    }
    Ok(())
}

/// The keys keyward signs its own statements with, one per purpose, shared
/// by every replica.
#[derive(Clone, Copy)]
enum ServiceKey {
    /// Attestation evidence (`pkcs11-key-attributes` statements).
    Attestation,
    /// OCSP answers: the delegated responder (`pki::responder`).
    OcspResponder,
    /// The audit log's checkpoints (`transparency`).
    AuditLog,
}

impl ServiceKey {
    fn purpose(self) -> &'static str {
        match self {
            ServiceKey::Attestation => "attestation",
            ServiceKey::OcspResponder => "ocsp-responder",
            ServiceKey::AuditLog => "audit",
        }
    }

    /// The certificate recorded with a new key. The responder's is its
    /// first day-long certificate from the active CA: the responder renews
    /// its own, per CA, as it answers.
    async fn certify(
        self,
        authority: &Authority,
        public_key: &p256::PublicKey,
    ) -> Result<crate::pki::cert::Certificate, crate::pki::CaError> {
        match self {
            ServiceKey::Attestation | ServiceKey::AuditLog => {
                authority
                    .issue_service_certificate(self.purpose(), public_key, SERVICE_CERT_LIFETIME)
                    .await
            }
            ServiceKey::OcspResponder => {
                authority
                    .issue_ocsp_responder_certificate(
                        authority.key_id(),
                        public_key,
                        crate::pki::responder::RESPONDER_CERT_LIFETIME,
                    )
                    .await
            }
        }
    }
}

/// The service key for `which`, generated on the token (and certified) by
/// the first replica to need it.
async fn ensure_service_key(
    pool: &KeyPool,
    store: &dyn Store,
    authority: &Authority,
    which: ServiceKey,
) -> anyhow::Result<EvidenceSigner> {
    let purpose = which.purpose();
    if let Some(record) = store.service_key(purpose).await? {
        return Ok(EvidenceSigner {
            key: KeyId::parse(&record.key_id)?,
            certificate_der: record.cert_der,
        });
    }
    let key = KeyId::random(purpose);
    let public_key = pool.generate(&key).await?;
    let cert = which.certify(authority, &public_key).await?;
    let record = ServiceKeyRecord {
        purpose: purpose.into(),
        key_id: key.to_string(),
        cert_der: cert.to_der()?,
        created_at: time::OffsetDateTime::now_utc().unix_timestamp(),
    };
    let audit =
        AuditEvent::new("keyward", "service_key.create", purpose).with("key_id", key.to_string());
    match store.insert_service_key(&record, &audit).await {
        Ok(()) => Ok(EvidenceSigner {
            key,
            certificate_der: record.cert_der,
        }),
        Err(StoreError::Conflict(_)) => {
            let _ = pool.destroy(&key).await;
            let record = store
                .service_key(purpose)
                .await?
                .context("service key vanished")?;
            Ok(EvidenceSigner {
                key: KeyId::parse(&record.key_id)?,
                certificate_der: record.cert_der,
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// Refuses to start on a data directory, or a SQLite database, that group
/// or others can read: an existing one is not re-permissioned behind the
/// operator's back, but it is not used either. The CLI calls it for every
/// command that opens keyward's state, before the embedded token is
/// prepared in the directory.
pub fn refuse_shared_data(config: &Config) -> anyhow::Result<()> {
    let mut paths = vec![config.data_dir.clone()];
    if let Some(db) = sqlite_path(&config.database_url) {
        for suffix in ["", "-wal", "-shm"] {
            let mut name = db.clone().into_os_string();
            name.push(suffix);
            paths.push(name.into());
        }
    }
    for path in paths {
        if let Some(problem) = crate::runtime::files::shared_with_others(&path)
            .with_context(|| format!("checking {}", path.display()))?
        {
            anyhow::bail!("refusing to start: {problem}");
        }
    }
    Ok(())
}

/// The file a `sqlite:` database URL names, if it names one.
fn sqlite_path(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    (!path.is_empty() && path != ":memory:").then(|| PathBuf::from(path))
}

/// The admin the bootstrap token (`<data-dir>/admin.token`) belongs to.
pub const BOOTSTRAP_ADMIN: &str = "admin";

/// On first start, creates a random admin token for the bootstrap admin,
/// stores its hash and writes the token to `<data-dir>/admin.token` (0600).
/// Later starts reuse it.
async fn ensure_admin_token(store: &dyn Store, data_dir: &Path) -> anyhow::Result<AdminTokens> {
    let path = data_dir.join("admin.token");
    if !path.exists() {
        let token = new_admin_token();
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let audit = AuditEvent::new("keyward", "admin_token.create", BOOTSTRAP_ADMIN)
            .with("token_sha256_prefix", hex::encode(&hash[..4]));
        store
            .insert_admin_token(&hash, BOOTSTRAP_ADMIN, &audit)
            .await?;
        write_private_file(&path, token.as_bytes()).context("writing admin.token")?;
    } else {
        let token = crate::config::read_secret_file(&path)?;
        let hash: [u8; 32] =
            Sha256::digest(secrecy::ExposeSecret::expose_secret(&token).as_bytes()).into();
        let known = store.admin_tokens().await?;
        if !known.iter().any(|(stored, _)| *stored == hash) {
            // The file is the operator's; a fresh database learns its hash.
            let audit = AuditEvent::new("keyward", "admin_token.import", BOOTSTRAP_ADMIN)
                .with("token_sha256_prefix", hex::encode(&hash[..4]));
            store
                .insert_admin_token(&hash, BOOTSTRAP_ADMIN, &audit)
                .await?;
        }
    }
    admin_tokens(store).await
}

/// The admin tokens the API accepts, each with its admin's name.
async fn admin_tokens(store: &dyn Store) -> anyhow::Result<AdminTokens> {
    let tokens = store
        .admin_tokens()
        .await?
        .into_iter()
        .map(|(hash, name)| {
            let name = crate::identity::AgentName::parse(&name)
                .with_context(|| format!("stored admin name {name:?} is not a valid name"))?;
            Ok((hash, name))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(AdminTokens::new(tokens))
}

fn new_admin_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("kwa_{}", hex::encode(bytes))
}

/// The CAs replaced recently enough that certificates they issued may still
/// be valid: retired within the longest certificate lifetime (plus the
/// backdating of notBefore).
async fn previous_cas(store: &dyn Store, config: &Config) -> anyhow::Result<Vec<CaRecord>> {
    let overlap = config.ttl.max + crate::pki::profile::BACKDATE + Duration::from_secs(60);
    let since = time::OffsetDateTime::now_utc().unix_timestamp() - overlap.as_secs() as i64;
    Ok(store.previous_cas(since).await?)
}

/// `keyward admin token-create --name NAME`: an admin credential that
/// belongs to the admin `name`. The two-person rule counts names, so each
/// person needs a name of their own; one person's token and certificate
/// (same name) are one admin. Written to `out` (0600); only its hash is
/// stored. Running servers accept it after a restart.
pub async fn admin_token_create(
    keyward: &Keyward,
    name: &crate::identity::AgentName,
    out: &Path,
) -> anyhow::Result<String> {
    let token = new_admin_token();
    let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    let id = hex::encode(&hash[..4]);
    let audit = AuditEvent::new("operator", "admin_token.create", name.as_str())
        .with("token_sha256_prefix", id.clone());
    keyward
        .store
        .insert_admin_token(&hash, name.as_str(), &audit)
        .await?;
    write_private_file(out, token.as_bytes()).context("writing the admin token")?;
    Ok(id)
}

/// `keyward admin cert-issue`: an admin's client certificate for a key the
/// CLI makes here (`<out>/key.pem`, 0600; `<out>/cert.pem`).
pub async fn admin_cert_issue(
    keyward: &Keyward,
    name: &crate::identity::AgentName,
    lifetime: Duration,
    out: &Path,
) -> anyhow::Result<String> {
    use p256::pkcs8::{EncodePrivateKey, LineEnding};
    let secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
    let issued = keyward
        .authority
        .issue_admin_certificate(name, &secret.public_key(), lifetime)
        .await?;
    std::fs::create_dir_all(out)?;
    write_private_file(
        &out.join("key.pem"),
        secret.to_pkcs8_pem(LineEnding::LF)?.as_bytes(),
    )?;
    std::fs::write(out.join("cert.pem"), issued.pem.as_bytes())?;
    let audit = AuditEvent::new("operator", "admin_cert.issue", name.as_str())
        .with("serial", issued.serial.clone())
        .with("not_after", issued.not_after);
    keyward.store.append_audit_event(&audit).await?;
    Ok(issued.serial)
}

/// `keyward ca rotate`: a new self-signed root on the token becomes the
/// issuing CA; the current one stays trusted, and answers OCSP, for what it
/// issued until that has expired. Replicas pick it up when restarted.
pub async fn ca_rotate(keyward: &Keyward, config: &Config) -> anyhow::Result<String> {
    let record = Authority::create_root(&keyward.state.pool, config.ca_validity).await?;
    let audit = AuditEvent::new("operator", "ca.rotate", &record.key_id)
        .with("previous_key_id", keyward.authority.key_id().to_string());
    keyward.store.install_ca(&record, true, &audit).await?;
    // ca.pem gains the new root now, so clients can trust both before the
    // restart that makes the new CA active.
    let mut bundle = keyward.authority.trust_bundle_pem()?;
    bundle.push_str(&crate::pki::Certificate::from_der(&record.cert_der)?.to_pem_string()?);
    let path = config.data_dir.join("ca.pem");
    let tmp = config.data_dir.join("ca.pem.tmp");
    std::fs::write(&tmp, bundle.as_bytes())?;
    std::fs::rename(&tmp, &path)?;
    Ok(record.key_id)
}

/// Writes the root of trust to `<data-dir>/ca.pem` for clients.
fn write_trust_anchor(data_dir: &Path, authority: &Authority) -> anyhow::Result<()> {
    // Every root in use: during a CA rotation's overlap, old and new.
    let pem = authority.trust_bundle_pem()?;
    let path = data_dir.join("ca.pem");
    let tmp = data_dir.join("ca.pem.tmp");
    std::fs::write(&tmp, pem.as_bytes())?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

/// Serves the API over TLS on `listener` until `shutdown` completes.
/// `ready` runs once the listener's key and certificate exist, just before
/// the first connection is accepted.
pub async fn serve(
    listener: TcpListener,
    keyward: &Keyward,
    ready: impl FnOnce(),
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let identity = Arc::new(
        ServerIdentity::issue(
            &keyward.state.pool,
            keyward.store.clone(),
            &keyward.authority,
            keyward.server_names.clone(),
        )
        .await
        .context("the HTTPS listener's key and certificate")?,
    );
    let acceptor =
        tokio_rustls::TlsAcceptor::from(identity.rustls_config(&keyward.authority.roots())?);
    let identify = api::extract::ClientIdentifier::new(&keyward.authority);
    let app = api::router(
        keyward.state.clone(),
        crate::console::router(keyward.store.clone()),
    );
    let renewing = identity.clone();
    let authority = keyward.authority.clone();
    keyward
        .tasks
        .spawn("listener certificate renewal", move |mut stop| async move {
            tokio::select! {
                _ = stop.stopped() => {}
                _ = renewing.renew_forever(authority) => {}
            }
        });
    ready();
    tokio::pin!(shutdown);
    loop {
        let (tcp, client_address) = tokio::select! {
            _ = &mut shutdown => {
                identity.retire().await;
                return Ok(());
            }
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        let identify = identify.clone();
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
            // The client certificate names the caller for the whole
            // connection: checked once here, not on every request.
            let peer = identify.identify(tls.get_ref().1.peer_certificates());
            let service = TowerToHyperService::new(
                axum::Extension(crate::api::ClientAddress(client_address))
                    .layer(axum::Extension(peer).layer(app)),
            );
            if let Err(e) = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .await
            {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
}

/// `keyward ca csr`: a PKCS#10 request for the CA key.
pub async fn ca_csr(keyward: &Keyward) -> anyhow::Result<String> {
    Ok(keyward.authority.certificate_request().await?)
}

/// `keyward ca import`: makes an externally signed certificate for the CA
/// key the issuing certificate.
pub async fn ca_import(
    keyward: &Keyward,
    config: &Config,
    cert_pem: &str,
    chain_pem: &str,
) -> anyhow::Result<()> {
    let record = keyward.authority.import_signed(cert_pem, chain_pem)?;
    let cert = crate::pki::Certificate::from_der(&record.cert_der)?;
    let audit = AuditEvent::new("operator", "ca.import", &record.key_id)
        .with("subject", cert.tbs_certificate.subject.to_string());
    keyward.store.install_ca(&record, true, &audit).await?;
    let root = crate::pki::parse_pem_chain(&record.chain_pem)?
        .last()
        .context("empty chain")?
        .to_pem_string()?;
    std::fs::write(config.data_dir.join("ca.pem"), root)?;
    Ok(())
}
