//! Publishing revocation status: the CRL, signed by the CA key on the
//! token, and OCSP answers, signed by the delegated responder's key
//! (`responder`), both through the pool.
//!
//! Both read the database, not the in-memory set: a relying party asks
//! rarely compared with signing, and the answer must hold even on a replica
//! whose set is a moment behind. The set's generation only tells the CRL
//! cache when to rebuild.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use super::crl::{self, CrlRequest, RevocationReason, RevokedEntry};
use super::ocsp::{self, CertStatus, ResponseStatus, SingleResponseInfo};
use super::responder::OcspResponder;
use super::{Authority, CaError, Certificate};
use crate::keys::KeyId;
use crate::revocation::RevocationSet;
use crate::store::Store;

/// How long a CRL is valid (its nextUpdate).
pub const CRL_LIFETIME: Duration = Duration::from_secs(600);
/// A CRL is rebuilt this long before its nextUpdate, so that a relying
/// party never fetches one that is about to lapse.
const CRL_REFRESH_MARGIN: Duration = Duration::from_secs(120);
/// How long an OCSP answer is valid (its nextUpdate).
pub const OCSP_LIFETIME: Duration = Duration::from_secs(300);
/// A kept OCSP answer is signed anew this long before its nextUpdate.
const OCSP_REFRESH_MARGIN: Duration = Duration::from_secs(60);

struct PublishedCrl {
    der: Arc<Vec<u8>>,
    generation: u64,
    next_update: SystemTime,
}

pub struct StatusPublisher {
    authority: Arc<Authority>,
    store: Arc<dyn Store>,
    revocations: Arc<RevocationSet>,
    /// Each CA's current CRL, by CA key. Held while a CRL is built, so
    /// concurrent requests wait for one build instead of each signing
    /// their own.
    crls: tokio::sync::Mutex<std::collections::HashMap<KeyId, PublishedCrl>>,
    responder: OcspResponder,
}

fn at_unix(seconds: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(seconds.max(0) as u64)
}

fn whole_seconds(t: SystemTime) -> SystemTime {
    at_unix(
        t.duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64),
    )
}

impl StatusPublisher {
    pub fn new(
        authority: Arc<Authority>,
        store: Arc<dyn Store>,
        revocations: Arc<RevocationSet>,
        responder: OcspResponder,
    ) -> Self {
        Self {
            authority,
            store,
            revocations,
            crls: tokio::sync::Mutex::new(std::collections::HashMap::new()),
            responder,
        }
    }

    /// The active CA's current CRL (DER).
    pub async fn crl(&self) -> Result<Arc<Vec<u8>>, CaError> {
        let (ca, key) = (self.authority.certificate(), self.authority.key_id());
        self.crl_of(ca, key).await
    }

    /// The CRL of the CA (active or previous) whose key identifier, in
    /// hex, is `identifier`; `None` for no CA of keyward's.
    pub async fn crl_for(&self, identifier: &str) -> Result<Option<Arc<Vec<u8>>>, CaError> {
        match self.authority.ca_identified_by(identifier) {
            Some((ca, key)) => Ok(Some(self.crl_of(ca, key).await?)),
            None => Ok(None),
        }
    }

    /// `ca`'s current CRL: rebuilt when the revocation set has changed
    /// since the last one, or when that one nears its nextUpdate. It lists
    /// every revoked certificate keyward has not seen expire, whichever CA
    /// issued it: the store does not record the issuer, and a serial
    /// (random, 16 bytes) names no other CA's certificate.
    async fn crl_of(&self, ca: &Certificate, key: &KeyId) -> Result<Arc<Vec<u8>>, CaError> {
        let mut crls = self.crls.lock().await;
        let now = whole_seconds(SystemTime::now());
        let generation = self.revocations.generation();
        if let Some(current) = crls.get(key) {
            if current.generation == generation && now + CRL_REFRESH_MARGIN < current.next_update {
                return Ok(current.der.clone());
            }
        }
        let unix_now = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let snapshot = self.store.revocation_snapshot(unix_now).await?;
        let entries = snapshot
            .certificates
            .iter()
            .map(|c| {
                Ok(RevokedEntry {
                    serial: hex::decode(&c.serial)
                        .map_err(|_| CaError::Internal(format!("stored serial {:?}", c.serial)))?,
                    revoked_at: at_unix(c.revoked_at),
                    reason: RevocationReason::parse(&c.reason)
                        .unwrap_or(RevocationReason::Unspecified),
                })
            })
            .collect::<Result<Vec<_>, CaError>>()?;
        let number = self.store.next_crl_number().await?;
        let next_update = now + CRL_LIFETIME;
        let tbs = crl::tbs_cert_list(&CrlRequest {
            issuer: ca,
            entries: &entries,
            crl_number: number as u64,
            this_update: now,
            next_update,
        })?;
        let signature = self
            .authority
            .sign_digest_with(key, Sha256::digest(&tbs).into())
            .await?;
        let der = Arc::new(crl::assemble(&tbs, signature.to_der().as_bytes())?);
        crls.insert(
            key.clone(),
            PublishedCrl {
                der: der.clone(),
                generation,
                next_update,
            },
        );
        Ok(der)
    }

