//! X.509 certificates: `x509-cert`'s types, with the few conveniences
//! keyward's code uses on them.
//!
//! Until the attestation extension moved to id-pe-cmw (1.3.6.1.5.5.7.1.35)
//! this module held hand-written mirrors of RFC 5280's structures, because
//! the old UUID arc (2.25.…) did not fit `const-oid`. Now every OID keyward
//! writes fits, and a certificate carrying one that does not (a huge arc)
//! is refused as malformed when it is parsed.

use const_oid::AssociatedOid;
use der::asn1::OctetString;
use der::{Decode, Encode, EncodePem};

pub use x509_cert::ext::Extension;
pub use x509_cert::{Certificate, TbsCertificate};

use super::CaError;

/// Builds an extension from its typed value.
pub fn extension<T: AssociatedOid + Encode>(
    critical: bool,
    value: &T,
) -> Result<Extension, CaError> {
    Ok(Extension {
        extn_id: T::OID,
        critical,
        extn_value: OctetString::new(value.to_der()?)?,
    })
}

/// PEM and the serial number as keyward writes them.
pub trait CertificateText: Sized {
    fn to_pem_string(&self) -> Result<String, CaError>;
    /// One certificate in one PEM block, with nothing after its DER value.
    fn from_pem_str(pem: &str) -> Result<Self, CaError>;
    /// Lower-case hex of the serial number's bytes.
    fn serial_hex(&self) -> String;
}

impl CertificateText for Certificate {
    fn to_pem_string(&self) -> Result<String, CaError> {
        Ok(self.to_pem(der::pem::LineEnding::LF)?)
    }

    fn from_pem_str(pem: &str) -> Result<Self, CaError> {
        Ok(from_pem_strict(pem)?)
    }

    fn serial_hex(&self) -> String {
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

/// Decodes the signed part of a structure (a TBSCertList, a ResponseData)
/// so that it can be carried in the signed whole, refusing bytes its
/// re-encoding would not reproduce: `der` accepts a DEFAULT value written
/// out (an explicit version v1, say) and drops it again on encoding, and
/// the signature would then cover bytes the result does not hold.
pub(crate) fn decode_signed<'a, T>(der: &'a [u8]) -> Result<T, CaError>
where
    T: Decode<'a> + Encode,
{
    let value = T::from_der(der)?;
    if value.to_der()? != der {
        return Err(CaError::Internal(
            "the signed part does not re-encode to its own bytes".into(),
        ));
    }
    Ok(value)
}

/// Every certificate in a PEM bundle, in order; text between the blocks
/// is ignored.
///
/// Not `Certificate::load_pem_chain` (x509-cert 0.2.5), for two concrete
/// gaps: it computes `input.len() - 1` before looking at the input, so an
/// empty or blank bundle panics (in debug builds) instead of failing, and it
/// reads each block with `der`'s `from_pem`, which accepts bytes after the
/// certificate's DER value (see [`from_pem_strict`]).
pub fn parse_pem_chain(pem: &str) -> Result<Vec<Certificate>, CaError> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = pem;
    while let Some(start) = rest.find(BEGIN) {
        let block = &rest[start..];
        let end = block
            .find(END)
            .ok_or_else(|| CaError::Internal("unterminated PEM certificate".into()))?;
        out.push(Certificate::from_pem_str(&block[..end + END.len()])?);
        rest = &block[end + END.len()..];
    }
    Ok(out)
}
