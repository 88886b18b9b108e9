//! RFC 5280 certification path building: the one path builder behind
//! `POST /v1/verify`, signed envelopes and the mTLS client identifier
//! (`crate::pki::verify`) and the TPM EK-chain check
//! (`attestation::tpm::ek`). Each caller adds its own end-entity rules and
//! chooses the signature algorithms it accepts.
//!
//! A deliberate subset of RFC 5280 §6: name chaining narrowed by key
//! identifiers, signatures, validity, CA constraints (basicConstraints,
//! keyCertSign, pathLenConstraint), at most one instance of each extension,
//! and refusal of critical extensions the caller does not apply. No
//! revocation, policy or name-constraint processing: a certificate that
//! needs those marks them critical and is refused rather than half-checked.
//!
//! Not a crate: `webpki` knows only the web PKI's end-entity rules (it
//! refuses EK certificates' empty subjects and keyEncipherment-only keys)
//! and RSA/ECDSA on its own terms, and no maintained pure-Rust RFC 5280
//! path validator takes `x509-cert`'s types.

use std::borrow::Cow;
use std::cell::Cell;
use std::time::SystemTime;

use const_oid::db::rfc5912;
use const_oid::ObjectIdentifier;
use der::{Decode, Encode, Tag, Tagged};
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use rsa::pkcs1::{RsaPssParams, RsaPublicKey as Pkcs1RsaPublicKey};
use rsa::signature::Verifier;
use rsa::traits::PublicKeyParts;
use rsa::{BigUint, RsaPublicKey};
use sha2::{Digest, Sha256, Sha384, Sha512};
use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use x509_cert::certificate::Version;
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, KeyUsage, SubjectKeyIdentifier,
};

use super::cert::Certificate;

/// Most extensions in one certificate. keyward's have at most nine and
/// public WebPKI certificates about ten; the bound keeps the duplicate check
/// (quadratic) cheap on hostile input.
const MAX_EXTENSIONS: usize = 32;

/// RSA issuer keys outside these sizes are refused: a forged certificate
/// under a weak key would pass as the CA's.
const MIN_RSA_ISSUER_BITS: usize = 2048;
const MAX_RSA_ISSUER_BITS: usize = 4096;

/// A certificate as the path builder sees it: decoded, and the bytes its
/// signature covers.
pub trait PathCertificate {
    fn certificate(&self) -> &Certificate;

    /// The tbsCertificate as signed. By default the DER re-encoding of the
    /// decoded value: `der` decodes strict DER only, so for a well-formed
    /// certificate that is the original byte for byte, and where an issuer
    /// produced something `der` normalises on decoding (an explicit DEFAULT
    /// value, say) the signature fails. That fails closed, and the bytes
    /// verified are exactly the encoding of the structure interpreted. A
    /// caller holding the received bytes may give them instead (TPM
    /// manufacturers' certificates do carry such quirks).
    fn signed_bytes(&self) -> Result<Cow<'_, [u8]>, der::Error> {
        self.certificate().tbs_certificate.to_der().map(Cow::Owned)
    }
}

impl PathCertificate for Certificate {
    fn certificate(&self) -> &Certificate {
        self
    }
}

/// What a caller accepts beyond the rules every path follows.
#[derive(Clone, Copy, Debug)]
pub struct PathRules<'a> {
    /// Certificates above the end-entity certificate, trust anchor
    /// included.
    pub max_issuers: usize,
    /// Candidate issuers tried in all, each costing a signature check:
    /// certificates offered by the party being checked may share names
    /// and keys, which would otherwise make the search exponential.
    pub max_issuer_checks: usize,
    /// Extensions whose meaning the caller applies (or knowingly ignores);
    /// any other extension marked critical fails the certificate.
    pub understood_extensions: &'a [ObjectIdentifier],
    pub algorithms: Algorithms,
}

/// The signature algorithms a path may use below its anchor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithms {
    /// ecdsa-with-SHA256 under P-256 issuer keys: the only algorithm keyward
    /// issues certificates with.
    EcdsaP256Sha256,
    /// What TPM manufacturers' CAs use: RSA (PKCS #1 v1.5 and PSS, 2048 to
    /// 4096 bits) and ECDSA on P-256 and P-384, with SHA-256, -384 or -512.
    Manufacturer,
}

