//! Certificate profiles: what keyward's certificates contain, built as a
//! `TbsCertificate` with no private key anywhere near it. The pool signs
//! the TBS digest on the token; `ca::Authority` assembles the result.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use const_oid::db::rfc5280::{ID_KP_CLIENT_AUTH, ID_KP_OCSP_SIGNING, ID_KP_SERVER_AUTH};
use const_oid::db::rfc5912::{ECDSA_WITH_SHA_256, ID_EC_PUBLIC_KEY, SECP_256_R_1};
use const_oid::db::rfc6960::ID_PKIX_OCSP_NOCHECK;
use const_oid::ObjectIdentifier;
use der::asn1::{BitString, GeneralizedTime, Ia5String, OctetString, UtcTime};
use der::{Decode, Encode};
use p256::pkcs8::EncodePublicKey;
use p256::PublicKey;
use sha2::{Digest, Sha256};
use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use x509_cert::certificate::Version;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, KeyUsages,
    SubjectAltName, SubjectKeyIdentifier,
};
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::time::{Time, Validity};

use super::cert::{self, Extension, TbsCertificate};
use super::CaError;

/// id-pe-cmw (RFC 9999): the attestation extension, a RATS Conceptual
/// Message Wrapper in a certificate. keyward's claims travel in it as a
/// JSON CMW record (see `attestation::AttestationClaims`). An IANA-assigned
/// OID with small arcs, so every X.509 stack parses the certificate; the
/// UUID arc (2.25.…) used before it made Go's crypto/x509 and pkilint refuse
/// the whole certificate.
pub const ID_PE_CMW: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.1.35");

/// The extended key usage of certificates for keys keyward holds for agents
/// (custodial keys): id-kp-documentSigning, RFC 9336. Every signature such a
/// key makes went through keyward's policy and signature log, so a verifier
/// that accepts agent signatures and messages demands this purpose, and a
/// certificate for a key the agent holds itself (client authentication)
/// never carries it: an agent's own key cannot pass for one keyward signs
/// with. A registered EKU with small arcs rather than one of keyward's own:
/// RFC 9336 defines it for keys that sign statements meant to be read (an
/// envelope's intent is printable text), and every PKI stack parses it.
pub const ID_KP_DOCUMENT_SIGNING: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.36");

/// Certificates start this far in the past to absorb clock skew between
/// keyward and relying parties.
pub const BACKDATE: Duration = Duration::from_secs(30);

/// `ecdsa-with-SHA256`, parameters absent (RFC 5758 §3.2).
pub fn ecdsa_with_sha256() -> AlgorithmIdentifierOwned {
    AlgorithmIdentifierOwned {
        oid: ECDSA_WITH_SHA_256,
        parameters: None,
    }
}

pub fn spki_of(key: &PublicKey) -> SubjectPublicKeyInfoOwned {
    let der = key
        .to_public_key_der()
        .expect("a P-256 point always encodes");
    SubjectPublicKeyInfoOwned::from_der(der.as_bytes()).expect("just encoded")
}

/// Returns the P-256 key in an SPKI, or an error naming what it is instead.
pub fn p256_key_of(spki: &SubjectPublicKeyInfoOwned) -> Result<PublicKey, CaError> {
    if spki.algorithm.oid != ID_EC_PUBLIC_KEY {
        return Err(CaError::UnsupportedKey(format!(
            "key algorithm {}",
            spki.algorithm.oid
        )));
    }
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.decode_as::<ObjectIdentifier>().ok());
    if curve != Some(SECP_256_R_1) {
        return Err(CaError::UnsupportedKey(
            "EC key on a curve other than P-256".into(),
        ));
    }
    let point = spki
        .subject_public_key
        .as_bytes()
        .ok_or_else(|| CaError::UnsupportedKey("public key is not whole bytes".into()))?;
    PublicKey::from_sec1_bytes(point)
        .map_err(|_| CaError::UnsupportedKey("not a valid P-256 point".into()))
}

/// Key identifier: SHA-256 of the subjectPublicKey bits, truncated to 160
/// bits (RFC 7093 §2 method 1).
pub fn key_identifier(key: &PublicKey) -> Vec<u8> {
    let point = key.to_sec1_bytes();
    Sha256::digest(&point)[..20].to_vec()
}

