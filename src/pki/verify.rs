//! Signature and certificate-chain verification: the one code path behind
//! `POST /v1/verify` and signed envelopes (`crate::agents::envelope`).
//!
//! Everything here is ECDSA P-256 with SHA-256, the only algorithm keyward
//! issues certificates for or signs with; anything else is refused as
//! `unsupported_algorithm` rather than half-supported. Verification is done
//! in software with `p256`: this is the relying-party side and needs no
//! secret.
//!
//! Certificates arrive already decoded as [`Certificate`]. The bytes whose
//! signature is checked are the DER re-encoding of the decoded
//! `tbs_certificate`. `der` decodes strict DER only, so for a well-formed
//! certificate the re-encoding is the original byte for byte; where an issuer
//! produced something `der` normalises on decoding (an unsorted SET OF, say)
//! the re-encoding differs and the signature fails. That fails closed, and it
//! means the bytes we verify are exactly the encoding of the structure we go
//! on to interpret.

use std::time::SystemTime;

use const_oid::db::rfc5280::{
    ID_CE_AUTHORITY_KEY_IDENTIFIER, ID_CE_BASIC_CONSTRAINTS, ID_CE_EXT_KEY_USAGE, ID_CE_KEY_USAGE,
    ID_CE_SUBJECT_ALT_NAME, ID_CE_SUBJECT_KEY_IDENTIFIER,
};
use const_oid::ObjectIdentifier;
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::PublicKey;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAltName};

use crate::pki::cert::{Certificate, CertificateText};
use crate::pki::path::{self, Algorithms, NotCaReason, PathError, PathRules};
use crate::pki::profile;

/// Most certificates in a path, leaf and trust anchor included. keyward's
/// own paths are two long (agent, root) or a few more under an external
/// root; five leaves room for that and bounds the work an input can cause.
pub const MAX_PATH_LEN: usize = 5;

/// Most intermediates a caller may offer. Each step of path building tries
/// every name-matching candidate, so this bounds signature checks per call.
pub const MAX_INTERMEDIATES: usize = 8;

/// Length of an IEEE P1363 (`r || s`) P-256 signature.
pub const P1363_LEN: usize = 64;

/// Extensions whose meaning this verifier applies (or, for EKU, knowingly
/// places no constraint from). Any other extension marked critical makes the
/// certificate unusable, as RFC 5280 §4.2 requires.
const UNDERSTOOD_EXTENSIONS: [ObjectIdentifier; 6] = [
    ID_CE_BASIC_CONSTRAINTS,
    ID_CE_KEY_USAGE,
    ID_CE_EXT_KEY_USAGE,
    ID_CE_SUBJECT_ALT_NAME,
    ID_CE_SUBJECT_KEY_IDENTIFIER,
    ID_CE_AUTHORITY_KEY_IDENTIFIER,
];

/// Why a signature or a chain was refused. `depth` counts from the leaf
/// (0) towards the trust anchor.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    #[error("the signature does not verify")]
    BadSignature,
    #[error("the signature is neither strict DER nor 64-byte r||s with r, s in [1, n-1]")]
    MalformedSignature,
    #[error(
        "the signature of the certificate at depth {depth} does not verify with its issuer's key"
    )]
    BadCertificateSignature { depth: usize },
    #[error("no path from the certificate at depth {depth} to a trust anchor")]
    UntrustedChain { depth: usize },
    #[error("the certificate at depth {depth} has expired")]
    Expired { depth: usize },
    #[error("the certificate at depth {depth} is not yet valid")]
    NotYetValid { depth: usize },
    #[error("the certificate at depth {depth} issued a certificate but is not a CA")]
    NotACa { depth: usize },
    #[error("the end-entity certificate is a CA certificate")]
    LeafIsCa,
    #[error("the key usage of the certificate at depth {depth} does not include {usage}")]
    KeyUsage { depth: usize, usage: &'static str },
    #[error("the path length constraint of the certificate at depth {depth} is exceeded")]
    PathLenExceeded { depth: usize },
    #[error("no trust anchor within {MAX_PATH_LEN} certificates of the leaf")]
    PathTooLong,
    #[error("more than {MAX_INTERMEDIATES} intermediate certificates")]
    TooManyCertificates,
    #[error("the certificate at depth {depth} has an unhandled critical extension {oid}")]
    UnhandledCriticalExtension { depth: usize, oid: String },
    #[error("unsupported algorithm at depth {depth}: {detail}")]
    UnsupportedAlgorithm { depth: usize, detail: String },
    #[error("malformed certificate at depth {depth}: {detail}")]
    MalformedCertificate { depth: usize, detail: String },
}

impl VerifyError {
    /// A stable, machine-readable code for API responses and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::BadSignature => "bad_signature",
            Self::MalformedSignature => "malformed_signature",
            Self::BadCertificateSignature { .. } => "bad_certificate_signature",
            Self::UntrustedChain { .. } => "untrusted_chain",
            Self::Expired { .. } => "expired",
            Self::NotYetValid { .. } => "not_yet_valid",
            Self::NotACa { .. } => "not_a_ca",
            Self::LeafIsCa => "leaf_is_ca",
            Self::KeyUsage { .. } => "key_usage",
            Self::PathLenExceeded { .. } => "path_len_exceeded",
            Self::PathTooLong => "path_too_long",
            Self::TooManyCertificates => "too_many_certificates",
            Self::UnhandledCriticalExtension { .. } => "unhandled_critical_extension",
            Self::UnsupportedAlgorithm { .. } => "unsupported_algorithm",
            Self::MalformedCertificate { .. } => "malformed_certificate",
        }
    }
}