    /// Answers an OCSP request (DER) with an OCSP response (DER). Never an
    /// error: what goes wrong is said in the response status, as RFC 6960
    /// requires.
    pub async fn ocsp(&self, request_der: &[u8]) -> Vec<u8> {
        match self.try_ocsp(request_der).await {
            Ok(response) => response,
            Err(status) => ocsp::error_response(status),
        }
    }

    async fn try_ocsp(&self, request_der: &[u8]) -> Result<Vec<u8>, ResponseStatus> {
        let request =
            ocsp::parse_request(request_der).map_err(|_| ResponseStatus::MalformedRequest)?;
        // keyward answers only for its own CAs (RFC 6960 §2.3): the active
        // one or one it replaced, and one per request.
        let (_, issuer_key) = self
            .authority
            .issuer_matching(|ca| request.cert_ids.iter().all(|id| id.matches_issuer(ca)))
            .ok_or(ResponseStatus::Unauthorized)?;
        // Read before the statuses: a revocation landing meanwhile makes
        // this answer's generation stale at once.
        let generation = self.revocations.generation();
        let mut request_key = issuer_key.to_string().into_bytes();
        for id in &request.cert_ids {
            request_key.extend_from_slice(id.der());
        }
        if let Some(answer) = self.responder.cached(&request_key, generation) {
            return Ok(answer.as_ref().clone());
        }
        let now = whole_seconds(SystemTime::now());
        let mut statuses = Vec::with_capacity(request.cert_ids.len());
        for id in &request.cert_ids {
            let record = self
                .store
                .certificate(&hex::encode(&id.serial))
                .await
                .map_err(|e| {
                    tracing::warn!(error = %e, "OCSP status lookup failed");
                    ResponseStatus::TryLater
                })?;
            statuses.push(match record {
                None => CertStatus::Unknown,
                Some(record) => match (record.revoked_at, &record.revocation_reason) {
                    (Some(at), reason) => CertStatus::Revoked {
                        at: at_unix(at),
                        reason: reason.as_deref().and_then(RevocationReason::parse),
                    },
                    (None, _) => CertStatus::Good,
                },
            });
        }
        let responses: Vec<SingleResponseInfo> = request
            .cert_ids
            .iter()
            .zip(statuses)
            .map(|(cert_id, status)| SingleResponseInfo {
                cert_id,
                status,
                this_update: now,
                next_update: now + OCSP_LIFETIME,
            })
            .collect();
        let internal = |e: CaError| {
            tracing::warn!(error = %e, "building an OCSP response failed");
            ResponseStatus::InternalError
        };
        let unavailable = |e: CaError| match e {
            CaError::Pool(_) | CaError::Store(_) => {
                tracing::warn!(error = %e, "OCSP responder unavailable");
                ResponseStatus::TryLater
            }
            other => internal(other),
        };
        let responder_cert = self
            .responder
            .certificate_from(&self.authority, self.store.as_ref(), issuer_key)
            .await
            .map_err(unavailable)?;
        // No nonce, even when asked for one (see `responder`).
        let data = ocsp::response_data(&responder_cert, &responses, now, None).map_err(internal)?;
        let signature = self
            .authority
            .sign_digest_with(self.responder.key(), Sha256::digest(&data).into())
            .await
            .map_err(unavailable)?;
        let der = ocsp::assemble_basic(
            &data,
            signature.to_der().as_bytes(),
            std::slice::from_ref(responder_cert.as_ref()),
        )
        .map_err(internal)?;
        // An unknown serial may be one issued a moment from now.
        if responses
            .iter()
            .all(|r| !matches!(r.status, CertStatus::Unknown))
        {
            let refresh_at = now + OCSP_LIFETIME - OCSP_REFRESH_MARGIN;
            self.responder
                .remember(request_key, Arc::new(der.clone()), refresh_at, generation);
        }
        Ok(der)
    }
}
