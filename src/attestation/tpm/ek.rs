//! EK certificates: the TPM manufacturer's statement that an endorsement key
//! lives in a genuine TPM. keyward trusts an EK only if its certificate
//! chains to a manufacturer root the operator configured.
//!
//! This is deliberately a small RFC 5280 subset: name chaining with key
//! identifiers, signatures, CA constraints, validity, and rejection of
//! critical extensions it does not understand. No revocation checking and no
//! policy or name-constraint processing; a chain whose certificates need
//! those (marked critical) is refused rather than half-checked.
//!
//! EK certificates break several web-PKI habits, which this accepts: an
//! empty subject with the TPM identity in a critical subjectAltName
//! directoryName, key usage keyEncipherment (or keyAgreement) only, the
//! TCG EK extended key usage, and subjectDirectoryAttributes.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use const_oid::db::{rfc5280, rfc5912};
use const_oid::ObjectIdentifier;
use der::{Any, Decode, Encode, Header, Reader, SliceReader, Tag, Tagged};
use rsa::pkcs1::RsaPublicKey as Pkcs1RsaPublicKey;
use sha2::{Digest, Sha256};
use x509_cert::certificate::TbsCertificate;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::name::Name;
use x509_cert::Certificate;

use super::credential::EkKey;
use crate::pki::path::{self, named_curve, Algorithms, PathCertificate, PathError, PathRules};

/// TCG EK Credential Profile attribute types for the TPM's identity.
const TCG_AT_TPM_MANUFACTURER: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.23.133.2.1");
const TCG_AT_TPM_MODEL: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.23.133.2.2");
const TCG_AT_TPM_VERSION: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.23.133.2.3");

/// Certificates above the EK certificate, trust anchor included. Real
/// manufacturer chains use two or three; the bound keeps path search cheap
/// even with many candidate intermediates.
const MAX_ISSUERS: usize = 5;

/// Every candidate issuer costs a signature verification, and extra
/// intermediates may come from the party being attested: many certificates
/// sharing names and keys would otherwise make the search exponential.
const MAX_ISSUER_CHECKS: usize = 32;

/// Extensions whose meaning is either checked here or harmless to ignore;
/// any other extension marked critical fails the certificate.
const RECOGNISED_EXTENSIONS: [ObjectIdentifier; 10] = [
    rfc5280::ID_CE_BASIC_CONSTRAINTS,
    rfc5280::ID_CE_KEY_USAGE,
    rfc5280::ID_CE_SUBJECT_ALT_NAME,
    rfc5280::ID_CE_EXT_KEY_USAGE,
    rfc5280::ID_CE_AUTHORITY_KEY_IDENTIFIER,
    rfc5280::ID_CE_SUBJECT_KEY_IDENTIFIER,
    rfc5280::ID_CE_CERTIFICATE_POLICIES,
    rfc5280::ID_CE_SUBJECT_DIRECTORY_ATTRIBUTES,
    rfc5280::ID_CE_CRL_DISTRIBUTION_POINTS,
    rfc5280::ID_PE_AUTHORITY_INFO_ACCESS,
];

const PEM_CERTIFICATE_BEGIN: &[u8] = b"-----BEGIN CERTIFICATE-----";
const PEM_CERTIFICATE_END: &[u8] = b"-----END CERTIFICATE-----";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EkError {
    #[error("reading {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("malformed certificate: {0}")]
    Malformed(String),
    #[error("no EK trust anchors are configured")]
    NoRoots,
    #[error("the EK certificate does not chain to a configured root: {0}")]
    Untrusted(String),
    #[error("the signature on {subject} does not verify with the key of {issuer}")]
    BadSignature { subject: String, issuer: String },
    #[error("{subject} expired at {not_after}")]
    Expired { subject: String, not_after: String },
    #[error("{subject} is not valid before {not_before}")]
    NotYetValid { subject: String, not_before: String },
    #[error("{subject} may not issue certificates: {reason}")]
    NotCa {
        subject: String,
        reason: &'static str,
    },
    #[error("{subject} allows fewer intermediate CAs below it than the chain has")]
    PathLenExceeded { subject: String },
    #[error("{subject} has an unrecognised critical extension {oid}")]
    UnknownCriticalExtension { subject: String, oid: String },
    #[error("unsupported algorithm: {0}")]
    UnsupportedAlgorithm(String),
}

/// A certificate together with the exact bytes it was decoded from, since
/// signatures cover the encoding as received.
#[derive(Clone, Debug)]
struct ParsedCertificate {
    certificate: Certificate,
    der: Vec<u8>,
}

impl ParsedCertificate {
    fn from_der(der: &[u8]) -> Result<Self, der::Error> {
        Ok(Self {
            certificate: Certificate::from_der(der)?,
            der: der.to_vec(),
        })
    }

    fn tbs(&self) -> &TbsCertificate {
        &self.certificate.tbs_certificate
    }

    fn is_self_issued(&self) -> bool {
        self.tbs().subject == self.tbs().issuer
    }
}

impl PathCertificate for ParsedCertificate {
    fn certificate(&self) -> &Certificate {
        &self.certificate
    }

    /// The tbsCertificate TLV inside the outer SEQUENCE, as received:
    /// manufacturers' certificates carry encodings `der` normalises.
    fn signed_bytes(&self) -> Result<Cow<'_, [u8]>, der::Error> {
        let mut reader = SliceReader::new(&self.der)?;
        Header::decode(&mut reader)?;
        reader.tlv_bytes().map(Cow::Borrowed)
    }
}

/// Trust anchors (the self-signed certificates) and the intermediates that
/// may connect an EK certificate to them.
#[derive(Clone, Debug, Default)]
pub struct EkRoots {
    anchors: Vec<ParsedCertificate>,
    intermediates: Vec<ParsedCertificate>,
}

