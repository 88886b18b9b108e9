//! X.509 certificate structure with extension OIDs kept as raw DER.
//!
//! keyward's attestation extension lives under the 2.25 (UUID) arc, whose
//! 128-bit arc does not fit the 32-bit arcs of `const-oid` and therefore
//! cannot be encoded or parsed by `x509-cert`'s `Extension`. These types
//! mirror RFC 5280's `Certificate` and `TBSCertificate` field for field but
//! hold each extension's `extnID` as an opaque `OBJECT IDENTIFIER` TLV;
//! standard extensions are still encoded and decoded with `x509-cert`'s
//! typed values.

use const_oid::AssociatedOid;
use der::asn1::{Any, BitString, OctetString};
use der::{Decode, DecodePem, Encode, EncodePem, Sequence, Tag, Tagged};
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
        Ok(Self::from_pem(pem.trim().as_bytes())?)
    }

    /// Lower-case hex of the serial number's bytes.
    pub fn serial_hex(&self) -> String {
        hex::encode(self.tbs_certificate.serial_number.as_bytes())
    }
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

/// Content octets of an OBJECT IDENTIFIER whose arcs may exceed 32 bits.
pub fn oid_content(arcs: &[u128]) -> Vec<u8> {
    assert!(
        arcs.len() >= 2 && arcs[0] <= 2,
        "an OID has at least two arcs, the first 0..=2"
    );
    let mut out = Vec::new();
    let mut push_arc = |mut v: u128| {
        let mut groups = vec![(v & 0x7f) as u8];
        v >>= 7;
        while v > 0 {
            groups.push(0x80 | (v & 0x7f) as u8);
            v >>= 7;
        }
        out.extend(groups.iter().rev());
    };
    push_arc(arcs[0] * 40 + arcs[1]);
    for arc in &arcs[2..] {
        push_arc(*arc);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oid_encoding_matches_const_oid_for_small_arcs() {
        let expected = const_oid::db::rfc5280::ID_CE_BASIC_CONSTRAINTS;
        assert_eq!(oid_content(&[2, 5, 29, 19]), expected.as_bytes());
        let ecdsa = const_oid::db::rfc5912::ECDSA_WITH_SHA_256;
        assert_eq!(oid_content(&[1, 2, 840, 10045, 4, 3, 2]), ecdsa.as_bytes());
    }

    #[test]
    fn uuid_arcs_encode_in_base_128() {
        // 2.25.2^127: 0x69, then 2^127 in 7-bit groups: 0x82 followed by 18 x 0x80 and 0x00.
        let bytes = oid_content(&[2, 25, 1u128 << 127]);
        assert_eq!(bytes[0], 0x69);
        assert_eq!(bytes[1], 0x82);
        assert!(bytes[2..bytes.len() - 1].iter().all(|b| *b == 0x80));
        assert_eq!(*bytes.last().unwrap(), 0x00);
    }
}