/// A leaf certificate whose path to a trust anchor verified at a given
/// time. Only [`verify_chain`] constructs one.
#[derive(Clone, Debug)]
pub struct VerifiedLeaf {
    public_key: PublicKey,
    spiffe_id: Option<String>,
    serial_hex: String,
    subject: String,
    anchor_subject: String,
    not_before: SystemTime,
    not_after: SystemTime,
    extended_key_usage: Vec<ObjectIdentifier>,
}

impl VerifiedLeaf {
    /// Whether the leaf's extended key usage names `purpose`. A leaf
    /// without the extension names none: the purposes keyward checks for
    /// are always written out, and anyExtendedKeyUsage is not one of them.
    pub fn has_extended_key_usage(&self, purpose: ObjectIdentifier) -> bool {
        self.extended_key_usage.contains(&purpose)
    }

    /// The leaf's P-256 public key.
    pub fn public_key(&self) -> &PublicKey {
        &self.public_key
    }

    /// The SPIFFE ID, if the leaf has exactly one URI SAN and it is a
    /// well-formed SPIFFE ID (X509-SVID §2 allows exactly one).
    pub fn spiffe_id(&self) -> Option<&str> {
        self.spiffe_id.as_deref()
    }

    /// Lower-case hex of the serial number's content octets.
    pub fn serial_hex(&self) -> &str {
        &self.serial_hex
    }

    /// The leaf's subject name, RFC 4514 style.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The subject name of the trust anchor the path ended at.
    pub fn anchor_subject(&self) -> &str {
        &self.anchor_subject
    }

    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
}

/// Verifies an ECDSA P-256 signature over a SHA-256 digest.
///
/// `signature` is taken as IEEE P1363 `r || s` when it is exactly 64 bytes
/// long and as strict DER otherwise. A DER P-256 signature is 64 bytes long
/// only when `r` and `s` together have at most 58 content octets, which an
/// honest signer produces with probability around 2^-48; such a signature is
/// refused rather than made ambiguous. Callers that know the encoding should
/// use [`verify_signature_der`] or [`verify_signature_p1363`].
///
/// High-S signatures are accepted: ECDSA verification accepts both `s` and
/// `n - s`, Wycheproof marks them valid, and other signers emit them.
/// keyward's own signers emit low-S only.
pub fn verify_signature(
    key: &PublicKey,
    digest: &[u8; 32],
    signature: &[u8],
) -> Result<(), VerifyError> {
    if signature.len() == P1363_LEN {
        verify_signature_p1363(key, digest, signature)
    } else {
        verify_signature_der(key, digest, signature)
    }
}

/// Verifies a strict-DER `ECDSA-Sig-Value` (RFC 3279 §2.2.3). `ecdsa`'s
/// decoder refuses BER (long-form or indefinite lengths), non-minimal or
/// negative INTEGERs, trailing bytes and `r` or `s` outside `[1, n-1]`.
pub fn verify_signature_der(
    key: &PublicKey,
    digest: &[u8; 32],
    signature: &[u8],
) -> Result<(), VerifyError> {
    let signature = Signature::from_der(signature).map_err(|_| VerifyError::MalformedSignature)?;
    verify_parsed(key, digest, &signature)
}

/// Verifies a 64-byte IEEE P1363 signature, `r || s` as 32-byte big-endian
/// integers, each in `[1, n-1]`.
pub fn verify_signature_p1363(
    key: &PublicKey,
    digest: &[u8; 32],
    signature: &[u8],
) -> Result<(), VerifyError> {
    // `from_slice` checks the length and the range of r and s.
    let signature =
        Signature::from_slice(signature).map_err(|_| VerifyError::MalformedSignature)?;
    verify_parsed(key, digest, &signature)
}

fn verify_parsed(
    key: &PublicKey,
    digest: &[u8; 32],
    signature: &Signature,
) -> Result<(), VerifyError> {
    VerifyingKey::from(key)
        .verify_prehash(digest, signature)
        .map_err(|_| VerifyError::BadSignature)
}