impl EkRoots {
    /// Reads every `*.pem`, `*.crt` and `*.cer` file in `dir` (not
    /// recursively): PEM, possibly several certificates per file, or DER.
    /// A file that holds no readable certificate is an error, so that a
    /// broken trust store is noticed at startup rather than at first use.
    pub fn load_dir(dir: &Path) -> Result<Self, EkError> {
        let io_error = |error| EkError::Io {
            path: dir.to_path_buf(),
            error,
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io_error)? {
            let path = entry.map_err(io_error)?.path();
            if has_certificate_extension(&path) && path.is_file() {
                files.push(path);
            }
        }
        files.sort();

        let mut certificates = Vec::new();
        for path in files {
            let bytes = std::fs::read(&path).map_err(|error| EkError::Io {
                path: path.clone(),
                error,
            })?;
            let parsed = parse_certificate_file(&bytes)
                .map_err(|reason| EkError::Malformed(format!("{}: {reason}", path.display())))?;
            certificates.extend(parsed);
        }
        Ok(Self::from_parsed(certificates))
    }

    pub fn from_certificates(certs: Vec<Certificate>) -> Self {
        let parsed = certs
            .into_iter()
            // A decoded certificate always re-encodes; one that somehow
            // does not could never verify anyway.
            .filter_map(|certificate| {
                let der = certificate.to_der().ok()?;
                Some(ParsedCertificate { certificate, der })
            })
            .collect();
        Self::from_parsed(parsed)
    }

    fn from_parsed(certificates: Vec<ParsedCertificate>) -> Self {
        let mut roots = Self::default();
        for certificate in certificates {
            let known = roots
                .anchors
                .iter()
                .chain(&roots.intermediates)
                .any(|c| c.der == certificate.der);
            if known {
                continue;
            }
            // Trust comes from the operator placing the certificate here,
            // not from its self-signature, so self-issued is enough.
            if certificate.is_self_issued() {
                roots.anchors.push(certificate);
            } else {
                roots.intermediates.push(certificate);
            }
        }
        roots
    }

    /// True when there is no trust anchor, so nothing can verify (loose
    /// intermediates alone do not count).
    pub fn is_empty(&self) -> bool {
        self.anchors.is_empty()
    }

    pub fn anchor_count(&self) -> usize {
        self.anchors.len()
    }
}

/// An EK certificate whose chain to a configured root checked out.
#[derive(Clone, Debug)]
pub struct VerifiedEkCertificate {
    pub certificate: Certificate,
    /// SHA-256 of the EK certificate's DER.
    pub fingerprint_sha256: [u8; 32],
    /// TCG attributes from the subjectAltName directoryName, verbatim (for
    /// example "id:00001014").
    pub manufacturer: Option<String>,
    pub model: Option<String>,
    pub version: Option<String>,
    pub anchor_subject: String,
}

/// Checks `ek_cert_der` against `roots`, using the configured intermediates
/// and `extra_intermediates_der` (for example from the TPM's NV or the
/// manufacturer's AIA URL) to build the path; extras are never trusted as
/// anchors, even when self-signed.
pub fn verify_ek_certificate(
    roots: &EkRoots,
    ek_cert_der: &[u8],
    extra_intermediates_der: &[Vec<u8>],
    now: SystemTime,
) -> Result<VerifiedEkCertificate, EkError> {
    if roots.anchors.is_empty() {
        return Err(EkError::NoRoots);
    }
    let leaf_der = without_nv_padding(ek_cert_der)?;
    let leaf = ParsedCertificate::from_der(leaf_der)
        .map_err(|e| EkError::Malformed(format!("EK certificate: {e}")))?;
    let mut extras = Vec::with_capacity(extra_intermediates_der.len());
    for (index, der) in extra_intermediates_der.iter().enumerate() {
        let parsed = ParsedCertificate::from_der(der).map_err(|e| {
            EkError::Malformed(format!("intermediate certificate {}: {e}", index + 1))
        })?;
        extras.push(parsed);
    }

    path::check_certificate(&leaf.certificate, 0, now, &EK_RULES)?;
    let identity = TpmIdentity::from_certificate(&leaf)?;

    let mut intermediates: Vec<&ParsedCertificate> = Vec::new();
    for candidate in roots.intermediates.iter().chain(&extras) {
        if !candidate.is_self_issued() && !intermediates.iter().any(|c| c.der == candidate.der) {
            intermediates.push(candidate);
        }
    }
    let anchors: Vec<&ParsedCertificate> = roots.anchors.iter().collect();
    let anchor = path::build_path(&leaf, &intermediates, &anchors, now, &EK_RULES)?;

    Ok(VerifiedEkCertificate {
        fingerprint_sha256: Sha256::digest(&leaf.der).into(),
        manufacturer: identity.manufacturer,
        model: identity.model,
        version: identity.version,
        anchor_subject: anchor.tbs().subject.to_string(),
        certificate: leaf.certificate,
    })
}

/// Whether the certificate certifies exactly `key` (the EK read from the
/// TPM). RSA moduli compare as integers, so leading zero octets are ignored.
pub fn ek_certificate_key_matches(cert: &Certificate, key: &EkKey) -> bool {
    let spki = &cert.tbs_certificate.subject_public_key_info;
    let Some(public_key) = spki.subject_public_key.as_bytes() else {
        return false;
    };
    match key {
        EkKey::Rsa { modulus, exponent } => {
            // Some EK certificates label the key id-RSAES-OAEP, which is how
            // the EK is used; the key itself is the same RSAPublicKey.
            let rsa_oid = spki.algorithm.oid == rfc5912::RSA_ENCRYPTION
                || spki.algorithm.oid == rfc5912::ID_RSAES_OAEP;
            let Ok(certified) = Pkcs1RsaPublicKey::from_der(public_key) else {
                return false;
            };
            let modulus = without_leading_zeros(modulus);
            let exponent = EkKey::rsa_exponent(*exponent).to_be_bytes();
            rsa_oid
                && !modulus.is_empty()
                && without_leading_zeros(certified.modulus.as_bytes()) == modulus
                && without_leading_zeros(certified.public_exponent.as_bytes())
                    == without_leading_zeros(&exponent)
        }
        EkKey::P256(ek) => {
            named_curve(&spki.algorithm) == Some(rfc5912::SECP_256_R_1)
                && p256::PublicKey::from_sec1_bytes(public_key).is_ok_and(|k| k == *ek)
        }
        EkKey::P384(ek) => {
            named_curve(&spki.algorithm) == Some(rfc5912::SECP_384_R_1)
                && p384::PublicKey::from_sec1_bytes(public_key).is_ok_and(|k| k == *ek)
        }
    }
}