/// Why a certificate or a path was refused. `depth` counts from the
/// end-entity certificate (0) towards the trust anchor; `subject` names the
/// certificate for messages.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    #[error("malformed certificate {subject}: {detail}")]
    Malformed {
        depth: usize,
        subject: String,
        detail: String,
    },
    #[error("{subject} has an unrecognised critical extension {oid}")]
    UnknownCriticalExtension {
        depth: usize,
        subject: String,
        oid: String,
    },
    #[error("{subject} is not valid before {not_before}")]
    NotYetValid {
        depth: usize,
        subject: String,
        not_before: String,
    },
    #[error("{subject} expired at {not_after}")]
    Expired {
        depth: usize,
        subject: String,
        not_after: String,
    },
    #[error("the signature on {subject} does not verify with the key of {issuer}")]
    BadSignature {
        depth: usize,
        subject: String,
        issuer: String,
    },
    #[error("{subject} may not issue certificates: {}", reason.text())]
    NotCa {
        depth: usize,
        subject: String,
        reason: NotCaReason,
    },
    #[error("{subject} allows fewer intermediate CAs below it than the path has")]
    PathLenExceeded { depth: usize, subject: String },
    #[error("no trust anchor or known intermediate issued {subject}")]
    Untrusted { depth: usize, subject: String },
    #[error("no trust anchor within the path length limit")]
    PathTooLong,
    #[error("gave up after {0} candidate issuers")]
    TooManyCandidates(usize),
    #[error("unsupported algorithm at depth {depth}: {detail}")]
    UnsupportedAlgorithm { depth: usize, detail: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotCaReason {
    NoBasicConstraints,
    CaFalse,
    NoKeyCertSign,
}

impl NotCaReason {
    pub fn text(self) -> &'static str {
        match self {
            Self::NoBasicConstraints => "no basicConstraints extension",
            Self::CaFalse => "basicConstraints has cA false",
            Self::NoKeyCertSign => "keyUsage lacks keyCertSign",
        }
    }
}

/// A name for messages; EK certificates usually have an empty subject.
pub fn describe(cert: &Certificate) -> String {
    let tbs = &cert.tbs_certificate;
    if tbs.subject.is_empty() {
        format!(
            "the certificate with serial {} from {}",
            tbs.serial_number, tbs.issuer
        )
    } else {
        tbs.subject.to_string()
    }
}

/// What every certificate on a path must satisfy, end-entity certificate
/// and anchor included: X.509 v3, a non-empty issuer, each extension at
/// most once (RFC 5280 §4.2: a second basicConstraints must not hide behind
/// the first), no critical extension outside `rules`, and valid at `at`
/// (bounds inclusive).
pub fn check_certificate(
    cert: &Certificate,
    depth: usize,
    at: SystemTime,
    rules: &PathRules,
) -> Result<(), PathError> {
    let tbs = &cert.tbs_certificate;
    let malformed = |detail: String| PathError::Malformed {
        depth,
        subject: describe(cert),
        detail,
    };
    if tbs.version != Version::V3 {
        return Err(malformed("not an X.509 v3 certificate".into()));
    }
    if tbs.issuer.0.is_empty() {
        return Err(malformed("empty issuer name".into()));
    }
    let extensions = tbs.extensions.as_deref().unwrap_or_default();
    if extensions.len() > MAX_EXTENSIONS {
        return Err(malformed(format!("more than {MAX_EXTENSIONS} extensions")));
    }
    for (i, extension) in extensions.iter().enumerate() {
        if extensions[..i]
            .iter()
            .any(|e| e.extn_id == extension.extn_id)
        {
            return Err(malformed(format!(
                "duplicate extension {}",
                extension.extn_id
            )));
        }
        if extension.critical && !rules.understood_extensions.contains(&extension.extn_id) {
            return Err(PathError::UnknownCriticalExtension {
                depth,
                subject: describe(cert),
                oid: extension.extn_id.to_string(),
            });
        }
    }
    let validity = &tbs.validity;
    if at < validity.not_before.to_system_time() {
        return Err(PathError::NotYetValid {
            depth,
            subject: describe(cert),
            not_before: validity.not_before.to_string(),
        });
    }
    if at > validity.not_after.to_system_time() {
        return Err(PathError::Expired {
            depth,
            subject: describe(cert),
            not_after: validity.not_after.to_string(),
        });
    }
    Ok(())
}