/// Builds and checks the path from `leaf` to one of `trust_anchors` with
/// the shared path builder ([`path::build_path`], whose documentation
/// gives the rules), accepting only ecdsa-with-SHA256 under P-256 keys.
///
/// On top of those rules: the leaf holds a P-256 key, is not a CA, and
/// allows digitalSignature when keyUsage is present; at most
/// [`MAX_INTERMEDIATES`] intermediates are offered and a path holds at most
/// [`MAX_PATH_LEN`] certificates.
///
/// Revocation is not checked; keyward's agent certificates are short-lived
/// instead.
pub fn verify_chain(
    leaf: &Certificate,
    intermediates: &[Certificate],
    trust_anchors: &[Certificate],
    at: SystemTime,
) -> Result<VerifiedLeaf, VerifyError> {
    if intermediates.len() > MAX_INTERMEDIATES {
        return Err(VerifyError::TooManyCertificates);
    }
    path::check_certificate(leaf, 0, at, &PATH_RULES)?;
    let leaf_facts = Facts::parse(leaf)?;
    if leaf_facts.is_ca() {
        return Err(VerifyError::LeafIsCa);
    }
    if let Some(usage) = &leaf_facts.key_usage {
        if !usage.digital_signature() {
            return Err(VerifyError::KeyUsage {
                depth: 0,
                usage: "digitalSignature",
            });
        }
    }
    let intermediates: Vec<&Certificate> = intermediates.iter().collect();
    let anchors: Vec<&Certificate> = trust_anchors.iter().collect();
    let anchor = path::build_path(leaf, &intermediates, &anchors, at, &PATH_RULES)?;
    Ok(VerifiedLeaf {
        public_key: leaf_facts.key,
        spiffe_id: leaf_facts.spiffe_id,
        serial_hex: leaf.serial_hex(),
        subject: leaf.tbs_certificate.subject.to_string(),
        anchor_subject: anchor.tbs_certificate.subject.to_string(),
        not_before: leaf.tbs_certificate.validity.not_before.to_system_time(),
        not_after: leaf.tbs_certificate.validity.not_after.to_system_time(),
        extended_key_usage: leaf_facts.extended_key_usage,
    })
}

/// keyward's paths: what it issues, under its own or an external root.
const PATH_RULES: PathRules<'static> = PathRules {
    max_issuers: MAX_PATH_LEN - 1,
    max_issuer_checks: 32,
    understood_extensions: &UNDERSTOOD_EXTENSIONS,
    algorithms: Algorithms::EcdsaP256Sha256,
};

impl From<PathError> for VerifyError {
    fn from(e: PathError) -> Self {
        match e {
            PathError::Malformed { depth, detail, .. } => {
                VerifyError::MalformedCertificate { depth, detail }
            }
            PathError::UnknownCriticalExtension { depth, oid, .. } => {
                VerifyError::UnhandledCriticalExtension { depth, oid }
            }
            PathError::NotYetValid { depth, .. } => VerifyError::NotYetValid { depth },
            PathError::Expired { depth, .. } => VerifyError::Expired { depth },
            PathError::BadSignature { depth, .. } => VerifyError::BadCertificateSignature { depth },
            PathError::NotCa {
                depth,
                reason: NotCaReason::NoKeyCertSign,
                ..
            } => VerifyError::KeyUsage {
                depth,
                usage: "keyCertSign",
            },
            PathError::NotCa { depth, .. } => VerifyError::NotACa { depth },
            PathError::PathLenExceeded { depth, .. } => VerifyError::PathLenExceeded { depth },
            PathError::Untrusted { depth, .. } => VerifyError::UntrustedChain { depth },
            PathError::PathTooLong | PathError::TooManyCandidates(_) => VerifyError::PathTooLong,
            PathError::UnsupportedAlgorithm { depth, detail } => {
                VerifyError::UnsupportedAlgorithm { depth, detail }
            }
        }
    }
}

/// What the verifier needs from the leaf, decoded once.
struct Facts {
    key: PublicKey,
    basic_constraints: Option<BasicConstraints>,
    key_usage: Option<KeyUsage>,
    spiffe_id: Option<String>,
    extended_key_usage: Vec<ObjectIdentifier>,
}

impl Facts {
    fn parse(cert: &Certificate) -> Result<Self, VerifyError> {
        let malformed = |e: der::Error| VerifyError::MalformedCertificate {
            depth: 0,
            detail: e.to_string(),
        };
        let tbs = &cert.tbs_certificate;
        let key = profile::p256_key_of(&tbs.subject_public_key_info).map_err(|e| {
            VerifyError::UnsupportedAlgorithm {
                depth: 0,
                detail: e.to_string(),
            }
        })?;
        let basic_constraints = tbs
            .get::<BasicConstraints>()
            .map_err(malformed)?
            .map(|(_, v)| v);
        let key_usage = tbs.get::<KeyUsage>().map_err(malformed)?.map(|(_, v)| v);
        let san = tbs
            .get::<SubjectAltName>()
            .map_err(malformed)?
            .map(|(_, v)| v);
        let extended_key_usage = tbs
            .get::<ExtendedKeyUsage>()
            .map_err(malformed)?
            .map(|(_, v)| v.0)
            .unwrap_or_default();
        Ok(Self {
            key,
            basic_constraints,
            key_usage,
            spiffe_id: san.as_ref().and_then(single_spiffe_id),
            extended_key_usage,
        })
    }

    fn is_ca(&self) -> bool {
        self.basic_constraints.as_ref().is_some_and(|bc| bc.ca)
    }
}

/// The SPIFFE ID in a SAN extension, if it has exactly one URI and that URI
/// is a SPIFFE ID.
fn single_spiffe_id(san: &SubjectAltName) -> Option<String> {
    let mut uris = san.0.iter().filter_map(|name| match name {
        GeneralName::UniformResourceIdentifier(uri) => Some(uri.as_str()),
        _ => None,
    });
    let uri = uris.next()?;
    if uris.next().is_some() || !is_spiffe_id(uri) {
        return None;
    }
    Some(uri.to_owned())
}

