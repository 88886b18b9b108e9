//! Signing for agents with their custodial keys: the hot path.
//!
//! agent (from a short-lived cache) -> pool signature on the token ->
//! durable record (group commit) -> answer.

use std::sync::Arc;

use der::Decode;
use p256::ecdsa::Signature;

use super::cache::{AgentCache, SigningView};
use super::{AgentError, ACTIVE};
use crate::agents::envelope::{self, Claims, Header};
use crate::identity::AgentName;
use crate::keys::{KeyId, KeyRef};
use crate::pki::cert::Certificate;
use crate::pki::Authority;
use crate::pool::KeyPool;
use crate::revocation::{RevocationSet, RevocationView};
use crate::store::{SignatureLog, SignatureRecord, Store};
use crate::telemetry::traces;
use tracing::Instrument as _;

/// A signature made for an agent.
#[derive(Clone, Debug)]
pub struct AgentSignature {
    pub signature: Signature,
    pub key_id: KeyId,
    pub certificate_serial: Option<String>,
}

/// A signed envelope (docs/envelope.md) and what it says.
#[derive(Clone, Debug)]
pub struct SignedMessage {
    pub token: String,
    pub claims: Claims,
    pub certificate_serial: String,
}

/// What an agent asks to send: to whom, asking what, valid how long.
pub struct MessageRequest<'a> {
    /// The recipient's SPIFFE ID.
    pub audience: &'a str,
    pub intent: &'a str,
    pub lifetime_secs: i64,
}

/// An agent cleared to sign, as one request loaded it
/// ([`AgentSigner::signing_agent`]).
pub struct SigningAgent {
    name: AgentName,
    view: Arc<SigningView>,
    key: KeyRef,
    revoked: Arc<RevocationView>,
    /// When the request was taken up: its records' time.
    at: time::OffsetDateTime,
}

impl SigningAgent {
    /// The agent's scopes: its roles under the policy.
    pub fn roles(&self) -> &[String] {
        &self.view.scopes
    }

    /// The newest certificate of the current key, unless the reading of
    /// the revocation set that cleared the agent lists it.
    fn live_certificate(&self) -> Option<String> {
        self.view
            .certificate_serial
            .clone()
            .filter(|serial| self.revoked.certificate(serial).is_none())
    }
}

pub struct AgentSigner {
    pool: KeyPool,
    store: Arc<dyn Store>,
    authority: Arc<Authority>,
    log: SignatureLog,
    cache: Arc<AgentCache>,
    revocations: Arc<RevocationSet>,
}

/// Why the signature is made, recorded with it.
enum Purpose<'a> {
    Sign,
    /// An envelope, with what it says (JSON) for the record.
    Message(&'a str),
}

/// How the signature log names an envelope's signature.
pub const MESSAGE_PURPOSE: &str = "message";

/// Who asked for a signature, under which policy version, and when the
/// request was taken up: its record's `signed_at_ms`.
struct SigningRequest<'a> {
    id: &'a str,
    policy_version: i64,
    at: time::OffsetDateTime,
}

fn unix_ms(t: time::OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

/// Where keyward's log holds the signature of an envelope issued at `iat`
/// (unix seconds): its record carries the instant `iat` was taken from.
pub fn message_made_ms(iat: i64) -> std::ops::Range<i64> {
    let start = iat.saturating_mul(1000);
    start..start.saturating_add(1000)
}

impl Purpose<'_> {
    fn as_str(&self) -> &'static str {
        match self {
            Purpose::Sign => "sign",
            Purpose::Message(_) => MESSAGE_PURPOSE,
        }
    }

    fn message(&self) -> Option<String> {
        match self {
            Purpose::Sign => None,
            Purpose::Message(what) => Some((*what).to_owned()),
        }
    }
}

/// The agent's signing view as the database has it now.
async fn load_view(
    store: &dyn Store,
    agent: &AgentName,
    now: i64,
) -> Result<SigningView, AgentError> {
    let record = store
        .agent(agent.as_str())
        .await?
        .ok_or_else(|| AgentError::NotFound(agent.to_string()))?;
    let key = match &record.key_id {
        Some(id) => Some(super::custodial_key_ref(
            id,
            record.public_key_der.as_deref(),
            record.key_wrapped.as_deref(),
        )?),
        None => None,
    };
    let newest = match &key {
        Some(key) => {
            store
                .newest_certificate_for_key(agent.as_str(), key.id().as_str(), now)
                .await?
        }
        None => None,
    };
    let (certificate_serial, certificate_not_after) = match newest {
        Some((serial, not_after)) => (Some(serial), not_after),
        None => (None, 0),
    };
    Ok(SigningView {
        key,
        status: record.status,
        scopes: record.scopes,
        certificate_serial,
        certificate_not_after,
    })
}

