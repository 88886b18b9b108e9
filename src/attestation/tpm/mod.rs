//! Attestation of keys that agents create in their own TPM.
//!
//! The verifier side runs without a TPM. A challenge checks the agent's EK
//! certificate against the configured manufacturer roots and its AK's
//! attributes, then encrypts a random secret to the EK, bound to the AK's
//! name (MakeCredential, computed in software) and pairs it with a nonce.
//! Only the TPM holding that EK, with that AK loaded, can recover the
//! secret (ActivateCredential). The evidence that comes back is a
//! TPM2_Certify of the new key by the AK, with the nonce as qualifying
//! data: it proves the key lives in the same TPM as the AK, and the secret
//! proves the AK lives in the TPM the EK certificate describes.

pub mod allowlist;
pub mod credential;
pub mod csr;
pub mod ek;
pub mod evidence;

use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::Serialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use self::allowlist::{ek_public_key_sha256, EkAllowList};
use self::credential::{make_credential, MadeCredential};
use self::ek::{ek_certificate_key_matches, verify_ek_certificate, EkRoots};
use self::evidence::{ParsedCertify, PublicArea};
use super::{AttestedKey, Verified};
use crate::store::{AttestationRecord, TpmChallengeRecord};

pub const FORMAT: &str = "tpm2-certify";
const DOCUMENT_FORMAT: &str = "keyward-tpm2-certify-v1";
/// Nonces (and the secrets paired with them) are this long.
pub const NONCE_LEN: usize = 32;
pub const DEFAULT_CHALLENGE_TTL: Duration = Duration::from_secs(300);