/// Finds and checks a path from `end_entity` (already checked by the
/// caller with [`check_certificate`] and its own rules) through
/// `intermediates` to one of `anchors`, and returns the anchor.
///
/// Issuers are found by exact (decoded) name match between a certificate's
/// issuer and a candidate's subject, narrowed by authority/subject key
/// identifiers when both carry one, and chosen by their signature
/// verifying; exact comparison can only refuse more than RFC 5280's
/// folding, never accept more. Anchors are tried before intermediates at
/// every step, so a path that carries its own root ends at the configured
/// anchor. The search is depth-first with backtracking, each certificate
/// used once per path, within `rules.max_issuer_checks`. When nothing
/// works, the first concrete failure is reported: it says more than
/// "untrusted".
///
/// Every issuer must pass [`check_certificate`], be a CA (basicConstraints
/// cA true, keyCertSign when keyUsage is present) and respect its
/// pathLenConstraint (self-issued intermediates are counted too, stricter
/// than RFC 5280). Signatures must use one of `rules.algorithms`, with the
/// same AlgorithmIdentifier inside and outside the TBS, over
/// [`PathCertificate::signed_bytes`]. An anchor's own signature is not
/// checked: it is trusted by configuration.
pub fn build_path<'a, C: PathCertificate>(
    end_entity: &C,
    intermediates: &[&'a C],
    anchors: &[&'a C],
    at: SystemTime,
    rules: &PathRules,
) -> Result<&'a C, PathError> {
    let search = PathSearch {
        intermediates,
        anchors,
        at,
        rules,
        checks_left: Cell::new(rules.max_issuer_checks),
    };
    search.find_anchor(end_entity, &mut Vec::new())
}

struct PathSearch<'s, 'a, C> {
    intermediates: &'s [&'a C],
    anchors: &'s [&'a C],
    at: SystemTime,
    rules: &'s PathRules<'s>,
    checks_left: Cell<usize>,
}

impl<'a, C: PathCertificate> PathSearch<'_, 'a, C> {
    /// `path` holds the intermediates already placed between the end-entity
    /// certificate and `child` (inclusive), so `child` is at depth
    /// `path.len()`.
    fn find_anchor(&self, child: &C, path: &mut Vec<&'a C>) -> Result<&'a C, PathError> {
        let depth = path.len();
        let signed = child.signed_bytes().map_err(|e| PathError::Malformed {
            depth,
            subject: describe(child.certificate()),
            detail: format!("the signed TBS: {e}"),
        })?;
        let mut first_failure = None;
        let issued = |issuer: &C| issued_by(child.certificate(), issuer.certificate());
        for &anchor in self.anchors.iter().filter(|a| issued(a)) {
            self.spend_check()?;
            match self.check_issuer(child, &signed, anchor, depth + 1) {
                Ok(()) => return Ok(anchor),
                Err(e) => {
                    first_failure.get_or_insert(e);
                }
            }
        }

        // An intermediate at depth + 1 still needs an anchor above it.
        let room = depth + 2 <= self.rules.max_issuers;
        for &candidate in self.intermediates {
            let used = path.iter().any(|c| std::ptr::eq(*c, candidate));
            if used || !issued(candidate) {
                continue;
            }
            if !room {
                first_failure.get_or_insert(PathError::PathTooLong);
                break;
            }
            self.spend_check()?;
            if let Err(e) = self.check_issuer(child, &signed, candidate, depth + 1) {
                first_failure.get_or_insert(e);
                continue;
            }
            path.push(candidate);
            match self.find_anchor(candidate, path) {
                Ok(anchor) => return Ok(anchor),
                Err(e) => {
                    first_failure.get_or_insert(e);
                    path.pop();
                }
            }
        }
        Err(first_failure.unwrap_or_else(|| {
            if room {
                PathError::Untrusted {
                    depth,
                    subject: describe(child.certificate()),
                }
            } else {
                PathError::PathTooLong
            }
        }))
    }

    fn spend_check(&self) -> Result<(), PathError> {
        let left = self.checks_left.get();
        if left == 0 {
            return Err(PathError::TooManyCandidates(self.rules.max_issuer_checks));
        }
        self.checks_left.set(left - 1);
        Ok(())
    }

    /// Whether `issuer`, at `depth`, issued `child` and may have.
    fn check_issuer(
        &self,
        child: &C,
        signed: &[u8],
        issuer: &C,
        depth: usize,
    ) -> Result<(), PathError> {
        let (child, issuer) = (child.certificate(), issuer.certificate());
        if !verify_signature(child, signed, issuer, depth, self.rules.algorithms)? {
            return Err(PathError::BadSignature {
                depth: depth - 1,
                subject: describe(child),
                issuer: describe(issuer),
            });
        }
        check_certificate(issuer, depth, self.at, self.rules)?;
        check_ca(issuer, depth)
    }
}

