//! Verification on behalf of relying parties: a signature by an agent (or
//! by the holder of a keyward certificate), and signed envelopes.
//!
//! The cryptography is `crate::verify` and `crate::envelope`, the same code
//! an offline verifier runs. What this adds is what only keyward knows: the
//! agent's certificates, and whether keyward has revoked one of them.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use der::Decode;

use crate::ca::cert::Certificate;
use crate::ca::Authority;
use crate::envelope::{self, ReplayCache, VerifiedMessage};
use crate::identity::AgentName;
use crate::store::Store;
use crate::verify::{self, VerifiedLeaf};

use super::AgentError;

/// How many of an agent's certificates are tried for one verification: it
/// bounds the work a request can cause. An agent rarely holds more than two
/// at once (the current one and its successor during renewal).
const MAX_CANDIDATE_CERTIFICATES: i64 = 16;

/// Whose signature is being checked.
pub enum Signer<'a> {
    /// A certificate (chain) the caller presents; `[0]` is the signer's.
    Certificate(&'a [Certificate]),
    /// A registered agent: its certificates valid at the time are tried.
    Agent(&'a AgentName),
}

/// The outcome of a verification the caller could ask about. A refusal is
/// an answer, not an error: the reason is machine-readable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict<T> {
    Valid(T),
    Invalid { reason: &'static str },
}

/// The certificate a valid signature was checked against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignerCertificate {
    pub serial: String,
    pub spiffe_id: Option<String>,
}

pub struct Verifier {
    store: Arc<dyn Store>,
    /// keyward's roots: the active CA's and, during a rotation, previous ones.
    anchors: Vec<Certificate>,
    /// Every non-root certificate of those chains.
    intermediates: Vec<Certificate>,
    replay: ReplayCache,
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl Verifier {
    pub fn new(store: Arc<dyn Store>, authority: Arc<Authority>) -> Self {
        Self {
            store,
            anchors: authority.roots(),
            intermediates: authority.all_intermediates(),
            replay: ReplayCache::new(ReplayCache::DEFAULT_CAPACITY),
        }
    }

    /// keyward's roots: what every verification here ends at.
    fn anchors(&self) -> &[Certificate] {
        &self.anchors
    }

    /// The chain of `leaf` to keyward's root at `at`, with keyward's own
    /// intermediates and the caller's as candidates.
    fn chain(
        &self,
        leaf: &Certificate,
        offered: &[Certificate],
        at: SystemTime,
    ) -> Result<VerifiedLeaf, verify::VerifyError> {
        let mut intermediates = self.intermediates.clone();
        intermediates.extend(offered.iter().cloned());
        verify::verify_chain(leaf, &intermediates, self.anchors(), at)
    }

    /// True when keyward issued the certificate and has revoked it by `at`.
    async fn revoked(&self, serial: &str, at: SystemTime) -> Result<bool, AgentError> {
        let record = self.store.certificate(serial).await?;
        Ok(record
            .and_then(|r| r.revoked_at)
            .is_some_and(|revoked_at| revoked_at <= unix(at)))
    }

    /// Checks `signature` (DER or P1363) over `digest` by `signer`, with the
    /// chain to keyward's root and validity evaluated at `at`.
    pub async fn verify_signature(
        &self,
        signer: Signer<'_>,
        digest: &[u8; 32],
        signature: &[u8],
        at: SystemTime,
    ) -> Result<Verdict<SignerCertificate>, AgentError> {
        match signer {
            Signer::Certificate(chain) => {
                let Some((leaf, offered)) = chain.split_first() else {
                    return Ok(Verdict::Invalid {
                        reason: "no_certificate",
                    });
                };
                self.verify_with(leaf, offered, digest, signature, at).await
            }
            Signer::Agent(name) => {
                if self.store.agent(name.as_str()).await?.is_none() {
                    return Err(AgentError::NotFound(name.to_string()));
                }
                let candidates = self
                    .store
                    .certificates_of_agent_at(name.as_str(), unix(at), MAX_CANDIDATE_CERTIFICATES)
                    .await?;
                // The most telling refusal wins when no certificate fits:
                // a bad signature says more than "no certificate".
                let mut verdict = Verdict::Invalid {
                    reason: "no_valid_certificate",
                };
                for record in candidates {
                    let leaf = Certificate::from_der(&record.der)
                        .map_err(|e| AgentError::Corrupt(e.to_string()))?;
                    match self.verify_with(&leaf, &[], digest, signature, at).await? {
                        valid @ Verdict::Valid(_) => return Ok(valid),
                        invalid => verdict = invalid,
                    }
                }
                Ok(verdict)
            }
        }
    }

    async fn verify_with(
        &self,
        leaf: &Certificate,
        offered: &[Certificate],
        digest: &[u8; 32],
        signature: &[u8],
        at: SystemTime,
    ) -> Result<Verdict<SignerCertificate>, AgentError> {
        let verified = match self.chain(leaf, offered, at) {
            Ok(verified) => verified,
            Err(e) => return Ok(Verdict::Invalid { reason: e.reason() }),
        };
        if let Err(e) = verify::verify_signature(verified.public_key(), digest, signature) {
            return Ok(Verdict::Invalid { reason: e.reason() });
        }
        if self.revoked(verified.serial_hex(), at).await? {
            return Ok(Verdict::Invalid { reason: "revoked" });
        }
        Ok(Verdict::Valid(SignerCertificate {
            serial: verified.serial_hex().to_owned(),
            spiffe_id: verified.spiffe_id().map(str::to_owned),
        }))
    }

    /// Verifies an envelope for `audience` now, and accepts each message
    /// once: a second verification of the same message answers `replayed`.
    /// The replay memory is this process's; see `ReplayCache`.
    pub async fn verify_message(
        &self,
        token: &str,
        audience: &str,
    ) -> Result<Verdict<VerifiedMessage>, AgentError> {
        let now = SystemTime::now();
        let message =
            match envelope::verify_once(&self.replay, token, self.anchors(), audience, now) {
                Ok(message) => message,
                Err(e) => return Ok(Verdict::Invalid { reason: e.reason() }),
            };
        // After the replay check, so a revoked signer's message is spent too.
        if self.revoked(message.signer_serial(), now).await? {
            return Ok(Verdict::Invalid { reason: "revoked" });
        }
        Ok(Verdict::Valid(message))
    }
}
