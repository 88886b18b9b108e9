//! Revocation hooks: every revocation, suspension and resumption is
//! delivered as a signed JSON event to each registered endpoint, at least
//! once, in order per hook, from the outbox the change itself wrote
//! (`hook_deliveries`, same transaction): a crash between the change and
//! the delivery loses nothing.
//!
//! Each request carries `keyward-signature: t=<unix>,v1=<hex>`, where the
//! hex is HMAC-SHA256 under the hook's secret of `"<t>.<body>"`, and
//! `keyward-event-id` for deduplication. Receivers should refuse a `t` far
//! from their clock (replay) and compare the MAC in constant time.

use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::audit::AuditEvent;
use crate::runtime::supervisor::Supervisor;
use crate::store::{HookDelivery, HookRecord, Store, StoreError};
use crate::telemetry::HookMetrics;

/// The system trust store for https hooks.
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";
/// How long one replica owns a delivery attempt before another may try:
/// three request timeouts. It is also how long an event waits after a
/// replica died in the middle of sending it.
const LEASE_SECS: i64 = 15;
/// How often the outbox is polled when nothing wakes the deliverer.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Per request.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Retry delays double from 1 s up to this.
const MAX_BACKOFF_SECS: i64 = 300;
/// After this many failed attempts the failure is written to the audit log
/// (once); retries continue.
const AUDIT_AFTER_ATTEMPTS: i64 = 5;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HookUrlError {
    #[error("the hook URL is not an absolute http(s) URL")]
    NotHttp,
    #[error("the hook URL may not carry credentials or a fragment")]
    Credentials,
    #[error("host {0:?} is not in hooks.allowed_hosts")]
    HostNotAllowed(String),
}

/// Checks a URL to register: http or https, no userinfo or fragment, and a
/// host named in `allowed_hosts` (as written in URLs: IPv6 in brackets).
pub fn check_url(url: &str, allowed_hosts: &[String]) -> Result<String, HookUrlError> {
    let parsed = reqwest::Url::parse(url).map_err(|_| HookUrlError::NotHttp)?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.cannot_be_a_base() {
        return Err(HookUrlError::NotHttp);
    }
    if !parsed.username().is_empty() || parsed.password().is_some() || parsed.fragment().is_some() {
        return Err(HookUrlError::Credentials);
    }
    let host = parsed.host_str().ok_or(HookUrlError::NotHttp)?.to_owned();
    if !allowed_hosts
        .iter()
        .any(|allowed| allowed.eq_ignore_ascii_case(&host))
    {
        return Err(HookUrlError::HostNotAllowed(host));
    }
    Ok(parsed.to_string())
}