/// Name chaining, narrowed by key identifiers when both sides carry them
/// (a CA that renewed its key keeps its name).
fn issued_by(child: &Certificate, issuer: &Certificate) -> bool {
    if child.tbs_certificate.issuer != issuer.tbs_certificate.subject {
        return false;
    }
    let authority_key_id = child
        .tbs_certificate
        .get::<AuthorityKeyIdentifier>()
        .ok()
        .flatten()
        .and_then(|(_, aki)| aki.key_identifier);
    let subject_key_id = issuer
        .tbs_certificate
        .get::<SubjectKeyIdentifier>()
        .ok()
        .flatten()
        .map(|(_, ski)| ski.0);
    match (authority_key_id, subject_key_id) {
        (Some(authority), Some(subject)) => authority == subject,
        _ => true,
    }
}

/// `depth - 1` certificates lie between `issuer` and the end-entity
/// certificate, all of them CAs (each passed this check).
fn check_ca(issuer: &Certificate, depth: usize) -> Result<(), PathError> {
    let tbs = &issuer.tbs_certificate;
    let malformed = |e: der::Error| PathError::Malformed {
        depth,
        subject: describe(issuer),
        detail: e.to_string(),
    };
    let not_ca = |reason| PathError::NotCa {
        depth,
        subject: describe(issuer),
        reason,
    };
    let constraints = match tbs.get::<BasicConstraints>().map_err(malformed)? {
        Some((_, constraints)) if constraints.ca => constraints,
        Some(_) => return Err(not_ca(NotCaReason::CaFalse)),
        None => return Err(not_ca(NotCaReason::NoBasicConstraints)),
    };
    if let Some((_, usage)) = tbs.get::<KeyUsage>().map_err(malformed)? {
        if !usage.key_cert_sign() {
            return Err(not_ca(NotCaReason::NoKeyCertSign));
        }
    }
    if let Some(limit) = constraints.path_len_constraint {
        if depth - 1 > usize::from(limit) {
            return Err(PathError::PathLenExceeded {
                depth,
                subject: describe(issuer),
            });
        }
    }
    Ok(())
}

