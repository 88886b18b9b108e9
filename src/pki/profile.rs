//! Certificate profiles: what keyward's certificates contain, drafted with
//! x509-cert's certificate builder and no private key anywhere near it:
//! the builder finalizes the TBSCertificate, the pool signs its digest on
//! the token, and the builder assembles the certificate
//! (`pki::sign_and_assemble`).

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use const_oid::db::rfc5280::{ID_KP_CLIENT_AUTH, ID_KP_OCSP_SIGNING, ID_KP_SERVER_AUTH};
use const_oid::db::rfc5912::{ECDSA_WITH_SHA_256, ID_EC_PUBLIC_KEY, SECP_256_R_1};
use const_oid::db::rfc6960::ID_PKIX_OCSP_NOCHECK;
use const_oid::{AssociatedOid, ObjectIdentifier};
use der::asn1::{Any, BitString, GeneralizedTime, Ia5String, OctetString, UtcTime};
use der::Decode;
use p256::ecdsa::signature::Keypair;
use p256::ecdsa::VerifyingKey;
use p256::pkcs8::EncodePublicKey;
use p256::PublicKey;
use sha2::{Digest, Sha256};
use spki::{AlgorithmIdentifierOwned, DynSignatureAlgorithmIdentifier, SubjectPublicKeyInfoOwned};
use x509_cert::builder::{CertificateBuilder, Profile};
use x509_cert::ext::pkix::crl::dp::DistributionPoint;
use x509_cert::ext::pkix::name::{DistributionPointName, GeneralName};
use x509_cert::ext::pkix::{
    AccessDescription, AuthorityInfoAccessSyntax, AuthorityKeyIdentifier, BasicConstraints,
    CrlDistributionPoints, ExtendedKeyUsage, KeyUsage, KeyUsages, SubjectAltName,
    SubjectKeyIdentifier,
};
use x509_cert::ext::{AsExtension, Extension};
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::time::{Time, Validity};

#[cfg(test)]
use super::cert::TbsCertificate;
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

/// A 16-byte serial: the issuing time in milliseconds since 1970 (6 bytes,
/// big-endian), then 10 random bytes (80 bits from the CSPRNG, past the
/// 64 the CA/Browser Forum asks for).
///
/// Time first so that serials, which are the certificates table's primary
/// key, sort in issuing order: a new row lands on the index's last page
/// instead of a random one, and the write-ahead log gets one page per
/// batch rather than one per certificate. The time says nothing notBefore
/// does not. The first byte is 0x01 from 2004 to 2039 and stays below 0x80
/// until the year 6429: positive, non-zero, 16 bytes encoded.
pub fn random_serial() -> SerialNumber {
    let millis = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut bytes = [0u8; 16];
    bytes[..6].copy_from_slice(&millis.to_be_bytes()[2..]);
    bytes[6..].copy_from_slice(&rand::random::<[u8; 10]>());
    // Only a clock before 1970 or past the year 10,000 reaches this.
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

/// The issuer's public key, standing in for the signer x509-cert's
/// certificate builder asks for. The builder wants a signer only to name
/// the signature algorithm; keyward asks it to finalize (the
/// TBSCertificate's DER) and to assemble, and the signature in between is
/// made on the token through the pool (`pki::sign_and_assemble`), so no
/// issuing key is ever in memory.
pub struct IssuerKey(VerifyingKey);

impl IssuerKey {
    pub fn new(key: &PublicKey) -> Self {
        Self(VerifyingKey::from(key))
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey::from(&self.0)
    }
}

impl Keypair for IssuerKey {
    type VerifyingKey = VerifyingKey;

    fn verifying_key(&self) -> VerifyingKey {
        self.0
    }
}

impl DynSignatureAlgorithmIdentifier for IssuerKey {
    fn signature_algorithm_identifier(&self) -> spki::Result<AlgorithmIdentifierOwned> {
        Ok(ecdsa_with_sha256())
    }
}

/// A certificate being built, up to its signature.
pub type Draft<'a> = CertificateBuilder<'a, IssuerKey>;

/// Everything needed to build one certificate but its signature.
pub struct TbsRequest<'a> {
    pub kind: Kind<'a>,
    pub subject: Name,
    pub subject_key: &'a PublicKey,
    pub issuer: Name,
    /// Invariant: for `RootCa`, the key of `subject_key`.
    pub issuer_key: &'a IssuerKey,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// keyward's public base URL, when it has one: the certificate then
    /// says where its revocation status is (see [`RevocationPointers`]).
    pub public_url: Option<&'a str>,
}