impl AgentSigner {
    pub fn new(
        pool: KeyPool,
        store: Arc<dyn Store>,
        authority: Arc<Authority>,
        log: SignatureLog,
        cache: Arc<AgentCache>,
        revocations: Arc<RevocationSet>,
    ) -> Self {
        Self {
            pool,
            store,
            authority,
            log,
            cache,
            revocations,
        }
    }

    /// What signing needs to know about the agent, from the cache or the
    /// database. A busy agent's entry is reloaded in the background before
    /// it expires, so its requests do not wait for the database.
    async fn view(&self, agent: &AgentName, now: i64) -> Result<Arc<SigningView>, AgentError> {
        if let Some((view, age)) = self.cache.get(agent) {
            if view.certificate_serial.is_none() || view.certificate_not_after > now {
                if self.cache.claim_refresh(agent, age) {
                    let (store, cache, agent) =
                        (self.store.clone(), self.cache.clone(), agent.clone());
                    tokio::spawn(async move {
                        let generation = cache.generation();
                        match load_view(store.as_ref(), &agent, now).await {
                            Ok(view) => {
                                cache.put(&agent, view, generation);
                            }
                            Err(e) => {
                                tracing::debug!(agent = %agent, error = %e, "reloading an agent's signing view failed")
                            }
                        }
                        cache.refresh_done(&agent);
                    });
                }
                return Ok(view);
            }
        }
        let generation = self.cache.generation();
        let view = load_view(self.store.as_ref(), agent, now).await?;
        Ok(self.cache.put(agent, view, generation))
    }

