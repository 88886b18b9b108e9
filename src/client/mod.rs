//! The operator's HTTP client behind the CLI (`keyward agent ...`,
//! `keyward cert ...`): HTTPS pinned to keyward's CA, admin token as bearer.

pub mod credential;
pub mod tpm_enrollment;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

pub struct Client {
    http: reqwest::Client,
    base: String,
    /// `None` when a client certificate is the credential.
    token: Option<SecretString>,
}

/// Where to reach the server and how to trust and authenticate to it.
pub struct ClientOptions {
    pub url: String,
    pub ca_file: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    pub data_dir: PathBuf,
    /// A client certificate and its key, instead of the admin token.
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl Client {
    pub fn new(options: &ClientOptions) -> anyhow::Result<Self> {
        let ca_file = options
            .ca_file
            .clone()
            .unwrap_or_else(|| options.data_dir.join("ca.pem"));
        let mut builder = pinned_to(&ca_file)?;
        let token = match &options.identity {
            Some((cert, key)) => {
                let mut pem =
                    std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
                pem.extend(
                    std::fs::read(key).with_context(|| format!("reading {}", key.display()))?,
                );
                builder = builder.identity(reqwest::Identity::from_pem(&pem)?);
                None
            }
            None => Some(match std::env::var("KEYWARD_TOKEN") {
                Ok(t) if options.token_file.is_none() => SecretString::from(t),
                _ => {
                    let file = options
                        .token_file
                        .clone()
                        .unwrap_or_else(|| options.data_dir.join("admin.token"));
                    read_token(&file)?
                }
            }),
        };
        let http = builder.build()?;
        Ok(Self {
            http,
            base: options.url.trim_end_matches('/').to_owned(),
            token,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token.expose_secret());
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.context("contacting keyward")?;
        let status = response.status();
        let value: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let code = value["error"]["code"].as_str().unwrap_or("unknown");
            let message = value["error"]["message"].as_str().unwrap_or("");
            bail!("{status}: {code}: {message}");
        }
        Ok(value)
    }

    pub async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(reqwest::Method::GET, path, None).await
    }

    /// Every item of a paged list (`{"<items>": [...], "next_cursor"}`),
    /// following the cursors to the last page, as one answer of the same
    /// shape.
    pub async fn get_all(&self, path: &str, items: &str) -> anyhow::Result<Value> {
        let mut all = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page_path = match &cursor {
                Some(c) => format!("{path}?limit=1000&cursor={c}"),
                None => format!("{path}?limit=1000"),
            };
            let mut page = self.get(&page_path).await?;
            match page[items].take() {
                Value::Array(found) => all.extend(found),
                _ => bail!("{path} answered without a list of {items}"),
            }
            match page["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => break,
            }
        }
        Ok(serde_json::json!({ items: all }))
    }
}

/// An HTTPS client that trusts `ca_file`'s certificate alone, not the
/// system's roots: keyward's CA is the only authority for its server.
pub fn pinned_to(ca_file: &Path) -> anyhow::Result<reqwest::ClientBuilder> {
    let ca_pem = std::fs::read(ca_file)
        .with_context(|| format!("reading the CA certificate {}", ca_file.display()))?;
    let ca = reqwest::Certificate::from_pem(&ca_pem).context("parsing the CA certificate")?;
    Ok(reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca))
}

/// The admin token in `path`, without the newline an editor adds.
pub fn read_token(path: &Path) -> anyhow::Result<SecretString> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the admin token from {}", path.display()))?;
    Ok(SecretString::from(text.trim().to_owned()))
}
