//! X.509 certificate structure with extension OIDs kept as raw DER.
//!
//! These types mirror RFC 5280's `Certificate` and `TBSCertificate` field
//! for field but hold each extension's `extnID` as an opaque `OBJECT
//! IDENTIFIER` TLV: the attestation extension used to sit under a UUID arc
//! (2.25.…) that `const-oid` cannot hold. It is on id-pe-cmw now, so these
//! can give way to `x509-cert`'s own types (issue 14, item 2).

use const_oid::AssociatedOid;
use der::asn1::{Any, BitString, OctetString};
use der::{Decode, Encode, EncodePem, Sequence, Tag, Tagged};
use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use x509_cert::certificate::Version;
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::time::Validity;

use super::CaError;

/// `Extension ::= SEQUENCE { extnID OBJECT IDENTIFIER, critical BOOLEAN
/// DEFAULT FALSE, extnValue OCTET STRING }`, with `extnID` kept raw.
#[derive(Clone, Debug, Eq, PartialEq, Sequence)]
pub struct Extension {
    pub extn_id: Any,
    #[asn1(default = "Default::default")]
    pub critical: bool,
    pub extn_value: OctetString,
}

impl Extension {
    /// A standard extension from its typed value.
    pub fn typed<T: AssociatedOid + Encode>(critical: bool, value: &T) -> Result<Self, CaError> {
        Ok(Self {
            extn_id: Any::encode_from(&T::OID)?,
            critical,
            extn_value: OctetString::new(value.to_der()?)?,
        })
    }

    /// An extension whose OID is given as its DER content octets.
    pub fn raw(oid_content: &[u8], critical: bool, value: Vec<u8>) -> Result<Self, CaError> {
        Ok(Self {
            extn_id: Any::new(Tag::ObjectIdentifier, oid_content)?,
            critical,
            extn_value: OctetString::new(value)?,
        })
    }

    /// Whether this is the extension with the given OID content octets.
    pub fn is(&self, oid_content: &[u8]) -> bool {
        self.extn_id.tag() == Tag::ObjectIdentifier && self.extn_id.value() == oid_content
    }
}

#[derive(Clone, Debug, Eq, PartialEq, Sequence)]
pub struct TbsCertificate {
    #[asn1(context_specific = "0", default = "Default::default")]
    pub version: Version,
    pub serial_number: SerialNumber,
    pub signature: AlgorithmIdentifierOwned,
    pub issuer: Name,
    pub validity: Validity,
    pub subject: Name,
    pub subject_public_key_info: SubjectPublicKeyInfoOwned,
    #[asn1(context_specific = "1", tag_mode = "IMPLICIT", optional = "true")]
    pub issuer_unique_id: Option<BitString>,
    #[asn1(context_specific = "2", tag_mode = "IMPLICIT", optional = "true")]
    pub subject_unique_id: Option<BitString>,
    #[asn1(context_specific = "3", tag_mode = "EXPLICIT", optional = "true")]
    pub extensions: Option<Vec<Extension>>,
}

impl TbsCertificate {
    pub fn extension(&self, oid_content: &[u8]) -> Option<&Extension> {
        self.extensions.as_ref()?.iter().find(|e| e.is(oid_content))
    }

    /// Decodes a standard extension, if present.
    pub fn typed_extension<'a, T>(&'a self) -> Result<Option<(bool, T)>, CaError>
    where
        T: AssociatedOid + Decode<'a>,
    {
        match self.extension(T::OID.as_bytes()) {
            None => Ok(None),
            Some(e) => Ok(Some((e.critical, T::from_der(e.extn_value.as_bytes())?))),
        }
    }
}

#[derive(Clone, Debug, Eq, PartialEq, Sequence)]
pub struct Certificate {
    pub tbs_certificate: TbsCertificate,
    pub signature_algorithm: AlgorithmIdentifierOwned,
    pub signature: BitString,
}

impl der::pem::PemLabel for Certificate {
    const PEM_LABEL: &'static str = "CERTIFICATE";
}

impl Certificate {
    pub fn to_pem_string(&self) -> Result<String, CaError> {
        Ok(self.to_pem(der::pem::LineEnding::LF)?)
    }

    pub fn from_pem_str(pem: &str) -> Result<Self, CaError> {
        Ok(from_pem_strict(pem)?)
    }

    /// Lower-case hex of the serial number's bytes.
    pub fn serial_hex(&self) -> String {
        hex::encode(self.tbs_certificate.serial_number.as_bytes())
    }
}

/// The value in one PEM block, which must hold exactly that value: `der`'s
/// own `from_pem` stops after the first DER value in the block and ignores
/// the bytes after it, so a CSR or certificate with trailing bytes was
/// read as if they were not there (found by `tests/parser_fuzz.rs`).
pub fn from_pem_strict<T>(pem: &str) -> Result<T, der::Error>
where
    T: der::DecodeOwned + der::pem::PemLabel,
{
    let (label, der) = pem_rfc7468::decode_vec(pem.trim().as_bytes())?;
    T::validate_pem_label(label)?;
    T::from_der(&der)
}

/// Parses every certificate in a PEM bundle, in order.
pub fn parse_pem_chain(pem: &str) -> Result<Vec<Certificate>, CaError> {
    let mut out = Vec::new();
    let mut rest = pem;
    const END: &str = "-----END CERTIFICATE-----";
    while let Some(start) = rest.find("-----BEGIN CERTIFICATE-----") {
        let after = &rest[start..];
        let end = after
            .find(END)
            .ok_or_else(|| CaError::Internal("unterminated PEM certificate".into()))?;
        out.push(Certificate::from_pem_str(&after[..end + END.len()])?);
        rest = &after[end + END.len()..];
    }
    Ok(out)
}
