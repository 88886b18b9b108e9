//! The HTTPS listener's identity: a P-256 key generated on the token (a
//! sign-only, non-extractable token object like every key of keyward's),
//! certified by keyward's CA for a day and replaced at half-life. TLS
//! handshakes sign through the key pool, so no private key of keyward's
//! lives in process memory.
//!
//! rustls asks for the handshake signature synchronously, from inside the
//! connection's task. The signer moves that task's runtime thread out of
//! the runtime (`block_in_place`) while the pool signs: the runtime keeps
//! serving every other connection on a thread it starts in its place, and
//! the pool's answer, which a task on the runtime hands out, still arrives.
//!
//! Each listener has keys of its own, named `tls-<unix seconds>-<random>`:
//! replicas never share one, and a key outlives its process only if the
//! process dies without shutting down (`is_stale` tells those apart by
//! age, for the janitor).

use crate::pki::CertificateText;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use der::Encode;
use rustls::pki_types::CertificateDer;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::audit::AuditEvent;
use crate::config::Config;
use crate::keys::KeyId;
use crate::pki::Authority;
use crate::pool::KeyPool;
use crate::store::Store;

/// Lifetime of the listener's certificate; key and certificate are
/// replaced at half-life.
pub const SERVER_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// A replaced key is destroyed this long after its successor took over, so
/// that handshakes already holding it finish.
const REPLACED_KEY_GRACE: Duration = Duration::from_secs(60);

/// Prefix of the listeners' key ids.
pub const TLS_KEY_PREFIX: &str = "tls-";

/// A listener's key no live process can still hold: older than two
/// certificate lifetimes (a live listener replaces its key at half of one).
pub fn is_stale(key: &str, now: SystemTime) -> bool {
    let Some(created) = key
        .strip_prefix(TLS_KEY_PREFIX)
        .and_then(|rest| rest.split('-').next())
        .and_then(|seconds| seconds.parse::<u64>().ok())
    else {
        return false;
    };
    let created = UNIX_EPOCH + Duration::from_secs(created);
    now.duration_since(created)
        .is_ok_and(|age| age > 2 * SERVER_CERT_LIFETIME)
}

/// The names the listener's certificate carries.
#[derive(Clone, Debug)]
pub struct ServerNames {
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
}

impl ServerNames {
    /// The loopback addresses, the listen address and the configured DNS
    /// names. Not `localhost`: a single-label name is not a valid dNSName
    /// for pkilint (RFC 1034 preferred syntax as the CA/Browser Forum reads
    /// it), and keyward's clients reach it by address; an operator who wants
    /// it lists it in `[server] dns_names`.
    pub fn for_config(config: &Config) -> Self {
        let dns_names = config.server_dns_names.clone();
        let mut ips = vec![
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ];
        let listen_ip = config.listen.ip();
        if !listen_ip.is_unspecified() && !ips.contains(&listen_ip) {
            ips.push(listen_ip);
        }
        Self { dns_names, ips }
    }
}

pub struct ServerIdentity {
    pool: KeyPool,
    /// Where each key's creation and destruction is audited.
    store: Arc<dyn Store>,
    names: ServerNames,
    current: RwLock<Arc<CertifiedKey>>,
    /// The key behind `current`, destroyed when it is replaced or the
    /// listener stops.
    current_key: Mutex<KeyId>,
}

impl std::fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerIdentity")
            .field("names", &self.names)
            .finish()
    }
}

impl ServerIdentity {
    /// Generates the first key on the token and has it certified.
    pub async fn issue(
        pool: &KeyPool,
        store: Arc<dyn Store>,
        authority: &Authority,
        names: ServerNames,
    ) -> anyhow::Result<Self> {
        let (key, certified) = certified_key(pool, store.as_ref(), authority, &names).await?;
        Ok(Self {
            pool: pool.clone(),
            store,
            names,
            current: RwLock::new(certified),
            current_key: Mutex::new(key),
        })
    }

    /// Replaces key and certificate at half-life; runs until aborted.
    pub async fn renew_forever(self: Arc<Self>, authority: Arc<Authority>) {
        loop {
            tokio::time::sleep(SERVER_CERT_LIFETIME / 2).await;
            match certified_key(&self.pool, self.store.as_ref(), &authority, &self.names).await {
                Ok((key, certified)) => {
                    *self.current.write().unwrap_or_else(|p| p.into_inner()) = certified;
                    let replaced = std::mem::replace(
                        &mut *self.current_key.lock().unwrap_or_else(|p| p.into_inner()),
                        key,
                    );
                    let (pool, store) = (self.pool.clone(), self.store.clone());
                    tokio::spawn(async move {
                        tokio::time::sleep(REPLACED_KEY_GRACE).await;
                        destroy(&pool, store.as_ref(), &replaced).await;
                    });
                }
                Err(e) => tracing::error!(error = %e, "renewing the server certificate failed"),
            }
        }
    }

    /// Destroys the current key: the listener has stopped.
    pub async fn retire(&self) {
        let key = self
            .current_key
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        destroy(&self.pool, self.store.as_ref(), &key).await;
    }