/// Whether `s` is a SPIFFE ID as the SPIFFE ID specification (§2) defines
/// it: `spiffe://`, a trust domain of `[a-z0-9._-]`, and a path of
/// non-empty `[A-Za-z0-9._-]` segments that are not `.` or `..`, with no
/// trailing slash, query, fragment, port or user info; 2048 bytes at most.
pub fn is_spiffe_id(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("spiffe://") else {
        return false;
    };
    if s.len() > 2048 {
        return false;
    }
    let (trust_domain, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let trust_domain_ok = !trust_domain.is_empty()
        && trust_domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    let path_ok = path.is_empty()
        || path.split('/').skip(1).all(|segment| {
            !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        });
    trust_domain_ok && path_ok
}

/// A throwaway PKI for tests: CAs and leaves built with the production
/// profiles and signed with software keys.
#[cfg(test)]
pub(crate) mod test_pki {
    use std::time::{Duration, SystemTime};

    use der::Encode;
    use p256::ecdsa::signature::hazmat::PrehashSigner;
    use p256::ecdsa::{Signature, SigningKey};
    use p256::PublicKey;
    use sha2::{Digest, Sha256};
    use x509_cert::name::Name;

    use crate::pki::cert::{Certificate, Extension, TbsCertificate};
    use crate::pki::profile::{self, AgentKeyPurpose, Kind, TbsRequest};

    pub(crate) const TRUST_DOMAIN: &str = "example.org";

    pub(crate) fn key() -> SigningKey {
        SigningKey::random(&mut rand::rngs::OsRng)
    }

    pub(crate) fn public(key: &SigningKey) -> PublicKey {
        PublicKey::from(key.verifying_key())
    }

    pub(crate) fn spiffe_id(agent: &str) -> String {
        format!("spiffe://{TRUST_DOMAIN}/agent/{agent}")
    }

    /// Signs a TBS the way `pki::sign_and_assemble` does, with a software key.
    pub(crate) fn sign(tbs: TbsCertificate, key: &SigningKey) -> Certificate {
        let digest = Sha256::digest(tbs.to_der().unwrap());
        let signature: Signature = key.sign_prehash(&digest).unwrap();
        Certificate {
            tbs_certificate: tbs,
            signature_algorithm: profile::ecdsa_with_sha256(),
            signature: profile::signature_bits(signature.to_der().as_bytes()).unwrap(),
        }
    }

    /// Replaces (or adds) the extension with `replacement`'s OID.
    pub(crate) fn set_extension(tbs: &mut TbsCertificate, replacement: Extension) {
        let extensions = tbs.extensions.get_or_insert_with(Vec::new);
        extensions.retain(|e| e.extn_id != replacement.extn_id);
        extensions.push(replacement);
    }

    pub(crate) struct TestCa {
        pub(crate) key: SigningKey,
        pub(crate) cert: Certificate,
    }

    impl TestCa {
        pub(crate) fn name(&self) -> Name {
            self.cert.tbs_certificate.subject.clone()
        }

        /// A self-signed root like `Authority::create_root` makes.
        pub(crate) fn root(cn: &str) -> Self {
            let now = SystemTime::now();
            Self::root_valid(
                cn,
                now - profile::BACKDATE,
                now + Duration::from_secs(86_400),
            )
        }

        pub(crate) fn root_valid(cn: &str, not_before: SystemTime, not_after: SystemTime) -> Self {
            let key = key();
            let name = profile::common_name(cn).unwrap();
            let tbs = profile::build_tbs(TbsRequest {
                kind: Kind::RootCa,
                subject: name.clone(),
                subject_key: &public(&key),
                issuer: name,
                issuer_key: &profile::IssuerKey::new(&public(&key)),
                not_before,
                not_after,
                public_url: None,
            })
            .unwrap();
            let cert = sign(tbs, &key);
            Self { key, cert }
        }

        /// A root whose basicConstraints set no path length, so that
        /// intermediates may sit below it (keyward's CA profile says 0).
        pub(crate) fn root_without_path_len(cn: &str) -> Self {
            let root = Self::root(cn);
            let mut tbs = root.cert.tbs_certificate.clone();
            let unconstrained = x509_cert::ext::pkix::BasicConstraints {
                ca: true,
                path_len_constraint: None,
            };
            set_extension(
                &mut tbs,
                crate::pki::cert::extension(true, &unconstrained).unwrap(),
            );
            Self {
                cert: sign(tbs, &root.key),
                key: root.key,
            }
        }

        /// A CA certificate for a new key, issued by this CA, with the CA
        /// profile's extensions (path length 0).
        pub(crate) fn intermediate(&self, cn: &str) -> Self {
            let key = key();
            let now = SystemTime::now();
            let tbs = profile::build_tbs(TbsRequest {
                kind: Kind::RootCa,
                subject: profile::common_name(cn).unwrap(),
                subject_key: &public(&key),
                issuer: self.name(),
                issuer_key: &profile::IssuerKey::new(&public(&self.key)),
                not_before: now - profile::BACKDATE,
                not_after: now + Duration::from_secs(86_400),
                public_url: None,
            })
            .unwrap();
            let cert = sign(tbs, &self.key);
            Self { key, cert }
        }

        /// An agent TBS as `Authority::issue_agent_certificate` builds it
        /// for a custodial key (the purpose signatures are verified for).
        pub(crate) fn agent_tbs(
            &self,
            agent: &str,
            subject_key: &PublicKey,
            not_before: SystemTime,
            not_after: SystemTime,
        ) -> TbsCertificate {
            self.agent_tbs_for(
                AgentKeyPurpose::Signing,
                agent,
                subject_key,
                not_before,
                not_after,
            )
        }

        pub(crate) fn agent_tbs_for(
            &self,
            purpose: AgentKeyPurpose,
            agent: &str,
            subject_key: &PublicKey,
            not_before: SystemTime,
            not_after: SystemTime,
        ) -> TbsCertificate {
            let spiffe_id = spiffe_id(agent);
            profile::build_tbs(TbsRequest {
                kind: Kind::Agent {
                    spiffe_id: &spiffe_id,
                    attestation: None,
                    purpose,
                },
                subject: profile::common_name(agent).unwrap(),
                subject_key,
                issuer: self.name(),
                issuer_key: &profile::IssuerKey::new(&public(&self.key)),
                not_before,
                not_after,
                public_url: None,
            })
            .unwrap()
        }

        /// An agent certificate valid from 30 s ago for 15 minutes.
        pub(crate) fn agent(&self, agent: &str, subject_key: &PublicKey) -> Certificate {
            let now = SystemTime::now();
            self.agent_valid(
                agent,
                subject_key,
                now - profile::BACKDATE,
                now + Duration::from_secs(900),
            )
        }

        pub(crate) fn agent_valid(
            &self,
            agent: &str,
            subject_key: &PublicKey,
            not_before: SystemTime,
            not_after: SystemTime,
        ) -> Certificate {
            sign(
                self.agent_tbs(agent, subject_key, not_before, not_after),
                &self.key,
            )
        }

        /// An agent's client certificate, for a key the agent holds itself.
        pub(crate) fn client(&self, agent: &str, subject_key: &PublicKey) -> Certificate {
            let now = SystemTime::now();
            let tbs = self.agent_tbs_for(
                AgentKeyPurpose::ClientAuth,
                agent,
                subject_key,
                now - profile::BACKDATE,
                now + Duration::from_secs(900),
            );
            sign(tbs, &self.key)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use der::{Decode, Encode};
    use p256::ecdsa::signature::hazmat::PrehashSigner;
    use sha2::{Digest, Sha256};
    use x509_cert::ext::pkix::{BasicConstraints, KeyUsage, KeyUsages};

    use super::test_pki::{self, TestCa};
    use super::*;
    use crate::pki::cert;
    use crate::pki::profile::{self, Kind, TbsRequest};

    fn now() -> SystemTime {
        SystemTime::now()
    }

    #[test]
    fn a_good_chain_verifies_and_exposes_the_leaf() {
        let ca = TestCa::root("test ca");
        let key = test_pki::key();
        let leaf = ca.agent("alpha", &test_pki::public(&key));
        let verified = verify_chain(&leaf, &[], std::slice::from_ref(&ca.cert), now()).unwrap();
        assert_eq!(verified.public_key(), &test_pki::public(&key));
        assert_eq!(
            verified.spiffe_id(),
            Some("spiffe://example.org/agent/alpha")
        );
        assert_eq!(verified.serial_hex(), leaf.serial_hex());
        assert_eq!(verified.serial_hex().len(), 32);
        assert_eq!(verified.subject(), "CN=alpha");
        assert_eq!(verified.anchor_subject(), "CN=test ca");
        assert!(verified.not_before() < verified.not_after());
    }

    #[test]
    fn the_tbs_reencoding_is_the_signed_bytes() {
        // The premise of verifying a re-encoded TBS: DER in, same DER out.
        let ca = TestCa::root("test ca");
        let leaf = ca.agent("alpha", &test_pki::public(&test_pki::key()));
        let der = leaf.to_der().unwrap();
        let reparsed = Certificate::from_der(&der).unwrap();
        assert_eq!(reparsed.to_der().unwrap(), der);
        verify_chain(&reparsed, &[], &[ca.cert], now()).unwrap();
    }

    #[test]
    fn a_chain_through_an_intermediate_verifies_when_path_length_allows() {
        let root = TestCa::root_without_path_len("test root");
        let issuing = root.intermediate("test issuing");
        let leaf = issuing.agent("alpha", &test_pki::public(&test_pki::key()));
        // The chain may carry the root too; the configured anchor is used.
        let chain = [issuing.cert.clone(), root.cert.clone()];
        let verified =
            verify_chain(&leaf, &chain, std::slice::from_ref(&root.cert), now()).unwrap();
        assert_eq!(verified.anchor_subject(), "CN=test root");

        // Without the intermediate there is no path.
        let err = verify_chain(&leaf, &[], &[root.cert], now()).unwrap_err();
        assert_eq!(err.reason(), "untrusted_chain");
    }

    #[test]
    fn a_renewed_intermediate_is_found_behind_its_expired_predecessor() {
        let root = TestCa::root_without_path_len("test root");
        let issuing = root.intermediate("test issuing");
        // The same name and key, certified again: the old certificate has
        // expired, and a client still sends it first.
        let mut expired = issuing.cert.tbs_certificate.clone();
        expired.serial_number = profile::random_serial();
        let t = now();
        expired.validity.not_before = profile::x509_time(t - Duration::from_secs(7200)).unwrap();
        expired.validity.not_after = profile::x509_time(t - Duration::from_secs(3600)).unwrap();
        let expired = test_pki::sign(expired, &root.key);
        let leaf = issuing.agent("alpha", &test_pki::public(&test_pki::key()));

        let chain = [expired.clone(), issuing.cert.clone()];
        let anchors = std::slice::from_ref(&root.cert);
        let verified = verify_chain(&leaf, &chain, anchors, t).unwrap();
        assert_eq!(verified.anchor_subject(), "CN=test root");

        // With only the expired one, that is the reason given.
        let err = verify_chain(&leaf, &[expired], anchors, t).unwrap_err();
        assert_eq!(err, VerifyError::Expired { depth: 1 });
    }

    #[test]
    fn a_path_length_zero_root_refuses_an_intermediate_below_it() {
        let root = TestCa::root("test root");
        let issuing = root.intermediate("test issuing");
        let leaf = issuing.agent("alpha", &test_pki::public(&test_pki::key()));
        let err = verify_chain(&leaf, &[issuing.cert], &[root.cert], now()).unwrap_err();
        assert_eq!(err, VerifyError::PathLenExceeded { depth: 2 });
        assert_eq!(err.reason(), "path_len_exceeded");
    }

    #[test]
    fn a_leaf_signed_by_another_ca_is_untrusted() {
        let trusted = TestCa::root("trusted ca");
        let other = TestCa::root("other ca");
        let leaf = other.agent("alpha", &test_pki::public(&test_pki::key()));
        let err = verify_chain(&leaf, &[], std::slice::from_ref(&trusted.cert), now()).unwrap_err();
        assert_eq!(err, VerifyError::UntrustedChain { depth: 0 });
        assert_eq!(err.reason(), "untrusted_chain");

        // Offering the other root as an intermediate does not make it an anchor.
        let err = verify_chain(&leaf, &[other.cert], &[trusted.cert], now()).unwrap_err();
        assert_eq!(err.reason(), "untrusted_chain");
    }

    #[test]
    fn an_impostor_ca_with_the_trusted_name_is_refused() {
        // Same subject name, different key: the AKI/SKI mismatch rules the
        // anchor out, so nothing issued the leaf.
        let trusted = TestCa::root("test ca");
        let impostor = TestCa::root("test ca");
        let leaf = impostor.agent("alpha", &test_pki::public(&test_pki::key()));
        let err = verify_chain(&leaf, &[], std::slice::from_ref(&trusted.cert), now()).unwrap_err();
        assert_eq!(err.reason(), "untrusted_chain");

        // Without key identifiers, the name matches and the signature decides.
        let mut tbs = leaf.tbs_certificate.clone();
        tbs.extensions
            .as_mut()
            .unwrap()
            .retain(|e| e.extn_id != const_oid::db::rfc5280::ID_CE_AUTHORITY_KEY_IDENTIFIER);
        let leaf = test_pki::sign(tbs, &impostor.key);
        let err = verify_chain(&leaf, &[], &[trusted.cert], now()).unwrap_err();
        assert_eq!(err, VerifyError::BadCertificateSignature { depth: 0 });
    }

    #[test]
    fn expired_and_not_yet_valid_leaves_are_refused() {
        let ca = TestCa::root("test ca");
        let key = test_pki::public(&test_pki::key());
        let t = now();
        let hour = Duration::from_secs(3600);
        let expired = ca.agent_valid("alpha", &key, t - 2 * hour, t - hour);
        let err = verify_chain(&expired, &[], std::slice::from_ref(&ca.cert), t).unwrap_err();
        assert_eq!(err, VerifyError::Expired { depth: 0 });
        assert_eq!(err.reason(), "expired");

        let future = ca.agent_valid("alpha", &key, t + hour, t + 2 * hour);
        let err = verify_chain(&future, &[], std::slice::from_ref(&ca.cert), t).unwrap_err();
        assert_eq!(err, VerifyError::NotYetValid { depth: 0 });
        assert_eq!(err.reason(), "not_yet_valid");

        // The same certificate verifies at a time inside its validity.
        verify_chain(&future, &[], &[ca.cert], t + hour + Duration::from_secs(1)).unwrap();
    }

    #[test]
    fn an_expired_anchor_is_refused() {
        let t = now();
        let hour = Duration::from_secs(3600);
        let ca = TestCa::root_valid("test ca", t - 2 * hour, t - hour);
        let leaf = ca.agent_valid(
            "alpha",
            &test_pki::public(&test_pki::key()),
            t - hour,
            t + hour,
        );
        let err = verify_chain(&leaf, &[], &[ca.cert], t).unwrap_err();
        assert_eq!(err, VerifyError::Expired { depth: 1 });
    }

    #[test]
    fn a_tampered_tbs_is_refused() {
        let ca = TestCa::root("test ca");
        let leaf = ca.agent("alpha", &test_pki::public(&test_pki::key()));
        // Swap in another key, keeping the CA's signature.
        let mut tampered = leaf.clone();
        tampered.tbs_certificate.subject_public_key_info =
            profile::spki_of(&test_pki::public(&test_pki::key()));
        let err = verify_chain(&tampered, &[], std::slice::from_ref(&ca.cert), now()).unwrap_err();
        assert_eq!(err, VerifyError::BadCertificateSignature { depth: 0 });
        assert_eq!(err.reason(), "bad_certificate_signature");

        // And a flipped bit in the signature itself.
        let mut sig = leaf.signature.raw_bytes().to_vec();
        let last = sig.len() - 1;
        sig[last] ^= 1;
        let mut tampered = leaf;
        tampered.signature = profile::signature_bits(&sig).unwrap();
        let err = verify_chain(&tampered, &[], &[ca.cert], now()).unwrap_err();
        assert_eq!(err.reason(), "bad_certificate_signature");
    }

    #[test]
    fn a_leaf_used_as_issuer_is_not_a_ca() {
        let ca = TestCa::root("test ca");
        let issuer_key = test_pki::key();
        let issuer_leaf = ca.agent("alpha", &test_pki::public(&issuer_key));
        // A certificate "issued" by the agent's key under the agent's name.
        let fake_issuer = TestCa {
            key: issuer_key,
            cert: issuer_leaf.clone(),
        };
        let victim = fake_issuer.agent("bravo", &test_pki::public(&test_pki::key()));
        let err = verify_chain(&victim, &[issuer_leaf], &[ca.cert], now()).unwrap_err();
        assert_eq!(err, VerifyError::NotACa { depth: 1 });
        assert_eq!(err.reason(), "not_a_ca");
    }

    #[test]
    fn a_ca_without_key_cert_sign_cannot_issue() {
        let root = TestCa::root("test ca");
        let mut tbs = root.cert.tbs_certificate.clone();
        let usage = KeyUsage(KeyUsages::DigitalSignature.into());
        test_pki::set_extension(&mut tbs, cert::extension(true, &usage).unwrap());
        let root = TestCa {
            cert: test_pki::sign(tbs, &root.key),
            key: root.key,
        };
        let leaf = root.agent("alpha", &test_pki::public(&test_pki::key()));
        let err = verify_chain(&leaf, &[], &[root.cert], now()).unwrap_err();
        assert_eq!(
            err,
            VerifyError::KeyUsage {
                depth: 1,
                usage: "keyCertSign"
            }
        );
    }

    #[test]
    fn a_ca_certificate_is_not_accepted_as_a_leaf() {
        let root = TestCa::root("test root");
        let issuing = root.intermediate("test issuing");
        let err = verify_chain(&issuing.cert, &[], &[root.cert], now()).unwrap_err();
        assert_eq!(err, VerifyError::LeafIsCa);
    }

    #[test]
    fn unknown_critical_extensions_and_duplicates_are_refused() {
        let ca = TestCa::root("test ca");
        let key = test_pki::public(&test_pki::key());
        let t = now();
        let mut tbs = ca.agent_tbs(
            "alpha",
            &key,
            t - profile::BACKDATE,
            t + Duration::from_secs(60),
        );
        // nameConstraints (2.5.29.30), which this verifier does not apply.
        tbs.extensions
            .as_mut()
            .unwrap()
            .push(x509_cert::ext::Extension {
                extn_id: const_oid::db::rfc5280::ID_CE_NAME_CONSTRAINTS,
                critical: true,
                extn_value: der::asn1::OctetString::new(vec![0x30, 0x00]).unwrap(),
            });
        let leaf = test_pki::sign(tbs, &ca.key);
        let err = verify_chain(&leaf, &[], std::slice::from_ref(&ca.cert), t).unwrap_err();
        assert_eq!(err.reason(), "unhandled_critical_extension");

        let mut tbs = ca.agent_tbs(
            "alpha",
            &key,
            t - profile::BACKDATE,
            t + Duration::from_secs(60),
        );
        let ca_true = BasicConstraints {
            ca: true,
            path_len_constraint: None,
        };
        tbs.extensions
            .as_mut()
            .unwrap()
            .push(cert::extension(true, &ca_true).unwrap());
        let leaf = test_pki::sign(tbs, &ca.key);
        let err = verify_chain(&leaf, &[], &[ca.cert], t).unwrap_err();
        assert_eq!(err.reason(), "malformed_certificate");
    }

    #[test]
    fn spiffe_id_needs_exactly_one_uri() {
        let ca = TestCa::root("test ca");
        let key = test_pki::public(&test_pki::key());
        let t = now();
        let spiffe = test_pki::spiffe_id("alpha");
        let tbs = profile::build_tbs(TbsRequest {
            kind: Kind::ServiceSigner,
            subject: profile::common_name("svc").unwrap(),
            subject_key: &key,
            issuer: ca.name(),
            issuer_key: &profile::IssuerKey::new(&test_pki::public(&ca.key)),
            not_before: t - profile::BACKDATE,
            not_after: t + Duration::from_secs(60),
            public_url: None,
        })
        .unwrap();
        let leaf = test_pki::sign(tbs.clone(), &ca.key);
        let verified = verify_chain(&leaf, &[], std::slice::from_ref(&ca.cert), t).unwrap();
        assert_eq!(verified.spiffe_id(), None);

        let uri = |s: &str| {
            x509_cert::ext::pkix::name::GeneralName::UniformResourceIdentifier(
                der::asn1::Ia5String::new(s).unwrap(),
            )
        };
        let mut two = tbs.clone();
        let san = SubjectAltName(vec![uri(&spiffe), uri("spiffe://example.org/agent/b")]);
        test_pki::set_extension(&mut two, cert::extension(false, &san).unwrap());
        let leaf = test_pki::sign(two, &ca.key);
        let verified = verify_chain(&leaf, &[], std::slice::from_ref(&ca.cert), t).unwrap();
        assert_eq!(verified.spiffe_id(), None);

        let mut one = tbs;
        let san = SubjectAltName(vec![uri(&spiffe)]);
        test_pki::set_extension(&mut one, cert::extension(false, &san).unwrap());
        let leaf = test_pki::sign(one, &ca.key);
        let verified = verify_chain(&leaf, &[], &[ca.cert], t).unwrap();
        assert_eq!(verified.spiffe_id(), Some(spiffe.as_str()));
    }

    #[test]
    fn too_many_intermediates_are_refused_before_any_work() {
        let ca = TestCa::root("test ca");
        let leaf = ca.agent("alpha", &test_pki::public(&test_pki::key()));
        let many = vec![ca.cert.clone(); MAX_INTERMEDIATES + 1];
        let err = verify_chain(&leaf, &many, &[ca.cert], now()).unwrap_err();
        assert_eq!(err.reason(), "too_many_certificates");
    }

    #[test]
    fn spiffe_ids_follow_the_specification() {
        for ok in [
            "spiffe://example.org",
            "spiffe://example.org/agent/alpha",
            "spiffe://a-b_c.d/x/Y.z_1-2",
        ] {
            assert!(is_spiffe_id(ok), "{ok}");
        }
        for bad in [
            "",
            "spiffe://",
            "spiffe:///agent",
            "SPIFFE://example.org/a",
            "spiffe://Example.org/a",
            "spiffe://example.org/",
            "spiffe://example.org//a",
            "spiffe://example.org/a/../b",
            "spiffe://example.org/./b",
            "spiffe://example.org:8443/a",
            "spiffe://user@example.org/a",
            "spiffe://example.org/a?q",
            "spiffe://example.org/a#f",
            "https://example.org/a",
        ] {
            assert!(!is_spiffe_id(bad), "{bad}");
        }
        assert!(!is_spiffe_id(&format!(
            "spiffe://example.org/{}",
            "a".repeat(2048)
        )));
    }

    #[test]
    fn signatures_verify_in_both_encodings_and_high_s_is_accepted() {
        let key = test_pki::key();
        let public = test_pki::public(&key);
        let digest: [u8; 32] = Sha256::digest(b"hello").into();
        let sig: Signature = key.sign_prehash(&digest).unwrap();
        verify_signature(&public, &digest, sig.to_der().as_bytes()).unwrap();
        verify_signature(&public, &digest, &sig.to_bytes()).unwrap();
        verify_signature_p1363(&public, &digest, &sig.to_bytes()).unwrap();
        verify_signature_der(&public, &digest, sig.to_der().as_bytes()).unwrap();

        // (r, n - s) verifies as well as (r, s).
        let (r, s) = sig.split_scalars();
        let flipped = Signature::from_scalars(r.to_bytes(), (-*s).to_bytes()).unwrap();
        assert_ne!(flipped, sig);
        verify_signature(&public, &digest, &flipped.to_bytes()).unwrap();

        let other: [u8; 32] = Sha256::digest(b"hellp").into();
        assert_eq!(
            verify_signature(&public, &other, &sig.to_bytes()),
            Err(VerifyError::BadSignature)
        );
    }

    #[test]
    fn malformed_signatures_are_told_apart_from_wrong_ones() {
        let public = test_pki::public(&test_pki::key());
        let digest = [7u8; 32];
        for bad in [
            &[][..],
            &[0u8; 63][..],
            &[0u8; 64][..],
            &[0u8; 65][..],
            &[0x30, 0x00][..],
        ] {
            assert_eq!(
                verify_signature(&public, &digest, bad),
                Err(VerifyError::MalformedSignature),
                "{bad:?}"
            );
        }
        // DER with a trailing byte.
        let key = test_pki::key();
        let sig: Signature = key.sign_prehash(&digest).unwrap();
        let mut der = sig.to_der().as_bytes().to_vec();
        der.push(0);
        assert_eq!(
            verify_signature(&test_pki::public(&key), &digest, &der),
            Err(VerifyError::MalformedSignature)
        );
        // P1363 must be exactly 64 bytes.
        assert_eq!(
            verify_signature_p1363(&test_pki::public(&key), &digest, sig.to_der().as_bytes()),
            Err(VerifyError::MalformedSignature)
        );
    }
}
