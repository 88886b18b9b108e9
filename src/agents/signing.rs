//! Signing for agents with their custodial keys: the hot path.
//!
//! agent (from a short-lived cache) -> pool signature on the token ->
//! durable record (group commit) -> answer.

use std::sync::Arc;

use p256::ecdsa::Signature;

use super::cache::{AgentCache, SigningView};
use super::{AgentError, ACTIVE};
use crate::identity::AgentName;
use crate::keys::KeyId;
use crate::pool::KeyPool;
use crate::store::{SignatureLog, SignatureRecord, Store};

/// A signature made for an agent.
#[derive(Clone, Debug)]
pub struct AgentSignature {
    pub signature: Signature,
    pub key_id: KeyId,
    pub certificate_serial: Option<String>,
}

pub struct AgentSigner {
    pool: KeyPool,
    store: Arc<dyn Store>,
    log: SignatureLog,
    cache: Arc<AgentCache>,
}

/// Why the signature is made, recorded with it.
#[derive(Clone, Copy, Debug)]
pub enum Purpose {
    Sign,
    Message,
}

impl Purpose {
    fn as_str(self) -> &'static str {
        match self {
            Purpose::Sign => "sign",
            Purpose::Message => "message",
        }
    }
}

impl AgentSigner {
    pub fn new(
        pool: KeyPool,
        store: Arc<dyn Store>,
        log: SignatureLog,
        cache: Arc<AgentCache>,
    ) -> Self {
        Self {
            pool,
            store,
            log,
            cache,
        }
    }

    /// What signing needs to know about the agent, from the cache or the
    /// database.
    async fn view(&self, agent: &AgentName, now: i64) -> Result<Arc<SigningView>, AgentError> {
        if let Some(view) = self.cache.get(agent) {
            if view.certificate_serial.is_none() || view.certificate_not_after > now {
                return Ok(view);
            }
        }
        let record = self
            .store
            .agent(agent.as_str())
            .await?
            .ok_or_else(|| AgentError::NotFound(agent.to_string()))?;
        let key_id = record
            .key_id
            .as_deref()
            .map(KeyId::parse)
            .transpose()
            .map_err(|e| AgentError::Corrupt(e.to_string()))?;
        let newest = match &key_id {
            Some(key) => {
                self.store
                    .newest_certificate_for_key(key.as_str(), now)
                    .await?
            }
            None => None,
        };
        let (certificate_serial, certificate_not_after) = match newest {
            Some((serial, not_after)) => (Some(serial), not_after),
            None => (None, 0),
        };
        let view = SigningView {
            key_id,
            status: record.status,
            certificate_serial,
            certificate_not_after,
        };
        Ok(self.cache.put(agent, view))
    }

    /// Signs `digest` with the agent's custodial key and records it before
    /// returning.
    pub async fn sign(
        &self,
        agent: &AgentName,
        digest: [u8; 32],
        purpose: Purpose,
        request_id: &str,
        policy_version: i64,
    ) -> Result<AgentSignature, AgentError> {
        let now = time::OffsetDateTime::now_utc();
        let view = self.view(agent, now.unix_timestamp()).await?;
        if view.status != ACTIVE {
            return Err(AgentError::NotActive(
                agent.to_string(),
                view.status.clone(),
            ));
        }
        let key_id = view
            .key_id
            .clone()
            .ok_or_else(|| AgentError::NoCustodialKey(agent.to_string()))?;
        let signature = self.pool.sign(&key_id, digest).await?;
        self.log
            .record(SignatureRecord {
                request_id: request_id.to_owned(),
                agent_name: agent.to_string(),
                key_id: key_id.to_string(),
                digest: hex::encode(digest),
                purpose: purpose.as_str().to_owned(),
                policy_version,
                signed_at_ms: (now.unix_timestamp_nanos() / 1_000_000) as i64,
            })
            .await?;
        Ok(AgentSignature {
            signature,
            key_id,
            certificate_serial: view.certificate_serial.clone(),
        })
    }
}
