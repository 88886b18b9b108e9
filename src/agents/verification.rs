//! Verification on behalf of relying parties: a signature by an agent (or
//! by the holder of a keyward certificate), and signed envelopes.
//!
//! The cryptography is `crate::pki::verify` and `crate::agents::envelope`, the same code
//! an offline verifier runs. What this adds is what only keyward knows, so
//! that `valid` here means "keyward made this signature for that agent,
//! under its policy": the signer's certificate must be for a key keyward
//! holds (message signing, never an agent's own client key); an envelope
//! must be in keyward's signature log as a message (a raw signature over an
//! envelope's digest, which an agent allowed only `sign` could ask for,
//! does not pass); and keyward's revocation records apply. For a key
//! reported compromised no caller-chosen time is safe: only a signature the
//! log shows keyward made before the report stands. The log is searched by
//! key within a time window: an envelope's `iat` second, or, for a
//! compromised key only, the key's history up to the report.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use der::Decode;

use crate::agents::envelope::{self, ReplayCache, VerifiedMessage};
use crate::identity::AgentName;
use crate::pki::cert::Certificate;
use crate::pki::profile::ID_KP_DOCUMENT_SIGNING;
use crate::pki::verify::{self, VerifiedLeaf};
use crate::pki::Authority;
use crate::store::Store;

use super::signing::{message_made_ms, MESSAGE_PURPOSE};
use super::AgentError;

/// How many of an agent's certificates are tried for one verification: it
/// bounds the work a request can cause. An agent rarely holds more than two
/// at once (the current one and its successor during renewal).
const MAX_CANDIDATE_CERTIFICATES: i64 = 16;

/// What kind of signature keyward's records are asked about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SignatureKind {
    /// Over a digest the caller gives (`POST /v1/verify`).
    Raw,
    /// An envelope, made in the second its `iat` names.
    Message { iat: i64 },
}

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

    /// What keyward's records say of a signature over `digest` that the
    /// certificate `serial`'s key made (cryptographically checked already):
    /// `None` when it stands, else the reason it does not.
    async fn keyward_verdict(
        &self,
        serial: &str,
        digest: &[u8; 32],
        kind: SignatureKind,
        at: SystemTime,
    ) -> Result<Option<&'static str>, AgentError> {
        // A certificate for a key keyward holds is always recorded, with
        // the key's id; anything else is not one keyward signs with.
        let Some(record) = self.store.certificate(serial).await? else {
            return Ok(Some("unrecorded_signature"));
        };
        let Some(key_id) = record.key_id.as_deref() else {
            return Ok(Some("wrong_key_purpose"));
        };
        let digest = hex::encode(digest);
        let (purpose, mut made_ms) = match kind {
            SignatureKind::Message { iat } => (Some(MESSAGE_PURPOSE), message_made_ms(iat)),
            SignatureKind::Raw => (None, i64::MIN..i64::MAX),
        };
        let compromised_at = self
            .store
            .key_compromised_at(&record.public_key_sha256)
            .await?;
        if let Some(compromised_at) = compromised_at {
            // No time a caller names is safe for a compromised key: only
            // keyward's record of a signature made before the report.
            made_ms.end = made_ms.end.min(compromised_at.saturating_mul(1000));
            let before = !made_ms.is_empty()
                && self
                    .store
                    .signature_made(key_id, &digest, purpose, made_ms)
                    .await?;
            return Ok((!before).then_some("revoked"));
        }
        if record
            .revoked_at
            .is_some_and(|revoked_at| revoked_at <= unix(at))
        {
            return Ok(Some("revoked"));
        }
        // A raw signature's time is unknown, and a search through all of a
        // key's signatures is no price for every verification: a custodial
        // key signs only through keyward until it is reported compromised.
        if kind == SignatureKind::Raw {
            return Ok(None);
        }
        let recorded = self
            .store
            .signature_made(key_id, &digest, purpose, made_ms)
            .await?;
        Ok((!recorded).then_some("unrecorded_signature"))
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
        if !verified.has_extended_key_usage(ID_KP_DOCUMENT_SIGNING) {
            return Ok(Verdict::Invalid {
                reason: "wrong_key_purpose",
            });
        }
        if let Err(e) = verify::verify_signature(verified.public_key(), digest, signature) {
            return Ok(Verdict::Invalid { reason: e.reason() });
        }
        if let Some(reason) = self
            .keyward_verdict(verified.serial_hex(), digest, SignatureKind::Raw, at)
            .await?
        {
            return Ok(Verdict::Invalid { reason });
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
        if let Some(reason) = self
            .keyward_verdict(
                message.signer_serial(),
                message.digest(),
                SignatureKind::Message { iat: message.iat() },
                now,
            )
            .await?
        {
            return Ok(Verdict::Invalid { reason });
        }
        Ok(Verdict::Valid(message))
    }
}