/// Whether `child`'s signature over `signed` verifies with the key of
/// `issuer` (at `depth`). An error when the algorithm is not one of
/// `algorithms` or the encoding is malformed; `Ok(false)` when the
/// signature simply is not the issuer's.
fn verify_signature(
    child: &Certificate,
    signed: &[u8],
    issuer: &Certificate,
    depth: usize,
    algorithms: Algorithms,
) -> Result<bool, PathError> {
    let child_depth = depth - 1;
    let algorithm = &child.signature_algorithm;
    let malformed = |at: usize, detail: String| PathError::Malformed {
        depth: at,
        subject: describe(if at == depth { issuer } else { child }),
        detail,
    };
    let unsupported =
        |at: usize, detail: String| PathError::UnsupportedAlgorithm { depth: at, detail };
    // RFC 5280 §4.1.1.2: the unsigned copy must match the signed one, or an
    // attacker could relabel the algorithm.
    if *algorithm != child.tbs_certificate.signature {
        return Err(malformed(
            child_depth,
            "signatureAlgorithm differs from the signed signature field".into(),
        ));
    }
    let Some(signature) = child.signature.as_bytes() else {
        return Ok(false);
    };
    let key = &issuer.tbs_certificate.subject_public_key_info;
    // Parameters are the child's signature algorithm's.
    let no_parameters =
        || require_no_parameters(algorithm).map_err(|detail| malformed(child_depth, detail));
    let key_error = |e: KeyError| match e {
        KeyError::Malformed(detail) => malformed(depth, detail),
        KeyError::Unsupported(detail) => unsupported(depth, detail),
    };
    if algorithms == Algorithms::EcdsaP256Sha256 {
        // Parameters absent, as RFC 5758 §3.2 has it and keyward writes.
        if algorithm.oid != rfc5912::ECDSA_WITH_SHA_256 || algorithm.parameters.is_some() {
            return Err(unsupported(
                child_depth,
                format!("signature algorithm {}", algorithm.oid),
            ));
        }
        if named_curve(&key.algorithm) != Some(rfc5912::SECP_256_R_1) {
            return Err(unsupported(depth, "issuer key is not P-256".into()));
        }
        return verify_ecdsa(key, &Sha256::digest(signed), signature).map_err(key_error);
    }
    let verified = match algorithm.oid {
        rfc5912::SHA_256_WITH_RSA_ENCRYPTION => {
            no_parameters()?;
            verify_pkcs1v15::<Sha256>(key, signed, signature)
        }
        rfc5912::SHA_384_WITH_RSA_ENCRYPTION => {
            no_parameters()?;
            verify_pkcs1v15::<Sha384>(key, signed, signature)
        }
        rfc5912::SHA_512_WITH_RSA_ENCRYPTION => {
            no_parameters()?;
            verify_pkcs1v15::<Sha512>(key, signed, signature)
        }
        rfc5912::ID_RSASSA_PSS => verify_pss(key, algorithm, signed, signature),
        rfc5912::ECDSA_WITH_SHA_256 => {
            no_parameters()?;
            verify_ecdsa(key, &Sha256::digest(signed), signature)
        }
        rfc5912::ECDSA_WITH_SHA_384 => {
            no_parameters()?;
            verify_ecdsa(key, &Sha384::digest(signed), signature)
        }
        rfc5912::ECDSA_WITH_SHA_512 => {
            no_parameters()?;
            verify_ecdsa(key, &Sha512::digest(signed), signature)
        }
        other => {
            return Err(unsupported(
                child_depth,
                format!("signature algorithm {other} on {}", describe(child)),
            ))
        }
    };
    verified.map_err(key_error)
}

/// A problem with an issuer key or an algorithm's parameters.
enum KeyError {
    Malformed(String),
    Unsupported(String),
}

/// PKCS#1 v1.5 and ECDSA identifiers carry NULL or nothing; tolerating
/// either costs nothing, and some encoders get this wrong.
fn require_no_parameters(algorithm: &AlgorithmIdentifierOwned) -> Result<(), String> {
    match &algorithm.parameters {
        None => Ok(()),
        Some(parameters) if parameters.tag() == Tag::Null => Ok(()),
        Some(_) => Err(format!("unexpected parameters for {}", algorithm.oid)),
    }
}

/// `Ok(None)` when the issuer key is not RSA at all: then the signature
/// simply cannot be the issuer's.
fn rsa_issuer_key(key: &SubjectPublicKeyInfoOwned) -> Result<Option<RsaPublicKey>, KeyError> {
    if key.algorithm.oid != rfc5912::RSA_ENCRYPTION {
        return Ok(None);
    }
    let malformed = || KeyError::Malformed("issuer RSA public key".into());
    let raw = key.subject_public_key.as_bytes().ok_or_else(malformed)?;
    let parsed = Pkcs1RsaPublicKey::from_der(raw).map_err(|_| malformed())?;
    let public = RsaPublicKey::new_with_max_size(
        BigUint::from_bytes_be(parsed.modulus.as_bytes()),
        BigUint::from_bytes_be(parsed.public_exponent.as_bytes()),
        MAX_RSA_ISSUER_BITS,
    )
    .map_err(|_| {
        KeyError::Unsupported(format!(
            "RSA issuer key outside {MIN_RSA_ISSUER_BITS} to {MAX_RSA_ISSUER_BITS} bits or with a bad exponent"
        ))
    })?;
    let bits = public.n().bits();
    if bits < MIN_RSA_ISSUER_BITS {
        return Err(KeyError::Unsupported(format!(
            "RSA issuer key of {bits} bits"
        )));
    }
    Ok(Some(public))
}

fn verify_pkcs1v15<D>(
    key: &SubjectPublicKeyInfoOwned,
    signed: &[u8],
    signature: &[u8],
) -> Result<bool, KeyError>
where
    D: Digest + const_oid::AssociatedOid,
{
    let Some(key) = rsa_issuer_key(key)? else {
        return Ok(false);
    };
    let Ok(signature) = rsa::pkcs1v15::Signature::try_from(signature) else {
        return Ok(false);
    };
    Ok(rsa::pkcs1v15::VerifyingKey::<D>::new(key)
        .verify(signed, &signature)
        .is_ok())
}

