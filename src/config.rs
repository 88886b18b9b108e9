//! Configuration: an optional TOML file (see `hsm-config/`), command-line
//! overrides, and embedded defaults that need no file at all.
//!
//! Secrets are never inline: a PIN comes from an environment variable or a
//! file readable by the owner only, and is held as a `SecretString`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

use crate::identity::TrustDomain;
use crate::keys::pkcs11::Pkcs11Config;
use crate::keys::KeyStorage;
use crate::pki::TtlLimits;
use crate::pool::PoolConfig;

pub const DEFAULT_DATA_DIR: &str = "./keyward-data";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7443";
pub const DEFAULT_TRUST_DOMAIN: &str = "keyward.local";
pub const EMBEDDED_TOKEN_LABEL: &str = "keyward";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The file as written; every field optional, unknown fields refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
    pub trust_domain: Option<String>,
    pub database_url: Option<String>,
    pub keys: Option<KeysFile>,
    #[serde(default)]
    pub pool: PoolFile,
    #[serde(default)]
    pub certificates: CertificatesFile,
    #[serde(default)]
    pub server: ServerFile,
    #[serde(default)]
    pub hooks: HooksFile,
    #[serde(default)]
    pub attestation: AttestationFile,
    #[serde(default)]
    pub maintenance: MaintenanceFile,
    #[serde(default)]
    pub audit: AuditFile,
    #[serde(default)]
    pub telemetry: TelemetryFile,
}