/// Manufacturer chains: their extensions and algorithms.
const EK_RULES: PathRules<'static> = PathRules {
    max_issuers: MAX_ISSUERS,
    max_issuer_checks: MAX_ISSUER_CHECKS,
    understood_extensions: &RECOGNISED_EXTENSIONS,
    algorithms: Algorithms::Manufacturer,
};

impl From<PathError> for EkError {
    fn from(e: PathError) -> Self {
        match e {
            PathError::Malformed {
                subject, detail, ..
            } => EkError::Malformed(format!("{subject}: {detail}")),
            PathError::UnknownCriticalExtension { subject, oid, .. } => {
                EkError::UnknownCriticalExtension { subject, oid }
            }
            PathError::NotYetValid {
                subject,
                not_before,
                ..
            } => EkError::NotYetValid {
                subject,
                not_before,
            },
            PathError::Expired {
                subject, not_after, ..
            } => EkError::Expired { subject, not_after },
            PathError::BadSignature {
                subject, issuer, ..
            } => EkError::BadSignature { subject, issuer },
            PathError::NotCa {
                subject, reason, ..
            } => EkError::NotCa {
                subject,
                reason: reason.text(),
            },
            PathError::PathLenExceeded { subject, .. } => EkError::PathLenExceeded { subject },
            PathError::Untrusted { subject, .. } => EkError::Untrusted(format!(
                "no configured root or known intermediate issued {subject}"
            )),
            PathError::PathTooLong => {
                EkError::Untrusted(format!("no configured root within {MAX_ISSUERS} issuers"))
            }
            PathError::TooManyCandidates(n) => {
                EkError::Untrusted(format!("gave up after {n} candidate issuers"))
            }
            PathError::UnsupportedAlgorithm { detail, .. } => EkError::UnsupportedAlgorithm(detail),
        }
    }
}

/// The TPM's identity as its manufacturer certified it.
#[derive(Default)]
struct TpmIdentity {
    manufacturer: Option<String>,
    model: Option<String>,
    version: Option<String>,
}

impl TpmIdentity {
    fn from_certificate(cert: &ParsedCertificate) -> Result<Self, EkError> {
        let mut identity = Self::default();
        let san = cert
            .tbs()
            .get::<SubjectAltName>()
            .map_err(|e| EkError::Malformed(format!("EK subjectAltName: {e}")))?;
        let directory_names = san
            .iter()
            .flat_map(|(_, san)| san.0.iter())
            .filter_map(|name| match name {
                GeneralName::DirectoryName(name) => Some(name),
                _ => None,
            });
        for name in directory_names {
            identity.collect(name);
        }
        Ok(identity)
    }

    fn collect(&mut self, name: &Name) {
        for attribute in name.0.iter().flat_map(|rdn| rdn.0.iter()) {
            let slot = match attribute.oid {
                TCG_AT_TPM_MANUFACTURER => &mut self.manufacturer,
                TCG_AT_TPM_MODEL => &mut self.model,
                TCG_AT_TPM_VERSION => &mut self.version,
                _ => continue,
            };
            if slot.is_none() {
                *slot = attribute_text(&attribute.value);
            }
        }
    }
}

fn attribute_text(value: &Any) -> Option<String> {
    match value.tag() {
        Tag::Utf8String | Tag::PrintableString | Tag::Ia5String => {
            std::str::from_utf8(value.value()).ok().map(str::to_owned)
        }
        _ => None,
    }
}

/// TPMs return the whole NV index, which can be larger than the certificate
/// and filled with 0x00 or 0xFF; anything else after it is an error.
pub fn without_nv_padding(bytes: &[u8]) -> Result<&[u8], EkError> {
    let certificate = SliceReader::new(bytes)
        .and_then(|mut reader| reader.tlv_bytes())
        .map_err(|e| EkError::Malformed(format!("EK certificate: {e}")))?;
    let padding = &bytes[certificate.len()..];
    let is_fill = padding.iter().all(|&b| b == 0x00) || padding.iter().all(|&b| b == 0xFF);
    if !is_fill {
        return Err(EkError::Malformed(
            "EK certificate: trailing data after the certificate".into(),
        ));
    }
    Ok(certificate)
}

fn without_leading_zeros(bytes: &[u8]) -> &[u8] {
    let first = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    &bytes[first..]
}

fn has_certificate_extension(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
        ["pem", "crt", "cer"]
            .iter()
            .any(|x| e.eq_ignore_ascii_case(x))
    })
}

