//! The delegated OCSP responder (RFC 6960 §4.2.2.2): OCSP answers are
//! signed by a key of their own on the token, not by a CA key. Each CA
//! keyward answers for (the active one and those a rotation replaced)
//! certifies that key for a day with id-kp-OCSPSigning and
//! id-pkix-ocsp-nocheck; the certificate is renewed once half its life is
//! gone, and travels in every response so that clients find the signer.
//!
//! Signed answers are kept until shortly before their nextUpdate, or until
//! the revocation set changes, so a flood of OCSP requests costs no CA-key
//! operation and one responder signature per certificate and refresh.
//! Cached answers carry no nonce (as RFC 5019's pre-produced responses do):
//! an answer echoing one client's nonce could not be served to the next,
//! and signing per nonce would let anyone spend the token by varying it.
//! A replayed answer is at most `OCSP_LIFETIME` old, and a revocation
//! drops the cache (SECURITY.md).

use super::cert::CertificateText;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use p256::PublicKey;

use super::cert::Certificate;
use super::{Authority, CaError};
use crate::audit::AuditEvent;
use crate::keys::KeyId;
use crate::store::Store;

/// How long a responder certificate lives.
pub const RESPONDER_CERT_LIFETIME: Duration = Duration::from_secs(86_400);

/// Answers kept at most; past it, lapsed answers go, and all of them if
/// none has lapsed (a flood of distinct certificates costs signatures, not
/// memory).
const MAX_CACHED_ANSWERS: usize = 65_536;

/// A signed OCSP response and until when it is served as is.
struct CachedAnswer {
    der: Arc<Vec<u8>>,
    refresh_at: SystemTime,
    /// The revocation set's generation it was built under.
    generation: u64,
}

pub struct OcspResponder {
    key: KeyId,
    public_key: PublicKey,
    /// The current certificate from each CA, by CA key id. Held across a
    /// renewal, so concurrent requests wait for one CA signature.
    certificates: tokio::sync::Mutex<HashMap<KeyId, Arc<Certificate>>>,
    answers: Mutex<HashMap<Vec<u8>, CachedAnswer>>,
}

impl OcspResponder {
    /// `key` is the responder's signing key on the token.
    pub fn new(key: KeyId, public_key: PublicKey) -> Self {
        Self {
            key,
            public_key,
            certificates: tokio::sync::Mutex::new(HashMap::new()),
            answers: Mutex::new(HashMap::new()),
        }
    }

    pub fn key(&self) -> &KeyId {
        &self.key
    }

    /// The responder's certificate from the CA whose key is `ca_key`,
    /// issued (and audited) when there is none yet or half its life is
    /// gone.
    pub async fn certificate_from(
        &self,
        authority: &Authority,
        store: &dyn Store,
        ca_key: &KeyId,
    ) -> Result<Arc<Certificate>, CaError> {
        let mut certificates = self.certificates.lock().await;
        let now = SystemTime::now();
        if let Some(current) = certificates.get(ca_key) {
            let validity = &current.tbs_certificate.validity;
            let (from, until) = (
                validity.not_before.to_system_time(),
                validity.not_after.to_system_time(),
            );
            let half_life = until.duration_since(from).unwrap_or_default() / 2;
            if now < from + half_life {
                return Ok(current.clone());
            }
        }
        let issued = authority
            .issue_ocsp_responder_certificate(ca_key, &self.public_key, RESPONDER_CERT_LIFETIME)
            .await?;
        let audit = AuditEvent::new("keyward", "ocsp_responder.certify", issued.serial_hex())
            .with("ca_key_id", ca_key.to_string())
            .with("responder_key_id", self.key.to_string());
        store.append_audit_event(&audit).await?;
        let issued = Arc::new(issued);
        certificates.insert(ca_key.clone(), issued.clone());
        Ok(issued)
    }

    /// The answer kept under `request_key`, if it is still to be served
    /// under the revocation set's `generation`.
    pub fn cached(&self, request_key: &[u8], generation: u64) -> Option<Arc<Vec<u8>>> {
        let answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        answers
            .get(request_key)
            .filter(|a| a.generation == generation && SystemTime::now() < a.refresh_at)
            .map(|a| a.der.clone())
    }

    pub fn remember(
        &self,
        request_key: Vec<u8>,
        der: Arc<Vec<u8>>,
        refresh_at: SystemTime,
        generation: u64,
    ) {
        let mut answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        if answers.len() >= MAX_CACHED_ANSWERS {
            let now = SystemTime::now();
            answers.retain(|_, a| a.generation == generation && now < a.refresh_at);
            if answers.len() >= MAX_CACHED_ANSWERS {
                answers.clear();
            }
        }
        answers.insert(
            request_key,
            CachedAnswer {
                der,
                refresh_at,
                generation,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn responder() -> OcspResponder {
        let key = p256::SecretKey::random(&mut rand::rngs::OsRng).public_key();
        OcspResponder::new(KeyId::random("ocsp-responder"), key)
    }

    #[test]
    fn an_answer_is_served_until_its_refresh_or_a_revocation() {
        let responder = responder();
        let later = SystemTime::now() + Duration::from_secs(60);
        responder.remember(b"a".to_vec(), Arc::new(vec![1]), later, 7);
        assert_eq!(responder.cached(b"a", 7).as_deref(), Some(&vec![1]));
        assert!(responder.cached(b"a", 8).is_none(), "the set changed");
        assert!(responder.cached(b"b", 7).is_none());
        let past = SystemTime::now() - Duration::from_secs(1);
        responder.remember(b"c".to_vec(), Arc::new(vec![2]), past, 7);
        assert!(responder.cached(b"c", 7).is_none(), "due for refresh");
    }

    #[test]
    fn the_cache_stays_bounded() {
        let responder = responder();
        let later = SystemTime::now() + Duration::from_secs(60);
        for i in 0..MAX_CACHED_ANSWERS + 10 {
            responder.remember(i.to_be_bytes().to_vec(), Arc::new(vec![]), later, 1);
        }
        let held = responder.answers.lock().unwrap().len();
        assert!(held <= MAX_CACHED_ANSWERS, "{held}");
    }
}