fn verify_pss(
    key: &SubjectPublicKeyInfoOwned,
    algorithm: &AlgorithmIdentifierOwned,
    signed: &[u8],
    signature: &[u8],
) -> Result<bool, KeyError> {
    let parameters = algorithm
        .parameters
        .as_ref()
        .ok_or_else(|| KeyError::Malformed("RSASSA-PSS without parameters".into()))?;
    let encoded = parameters
        .to_der()
        .map_err(|e| KeyError::Malformed(format!("RSASSA-PSS parameters: {e}")))?;
    let parameters = RsaPssParams::from_der(&encoded)
        .map_err(|e| KeyError::Malformed(format!("RSASSA-PSS parameters: {e}")))?;
    // The rsa crate's PSS uses one hash for the message and MGF1; other
    // combinations are legal but not worth supporting for CA keys.
    let mgf1_hash = parameters.mask_gen.parameters.map(|p| p.oid);
    if parameters.mask_gen.oid != rfc5912::ID_MGF_1 || mgf1_hash != Some(parameters.hash.oid) {
        return Err(KeyError::Unsupported(
            "RSASSA-PSS with a mask generation function other than MGF1 over the message hash"
                .into(),
        ));
    }
    let salt_len = usize::from(parameters.salt_len);
    let Some(key) = rsa_issuer_key(key)? else {
        return Ok(false);
    };
    let Ok(signature) = rsa::pss::Signature::try_from(signature) else {
        return Ok(false);
    };
    let verified = match parameters.hash.oid {
        rfc5912::ID_SHA_256 => rsa::pss::VerifyingKey::<Sha256>::new_with_salt_len(key, salt_len)
            .verify(signed, &signature),
        rfc5912::ID_SHA_384 => rsa::pss::VerifyingKey::<Sha384>::new_with_salt_len(key, salt_len)
            .verify(signed, &signature),
        rfc5912::ID_SHA_512 => rsa::pss::VerifyingKey::<Sha512>::new_with_salt_len(key, salt_len)
            .verify(signed, &signature),
        other => {
            return Err(KeyError::Unsupported(format!(
                "RSASSA-PSS with hash {other}"
            )))
        }
    };
    Ok(verified.is_ok())
}

fn verify_ecdsa(
    key: &SubjectPublicKeyInfoOwned,
    prehash: &[u8],
    signature: &[u8],
) -> Result<bool, KeyError> {
    if key.algorithm.oid != rfc5912::ID_EC_PUBLIC_KEY {
        return Ok(false);
    }
    let point = key
        .subject_public_key
        .as_bytes()
        .ok_or_else(|| KeyError::Malformed("issuer EC public key".into()))?;
    match named_curve(&key.algorithm) {
        Some(rfc5912::SECP_256_R_1) => {
            let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(point)
                .map_err(|_| KeyError::Malformed("issuer P-256 public key".into()))?;
            let Ok(signature) = p256::ecdsa::Signature::from_der(signature) else {
                return Ok(false);
            };
            Ok(key.verify_prehash(prehash, &signature).is_ok())
        }
        Some(rfc5912::SECP_384_R_1) => {
            let key = p384::ecdsa::VerifyingKey::from_sec1_bytes(point)
                .map_err(|_| KeyError::Malformed("issuer P-384 public key".into()))?;
            let Ok(signature) = p384::ecdsa::Signature::from_der(signature) else {
                return Ok(false);
            };
            Ok(key.verify_prehash(prehash, &signature).is_ok())
        }
        Some(other) => Err(KeyError::Unsupported(format!("elliptic curve {other}"))),
        None => Err(KeyError::Malformed(
            "issuer EC key without a named curve".into(),
        )),
    }
}

/// The named curve of an EC key's algorithm, if it is one.
pub fn named_curve(algorithm: &AlgorithmIdentifierOwned) -> Option<ObjectIdentifier> {
    if algorithm.oid != rfc5912::ID_EC_PUBLIC_KEY {
        return None;
    }
    algorithm
        .parameters
        .as_ref()?
        .decode_as::<ObjectIdentifier>()
        .ok()
}