/// 16 random bytes, positive, with a non-zero first byte so the encoding is
/// always exactly 16 bytes.
pub fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x7f).max(1);
    SerialNumber::new(&bytes).expect("16 bytes is within the 20-byte limit")
}

/// RFC 5280 §4.1.2.5: UTCTime through 2049, GeneralizedTime after.
pub fn x509_time(t: SystemTime) -> Result<Time, CaError> {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|_| CaError::Internal("time before 1970".into()))?;
    let utc_limit = Duration::from_secs(2_524_608_000); // 2050-01-01T00:00:00Z
    let whole = Duration::from_secs(secs.as_secs());
    let time = if whole < utc_limit {
        UtcTime::from_unix_duration(whole).map(Time::UtcTime)
    } else {
        GeneralizedTime::from_unix_duration(whole).map(Time::GeneralTime)
    };
    time.map_err(|e| CaError::Internal(format!("encoding time: {e}")))
}

pub fn common_name(cn: &str) -> Result<Name, CaError> {
    // Only called with names that are already [a-z0-9 .-]: nothing to escape.
    format!("CN={cn}").parse().map_err(CaError::from)
}

/// What differs between the kinds of certificate keyward issues.
pub enum Kind<'a> {
    /// keyward's own issuing CA, self-signed.
    RootCa,
    /// An agent's (or admin's) certificate: SPIFFE URI SAN, attestation.
    Agent {
        spiffe_id: &'a str,
        attestation: Option<Vec<u8>>,
        purpose: AgentKeyPurpose,
    },
    /// keyward's HTTPS listener.
    Server {
        dns_names: &'a [String],
        ips: &'a [IpAddr],
    },
    /// A key keyward uses to sign statements (attestation evidence).
    ServiceSigner,
    /// The delegated OCSP responder (RFC 6960 §4.2.2.2): id-kp-OCSPSigning,
    /// and id-pkix-ocsp-nocheck, so that clients do not ask about the
    /// responder's own certificate (it lives a day and is renewed at half).
    OcspResponder,
}

/// What an agent certificate's key is for: never both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentKeyPurpose {
    /// A key the agent holds (by CSR, or in its own TPM): TLS client
    /// authentication (id-kp-clientAuth).
    ClientAuth,
    /// A key keyward holds for the agent: signatures and messages made
    /// through keyward (id-kp-documentSigning).
    Signing,
}

impl AgentKeyPurpose {
    pub fn extended_key_usage(self) -> ObjectIdentifier {
        match self {
            AgentKeyPurpose::ClientAuth => ID_KP_CLIENT_AUTH,
            AgentKeyPurpose::Signing => ID_KP_DOCUMENT_SIGNING,
        }
    }
}

/// Everything needed to build one TBSCertificate.
pub struct TbsRequest<'a> {
    pub kind: Kind<'a>,
    pub subject: Name,
    pub subject_key: &'a PublicKey,
    pub issuer: Name,
    /// Invariant: for `RootCa`, equal to `subject_key`.
    pub issuer_key: &'a PublicKey,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