/// The certificate `request` describes, ready to finalize. Every extension
/// is chosen here (`Profile::Manual`): x509-cert's own profiles add key
/// usages keyward does not want (a leaf's keyEncipherment, say).
pub fn draft(request: TbsRequest<'_>) -> Result<Draft<'_>, CaError> {
    let issuer_public = request.issuer_key.public_key();
    let validity = Validity {
        not_before: x509_time(request.not_before)?,
        not_after: x509_time(request.not_after)?,
    };
    let mut draft = CertificateBuilder::new(
        Profile::Manual {
            issuer: Some(request.issuer),
        },
        random_serial(),
        validity,
        request.subject,
        spki_of(request.subject_key),
        request.issuer_key,
    )?;
    let leaf = BasicConstraints {
        ca: false,
        path_len_constraint: None,
    };
    let signing_only = KeyUsage(KeyUsages::DigitalSignature.into());
    match &request.kind {
        Kind::RootCa => {
            draft.add_extension(&BasicConstraints {
                ca: true,
                path_len_constraint: Some(0),
            })?;
            draft.add_extension(&KeyUsage(KeyUsages::KeyCertSign | KeyUsages::CRLSign))?;
        }
        Kind::Agent {
            spiffe_id,
            attestation,
            purpose,
        } => {
            draft.add_extension(&leaf)?;
            draft.add_extension(&signing_only)?;
            draft.add_extension(&NonCritical(ExtendedKeyUsage(vec![
                purpose.extended_key_usage()
            ])))?;
            let uri = GeneralName::UniformResourceIdentifier(Ia5String::new(*spiffe_id)?);
            draft.add_extension(&SubjectAltName(vec![uri]))?;
            if let Some(claims) = attestation {
                draft.add_extension(&AttestationExtension(Any::from_der(claims)?))?;
            }
        }
        Kind::Server { dns_names, ips } => {
            draft.add_extension(&leaf)?;
            draft.add_extension(&signing_only)?;
            draft.add_extension(&NonCritical(ExtendedKeyUsage(vec![ID_KP_SERVER_AUTH])))?;
            let mut names = Vec::new();
            for dns in dns_names.iter() {
                names.push(GeneralName::DnsName(Ia5String::new(dns)?));
            }
            for ip in ips.iter() {
                names.push(GeneralName::from(*ip));
            }
            draft.add_extension(&SubjectAltName(names))?;
        }
        Kind::ServiceSigner => {
            draft.add_extension(&leaf)?;
            draft.add_extension(&signing_only)?;
        }
        Kind::OcspResponder => {
            draft.add_extension(&leaf)?;
            draft.add_extension(&signing_only)?;
            draft.add_extension(&NonCritical(ExtendedKeyUsage(vec![ID_KP_OCSP_SIGNING])))?;
            draft.add_extension(&OcspNoCheck)?;
        }
    }
    draft.add_extension(&SubjectKeyIdentifier(OctetString::new(key_identifier(
        request.subject_key,
    ))?))?;
    draft.add_extension(&AuthorityKeyIdentifier {
        key_identifier: Some(OctetString::new(key_identifier(&issuer_public))?),
        authority_cert_issuer: None,
        authority_cert_serial_number: None,
    })?;
    // The OCSP responder's certificate carries id-pkix-ocsp-nocheck: no
    // revocation pointers for it (RFC 6960 §4.2.2.2.1).
    if let (Some(base_url), false) = (
        request.public_url,
        matches!(request.kind, Kind::OcspResponder),
    ) {
        let pointers = RevocationPointers::new(base_url, &issuer_public)?;
        draft.add_extension(&pointers.crl)?;
        draft.add_extension(&pointers.ocsp)?;
    }
    Ok(draft)
}

/// The TBSCertificate of `request`, for tests that sign it with a software
/// key or take it apart.
#[cfg(test)]
pub fn build_tbs(request: TbsRequest<'_>) -> Result<TbsCertificate, CaError> {
    use x509_cert::builder::Builder;
    Ok(TbsCertificate::from_der(&draft(request)?.finalize()?)?)
}

/// The attestation extension (id-pe-cmw) around its encoded value, the
/// CMW `json` choice (`attestation::AttestationClaims` encodes it).
struct AttestationExtension(Any);

impl AssociatedOid for AttestationExtension {
    const OID: ObjectIdentifier = ID_PE_CMW;
}

impl der::EncodeValue for AttestationExtension {
    fn value_len(&self) -> der::Result<der::Length> {
        self.0.value_len()
    }

    fn encode_value(&self, writer: &mut impl der::Writer) -> der::Result<()> {
        self.0.encode_value(writer)
    }
}

impl der::Tagged for AttestationExtension {
    fn tag(&self) -> der::Tag {
        self.0.tag()
    }
}

impl AsExtension for AttestationExtension {
    fn critical(&self, _: &Name, _: &[Extension]) -> bool {
        false
    }
}

/// An extension added non-critical where x509-cert would mark it critical:
/// the extended key usage. RFC 5280 §4.2.1.12 leaves it to the issuer; the
/// CA/Browser Forum's profiles want it non-critical in end-entity
/// certificates, and keyward's have always carried it so.
struct NonCritical<T>(T);

impl<T: AssociatedOid> AssociatedOid for NonCritical<T> {
    const OID: ObjectIdentifier = T::OID;
}

impl<T: der::Encode> der::Encode for NonCritical<T> {
    fn encoded_len(&self) -> der::Result<der::Length> {
        self.0.encoded_len()
    }

    fn encode(&self, writer: &mut impl der::Writer) -> der::Result<()> {
        self.0.encode(writer)
    }
}

impl<T: AssociatedOid + der::Encode> AsExtension for NonCritical<T> {
    fn critical(&self, _: &Name, _: &[Extension]) -> bool {
        false
    }
}

/// id-pkix-ocsp-nocheck: its value is NULL (RFC 6960 §4.2.2.2.1).
struct OcspNoCheck;

impl AssociatedOid for OcspNoCheck {
    const OID: ObjectIdentifier = ID_PKIX_OCSP_NOCHECK;
}

impl der::EncodeValue for OcspNoCheck {
    fn value_len(&self) -> der::Result<der::Length> {
        Ok(der::Length::ZERO)
    }

    fn encode_value(&self, _: &mut impl der::Writer) -> der::Result<()> {
        Ok(())
    }
}

impl der::FixedTag for OcspNoCheck {
    const TAG: der::Tag = der::Tag::Null;
}

impl AsExtension for OcspNoCheck {
    fn critical(&self, _: &Name, _: &[Extension]) -> bool {
        false
    }
}

/// Where relying parties check a certificate's revocation: the CRL of the
/// CA that issued it, `<base>/v1/crl/<issuer key identifier, hex>` (so that
/// during a CA rotation's overlap each CA's certificates find their own
/// CRL), and the OCSP responder `<base>/v1/ocsp` (in the authority
/// information access extension), both non-critical.
pub struct RevocationPointers {
    pub crl: CrlDistributionPoints,
    pub ocsp: AuthorityInfoAccessSyntax,
}

impl RevocationPointers {
    pub fn new(base_url: &str, issuer_key: &PublicKey) -> Result<Self, CaError> {
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
        Ok(Self { crl, ocsp })
    }
}

/// Wraps DER (r, s) as the certificate's signature BIT STRING.
pub fn signature_bits(der: &[u8]) -> Result<BitString, CaError> {
    BitString::from_bytes(der).map_err(CaError::from)
}

#[cfg(test)]
mod tests {
    use const_oid::db::rfc5280::{
        ID_CE_AUTHORITY_KEY_IDENTIFIER, ID_CE_BASIC_CONSTRAINTS, ID_CE_CRL_DISTRIBUTION_POINTS,
        ID_CE_EXT_KEY_USAGE, ID_CE_KEY_USAGE, ID_CE_SUBJECT_ALT_NAME, ID_CE_SUBJECT_KEY_IDENTIFIER,
        ID_PE_AUTHORITY_INFO_ACCESS,
    };

    use der::Encode;

    use super::*;

    fn key() -> PublicKey {
        p256::SecretKey::random(&mut rand::thread_rng()).public_key()
    }

    /// Each extension's OID and criticality, in order, of a drafted
    /// certificate of `kind`.
    fn extensions_of(kind: Kind<'_>, public_url: Option<&str>) -> Vec<(ObjectIdentifier, bool)> {
        let (subject_key, issuer_public) = (key(), key());
        let issuer_key = IssuerKey::new(&issuer_public);
        let now = SystemTime::now();
        let tbs = build_tbs(TbsRequest {
            kind,
            subject: common_name("subject").unwrap(),
            subject_key: &subject_key,
            issuer: common_name("issuer").unwrap(),
            issuer_key: &issuer_key,
            not_before: now,
            not_after: now + Duration::from_secs(600),
            public_url,
        })
        .unwrap();
        tbs.extensions
            .unwrap()
            .iter()
            .map(|e| (e.extn_id, e.critical))
            .collect()
    }

    #[test]
    fn serials_are_sixteen_positive_bytes_in_issuing_order_and_never_repeat() {
        let first = random_serial();
        std::thread::sleep(Duration::from_millis(2));
        let batch: Vec<SerialNumber> = (0..1000).map(|_| random_serial()).collect();
        for serial in &batch {
            let bytes = serial.as_bytes();
            assert_eq!(bytes.len(), 16);
            assert!(bytes[0] != 0 && bytes[0] < 0x80, "{bytes:02x?}");
            // Later serials sort after earlier ones, as bytes and as the
            // lower-case hex the store keys certificates by.
            assert!(bytes > first.as_bytes());
            assert!(hex::encode(bytes) > hex::encode(first.as_bytes()));
        }
        // Many fall in the same millisecond; the random part tells them apart.
        let distinct: std::collections::HashSet<&[u8]> =
            batch.iter().map(SerialNumber::as_bytes).collect();
        assert_eq!(distinct.len(), batch.len());
    }

    #[test]
    fn every_kind_carries_its_extensions_with_the_profiles_criticality() {
        let agent = Kind::Agent {
            spiffe_id: "spiffe://keyward.local/agent/alpha",
            attestation: Some(
                der::asn1::Utf8StringRef::new("[]")
                    .unwrap()
                    .to_der()
                    .unwrap(),
            ),
            purpose: AgentKeyPurpose::Signing,
        };
        assert_eq!(
            extensions_of(agent, Some("https://keyward.example")),
            [
                (ID_CE_BASIC_CONSTRAINTS, true),
                (ID_CE_KEY_USAGE, true),
                (ID_CE_EXT_KEY_USAGE, false),
                (ID_CE_SUBJECT_ALT_NAME, false),
                (ID_PE_CMW, false),
                (ID_CE_SUBJECT_KEY_IDENTIFIER, false),
                (ID_CE_AUTHORITY_KEY_IDENTIFIER, false),
                (ID_CE_CRL_DISTRIBUTION_POINTS, false),
                (ID_PE_AUTHORITY_INFO_ACCESS, false),
            ]
        );
        let server = Kind::Server {
            dns_names: &["keyward.example".to_owned()],
            ips: &[],
        };
        assert_eq!(
            extensions_of(server, None),
            [
                (ID_CE_BASIC_CONSTRAINTS, true),
                (ID_CE_KEY_USAGE, true),
                (ID_CE_EXT_KEY_USAGE, false),
                (ID_CE_SUBJECT_ALT_NAME, false),
                (ID_CE_SUBJECT_KEY_IDENTIFIER, false),
                (ID_CE_AUTHORITY_KEY_IDENTIFIER, false),
            ]
        );
        // No revocation pointers for the responder, even with a URL.
        assert_eq!(
            extensions_of(Kind::OcspResponder, Some("https://keyward.example")),
            [
                (ID_CE_BASIC_CONSTRAINTS, true),
                (ID_CE_KEY_USAGE, true),
                (ID_CE_EXT_KEY_USAGE, false),
                (ID_PKIX_OCSP_NOCHECK, false),
                (ID_CE_SUBJECT_KEY_IDENTIFIER, false),
                (ID_CE_AUTHORITY_KEY_IDENTIFIER, false),
            ]
        );
        assert_eq!(
            extensions_of(Kind::RootCa, None),
            [
                (ID_CE_BASIC_CONSTRAINTS, true),
                (ID_CE_KEY_USAGE, true),
                (ID_CE_SUBJECT_KEY_IDENTIFIER, false),
                (ID_CE_AUTHORITY_KEY_IDENTIFIER, false),
            ]
        );
    }
}