/// A new hook secret: 32 random bytes, hex.
pub fn new_secret() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// The `keyward-signature` header value for `body` sent at `t`.
pub fn signature(secret: &str, t: i64, body: &[u8]) -> String {
    // HMAC takes keys of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

fn backoff_secs(attempts: i64) -> i64 {
    2_i64
        .saturating_pow(attempts.clamp(0, 16) as u32)
        .min(MAX_BACKOFF_SECS)
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Why a hook was not registered.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error(transparent)]
    Url(#[from] HookUrlError),
    #[error("a hook with that URL is registered already")]
    Exists,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Registers hooks and delivers the outbox. Every replica runs one; leases
/// keep them from sending the same event at the same time.
pub struct Deliverer {
    store: Arc<dyn Store>,
    /// The hosts a hook may point at (`hooks.allowed_hosts`).
    allowed_hosts: Vec<String>,
    http: reqwest::Client,
    metrics: HookMetrics,
    wake: tokio::sync::Notify,
}

impl Deliverer {
    pub fn new(
        store: Arc<dyn Store>,
        allowed_hosts: Vec<String>,
        metrics: HookMetrics,
    ) -> Result<Arc<Self>, reqwest::Error> {
        let mut builder = reqwest::Client::builder().use_rustls_tls();
        // https hooks are checked against the system's trust store (Debian's
        // ca-certificates, a runtime package).
        if let Ok(bundle) = std::fs::read(SYSTEM_ROOTS) {
            for root in reqwest::Certificate::from_pem_bundle(&bundle).unwrap_or_default() {
                builder = builder.add_root_certificate(root);
            }
        }
        let http = builder
            .timeout(TIMEOUT)
            // A hook answers; it does not send keyward elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Arc::new(Self {
            store,
            allowed_hosts,
            http,
            metrics,
            wake: tokio::sync::Notify::new(),
        }))
    }

    /// Registers a hook for `url` (checked against the allowed hosts),
    /// with a new secret, shown only in this answer.
    pub async fn register(&self, actor: &str, url: &str) -> Result<HookRecord, HookError> {
        let url = check_url(url, &self.allowed_hosts)?;
        let audit = AuditEvent::new(actor, "hook.create", &url);
        match self.store.insert_hook(&url, &new_secret(), &audit).await {
            Ok(hook) => Ok(hook),
            Err(StoreError::Conflict(_)) => Err(HookError::Exists),
            Err(e) => Err(e.into()),
        }
    }

    /// Active hooks by id, after `after`, at most `limit`.
    pub async fn page(
        &self,
        after: Option<i64>,
        limit: i64,
    ) -> Result<Vec<HookRecord>, StoreError> {
        self.store.hooks_page(after, limit).await
    }

    /// Stops delivering to hook `id`; false if there is no active one.
    pub async fn remove(&self, actor: &str, id: i64) -> Result<bool, StoreError> {
        let audit = AuditEvent::new(actor, "hook.delete", id.to_string());
        self.store.deactivate_hook(id, &audit).await
    }

    /// Asks for a round now (after a change made here), instead of at the
    /// next poll.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Delivers until shutdown. A delivery under way when shutdown begins
    /// is finished (or times out); its lease covers a replica that dies.
    pub fn start(self: &Arc<Self>, tasks: &Supervisor) {
        let deliverer = self.clone();
        tasks.spawn("hook delivery", move |mut stop| async move {
            while !stop.is_stopped() {
                if let Err(e) = deliverer.round().await {
                    tracing::warn!(error = %e, "delivering revocation hooks failed");
                }
                tokio::select! {
                    _ = stop.stopped() => {}
                    _ = tokio::time::timeout(POLL_INTERVAL, deliverer.wake.notified()) => {}
                }
            }
        });
    }

    /// Sends every due event that this replica can lease, one per hook,
    /// until none is left.
    async fn round(&self) -> Result<(), StoreError> {
        loop {
            let due = self
                .store
                .lease_hook_deliveries(unix_now(), LEASE_SECS)
                .await?;
            if let Ok(pending) = self.store.pending_hook_deliveries().await {
                self.metrics.pending.set(pending);
            }
            if due.is_empty() {
                return Ok(());
            }
            let hooks = self.store.hooks().await?;
            // One at a time: a slow hook delays the others by at most
            // TIMEOUT per round, and the order per hook is kept anyway.
            for delivery in due {
                let hook = hooks.iter().find(|h| h.id == delivery.hook_id).cloned();
                self.deliver(hook, delivery).await?;
            }
        }
    }

    async fn deliver(
        &self,
        hook: Option<HookRecord>,
        delivery: HookDelivery,
    ) -> Result<(), StoreError> {
        // Deactivated between lease and send: leave the row; it is no
        // longer leased out to active hooks.
        let Some(hook) = hook else { return Ok(()) };
        let t = unix_now();
        let result = self
            .http
            .post(&hook.url)
            .header("content-type", "application/json")
            .header(
                "keyward-signature",
                signature(&hook.secret, t, delivery.event.as_bytes()),
            )
            .header("keyward-event-id", event_id(&delivery.event))
            .body(delivery.event.clone())
            .send()
            .await;
        let error = match result {
            Ok(response) if response.status().is_success() => {
                self.metrics.delivered.inc();
                return self.store.hook_delivered(delivery.id, unix_now()).await;
            }
            Ok(response) => format!("answered {}", response.status()),
            // reqwest's error names the URL but never the headers.
            Err(e) => e.without_url().to_string(),
        };
        self.metrics.failed.inc();
        let attempts = delivery.attempts + 1;
        tracing::warn!(hook = hook.id, attempts, error = %error, "hook delivery failed");
        if attempts == AUDIT_AFTER_ATTEMPTS {
            let audit = AuditEvent::new("keyward", "hook.delivery_failing", &hook.url)
                .with("hook_id", hook.id)
                .with("attempts", attempts)
                .with("error", error.clone());
            if let Err(e) = self.store.append_audit_event(&audit).await {
                tracing::warn!(error = %e, "auditing a failing hook failed");
            }
        }
        self.store
            .hook_failed(delivery.id, unix_now() + backoff_secs(attempts - 1), &error)
            .await
    }
}

fn event_id(event: &str) -> String {
    serde_json::from_str::<serde_json::Value>(event)
        .ok()
        .and_then(|v| v["event_id"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback() -> Vec<String> {
        crate::config::DEFAULT_HOOK_HOSTS
            .iter()
            .map(|h| (*h).to_owned())
            .collect()
    }

    #[test]
    fn only_http_urls_to_allowed_hosts_are_accepted() {
        let allowed = loopback();
        assert!(check_url("http://127.0.0.1:9000/hook", &allowed).is_ok());
        assert!(check_url("https://localhost/hook", &allowed).is_ok());
        assert!(check_url("http://[::1]:8080/", &allowed).is_ok());
        assert_eq!(
            check_url("ftp://127.0.0.1/hook", &allowed),
            Err(HookUrlError::NotHttp)
        );
        assert_eq!(
            check_url("127.0.0.1/hook", &allowed),
            Err(HookUrlError::NotHttp)
        );
        assert_eq!(
            check_url("http://user:pw@127.0.0.1/", &allowed),
            Err(HookUrlError::Credentials)
        );
        assert_eq!(
            check_url("http://169.254.169.254/latest/meta-data", &allowed),
            Err(HookUrlError::HostNotAllowed("169.254.169.254".into()))
        );
        // The host is what the URL parser resolves, not a prefix match.
        assert!(matches!(
            check_url("http://127.0.0.1.evil.example/", &allowed),
            Err(HookUrlError::HostNotAllowed(_))
        ));
    }

    #[test]
    fn the_signature_is_an_hmac_of_time_and_body() {
        let value = signature("secret", 1_700_000_000, b"{}");
        let mut mac = Hmac::<Sha256>::new_from_slice(b"secret").unwrap();
        mac.update(b"1700000000.{}");
        let expected = hex::encode(mac.finalize().into_bytes());
        assert_eq!(value, format!("t=1700000000,v1={expected}"));
        assert_ne!(value, signature("other", 1_700_000_000, b"{}"));
    }

    #[test]
    fn retries_back_off_to_a_ceiling() {
        assert_eq!(backoff_secs(0), 1);
        assert_eq!(backoff_secs(3), 8);
        assert_eq!(backoff_secs(40), MAX_BACKOFF_SECS);
    }
}