pub fn build_tbs(request: TbsRequest<'_>) -> Result<TbsCertificate, CaError> {
    let ski = key_identifier(request.subject_key);
    let aki = AuthorityKeyIdentifier {
        key_identifier: Some(OctetString::new(key_identifier(request.issuer_key))?),
        authority_cert_issuer: None,
        authority_cert_serial_number: None,
    };
    let leaf = BasicConstraints {
        ca: false,
        path_len_constraint: None,
    };
    let signing_only = KeyUsage(KeyUsages::DigitalSignature.into());
    let mut extensions = Vec::new();
    match &request.kind {
        Kind::RootCa => {
            let ca = BasicConstraints {
                ca: true,
                path_len_constraint: Some(0),
            };
            let usage = KeyUsage(KeyUsages::KeyCertSign | KeyUsages::CRLSign);
            extensions.push(cert::extension(true, &ca)?);
            extensions.push(cert::extension(true, &usage)?);
        }
        Kind::Agent {
            spiffe_id,
            attestation,
            purpose,
        } => {
            extensions.push(cert::extension(true, &leaf)?);
            extensions.push(cert::extension(true, &signing_only)?);
            extensions.push(cert::extension(
                false,
                &ExtendedKeyUsage(vec![purpose.extended_key_usage()]),
            )?);
            let uri = GeneralName::UniformResourceIdentifier(Ia5String::new(*spiffe_id)?);
            extensions.push(cert::extension(false, &SubjectAltName(vec![uri]))?);
            if let Some(claims) = attestation {
                extensions.push(Extension {
                    extn_id: ID_PE_CMW,
                    critical: false,
                    extn_value: OctetString::new(claims.clone())?,
                });
            }
        }
        Kind::Server { dns_names, ips } => {
            extensions.push(cert::extension(true, &leaf)?);
            extensions.push(cert::extension(true, &signing_only)?);
            extensions.push(cert::extension(
                false,
                &ExtendedKeyUsage(vec![ID_KP_SERVER_AUTH]),
            )?);
            let mut names = Vec::new();
            for dns in dns_names.iter() {
                names.push(GeneralName::DnsName(Ia5String::new(dns)?));
            }
            for ip in ips.iter() {
                names.push(GeneralName::from(*ip));
            }
            extensions.push(cert::extension(false, &SubjectAltName(names))?);
        }
        Kind::ServiceSigner => {
            extensions.push(cert::extension(true, &leaf)?);
            extensions.push(cert::extension(true, &signing_only)?);
        }
        Kind::OcspResponder => {
            extensions.push(cert::extension(true, &leaf)?);
            extensions.push(cert::extension(true, &signing_only)?);
            extensions.push(cert::extension(
                false,
                &ExtendedKeyUsage(vec![ID_KP_OCSP_SIGNING]),
            )?);
            // Its value is NULL (RFC 6960 §4.2.2.2.1).
            extensions.push(Extension {
                extn_id: ID_PKIX_OCSP_NOCHECK,
                critical: false,
                extn_value: OctetString::new(der::asn1::Null.to_der()?)?,
            });
        }
    }
    extensions.push(cert::extension(
        false,
        &SubjectKeyIdentifier(OctetString::new(ski)?),
    )?);
    extensions.push(cert::extension(false, &aki)?);

    Ok(TbsCertificate {
        version: Version::V3,
        serial_number: random_serial(),
        signature: ecdsa_with_sha256(),
        issuer: request.issuer,
        validity: Validity {
            not_before: x509_time(request.not_before)?,
            not_after: x509_time(request.not_after)?,
        },
        subject: request.subject,
        subject_public_key_info: spki_of(request.subject_key),
        issuer_unique_id: None,
        subject_unique_id: None,
        extensions: Some(extensions),
    })
}

/// Where relying parties check a certificate's revocation: the CRL of the
/// CA that issued it, `<base>/v1/crl/<issuer key identifier, hex>` (so that
/// during a CA rotation's overlap each CA's certificates find their own
/// CRL), and the OCSP responder `<base>/v1/ocsp` (in the authority
/// information access extension), both non-critical.
pub fn revocation_pointers(
    base_url: &str,
    issuer_key: &PublicKey,
) -> Result<Vec<Extension>, CaError> {
    use x509_cert::ext::pkix::crl::dp::DistributionPoint;
    use x509_cert::ext::pkix::name::DistributionPointName;
    use x509_cert::ext::pkix::{
        AccessDescription, AuthorityInfoAccessSyntax, CrlDistributionPoints,
    };
    let uri = |path: &str| -> Result<GeneralName, CaError> {
        Ok(GeneralName::UniformResourceIdentifier(Ia5String::new(
            &format!("{base_url}{path}"),
        )?))
    };
    let crl = CrlDistributionPoints(vec![DistributionPoint {
        distribution_point: Some(DistributionPointName::FullName(vec![uri(&format!(
            "/v1/crl/{}",
            hex::encode(key_identifier(issuer_key))
        ))?])),
        reasons: None,
        crl_issuer: None,
    }]);
    let ocsp = AuthorityInfoAccessSyntax(vec![AccessDescription {
        access_method: const_oid::db::rfc5280::ID_AD_OCSP,
        access_location: uri("/v1/ocsp")?,
    }]);
    Ok(vec![
        cert::extension(false, &crl)?,
        cert::extension(false, &ocsp)?,
    ])
}

/// Wraps DER (r, s) as the certificate's signature BIT STRING.
pub fn signature_bits(der: &[u8]) -> Result<BitString, CaError> {
    BitString::from_bytes(der).map_err(CaError::from)
}