    /// TLS with an optional client certificate: one that is presented must
    /// chain to one of `roots` (keyward's CAs), or the handshake fails;
    /// which agent it names is decided per connection by
    /// `api::extract::identify_client`.
    pub fn rustls_config(
        self: &Arc<Self>,
        roots: &[crate::pki::Certificate],
    ) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut trusted = rustls::RootCertStore::empty();
        for root in roots {
            trusted.add(CertificateDer::from(root.to_der()?))?;
        }
        let clients = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(trusted),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(clients)
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

impl ResolvesServerCert for ServerIdentity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

async fn destroy(pool: &KeyPool, store: &dyn Store, key: &KeyId) {
    if let Err(e) = pool.destroy(key).await {
        tracing::warn!(error = %e, key = %key, "destroying a server TLS key failed");
        return;
    }
    let audit = AuditEvent::new("keyward", "server_key.destroy", key.as_str());
    if let Err(e) = store.append_audit_event(&audit).await {
        tracing::warn!(error = %e, key = %key, "auditing a server TLS key's destruction failed");
    }
}

/// A new key on the token and its certificate, with the chain up to the root.
async fn certified_key(
    pool: &KeyPool,
    store: &dyn Store,
    authority: &Authority,
    names: &ServerNames,
) -> anyhow::Result<(KeyId, Arc<CertifiedKey>)> {
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let key = KeyId::random(&format!("{TLS_KEY_PREFIX}{created}"));
    let public_key = pool.generate(&key).await?;
    let certificate = authority
        .issue_server_certificate(
            &public_key,
            &names.dns_names,
            &names.ips,
            SERVER_CERT_LIFETIME,
        )
        .await;
    let certificate = match certificate {
        Ok(certificate) => certificate,
        Err(e) => {
            destroy(pool, store, &key).await;
            return Err(e.into());
        }
    };
    let audit = AuditEvent::new("keyward", "server_key.create", key.as_str())
        .with("serial", certificate.serial_hex());
    store.append_audit_event(&audit).await?;
    let mut chain = vec![CertificateDer::from(certificate.to_der()?)];
    for c in crate::pki::parse_pem_chain(authority.chain_pem())? {
        chain.push(CertificateDer::from(c.to_der()?));
    }
    let signer = Arc::new(TokenSigningKey {
        pool: pool.clone(),
        key: key.clone(),
        runtime: tokio::runtime::Handle::current(),
    });
    Ok((key, Arc::new(CertifiedKey::new(chain, signer))))
}

/// A rustls signing key that is a key on the token, used through the pool.
#[derive(Clone)]
struct TokenSigningKey {
    pool: KeyPool,
    key: KeyId,
    /// The runtime the pool's answers are handed out on.
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for TokenSigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigningKey")
            .field("key", &self.key)
            .finish()
    }
}

impl SigningKey for TokenSigningKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        offered
            .contains(&SignatureScheme::ECDSA_NISTP256_SHA256)
            .then(|| Box::new(self.clone()) as Box<dyn Signer>)
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::ECDSA
    }
}

impl Signer for TokenSigningKey {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        use tokio::runtime::{Handle, RuntimeFlavor};
        let digest: [u8; 32] = Sha256::digest(message).into();
        let signing = self.pool.sign(&self.key, digest);
        let signature = match Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(RuntimeFlavor::MultiThread) => {
                tokio::task::block_in_place(|| self.runtime.block_on(signing))
            }
            // Outside the runtime (a plain thread) blocking is allowed.
            Err(_) => self.runtime.block_on(signing),
            // A current-thread runtime cannot be left: the answer would
            // wait for the thread that waits for it.
            Ok(_) => {
                return Err(rustls::Error::General(
                    "TLS signing on the token needs a multi-thread runtime".into(),
                ))
            }
        };
        signature
            .map(|s| s.to_der().as_bytes().to_vec())
            .map_err(|e| rustls::Error::General(format!("signing on the token: {e}")))
    }

    fn scheme(&self) -> SignatureScheme {
        SignatureScheme::ECDSA_NISTP256_SHA256
    }
}

/// Destroys the listener keys of processes that died without shutting down
/// (`is_stale`), each with a `key.destroy_orphan` audit entry. Keys of live
/// listeners, this replica's or another's, are never that old.
pub async fn destroy_stale_listener_keys(
    pool: &KeyPool,
    store: &dyn Store,
) -> anyhow::Result<usize> {
    let now = SystemTime::now();
    let mut destroyed = 0;
    for key in pool.key_ids(TLS_KEY_PREFIX).await? {
        if !is_stale(key.as_str(), now) {
            continue;
        }
        match pool.destroy(&key).await {
            Ok(()) => {}
            // Another replica's sweep took it first.
            Err(e) if e.is_not_found() => continue,
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "destroying a stale listener key failed");
                continue;
            }
        }
        tracing::warn!(key = %key, "destroyed the TLS key of a listener that did not shut down");
        let audit = AuditEvent::new("keyward", "key.destroy_orphan", key.as_str())
            .with("older_than_seconds", (2 * SERVER_CERT_LIFETIME).as_secs());
        store.append_audit_event(&audit).await?;
        destroyed += 1;
    }
    Ok(destroyed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_keys_older_than_two_lifetimes_are_stale() {
        let now = SystemTime::now();
        let at = |age: Duration| {
            let t = (now - age).duration_since(UNIX_EPOCH).unwrap().as_secs();
            format!("{TLS_KEY_PREFIX}{t}-0123456789abcdef")
        };
        assert!(!is_stale(&at(Duration::from_secs(60)), now));
        assert!(!is_stale(&at(SERVER_CERT_LIFETIME), now));
        assert!(is_stale(&at(3 * SERVER_CERT_LIFETIME), now));
        assert!(!is_stale("agent-0123456789abcdef", now));
        assert!(!is_stale("tls-notanumber-01", now));
        let future = (now + Duration::from_secs(3600))
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(!is_stale(&format!("tls-{future}-01"), now));
    }
}