    /// The agent's signing view (its scopes are its roles under the
    /// policy), from the same short-lived cache as the signing path.
    pub async fn signing_agent_view(
        &self,
        agent: &AgentName,
    ) -> Result<Arc<SigningView>, AgentError> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        self.view(agent, now).await
    }

    /// The agent, if it may sign now: its view, its custodial key and the
    /// reading of the revocation set that cleared it, for the request's
    /// later checks. Loaded once per request; the policy decides on its
    /// roles, and the signature is made with its key.
    pub async fn signing_agent(&self, agent: &AgentName) -> Result<SigningAgent, AgentError> {
        let at = time::OffsetDateTime::now_utc();
        let now = at.unix_timestamp();
        // The revocation set first: it is current within a second on every
        // replica, where the cached view may be a second old.
        let revoked = self.revocations.current();
        if let Some(status) = revoked.inactive_status(agent.as_str()) {
            return Err(AgentError::NotActive(agent.to_string(), status.to_owned()));
        }
        let mut view = self.view(agent, now).await?;
        // Rotated on another replica since this entry was cached.
        if view
            .key
            .as_ref()
            .is_some_and(|key| revoked.key_retired(key.id().as_str()))
        {
            self.cache.invalidate(agent);
            view = self.view(agent, now).await?;
        }
        if view.status != ACTIVE {
            return Err(AgentError::NotActive(
                agent.to_string(),
                view.status.clone(),
            ));
        }
        let key = view
            .key
            .clone()
            .ok_or_else(|| AgentError::NoCustodialKey(agent.to_string()))?;
        // A compromised key signs nothing more: its signatures could not be
        // told from a thief's. The agent needs a new key (rotate-key).
        if revoked.key_compromised(key.id().as_str()) {
            return Err(AgentError::KeyCompromised(key.id().to_string()));
        }
        Ok(SigningAgent {
            name: agent.clone(),
            view,
            key,
            revoked,
            at,
        })
    }

    /// Signs on the token and records the signature durably.
    async fn sign_and_record(
        &self,
        agent: &AgentName,
        key: &KeyRef,
        digest: [u8; 32],
        purpose: Purpose<'_>,
        request: SigningRequest<'_>,
    ) -> Result<Signature, AgentError> {
        // Queued first: a request the pool refuses at once (full queue,
        // open breaker) leaves no record.
        let pending = self.pool.start_sign(key.clone(), digest)?;
        let record = SignatureRecord {
            request_id: request.id.to_owned(),
            agent_name: agent.to_string(),
            key_id: key.id().to_string(),
            digest: hex::encode(digest),
            purpose: purpose.as_str().to_owned(),
            message: purpose.message(),
            policy_version: request.policy_version,
            signed_at_ms: unix_ms(request.at),
        };
        // The token signs while the record commits (the record holds no
        // part of the signature), and the answer waits for both: no
        // signature leaves keyward before its record is durable, and a
        // request takes the longer of the two instead of their sum. A
        // signing that fails after its record committed leaves the record
        // of an attempt whose answer was an error.
        let needed_at = pending.expected_at();
        let (signature, recorded) = tokio::join!(
            pending
                .wait()
                .instrument(tracing::debug_span!(target: traces::TARGET, "pool sign")),
            self.log
                .record(record, needed_at)
                .instrument(tracing::debug_span!(target: traces::TARGET, "store commit")),
        );
        recorded?;
        Ok(signature?)
    }

    /// Signs `digest` with the agent's custodial key and records it before
    /// returning. With `key_id`, that key must be the current one or a
    /// retired one still within its grace period.
    pub async fn sign(
        &self,
        signing: &SigningAgent,
        digest: [u8; 32],
        request_id: &str,
        policy_version: i64,
        key_id: Option<&str>,
    ) -> Result<AgentSignature, AgentError> {
        let (agent, now) = (&signing.name, signing.at);
        let (key, certificate_serial) = match key_id {
            Some(requested) if requested != signing.key.id().as_str() => (
                self.retired_key_in_grace(agent, requested, now).await?,
                None,
            ),
            _ => (signing.key.clone(), signing.live_certificate()),
        };
        let signature = self
            .sign_and_record(
                agent,
                &key,
                digest,
                Purpose::Sign,
                SigningRequest {
                    id: request_id,
                    policy_version,
                    at: now,
                },
            )
            .await?;
        Ok(AgentSignature {
            signature,
            key_id: key.id().clone(),
            certificate_serial,
        })
    }

    /// A key the agent rotated away from, if it may still sign now.
    async fn retired_key_in_grace(
        &self,
        agent: &AgentName,
        key_id: &str,
        now: time::OffsetDateTime,
    ) -> Result<KeyRef, AgentError> {
        let retired = self.store.retired_key(key_id).await?;
        match retired {
            Some(r)
                if r.agent_name == agent.as_str()
                    && r.destroyed_at.is_none()
                    && now.unix_timestamp() < r.sign_until =>
            {
                super::custodial_key_ref(
                    &r.key_id,
                    Some(&r.public_key_der),
                    r.key_wrapped.as_deref(),
                )
            }
            _ => Err(AgentError::KeyRetired(key_id.to_owned())),
        }
    }

    /// Signs an envelope from `agent` with its custodial key. The envelope
    /// carries the agent's newest certificate and keyward's chain, and
    /// expires no later than that certificate, so that it verifies for its
    /// whole lifetime.
    pub async fn sign_message(
        &self,
        signing: &SigningAgent,
        message: MessageRequest<'_>,
        request_id: &str,
        policy_version: i64,
    ) -> Result<SignedMessage, AgentError> {
        let (agent, key, now) = (&signing.name, &signing.key, signing.at);
        let serial = signing
            .live_certificate()
            .ok_or_else(|| AgentError::NoCertificate(agent.to_string()))?;
        let record =
            self.store.certificate(&serial).await?.ok_or_else(|| {
                AgentError::Corrupt(format!("certificate {serial} is not stored"))
            })?;
        let leaf =
            Certificate::from_der(&record.der).map_err(|e| AgentError::Corrupt(e.to_string()))?;
        let iat = now.unix_timestamp();
        let lifetime = message
            .lifetime_secs
            .min(record.not_after.saturating_sub(iat));
        if lifetime < 1 {
            return Err(AgentError::NoCertificate(agent.to_string()));
        }
        let iss = self.authority.trust_domain().agent_spiffe_id(agent);
        let claims = Claims::new(&iss, message.audience, message.intent, iat, lifetime)?;
        let mut chain = Vec::with_capacity(1 + self.authority.chain().len());
        chain.push(leaf);
        chain.extend(self.authority.chain().iter().cloned());
        let header = Header::new(&chain)?;
        let input = envelope::signing_input(&header, &claims);
        let what = serde_json::json!({
            "aud": claims.aud(),
            "intent": claims.intent(),
            "jti": claims.jti(),
            "exp": claims.exp(),
        })
        .to_string();
        // Recorded at the instant `iat` is taken from, so that keyward's
        // verifier finds it in the second `iat` names (`message_made_ms`).
        let signature = self
            .sign_and_record(
                agent,
                key,
                envelope::signing_digest(&input),
                Purpose::Message(&what),
                SigningRequest {
                    id: request_id,
                    policy_version,
                    at: now,
                },
            )
            .await?;
        Ok(SignedMessage {
            token: envelope::assemble(&input, &signature.to_bytes().into()),
            claims,
            certificate_serial: serial,
        })
    }
}
