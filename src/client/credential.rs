//! `keyward agent login`: an agent's own client credential, kept current.
//!
//! The agent makes a P-256 key of its own (a file, 0600; it never leaves
//! the agent's host), enrolls with a single-use token, and renews over
//! mTLS at half of each certificate's lifetime with a fresh key. Files in
//! the credential directory: `key.pem`, `cert.pem`, `chain.pem`, replaced
//! atomically (write, then rename), so a reader never sees a key and
//! certificate that do not belong together for longer than one rename.

use crate::pki::CertificateText;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use p256::pkcs8::{EncodePrivateKey, LineEnding};
use serde_json::{json, Value};
use x509_cert::builder::{Builder, RequestBuilder};

/// Where to reach keyward and where to keep the credential.
pub struct LoginOptions {
    pub url: String,
    pub ca_file: PathBuf,
    pub dir: PathBuf,
    /// Asked-for certificate lifetime; keyward's default when `None`.
    pub ttl_seconds: Option<u64>,
}

/// A new key and a PEM CSR for it.
pub fn key_and_csr(agent: &str) -> anyhow::Result<(p256::SecretKey, String)> {
    let secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
    let signer = p256::ecdsa::SigningKey::from(&secret);
    let subject = format!("CN={agent}").parse()?;
    let request = RequestBuilder::new(subject, &signer)?
        .build::<p256::ecdsa::DerSignature>()
        .context("building the CSR")?;
    let csr = der::EncodePem::to_pem(&request, der::pem::LineEnding::LF)?;
    Ok((secret, csr))
}

fn write_atomically(path: &Path, contents: &[u8], private: bool) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    if private {
        crate::runtime::files::write_private_file(&tmp, contents)?;
    } else {
        std::fs::write(&tmp, contents)?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn store(dir: &Path, key: &p256::SecretKey, issued: &Value) -> anyhow::Result<()> {
    let key_pem = key.to_pkcs8_pem(LineEnding::LF)?;
    let cert = issued["certificate_pem"]
        .as_str()
        .context("no certificate_pem in the answer")?;
    let chain = issued["chain_pem"].as_str().unwrap_or_default();
    // The key first: until cert.pem is replaced too, the old pair is gone,
    // but a half-new pair is never what a reader finds after both renames.
    write_atomically(&dir.join("key.pem"), key_pem.as_bytes(), true)?;
    write_atomically(&dir.join("cert.pem"), cert.as_bytes(), false)?;
    write_atomically(&dir.join("chain.pem"), chain.as_bytes(), false)?;
    Ok(())
}

fn http_client(options: &LoginOptions, identity: Option<&Path>) -> anyhow::Result<reqwest::Client> {
    let ca = std::fs::read(&options.ca_file)
        .with_context(|| format!("reading {}", options.ca_file.display()))?;
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca)?)
        .timeout(Duration::from_secs(30));
    if let Some(dir) = identity {
        let mut pem = std::fs::read(dir.join("cert.pem"))?;
        pem.extend(std::fs::read(dir.join("key.pem"))?);
        builder = builder.identity(reqwest::Identity::from_pem(&pem)?);
    }
    Ok(builder.build()?)
}

/// POSTs JSON; keyward's error code and message become the error.
pub(crate) async fn post(
    client: &reqwest::Client,
    url: String,
    body: Value,
) -> anyhow::Result<Value> {
    let response = client.post(url).json(&body).send().await?;
    let status = response.status();
    let value: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!(
            "{status}: {}: {}",
            value["error"]["code"].as_str().unwrap_or("unknown"),
            value["error"]["message"].as_str().unwrap_or("")
        );
    }
    Ok(value)
}

/// Enrolls with `token`: the first credential, written to `options.dir`.
pub async fn enroll(options: &LoginOptions, agent: &str, token: &str) -> anyhow::Result<Value> {
    std::fs::create_dir_all(&options.dir)?;
    let (key, csr) = key_and_csr(agent)?;
    let client = http_client(options, None)?;
    let issued = post(
        &client,
        format!("{}/v1/enroll", options.url),
        json!({"token": token, "csr_pem": csr, "ttl_seconds": options.ttl_seconds}),
    )
    .await?;
    store(&options.dir, &key, &issued)?;
    Ok(issued)
}

/// Renews with the current credential (mTLS) and a new key.
pub async fn renew(options: &LoginOptions, agent: &str) -> anyhow::Result<Value> {
    let (key, csr) = key_and_csr(agent)?;
    let client = http_client(options, Some(&options.dir))?;
    let issued = post(
        &client,
        format!("{}/v1/renew", options.url),
        json!({"csr_pem": csr, "ttl_seconds": options.ttl_seconds}),
    )
    .await?;
    store(&options.dir, &key, &issued)?;
    Ok(issued)
}

/// When the stored certificate reaches half its lifetime.
pub fn half_life(dir: &Path) -> anyhow::Result<SystemTime> {
    let pem = std::fs::read_to_string(dir.join("cert.pem"))?;
    let cert = crate::pki::Certificate::from_pem_str(&pem)?;
    let validity = &cert.tbs_certificate.validity;
    // keyward backdates notBefore; the lifetime it granted starts later.
    let issued = validity.not_before.to_system_time() + crate::pki::profile::BACKDATE;
    let not_after = validity.not_after.to_system_time();
    let lifetime = not_after.duration_since(issued).unwrap_or_default();
    Ok(issued + lifetime / 2)
}

/// Renews at every half-life, for as long as the process runs. A failed
/// renewal is retried with backoff until the certificate expires.
pub async fn keep_renewed(options: &LoginOptions, agent: &str) -> anyhow::Result<()> {
    loop {
        let due = half_life(&options.dir)?;
        if let Ok(wait) = due.duration_since(SystemTime::now()) {
            tokio::time::sleep(wait).await;
        }
        let mut backoff = Duration::from_secs(1);
        loop {
            match renew(options, agent).await {
                Ok(issued) => {
                    tracing::info!(serial = issued["serial"].as_str().unwrap_or(""), "renewed");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "renewal failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                }
            }
        }
    }
}