fn parse_certificate_file(bytes: &[u8]) -> Result<Vec<ParsedCertificate>, String> {
    if find(bytes, b"-----BEGIN").is_none() {
        let parsed = ParsedCertificate::from_der(bytes).map_err(|e| format!("DER: {e}"))?;
        return Ok(vec![parsed]);
    }
    let mut certificates = Vec::new();
    let mut rest = bytes;
    while let Some(start) = find(rest, PEM_CERTIFICATE_BEGIN) {
        let block = &rest[start..];
        let end = find(block, PEM_CERTIFICATE_END).ok_or("PEM certificate without an END line")?
            + PEM_CERTIFICATE_END.len();
        let (_, der) = der::pem::decode_vec(&block[..end]).map_err(|e| format!("PEM: {e}"))?;
        let parsed = ParsedCertificate::from_der(&der)
            .map_err(|e| format!("certificate {}: {e}", certificates.len() + 1))?;
        certificates.push(parsed);
        rest = &block[end..];
    }
    if certificates.is_empty() {
        return Err("no CERTIFICATE block in a PEM file".into());
    }
    Ok(certificates)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use der::asn1::{BitString, OctetString, SetOfVec};
    use rand::rngs::OsRng;
    use rsa::pkcs1::RsaPssParams;
    use rsa::signature::{SignatureEncoding, Signer};
    use rsa::traits::PublicKeyParts;
    use rsa::RsaPrivateKey;
    use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
    use std::str::FromStr;
    use std::sync::OnceLock;
    use std::time::Duration;
    use x509_cert::attr::AttributeTypeAndValue;
    use x509_cert::certificate::Version;
    use x509_cert::ext::pkix::{
        AuthorityKeyIdentifier, BasicConstraints, KeyUsage, SubjectKeyIdentifier,
    };
    use x509_cert::ext::pkix::{ExtendedKeyUsage, KeyUsages};
    use x509_cert::ext::Extension;
    use x509_cert::name::RelativeDistinguishedName;
    use x509_cert::serial_number::SerialNumber;
    use x509_cert::time::{Time, Validity};

    const DAY: Duration = Duration::from_secs(86_400);
    const TCG_KP_EK_CERTIFICATE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.23.133.8.1");

    enum TestKey {
        Rsa(RsaPrivateKey),
        P256(p256::ecdsa::SigningKey),
        P384(p384::ecdsa::SigningKey),
    }

    impl TestKey {
        fn spki(&self) -> SubjectPublicKeyInfoOwned {
            match self {
                Self::Rsa(key) => SubjectPublicKeyInfoOwned::from_key(key.to_public_key()),
                Self::P256(key) => SubjectPublicKeyInfoOwned::from_key(*key.verifying_key()),
                Self::P384(key) => SubjectPublicKeyInfoOwned::from_key(*key.verifying_key()),
            }
            .unwrap()
        }

        fn algorithm(&self) -> AlgorithmIdentifierOwned {
            match self {
                Self::Rsa(_) => AlgorithmIdentifierOwned {
                    oid: rfc5912::SHA_256_WITH_RSA_ENCRYPTION,
                    parameters: Some(Any::null()),
                },
                Self::P256(_) => AlgorithmIdentifierOwned {
                    oid: rfc5912::ECDSA_WITH_SHA_256,
                    parameters: None,
                },
                Self::P384(_) => AlgorithmIdentifierOwned {
                    oid: rfc5912::ECDSA_WITH_SHA_384,
                    parameters: None,
                },
            }
        }

        fn sign(&self, message: &[u8]) -> Vec<u8> {
            match self {
                Self::Rsa(key) => rsa::pkcs1v15::SigningKey::<Sha256>::new(key.clone())
                    .sign(message)
                    .to_vec(),
                Self::P256(key) => {
                    let signature: p256::ecdsa::Signature = key.sign(message);
                    signature.to_der().as_bytes().to_vec()
                }
                Self::P384(key) => {
                    let signature: p384::ecdsa::Signature = key.sign(message);
                    signature.to_der().as_bytes().to_vec()
                }
            }
        }

        fn key_id(&self) -> Vec<u8> {
            Sha256::digest(self.spki().subject_public_key.raw_bytes())[..20].to_vec()
        }
    }

    struct Ca {
        name: Name,
        key: TestKey,
        der: Vec<u8>,
    }

    struct Spec<'a> {
        subject: Name,
        subject_key: SubjectPublicKeyInfoOwned,
        issuer_name: &'a Name,
        issuer_key: &'a TestKey,
        extensions: Vec<Extension>,
        not_before: SystemTime,
        not_after: SystemTime,
    }

    impl Spec<'_> {
        fn build(self) -> Vec<u8> {
            let tbs = TbsCertificate {
                version: Version::V3,
                serial_number: SerialNumber::from(rand::random::<u32>() >> 1),
                signature: self.issuer_key.algorithm(),
                issuer: self.issuer_name.clone(),
                validity: Validity {
                    not_before: Time::try_from(self.not_before).unwrap(),
                    not_after: Time::try_from(self.not_after).unwrap(),
                },
                subject: self.subject,
                subject_public_key_info: self.subject_key,
                issuer_unique_id: None,
                subject_unique_id: None,
                extensions: Some(self.extensions),
            };
            let signature = self.issuer_key.sign(&tbs.to_der().unwrap());
            Certificate {
                tbs_certificate: tbs,
                signature_algorithm: self.issuer_key.algorithm(),
                signature: BitString::from_bytes(&signature).unwrap(),
            }
            .to_der()
            .unwrap()
        }
    }

    fn extension(oid: ObjectIdentifier, critical: bool, value: impl Encode) -> Extension {
        Extension {
            extn_id: oid,
            critical,
            extn_value: OctetString::new(value.to_der().unwrap()).unwrap(),
        }
    }

    fn ca_extensions(
        subject_key: &TestKey,
        issuer_key: &TestKey,
        ca: bool,
        path_len: Option<u8>,
    ) -> Vec<Extension> {
        vec![
            extension(
                rfc5280::ID_CE_BASIC_CONSTRAINTS,
                true,
                BasicConstraints {
                    ca,
                    path_len_constraint: path_len,
                },
            ),
            extension(
                rfc5280::ID_CE_KEY_USAGE,
                true,
                KeyUsage(KeyUsages::KeyCertSign | KeyUsages::CRLSign),
            ),
            extension(
                rfc5280::ID_CE_SUBJECT_KEY_IDENTIFIER,
                false,
                SubjectKeyIdentifier(OctetString::new(subject_key.key_id()).unwrap()),
            ),
            extension(
                rfc5280::ID_CE_AUTHORITY_KEY_IDENTIFIER,
                false,
                AuthorityKeyIdentifier {
                    key_identifier: Some(OctetString::new(issuer_key.key_id()).unwrap()),
                    authority_cert_issuer: None,
                    authority_cert_serial_number: None,
                },
            ),
        ]
    }

    /// A subjectAltName directoryName with the TCG TPM attributes, as
    /// swtpm and TPM manufacturers write it.
    fn tpm_identity_san() -> Extension {
        let rdn = |oid, text: &str| {
            RelativeDistinguishedName(
                SetOfVec::try_from(vec![AttributeTypeAndValue {
                    oid,
                    value: Any::new(Tag::Utf8String, text.as_bytes()).unwrap(),
                }])
                .unwrap(),
            )
        };
        let name = Name::from(vec![
            rdn(TCG_AT_TPM_MANUFACTURER, "id:00001014"),
            rdn(TCG_AT_TPM_MODEL, "swtpm"),
            rdn(TCG_AT_TPM_VERSION, "id:20191023"),
        ]);
        // Critical because the subject is empty (RFC 5280 4.2.1.6).
        extension(
            rfc5280::ID_CE_SUBJECT_ALT_NAME,
            true,
            SubjectAltName(vec![GeneralName::DirectoryName(name)]),
        )
    }

    fn ek_extensions(issuer_key: &TestKey, usage: KeyUsages) -> Vec<Extension> {
        vec![
            tpm_identity_san(),
            extension(
                rfc5280::ID_CE_EXT_KEY_USAGE,
                false,
                ExtendedKeyUsage(vec![TCG_KP_EK_CERTIFICATE]),
            ),
            extension(
                rfc5280::ID_CE_BASIC_CONSTRAINTS,
                true,
                BasicConstraints {
                    ca: false,
                    path_len_constraint: None,
                },
            ),
            extension(
                rfc5280::ID_CE_AUTHORITY_KEY_IDENTIFIER,
                false,
                AuthorityKeyIdentifier {
                    key_identifier: Some(OctetString::new(issuer_key.key_id()).unwrap()),
                    authority_cert_issuer: None,
                    authority_cert_serial_number: None,
                },
            ),
            extension(rfc5280::ID_CE_KEY_USAGE, true, KeyUsage(usage.into())),
        ]
    }

    fn now() -> SystemTime {
        SystemTime::now()
    }

    fn issue_ca(name: &str, key: TestKey, issuer: Option<&Ca>, path_len: Option<u8>) -> Ca {
        let name = Name::from_str(name).unwrap();
        let (issuer_name, issuer_key) = match issuer {
            Some(ca) => (&ca.name, &ca.key),
            None => (&name, &key),
        };
        let der = Spec {
            subject: name.clone(),
            subject_key: key.spki(),
            issuer_name,
            issuer_key,
            extensions: ca_extensions(&key, issuer_key, true, path_len),
            not_before: now() - DAY,
            not_after: now() + 3650 * DAY,
        }
        .build();
        Ca { name, key, der }
    }

    fn rsa_key() -> TestKey {
        TestKey::Rsa(RsaPrivateKey::new(&mut OsRng, 2048).unwrap())
    }

    /// RSA root -> RSA intermediate (pathLen 0), and a P-256 CA under the
    /// same root; plus the EK keys. Generated once: RSA key generation is
    /// the slow part.
    struct Hierarchy {
        root: Ca,
        intermediate: Ca,
        ecc_ca: Ca,
        ek_rsa: TestKey,
        ek_p256: TestKey,
    }

    fn hierarchy() -> &'static Hierarchy {
        static HIERARCHY: OnceLock<Hierarchy> = OnceLock::new();
        HIERARCHY.get_or_init(|| {
            let root = issue_ca("CN=keyward test EK root,O=keyward", rsa_key(), None, None);
            let intermediate = issue_ca(
                "CN=keyward test EK issuing CA,O=keyward",
                rsa_key(),
                Some(&root),
                Some(0),
            );
            let ecc_ca = issue_ca(
                "CN=keyward test EK ECC CA,O=keyward",
                TestKey::P256(p256::ecdsa::SigningKey::random(&mut OsRng)),
                Some(&root),
                Some(0),
            );
            Hierarchy {
                root,
                intermediate,
                ecc_ca,
                ek_rsa: rsa_key(),
                ek_p256: TestKey::P256(p256::ecdsa::SigningKey::random(&mut OsRng)),
            }
        })
    }

    /// An EK certificate with the quirks real ones have: empty subject,
    /// critical SAN, EK EKU, keyEncipherment only.
    fn ek_spec<'a>(issuer: &'a Ca, ek: &TestKey) -> Spec<'a> {
        Spec {
            subject: Name::default(),
            subject_key: ek.spki(),
            issuer_name: &issuer.name,
            issuer_key: &issuer.key,
            extensions: ek_extensions(&issuer.key, KeyUsages::KeyEncipherment),
            not_before: now() - DAY,
            not_after: now() + 365 * DAY,
        }
    }

    fn rsa_ek_cert() -> Vec<u8> {
        let h = hierarchy();
        ek_spec(&h.intermediate, &h.ek_rsa).build()
    }

    fn roots_of(ders: &[&[u8]]) -> EkRoots {
        EkRoots::from_certificates(
            ders.iter()
                .map(|der| Certificate::from_der(der).unwrap())
                .collect(),
        )
    }

    fn full_roots() -> EkRoots {
        let h = hierarchy();
        roots_of(&[&h.root.der, &h.intermediate.der, &h.ecc_ca.der])
    }

    fn ek_key(key: &TestKey) -> EkKey {
        match key {
            TestKey::Rsa(key) => EkKey::Rsa {
                modulus: key.n().to_bytes_be(),
                exponent: 65537,
            },
            TestKey::P256(key) => EkKey::P256((*key.verifying_key()).into()),
            TestKey::P384(key) => EkKey::P384((*key.verifying_key()).into()),
        }
    }

    #[test]
    fn accepts_an_rsa_chain_and_reads_the_tpm_identity() {
        let h = hierarchy();
        let der = rsa_ek_cert();
        let verified = verify_ek_certificate(&full_roots(), &der, &[], now()).unwrap();
        assert_eq!(verified.anchor_subject, "CN=keyward test EK root,O=keyward");
        assert_eq!(verified.manufacturer.as_deref(), Some("id:00001014"));
        assert_eq!(verified.model.as_deref(), Some("swtpm"));
        assert_eq!(verified.version.as_deref(), Some("id:20191023"));
        assert_eq!(
            verified.fingerprint_sha256,
            <[u8; 32]>::from(Sha256::digest(&der))
        );
        assert!(ek_certificate_key_matches(
            &verified.certificate,
            &ek_key(&h.ek_rsa)
        ));
    }

    #[test]
    fn accepts_an_intermediate_supplied_with_the_ek_certificate() {
        let h = hierarchy();
        let root_only = roots_of(&[&h.root.der]);
        let der = rsa_ek_cert();
        assert!(matches!(
            verify_ek_certificate(&root_only, &der, &[], now()),
            Err(EkError::Untrusted(_))
        ));
        verify_ek_certificate(
            &root_only,
            &der,
            std::slice::from_ref(&h.intermediate.der),
            now(),
        )
        .unwrap();
    }

    #[test]
    fn accepts_an_ek_certificate_issued_directly_by_a_root() {
        let h = hierarchy();
        let der = ek_spec(&h.root, &h.ek_rsa).build();
        let verified = verify_ek_certificate(&roots_of(&[&h.root.der]), &der, &[], now()).unwrap();
        assert_eq!(verified.anchor_subject, "CN=keyward test EK root,O=keyward");
    }

    #[test]
    fn accepts_an_ecdsa_issuer() {
        let h = hierarchy();
        let mut spec = ek_spec(&h.ecc_ca, &h.ek_p256);
        spec.extensions = ek_extensions(&h.ecc_ca.key, KeyUsages::KeyAgreement);
        let der = spec.build();
        let verified = verify_ek_certificate(&full_roots(), &der, &[], now()).unwrap();
        assert!(ek_certificate_key_matches(
            &verified.certificate,
            &ek_key(&h.ek_p256)
        ));
    }

    #[test]
    fn accepts_a_p384_issuer_signing_with_sha384() {
        let h = hierarchy();
        let p384_ca = issue_ca(
            "CN=keyward test EK P-384 CA",
            TestKey::P384(p384::ecdsa::SigningKey::random(&mut OsRng)),
            Some(&h.root),
            None,
        );
        let der = ek_spec(&p384_ca, &h.ek_p256).build();
        verify_ek_certificate(
            &full_roots(),
            &der,
            std::slice::from_ref(&p384_ca.der),
            now(),
        )
        .unwrap();
    }

    #[test]
    fn refuses_a_chain_to_an_unconfigured_root() {
        let h = hierarchy();
        let stranger = issue_ca(
            "CN=someone else's root",
            TestKey::P256(p256::ecdsa::SigningKey::random(&mut OsRng)),
            None,
            None,
        );
        let der = ek_spec(&stranger, &h.ek_rsa).build();
        let refused = verify_ek_certificate(&full_roots(), &der, &[], now());
        assert!(matches!(refused, Err(EkError::Untrusted(_))), "{refused:?}");
        // Handing over the stranger's self-signed root does not make it one.
        let refused = verify_ek_certificate(
            &full_roots(),
            &der,
            std::slice::from_ref(&stranger.der),
            now(),
        );
        assert!(matches!(refused, Err(EkError::Untrusted(_))), "{refused:?}");
    }

    #[test]
    fn refuses_a_root_that_merely_shares_the_issuer_name() {
        let h = hierarchy();
        let impostor = Ca {
            name: h.root.name.clone(),
            key: TestKey::P256(p256::ecdsa::SigningKey::random(&mut OsRng)),
            der: Vec::new(),
        };
        let mut spec = ek_spec(&impostor, &h.ek_rsa);
        // Without key identifiers only the signature tells them apart.
        spec.extensions
            .retain(|e| e.extn_id != rfc5280::ID_CE_AUTHORITY_KEY_IDENTIFIER);
        let refused = verify_ek_certificate(&full_roots(), &spec.build(), &[], now());
        assert!(
            matches!(refused, Err(EkError::BadSignature { .. })),
            "{refused:?}"
        );
    }

    #[test]
    fn refuses_tampered_certificates() {
        let der = rsa_ek_cert();
        let roots = full_roots();

        let mut bad_signature = der.clone();
        let last = bad_signature.len() - 1;
        bad_signature[last] ^= 0x01;
        let refused = verify_ek_certificate(&roots, &bad_signature, &[], now());
        assert!(
            matches!(refused, Err(EkError::BadSignature { .. })),
            "{refused:?}"
        );

        // The model "swtpm" inside the signed part becomes "swtpn".
        let mut bad_body = der.clone();
        let at = find(&bad_body, b"swtpm").unwrap() + 4;
        bad_body[at] = b'n';
        let refused = verify_ek_certificate(&roots, &bad_body, &[], now());
        assert!(
            matches!(refused, Err(EkError::BadSignature { .. })),
            "{refused:?}"
        );
    }

    #[test]
    fn refuses_expired_and_not_yet_valid_certificates() {
        let h = hierarchy();
        let roots = full_roots();

        let mut expired = ek_spec(&h.intermediate, &h.ek_rsa);
        expired.not_before = now() - 30 * DAY;
        expired.not_after = now() - DAY;
        let refused = verify_ek_certificate(&roots, &expired.build(), &[], now());
        assert!(
            matches!(refused, Err(EkError::Expired { .. })),
            "{refused:?}"
        );

        let mut future = ek_spec(&h.intermediate, &h.ek_rsa);
        future.not_before = now() + DAY;
        let refused = verify_ek_certificate(&roots, &future.build(), &[], now());
        assert!(
            matches!(refused, Err(EkError::NotYetValid { .. })),
            "{refused:?}"
        );

        // The anchor's validity counts too: this EK certificate outlives it.
        let mut outlives_root = ek_spec(&h.root, &h.ek_rsa);
        outlives_root.not_after = now() + 5000 * DAY;
        let refused =
            verify_ek_certificate(&roots, &outlives_root.build(), &[], now() + 3700 * DAY);
        assert!(
            matches!(&refused, Err(EkError::Expired { subject, .. }) if subject.contains("EK root")),
            "{refused:?}"
        );
    }

    #[test]
    fn refuses_an_expired_intermediate() {
        let h = hierarchy();
        let key = TestKey::P256(p256::ecdsa::SigningKey::random(&mut OsRng));
        let name = Name::from_str("CN=keyward test expired CA").unwrap();
        let der = Spec {
            subject: name.clone(),
            subject_key: key.spki(),
            issuer_name: &h.root.name,
            issuer_key: &h.root.key,
            extensions: ca_extensions(&key, &h.root.key, true, None),
            not_before: now() - 30 * DAY,
            not_after: now() - DAY,
        }
        .build();
        let expired_ca = Ca { name, key, der };
        let leaf = ek_spec(&expired_ca, &h.ek_rsa).build();
        let refused = verify_ek_certificate(
            &full_roots(),
            &leaf,
            std::slice::from_ref(&expired_ca.der),
            now(),
        );
        assert!(
            matches!(refused, Err(EkError::Expired { .. })),
            "{refused:?}"
        );
    }

    #[test]
    fn refuses_an_intermediate_that_is_not_a_ca() {
        let h = hierarchy();
        let signing_key = p256::ecdsa::SigningKey::random(&mut OsRng);
        let key = TestKey::P256(signing_key.clone());
        let name = Name::from_str("CN=keyward test leaf posing as CA").unwrap();
        let not_ca = |extensions| {
            let der = Spec {
                subject: name.clone(),
                subject_key: key.spki(),
                issuer_name: &h.root.name,
                issuer_key: &h.root.key,
                extensions,
                not_before: now() - DAY,
                not_after: now() + DAY,
            }
            .build();
            let issuer = Ca {
                name: name.clone(),
                key: TestKey::P256(signing_key.clone()),
                der,
            };
            let leaf = ek_spec(&issuer, &h.ek_rsa).build();
            verify_ek_certificate(&full_roots(), &leaf, &[issuer.der], now())
        };

        let refused = not_ca(ca_extensions(&key, &h.root.key, false, None));
        assert!(matches!(refused, Err(EkError::NotCa { .. })), "{refused:?}");

        let mut no_cert_sign = ca_extensions(&key, &h.root.key, true, None);
        no_cert_sign[1] = extension(
            rfc5280::ID_CE_KEY_USAGE,
            true,
            KeyUsage(KeyUsages::DigitalSignature.into()),
        );
        let refused = not_ca(no_cert_sign);
        assert!(matches!(refused, Err(EkError::NotCa { .. })), "{refused:?}");

        let mut no_basic_constraints = ca_extensions(&key, &h.root.key, true, None);
        no_basic_constraints.remove(0);
        let refused = not_ca(no_basic_constraints);
        assert!(matches!(refused, Err(EkError::NotCa { .. })), "{refused:?}");
    }

    #[test]
    fn enforces_path_length_constraints() {
        let h = hierarchy();
        // The intermediate has pathLen 0, so it may not issue another CA.
        let sub = issue_ca(
            "CN=keyward test sub-CA",
            TestKey::P256(p256::ecdsa::SigningKey::random(&mut OsRng)),
            Some(&h.intermediate),
            None,
        );
        let leaf = ek_spec(&sub, &h.ek_rsa).build();
        let refused =
            verify_ek_certificate(&full_roots(), &leaf, std::slice::from_ref(&sub.der), now());
        assert!(
            matches!(refused, Err(EkError::PathLenExceeded { .. })),
            "{refused:?}"
        );
    }

    #[test]
    fn refuses_unknown_critical_extensions_only() {
        let h = hierarchy();
        let private_oid = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.99999.7");
        let with_extension = |critical| {
            let mut spec = ek_spec(&h.intermediate, &h.ek_rsa);
            spec.extensions
                .push(extension(private_oid, critical, der::asn1::Null));
            verify_ek_certificate(&full_roots(), &spec.build(), &[], now())
        };
        let refused = with_extension(true);
        assert!(
            matches!(&refused, Err(EkError::UnknownCriticalExtension { oid, .. }) if oid == "1.3.6.1.4.1.99999.7"),
            "{refused:?}"
        );
        with_extension(false).unwrap();
    }

    #[test]
    fn bounds_the_path_search() {
        // Two names issuing each other with shared keys: every A can sign
        // under every B and vice versa, so paths multiply with depth.
        let key_a = TestKey::P256(p256::ecdsa::SigningKey::random(&mut OsRng));
        let key_b = TestKey::P256(p256::ecdsa::SigningKey::random(&mut OsRng));
        let name_a = Name::from_str("CN=loop A").unwrap();
        let name_b = Name::from_str("CN=loop B").unwrap();
        let cross = |subject: &Name, key: &TestKey, issuer: &Name, issuer_key: &TestKey| {
            Spec {
                subject: subject.clone(),
                subject_key: key.spki(),
                issuer_name: issuer,
                issuer_key,
                extensions: vec![extension(
                    rfc5280::ID_CE_BASIC_CONSTRAINTS,
                    true,
                    BasicConstraints {
                        ca: true,
                        path_len_constraint: None,
                    },
                )],
                not_before: now() - DAY,
                not_after: now() + DAY,
            }
            .build()
        };
        let mut extras = Vec::new();
        for _ in 0..8 {
            extras.push(cross(&name_a, &key_a, &name_b, &key_b));
            extras.push(cross(&name_b, &key_b, &name_a, &key_a));
        }
        let issuer = Ca {
            name: name_a,
            key: key_a,
            der: Vec::new(),
        };
        let leaf = ek_spec(&issuer, &hierarchy().ek_rsa).build();
        let refused = verify_ek_certificate(&full_roots(), &leaf, &extras, now());
        assert!(
            matches!(&refused, Err(EkError::Untrusted(why)) if why.contains("gave up")),
            "{refused:?}"
        );
    }

    #[test]
    fn key_match_compares_the_certified_key() {
        let h = hierarchy();
        let rsa_cert = Certificate::from_der(&rsa_ek_cert()).unwrap();
        assert!(ek_certificate_key_matches(&rsa_cert, &ek_key(&h.ek_rsa)));
        assert!(!ek_certificate_key_matches(
            &rsa_cert,
            &ek_key(&h.intermediate.key)
        ));
        assert!(!ek_certificate_key_matches(&rsa_cert, &ek_key(&h.ek_p256)));

        let TestKey::Rsa(private) = &h.ek_rsa else {
            unreachable!()
        };
        let mut padded = vec![0, 0];
        padded.extend_from_slice(&private.n().to_bytes_be());
        let leading_zeros = EkKey::Rsa {
            modulus: padded.clone(),
            exponent: 65537,
        };
        assert!(ek_certificate_key_matches(&rsa_cert, &leading_zeros));
        let default_exponent = EkKey::Rsa {
            modulus: padded.clone(),
            exponent: 0,
        };
        assert!(ek_certificate_key_matches(&rsa_cert, &default_exponent));
        let other_exponent = EkKey::Rsa {
            modulus: padded,
            exponent: 3,
        };
        assert!(!ek_certificate_key_matches(&rsa_cert, &other_exponent));

        let ecc_cert = Certificate::from_der(&ek_spec(&h.ecc_ca, &h.ek_p256).build()).unwrap();
        assert!(ek_certificate_key_matches(&ecc_cert, &ek_key(&h.ek_p256)));
        let other_point = EkKey::P256(p256::SecretKey::random(&mut OsRng).public_key());
        assert!(!ek_certificate_key_matches(&ecc_cert, &other_point));
        let other_curve = EkKey::P384(p384::SecretKey::random(&mut OsRng).public_key());
        assert!(!ek_certificate_key_matches(&ecc_cert, &other_curve));
        assert!(!ek_certificate_key_matches(&ecc_cert, &ek_key(&h.ek_rsa)));
    }

    #[test]
    fn refuses_without_roots_and_on_garbage() {
        let der = rsa_ek_cert();
        let empty = EkRoots::from_certificates(Vec::new());
        assert!(empty.is_empty());
        assert!(matches!(
            verify_ek_certificate(&empty, &der, &[], now()),
            Err(EkError::NoRoots)
        ));
        let intermediates_only = roots_of(&[&hierarchy().intermediate.der]);
        assert!(intermediates_only.is_empty());

        let roots = full_roots();
        for garbage in [
            &[][..],
            &[0x30, 0x03, 0x02],
            &der[..der.len() - 1],
            b"not DER",
        ] {
            let refused = verify_ek_certificate(&roots, garbage, &[], now());
            assert!(matches!(refused, Err(EkError::Malformed(_))), "{refused:?}");
        }
        let refused = verify_ek_certificate(&roots, &der, &[b"junk".to_vec()], now());
        assert!(matches!(refused, Err(EkError::Malformed(_))), "{refused:?}");
    }

    #[test]
    fn tolerates_nv_index_fill_after_the_certificate() {
        let der = rsa_ek_cert();
        let roots = full_roots();
        for fill in [0x00, 0xFF] {
            let mut nv = der.clone();
            nv.resize(der.len() + 37, fill);
            let verified = verify_ek_certificate(&roots, &nv, &[], now()).unwrap();
            assert_eq!(
                verified.fingerprint_sha256,
                <[u8; 32]>::from(Sha256::digest(&der))
            );
        }
        let mut trailing = der.clone();
        trailing.extend_from_slice(&[0x00, 0x01]);
        assert!(matches!(
            verify_ek_certificate(&roots, &trailing, &[], now()),
            Err(EkError::Malformed(_))
        ));
    }

    #[test]
    fn verifies_rsassa_pss_signatures() {
        let h = hierarchy();
        let TestKey::Rsa(root_key) = &h.root.key else {
            unreachable!()
        };
        let parameters = RsaPssParams::new::<Sha256>(32).to_der().unwrap();
        let algorithm = AlgorithmIdentifierOwned {
            oid: rfc5912::ID_RSASSA_PSS,
            parameters: Some(Any::from_der(&parameters).unwrap()),
        };
        let ek = &h.ek_rsa;
        let mut tbs = Certificate::from_der(&ek_spec(&h.root, ek).build())
            .unwrap()
            .tbs_certificate;
        tbs.signature = algorithm.clone();
        let signing_key = rsa::pss::SigningKey::<Sha256>::new_with_salt_len(root_key.clone(), 32);
        let signature = rsa::signature::RandomizedSigner::sign_with_rng(
            &signing_key,
            &mut OsRng,
            &tbs.to_der().unwrap(),
        );
        let der = Certificate {
            tbs_certificate: tbs,
            signature_algorithm: algorithm,
            signature: BitString::from_bytes(&signature.to_vec()).unwrap(),
        }
        .to_der()
        .unwrap();
        let roots = roots_of(&[&h.root.der]);
        verify_ek_certificate(&roots, &der, &[], now()).unwrap();

        let mut tampered = der.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 0x01;
        assert!(matches!(
            verify_ek_certificate(&roots, &tampered, &[], now()),
            Err(EkError::BadSignature { .. })
        ));
    }

    #[test]
    fn load_dir_reads_pem_bundles_and_der() {
        let h = hierarchy();
        let dir = tempfile::tempdir().unwrap();
        let pem = |der: &[u8]| {
            der::pem::encode_string("CERTIFICATE", der::pem::LineEnding::LF, der).unwrap()
        };
        // A bundle with commentary around it, as `openssl x509 -text` leaves.
        let bundle = format!(
            "root and issuer\n{}subject=...\n{}",
            pem(&h.root.der),
            pem(&h.intermediate.der)
        );
        std::fs::write(dir.path().join("bundle.PEM"), bundle).unwrap();
        std::fs::write(dir.path().join("ecc.cer"), &h.ecc_ca.der).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();

        let roots = EkRoots::load_dir(dir.path()).unwrap();
        assert_eq!(roots.anchor_count(), 1);
        assert!(!roots.is_empty());
        verify_ek_certificate(&roots, &rsa_ek_cert(), &[], now()).unwrap();
        let ecc_leaf = ek_spec(&h.ecc_ca, &h.ek_p256).build();
        verify_ek_certificate(&roots, &ecc_leaf, &[], now()).unwrap();

        std::fs::write(
            dir.path().join("broken.crt"),
            "-----BEGIN CERTIFICATE-----\nAAAA\n",
        )
        .unwrap();
        assert!(matches!(
            EkRoots::load_dir(dir.path()),
            Err(EkError::Malformed(_))
        ));
        assert!(matches!(
            EkRoots::load_dir(&dir.path().join("missing")),
            Err(EkError::Io { .. })
        ));
    }
}