/// Why TPM evidence was refused. Each has its own code (`code()`), so an
/// agent, an operator and a test can tell the cases apart.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TpmAttestationError {
    #[error("{0} is malformed")]
    Malformed(&'static str),
    #[error("no TPM manufacturer roots and no EK allow-list are configured ([attestation.tpm])")]
    NoEkRoots,
    #[error("an EK certificate is required: this TPM's EK is not on the allow-list")]
    EkCertificateRequired,
    #[error("this TPM's EK is not on the allow-list")]
    EkNotAllowed,
    #[error("the EK certificate is not trusted: {0}")]
    EkUntrusted(String),
    #[error("the EK certificate's key is not the EK public area's key")]
    EkKeyMismatch,
    #[error("the EK cannot protect a credential: {0}")]
    EkUnsuitable(&'static str),
    #[error("the AK is not a restricted key, so its signature proves nothing about the TPM")]
    AkNotRestricted,
    #[error("the AK is unsuitable: {0}")]
    AkUnsuitable(&'static str),
    #[error("only SHA-256 and SHA-384 names are accepted")]
    UnsupportedNameAlg,
    #[error("the qualifying data is not a nonce keyward issued: stale or foreign evidence")]
    StaleNonce,
    #[error("the nonce has expired; ask for a new challenge")]
    NonceExpired,
    #[error("the nonce was used already")]
    NonceReplayed,
    #[error("the nonce was issued to another agent")]
    NonceOtherAgent,
    #[error("the credential secret is wrong: the AK and the EK are not in one TPM")]
    SecretMismatch,
    #[error("the attestation is not a TPM-generated structure")]
    AttestNotTpmGenerated,
    #[error("the attestation is not a TPM2_Certify result")]
    AttestWrongType,
    #[error("the AK's signature over the attestation does not verify")]
    SignatureInvalid,
    #[error("the certified object is not the key whose public area was given")]
    NameMismatch,
    #[error("the key is duplicable: fixedTPM and fixedParent must be set")]
    KeyDuplicable,
    #[error("the key was not generated in the TPM (sensitiveDataOrigin clear)")]
    KeyNotTpmGenerated,
    #[error("the key must be an unrestricted signing-only key")]
    KeyNotSignOnly,
    #[error("only ECC P-256 keys are certified")]
    KeyUnsupported,
}

impl TpmAttestationError {
    pub fn code(&self) -> &'static str {
        use TpmAttestationError::*;
        match self {
            Malformed(_) => "tpm_evidence_malformed",
            NoEkRoots => "ek_roots_not_configured",
            EkCertificateRequired => "ek_certificate_required",
            EkNotAllowed => "ek_not_allowed",
            EkUntrusted(_) => "ek_untrusted",
            EkKeyMismatch => "ek_key_mismatch",
            EkUnsuitable(_) => "ek_unsuitable",
            AkNotRestricted => "ak_not_restricted",
            AkUnsuitable(_) => "ak_unsuitable",
            UnsupportedNameAlg => "unsupported_name_alg",
            StaleNonce => "stale_nonce",
            NonceExpired => "nonce_expired",
            NonceReplayed => "nonce_replayed",
            NonceOtherAgent => "nonce_other_agent",
            SecretMismatch => "credential_secret_mismatch",
            AttestNotTpmGenerated => "attest_not_tpm_generated",
            AttestWrongType => "attest_wrong_type",
            SignatureInvalid => "attest_signature_invalid",
            NameMismatch => "certified_name_mismatch",
            KeyDuplicable => "key_duplicable",
            KeyNotTpmGenerated => "key_not_tpm_generated",
            KeyNotSignOnly => "key_not_sign_only",
            KeyUnsupported => "key_unsupported",
        }
    }
}

/// What an agent sends to be challenged.
pub struct ChallengeRequest {
    /// Absent for a TPM without one: then its EK must be on the allow-list.
    pub ek_certificate_der: Option<Vec<u8>>,
    /// Intermediates the agent holds (some TPMs ship them in NV).
    pub ek_intermediates_der: Vec<Vec<u8>>,
    /// The EK's `TPMT_PUBLIC` (or `TPM2B_PUBLIC`).
    pub ek_public: Vec<u8>,
    /// The AK's `TPMT_PUBLIC` (or `TPM2B_PUBLIC`).
    pub ak_public: Vec<u8>,
}

/// A challenge ready to store and send.
pub struct IssuedChallenge {
    pub record: TpmChallengeRecord,
    pub credential: MadeCredential,
}

/// Verifies TPM evidence against the configured EK roots and allow-list.
pub struct TpmVerifier {
    roots: EkRoots,
    allowlist: EkAllowList,
    challenge_ttl: Duration,
}

impl TpmVerifier {
    pub fn new(roots: EkRoots, allowlist: EkAllowList, challenge_ttl: Duration) -> Self {
        Self {
            roots,
            allowlist,
            challenge_ttl,
        }
    }

    /// Checks the EK certificate and the AK, and makes a challenge for
    /// `agent`: a nonce, and a fresh secret that only the EK's TPM can
    /// recover, and only for this AK.
    pub fn challenge(
        &self,
        agent: &str,
        request: &ChallengeRequest,
        now: SystemTime,
    ) -> Result<IssuedChallenge, TpmAttestationError> {
        if self.roots.is_empty() && self.allowlist.is_empty() {
            return Err(TpmAttestationError::NoEkRoots);
        }
        let ek_public = PublicArea::parse(&request.ek_public, "EK public area")?;
        let protection = ek_public.ek_protection()?;
        let key_digest = ek_public_key_sha256(&protection.key)
            .ok_or(TpmAttestationError::EkUnsuitable("EK key has no SPKI form"))?;
        // The operator's explicit list wins; otherwise the certificate
        // must chain to a manufacturer root.
        let (ek_sha256, key_location) = if self.allowlist.contains(&key_digest) {
            (
                key_digest,
                format!(
                    "TPM with allow-listed EK, EK public key sha256:{}",
                    hex::encode(key_digest)
                ),
            )
        } else {
            let Some(certificate) = &request.ek_certificate_der else {
                return Err(if self.allowlist.is_empty() {
                    TpmAttestationError::EkCertificateRequired
                } else {
                    TpmAttestationError::EkNotAllowed
                });
            };
            if self.roots.is_empty() {
                return Err(TpmAttestationError::EkNotAllowed);
            }
            let ek =
                verify_ek_certificate(&self.roots, certificate, &request.ek_intermediates_der, now)
                    .map_err(|e| TpmAttestationError::EkUntrusted(e.to_string()))?;
            if !ek_certificate_key_matches(&ek.certificate, &protection.key) {
                return Err(TpmAttestationError::EkKeyMismatch);
            }
            let location = format!(
                "TPM manufacturer {} model {} version {}, EK certificate sha256:{}",
                ek.manufacturer.as_deref().unwrap_or("unknown"),
                ek.model.as_deref().unwrap_or("unknown"),
                ek.version.as_deref().unwrap_or("unknown"),
                hex::encode(ek.fingerprint_sha256),
            );
            (ek.fingerprint_sha256, location)
        };
        let ak = PublicArea::parse(&request.ak_public, "AK public area")?;
        ak.attestation_key()?;
        let ak_name = ak.name()?;

        let mut rng = rand::rngs::OsRng;
        let secret: [u8; NONCE_LEN] = rand::random();
        let nonce: [u8; NONCE_LEN] = rand::random();
        let credential = make_credential(&protection, &ak_name, &secret, &mut rng)
            .map_err(|_| TpmAttestationError::EkUnsuitable("cannot encrypt to this EK"))?;
        let at = unix(now);
        Ok(IssuedChallenge {
            record: TpmChallengeRecord {
                nonce: nonce.to_vec(),
                agent_name: agent.to_owned(),
                secret_sha256: Sha256::digest(secret).into(),
                ak_public: ak.bytes().to_vec(),
                ek_sha256,
                key_location,
                created_at: at,
                expires_at: at + self.challenge_ttl.as_secs() as i64,
                used_at: None,
            },
            credential,
        })
    }

    /// Checks evidence against the challenge its qualifying data named.
    /// The caller spends the challenge afterwards, atomically, so that of
    /// two concurrent presentations only one is accepted.
    pub fn verify(
        &self,
        agent: &str,
        challenge: &TpmChallengeRecord,
        secret: &[u8],
        evidence: &ParsedCertify,
        now: SystemTime,
    ) -> Result<Verified<TpmAttestedKey>, TpmAttestationError> {
        if challenge.used_at.is_some() {
            return Err(TpmAttestationError::NonceReplayed);
        }
        if unix(now) >= challenge.expires_at {
            return Err(TpmAttestationError::NonceExpired);
        }
        if challenge.agent_name != agent {
            return Err(TpmAttestationError::NonceOtherAgent);
        }
        let presented: [u8; 32] = Sha256::digest(secret).into();
        if !bool::from(presented.ct_eq(&challenge.secret_sha256)) {
            return Err(TpmAttestationError::SecretMismatch);
        }
        let ak = PublicArea::parse(&challenge.ak_public, "stored AK public area")?;
        let public_key = evidence.verify(&ak)?;

        let document = EvidenceDocument {
            format: DOCUMENT_FORMAT,
            agent,
            nonce_b64: B64.encode(&challenge.nonce),
            ek_sha256: hex::encode(challenge.ek_sha256),
            ak_public_b64: B64.encode(ak.bytes()),
            key_public_b64: B64.encode(evidence.key.bytes()),
            certify_info_b64: B64.encode(evidence.attest_bytes()),
            signature_b64: B64.encode(evidence.signature_bytes()),
        };
        let bytes = serde_json::to_vec(&document).expect("plain data serializes");
        let at = unix(now);
        Ok(Verified::new(TpmAttestedKey {
            public_key,
            attested: AttestedKey {
                format: FORMAT,
                key_location: challenge.key_location.clone(),
                evidence: AttestationRecord {
                    digest: hex::encode(Sha256::digest(&bytes)),
                    format: FORMAT.into(),
                    evidence: bytes,
                    created_at: at,
                },
            },
        }))
    }
}

/// A P-256 key proven to live in an agent's TPM, with its evidence.
#[derive(Clone, Debug)]
pub struct TpmAttestedKey {
    pub public_key: p256::PublicKey,
    pub attested: AttestedKey,
}

/// The stored evidence: everything a third party needs to re-run the
/// checks, given the EK certificate (named by its digest) and the roots.
#[derive(Serialize)]
struct EvidenceDocument<'a> {
    format: &'a str,
    agent: &'a str,
    nonce_b64: String,
    /// The EK certificate's SHA-256, or for an allow-listed EK without
    /// one, its public key's (see `key_location`).
    ek_sha256: String,
    ak_public_b64: String,
    key_public_b64: String,
    certify_info_b64: String,
    signature_b64: String,
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