/// Traces (`docs/architecture.md`, Traces).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryFile {
    /// The OTLP/HTTP collector's base URL, e.g. `http://127.0.0.1:4318`:
    /// spans go to `<otlp_endpoint>/v1/traces`. `--otlp-endpoint` and
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` win over it. Default: no traces.
    pub otlp_endpoint: Option<String>,
}

/// The audit transparency log (`docs/audit.md`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditFile {
    /// The checkpoints' origin line and key name (default
    /// `<trust-domain>/audit`). A new origin starts a new log.
    pub origin: Option<String>,
    /// How often new entries are sealed into a signed checkpoint (default
    /// 1000 ms).
    pub checkpoint_interval_ms: Option<u64>,
    /// How often the whole stored log is checked against its latest
    /// checkpoint, besides at start (default 600 s).
    pub self_check_interval_seconds: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceFile {
    /// How long a custodial key on the token must have been owned by no
    /// agent before keyward destroys it (default 600). It must exceed the
    /// longest a registration takes between generating a key and recording
    /// it, on any replica.
    pub orphan_key_grace_seconds: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestationFile {
    #[serde(default)]
    pub tpm: TpmAttestationFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TpmAttestationFile {
    /// A directory of PEM (or DER) CA certificates: the TPM manufacturers
    /// whose EK certificates keyward trusts. Self-signed ones are roots;
    /// the others serve as intermediates. Without it, agents holding their
    /// own TPM keys cannot enroll.
    pub ek_roots: Option<PathBuf>,
    /// A file of EK public-key SHA-256 digests (one hex digest per line):
    /// TPMs admitted without an EK certificate.
    pub ek_allowlist: Option<PathBuf>,
    /// How long a challenge (its nonce and secret) stays usable.
    pub challenge_ttl_seconds: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HooksFile {
    /// Hosts that revocation hooks may be registered for (exact names or
    /// IP addresses). Default: loopback only.
    pub allowed_hosts: Option<Vec<String>>,
}

/// Hosts hooks may point at when the config names none.
pub const DEFAULT_HOOK_HOSTS: [&str; 3] = ["127.0.0.1", "localhost", "[::1]"];

#[derive(Debug, Deserialize)]
#[serde(tag = "backend", rename_all = "kebab-case", deny_unknown_fields)]
pub enum KeysFile {
    /// SoftHSM2 token created and owned by keyward under the data directory.
    /// Custodial keys are kept wrapped unless `custodial_storage = "token"`.
    EmbeddedSofthsm {
        custodial_storage: Option<KeyStorage>,
    },
    /// Custodial keys are token objects unless `custodial_storage =
    /// "wrapped"`, which needs the token's wrapping key (`keyward keys
    /// create-wrapping-key`).
    Pkcs11 {
        module: PathBuf,
        token_label: String,
        user_pin_env: Option<String>,
        user_pin_file: Option<PathBuf>,
        custodial_storage: Option<KeyStorage>,
    },
    /// A TPM 2.0 through a TCTI; key blobs under `key_dir` (default
    /// `<data-dir>/tpm-keys`).
    Tpm {
        tcti: String,
        key_dir: Option<PathBuf>,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolFile {
    pub workers: Option<usize>,
    pub batch_size: Option<usize>,
    pub queue_capacity: Option<usize>,
    pub deadline_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificatesFile {
    pub default_ttl_seconds: Option<u64>,
    pub max_ttl_seconds: Option<u64>,
    pub ca_validity_days: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    /// DNS names for the HTTPS certificate (the loopback and listen
    /// addresses are always there).
    #[serde(default)]
    pub dns_names: Vec<String>,
    /// The base URL relying parties reach keyward at, e.g.
    /// `https://keyward.example:7443`; certificates point at
    /// `<public_url>/v1/crl` and `<public_url>/v1/ocsp`. Default:
    /// `https://<listen address>`.
    pub public_url: Option<String>,
    /// A second listener, plain HTTP, serving only `/v1/crl` and
    /// `/v1/ocsp` (both answers are signed), as public CAs run them: relying
    /// parties then need no TLS to check revocation. When set, certificates
    /// point there (`status_url`, default `http://<status_listen>`).
    pub status_listen: Option<String>,
    pub status_url: Option<String>,
    /// Accept admin tokens (`Authorization: Bearer`). With `false`, admins
    /// authenticate with client certificates (`keyward admin cert-issue`).
    pub admin_token: Option<bool>,
    /// Threads serving HTTP, TLS and the handlers (default: see
    /// [`default_runtime_threads`]).
    pub runtime_threads: Option<usize>,
    /// Load balancers and proxies (addresses or CIDR networks) whose
    /// `X-Forwarded-For` names the client: the source in the audit log
    /// and traces, and the address the detectors count. Empty (the
    /// default): the header is ignored and the source is the TCP peer.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
}

/// Overrides from the command line; they win over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
    pub database_url: Option<String>,
    pub pool_workers: Option<usize>,
    pub tpm_ek_roots: Option<PathBuf>,
    pub tpm_ek_allowlist: Option<PathBuf>,
    /// `--otlp-endpoint` or `OTEL_EXPORTER_OTLP_ENDPOINT` (the flag first).
    pub otlp_endpoint: Option<String>,
}

#[derive(Debug, Clone)]
pub enum KeysConfig {
    EmbeddedSoftHsm,
    Pkcs11(Pkcs11Config),
    Tpm(crate::keys::tpm::TpmConfig),
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub trust_domain: TrustDomain,
    pub database_url: String,
    pub keys: KeysConfig,
    /// Where agents' custodial keys are kept (see `keys::KeyStorage`).
    pub custodial_storage: KeyStorage,
    pub pool: PoolConfig,
    pub ttl: TtlLimits,
    pub ca_validity: Duration,
    pub server_dns_names: Vec<String>,
    /// See `ServerFile::public_url`; `None` until `serve` knows its address.
    pub public_url: Option<String>,
    /// See `ServerFile::status_listen` and `status_url`.
    pub status_listen: Option<SocketAddr>,
    pub status_url: Option<String>,
    pub admin_token_enabled: bool,
    pub runtime_threads: usize,
    /// See `ServerFile::trusted_proxies`, parsed (an address as its /32
    /// or /128).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub hook_allowed_hosts: Vec<String>,
    /// See `MaintenanceFile::orphan_key_grace_seconds`.
    pub orphan_key_grace: Duration,
    /// See `TpmAttestationFile`.
    pub tpm_ek_roots: Option<PathBuf>,
    pub tpm_ek_allowlist: Option<PathBuf>,
    pub tpm_challenge_ttl: Duration,
    pub audit: AuditConfig,
    /// See `TelemetryFile::otlp_endpoint`, checked.
    pub otlp_endpoint: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    pub origin: String,
    pub checkpoint_interval: Duration,
    pub self_check_interval: Duration,
}

/// Half the cores, at least one. Under load the pool's workers (one per
/// core by default) each keep a core busy when the token signs on the
/// host's own CPUs (SoftHSM2); runtime threads beyond the cores left over
/// preempt them, and wake each other to share work one of them would
/// finish sooner. Measured in `keyward bench sign` on 2 cores, in
/// alternating runs: with one runtime thread `pool` reached 0.93–1.01 of
/// `raw` against 0.85–0.89 with two, `http` and the `http-half` tail the
/// same or better (README, Performance). For an HSM that signs in the
/// device, whose workers mostly wait, the number of cores may serve better.
pub fn default_runtime_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

/// Each entry an IP network (`10.0.0.0/8`) or address (`192.0.2.1`, as
/// its /32 or /128); a typo refuses to start rather than trusting less, or
/// more, than the operator meant.
fn parse_trusted_proxies(entries: &[String]) -> Result<Vec<ipnet::IpNet>, String> {
    const MAX_TRUSTED_PROXIES: usize = 256;
    if entries.len() > MAX_TRUSTED_PROXIES {
        return Err(format!(
            "server.trusted_proxies: at most {MAX_TRUSTED_PROXIES} entries"
        ));
    }
    entries
        .iter()
        .map(|entry| {
            entry
                .parse::<ipnet::IpNet>()
                .or_else(|_| entry.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map(|net| net.trunc())
                .map_err(|_| {
                    format!(
                        "server.trusted_proxies: {entry:?} is not an IP address or CIDR network"
                    )
                })
        })
        .collect()
}

/// An `http(s)://host[:port]` base with no path, query or fragment, so
/// that the URLs built on it are what the operator expects.
fn check_public_url(url: &str) -> Result<String, String> {
    let trimmed = url.trim_end_matches('/');
    let rest = trimmed
        .strip_prefix("https://")
        .or_else(|| trimmed.strip_prefix("http://"))
        .ok_or_else(|| format!("server.public_url = {url:?} is not an http(s) URL"))?;
    let ok = !rest.is_empty()
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
    if ok {
        Ok(trimmed.to_owned())
    } else {
        Err(format!(
            "server.public_url = {url:?} must be scheme://host[:port] only"
        ))
    }
}

/// An `http://host[:port][/path]` collector base URL. Plain HTTP only: the
/// exporter carries no TLS stack of its own (a collector on the host or
/// beside it, as an agent or sidecar, is the expected deployment).
fn check_otlp_endpoint(url: &str) -> Result<String, String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        if url.starts_with("https://") {
            format!("otlp_endpoint = {url:?}: https is not supported; use a collector over http://")
        } else {
            format!("otlp_endpoint = {url:?} is not an http:// URL")
        }
    })?;
    let host = rest.split('/').next().unwrap_or_default();
    let ok = !host.is_empty()
        && !rest.contains(['?', '#', ' '])
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
    if ok {
        Ok(url.trim_end_matches('/').to_owned())
    } else {
        Err(format!(
            "otlp_endpoint = {url:?} must be http://host[:port][/path]"
        ))
    }
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.message().to_owned(),
        })
    }

    pub fn validate(self, overrides: &Overrides) -> Result<Config, ConfigError> {
        let invalid = |m: String| ConfigError::Invalid(m);
        let data_dir = overrides
            .data_dir
            .clone()
            .or(self.data_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let listen_text = overrides
            .listen
            .clone()
            .or(self.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen: SocketAddr = listen_text.parse().map_err(|_| {
            invalid(format!(
                "listen = {listen_text:?} is not an IP:port address"
            ))
        })?;
        let trust_domain =
            TrustDomain::parse(self.trust_domain.as_deref().unwrap_or(DEFAULT_TRUST_DOMAIN))
                .map_err(|e| invalid(e.to_string()))?;
        let database_url = match overrides.database_url.clone().or(self.database_url) {
            Some(url) => url,
            None => format!("sqlite://{}", data_dir.join("keyward.db").display()),
        };
        let keys_file = self.keys.unwrap_or(KeysFile::EmbeddedSofthsm {
            custodial_storage: None,
        });
        // The embedded token has a wrapping key from its first start; an
        // operator's token needs one made by its security officer first.
        let custodial_storage = match &keys_file {
            KeysFile::EmbeddedSofthsm { custodial_storage } => {
                custodial_storage.unwrap_or(KeyStorage::Wrapped)
            }
            KeysFile::Pkcs11 {
                custodial_storage, ..
            } => custodial_storage.unwrap_or(KeyStorage::Token),
            // TPM keys already live outside the TPM only as blobs it seals.
            KeysFile::Tpm { .. } => KeyStorage::Token,
        };
        let keys = match keys_file {
            KeysFile::EmbeddedSofthsm { .. } => KeysConfig::EmbeddedSoftHsm,
            KeysFile::Pkcs11 {
                module,
                token_label,
                user_pin_env,
                user_pin_file,
                ..
            } => {
                let user_pin = match (user_pin_env, user_pin_file) {
                    (Some(var), None) => SecretString::from(std::env::var(&var).map_err(|_| {
                        invalid(format!("environment variable {var} (user PIN) is not set"))
                    })?),
                    (None, Some(file)) => read_secret_file(&file)?,
                    _ => {
                        return Err(invalid(
                            "[keys] needs exactly one of user_pin_env or user_pin_file".into(),
                        ))
                    }
                };
                KeysConfig::Pkcs11(Pkcs11Config {
                    module,
                    token_label,
                    user_pin,
                })
            }
            KeysFile::Tpm { tcti, key_dir } => KeysConfig::Tpm(crate::keys::tpm::TpmConfig {
                tcti,
                key_dir: key_dir.unwrap_or_else(|| data_dir.join("tpm-keys")),
            }),
        };
        let defaults = PoolConfig::default();
        let pool = PoolConfig {
            workers: overrides
                .pool_workers
                .or(self.pool.workers)
                .unwrap_or(defaults.workers),
            batch_size: self.pool.batch_size.unwrap_or(defaults.batch_size),
            queue_capacity: self.pool.queue_capacity.unwrap_or(defaults.queue_capacity),
            deadline: self
                .pool
                .deadline_ms
                .map(Duration::from_millis)
                .unwrap_or(defaults.deadline),
        };
        if pool.workers == 0 || pool.batch_size == 0 || pool.queue_capacity == 0 {
            return Err(invalid(
                "[pool] workers, batch_size and queue_capacity must be >= 1".into(),
            ));
        }
        let ttl_defaults = TtlLimits::default();
        let ttl = TtlLimits {
            default: self
                .certificates
                .default_ttl_seconds
                .map(Duration::from_secs)
                .unwrap_or(ttl_defaults.default),
            max: self
                .certificates
                .max_ttl_seconds
                .map(Duration::from_secs)
                .unwrap_or(ttl_defaults.max),
        };
        if ttl.default.is_zero() || ttl.default > ttl.max {
            return Err(invalid(
                "[certificates] needs 0 < default_ttl_seconds <= max_ttl_seconds".into(),
            ));
        }
        let ca_validity =
            Duration::from_secs(self.certificates.ca_validity_days.unwrap_or(3650) * 86_400);
        let tpm_challenge_ttl = Duration::from_secs(
            self.attestation
                .tpm
                .challenge_ttl_seconds
                .unwrap_or(crate::attestation::tpm::DEFAULT_CHALLENGE_TTL.as_secs()),
        );
        if tpm_challenge_ttl.is_zero() || tpm_challenge_ttl > Duration::from_secs(3600) {
            return Err(invalid(
                "[attestation.tpm] challenge_ttl_seconds must be 1 to 3600".into(),
            ));
        }
        let orphan_key_grace = Duration::from_secs(
            self.maintenance
                .orphan_key_grace_seconds
                .unwrap_or(crate::agents::DEFAULT_ORPHAN_KEY_GRACE.as_secs()),
        );
        if orphan_key_grace.is_zero() || orphan_key_grace > Duration::from_secs(7 * 86_400) {
            return Err(invalid(
                "[maintenance] orphan_key_grace_seconds must be 1 to 604800".into(),
            ));
        }
        let audit = AuditConfig {
            origin: self
                .audit
                .origin
                .unwrap_or_else(|| format!("{}/audit", trust_domain.as_str())),
            checkpoint_interval: Duration::from_millis(
                self.audit.checkpoint_interval_ms.unwrap_or(1000),
            ),
            self_check_interval: Duration::from_secs(
                self.audit.self_check_interval_seconds.unwrap_or(600),
            ),
        };
        if audit.origin.is_empty()
            || audit
                .origin
                .contains(|c: char| c.is_whitespace() || c == '+')
        {
            return Err(invalid(
                "[audit] origin must be one word with no spaces or '+'".into(),
            ));
        }
        if audit.checkpoint_interval < Duration::from_millis(10)
            || audit.checkpoint_interval > Duration::from_secs(3600)
            || audit.self_check_interval < Duration::from_secs(1)
        {
            return Err(invalid(
                "[audit] checkpoint_interval_ms must be 10 to 3600000 and \
                 self_check_interval_seconds at least 1"
                    .into(),
            ));
        }
        let otlp_endpoint = match overrides
            .otlp_endpoint
            .clone()
            .or(self.telemetry.otlp_endpoint)
            .filter(|url| !url.is_empty())
        {
            Some(url) => Some(check_otlp_endpoint(&url).map_err(invalid)?),
            None => None,
        };
        Ok(Config {
            otlp_endpoint,
            audit,
            orphan_key_grace,
            tpm_ek_roots: overrides
                .tpm_ek_roots
                .clone()
                .or(self.attestation.tpm.ek_roots),
            tpm_ek_allowlist: overrides
                .tpm_ek_allowlist
                .clone()
                .or(self.attestation.tpm.ek_allowlist),
            tpm_challenge_ttl,
            data_dir,
            listen,
            trust_domain,
            database_url,
            keys,
            custodial_storage,
            pool,
            ttl,
            ca_validity,
            server_dns_names: self.server.dns_names,
            admin_token_enabled: self.server.admin_token.unwrap_or(true),
            trusted_proxies: parse_trusted_proxies(&self.server.trusted_proxies)
                .map_err(invalid)?,
            runtime_threads: match self.server.runtime_threads {
                Some(0) => return Err(invalid("server.runtime_threads must be >= 1".into())),
                Some(n) => n,
                None => default_runtime_threads(),
            },
            status_listen: match &self.server.status_listen {
                Some(text) => Some(text.parse().map_err(|_| {
                    invalid(format!(
                        "server.status_listen = {text:?} is not an IP:port address"
                    ))
                })?),
                None => None,
            },
            status_url: match self.server.status_url {
                Some(url) => Some(check_public_url(&url).map_err(invalid)?),
                None => None,
            },
            hook_allowed_hosts: self
                .hooks
                .allowed_hosts
                .unwrap_or_else(|| DEFAULT_HOOK_HOSTS.iter().map(|h| (*h).to_owned()).collect()),
            public_url: match self.server.public_url {
                Some(url) => Some(check_public_url(&url).map_err(invalid)?),
                None => None,
            },
        })
    }
}

/// Reads a secret from a file that only its owner can read.
pub fn read_secret_file(path: &Path) -> Result<SecretString, ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(ConfigError::Invalid(format!(
            "{} is readable by group or others; chmod 600 it",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(ConfigError::Invalid(format!("{} is empty", path.display())));
    }
    Ok(SecretString::from(secret.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_otlp_endpoint_on_the_command_line_wins_over_the_file_and_is_plain_http() {
        let file = |url: &str| {
            toml::from_str::<ConfigFile>(&format!("[telemetry]\notlp_endpoint = {url:?}\n"))
                .unwrap()
        };
        let endpoint = |file: ConfigFile, overrides: &Overrides| {
            file.validate(overrides).map(|c| c.otlp_endpoint)
        };
        assert_eq!(
            endpoint(file("http://file:4318/"), &Overrides::default()).unwrap(),
            Some("http://file:4318".to_owned())
        );
        let flag = Overrides {
            otlp_endpoint: Some("http://flag:4318".into()),
            ..Default::default()
        };
        assert_eq!(
            endpoint(file("http://file:4318"), &flag).unwrap(),
            Some("http://flag:4318".to_owned())
        );
        assert_eq!(
            endpoint(ConfigFile::default(), &Overrides::default()).unwrap(),
            None
        );
        for bad in ["https://c:4318", "c:4318", "http://", "http://c:4318/?x=1"] {
            assert!(
                matches!(
                    endpoint(file(bad), &Overrides::default()),
                    Err(ConfigError::Invalid(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn trusted_proxies_are_addresses_or_networks_and_a_typo_refuses_to_start() {
        let proxies = |list: &str| {
            toml::from_str::<ConfigFile>(&format!("[server]\ntrusted_proxies = {list}\n"))
                .unwrap()
                .validate(&Overrides::default())
                .map(|c| {
                    c.trusted_proxies
                        .iter()
                        .map(|n| n.to_string())
                        .collect::<Vec<_>>()
                })
        };
        assert_eq!(
            proxies(r#"["10.0.0.0/8", "192.0.2.1", "2001:db8::/32", "10.9.8.7/16"]"#).unwrap(),
            ["10.0.0.0/8", "192.0.2.1/32", "2001:db8::/32", "10.9.0.0/16"]
        );
        assert!(proxies("[]").unwrap().is_empty());
        for bad in [
            r#"["10.0.0.0/33"]"#,
            r#"["lb.internal"]"#,
            r#"[""]"#,
            r#"["10.0.0.1:80"]"#,
        ] {
            assert!(
                matches!(proxies(bad), Err(ConfigError::Invalid(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn no_file_means_embedded_defaults() {
        let c = ConfigFile::default()
            .validate(&Overrides::default())
            .unwrap();
        assert!(matches!(c.keys, KeysConfig::EmbeddedSoftHsm));
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert!(c.database_url.starts_with("sqlite://"));
        assert_eq!(c.ttl.max, Duration::from_secs(3600));
    }

    #[test]
    fn runtime_threads_default_to_half_the_cores_and_zero_is_refused() {
        let cores = std::thread::available_parallelism().unwrap().get();
        let c = ConfigFile::default()
            .validate(&Overrides::default())
            .unwrap();
        assert_eq!(c.runtime_threads, (cores / 2).max(1));

        let file: ConfigFile = toml::from_str("[server]\nruntime_threads = 3\n").unwrap();
        assert_eq!(
            file.validate(&Overrides::default())
                .unwrap()
                .runtime_threads,
            3
        );
        let file: ConfigFile = toml::from_str("[server]\nruntime_threads = 0\n").unwrap();
        assert!(matches!(
            file.validate(&Overrides::default()),
            Err(ConfigError::Invalid(_))
        ));
    }

    #[test]
    fn orphan_key_grace_defaults_to_ten_minutes_and_must_be_one_second_to_a_week() {
        let c = ConfigFile::default()
            .validate(&Overrides::default())
            .unwrap();
        assert_eq!(c.orphan_key_grace, Duration::from_secs(600));
        for (seconds, accepted) in [(0, false), (1, true), (604_800, true), (604_801, false)] {
            let text = format!("[maintenance]\norphan_key_grace_seconds = {seconds}\n");
            let file: ConfigFile = toml::from_str(&text).unwrap();
            assert_eq!(
                file.validate(&Overrides::default()).is_ok(),
                accepted,
                "{seconds}"
            );
        }
    }

    #[test]
    fn an_inline_pin_is_not_a_config_option() {
        let text = "[keys]\nbackend = \"pkcs11\"\nmodule = \"/x.so\"\ntoken_label = \"t\"\nuser_pin = \"1234\"\n";
        assert!(toml::from_str::<ConfigFile>(text).is_err());
    }

    #[test]
    fn a_world_readable_pin_file_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        std::fs::write(&path, "1234").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_secret_file(&path).is_err());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(read_secret_file(&path).is_ok());
    }
}
