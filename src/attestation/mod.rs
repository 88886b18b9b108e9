//! Attestation: evidence that a key lives in hardware, checked once and then
//! carried as [`Verified`], which only this module can construct.
//!
//! The evidence itself is stored (and served by digest); certificates carry
//! only [`AttestationClaims`], a short summary in a non-critical extension.

pub mod pkcs11;
pub mod tpm;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use der::{Decode, Encode};

use crate::pool::PoolError;
use crate::store::AttestationRecord;

/// A value that passed verification. Only `attestation` can build one.
#[derive(Clone, Debug)]
pub struct Verified<T>(T);

impl<T> Verified<T> {
    pub(crate) fn new(value: T) -> Self {
        Self(value)
    }

    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> std::ops::Deref for Verified<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// A key whose hardware residence was proven, and the stored evidence.
#[derive(Clone, Debug)]
pub struct AttestedKey {
    /// `pkcs11-key-attributes`, `tpm2-key-attributes` (custodial keys in
    /// keyward's TPM) or `tpm2-certify` (keys in an agent's TPM).
    pub format: &'static str,
    /// The token or TPM it lives in, as the hardware described itself.
    pub key_location: String,
    pub evidence: AttestationRecord,
}

/// The media type of keyward's key-attestation claims inside the CMW record.
pub const CLAIMS_MEDIA_TYPE: &str = "application/vnd.keyward.key-attestation+json";

/// What a certificate says about its key's custody, carried in the
/// id-pe-cmw extension (RFC 9999, OID in `pki::profile`) as the CMW `json`
/// choice: the extension value is a DER UTF8String holding the JSON record
/// `["application/vnd.keyward.key-attestation+json", "<base64url payload>"]`,
/// and the payload is this object as JSON:
///
/// ```json
/// {"version": 1,
///  "format": "pkcs11-key-attributes",
///  "key_location": "SoftHSM project SoftHSM v2 serial 1a2b label keyward, wrapped",
///  "evidence_sha256": "<hex; GET /v1/attestations/{evidence_sha256}>",
///  "policy_version": 3,
///  "scopes": ["orders:read"]}
/// ```
///
/// The record is written with serde_json rather than the Veraison `cmw`
/// crate: a JSON CMW record is a two-element array, and the crate's X.509
/// helper encodes the extension as `SEQUENCE {OID, BOOLEAN, UTF8String}`
/// without the `extnValue` OCTET STRING RFC 5280 requires, so its output
/// could not go into a certificate. The tests read keyward's record with
/// that crate, as an independent implementation.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AttestationClaims {
    pub version: u8,
    /// `pkcs11-key-attributes`, `tpm2-key-attributes` or `tpm2-certify`.
    pub format: String,
    /// The token or TPM the key lives in, and `, wrapped` for a key kept
    /// in keyward's database wrapped under a key that never leaves it.
    pub key_location: String,
    /// SHA-256 of the stored evidence, lower-case hex.
    pub evidence_sha256: String,
    pub policy_version: u64,
    pub scopes: Vec<String>,
}

impl AttestationClaims {
    pub fn for_key(
        key: &AttestedKey,
        policy_version: u64,
        scopes: Vec<String>,
    ) -> Result<Self, AttestationError> {
        let digest = &key.evidence.digest;
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(AttestationError::Malformed(
                "evidence digest is not SHA-256 hex".into(),
            ));
        }
        Ok(Self {
            version: 1,
            format: key.format.to_owned(),
            key_location: key.key_location.clone(),
            evidence_sha256: digest.to_ascii_lowercase(),
            policy_version,
            scopes,
        })
    }

    /// The id-pe-cmw extension's value (the DER inside `extnValue`).
    pub fn to_extension_value(&self) -> Result<Vec<u8>, AttestationError> {
        let payload = serde_json::to_vec(self)
            .map_err(|e| AttestationError::Malformed(format!("encoding claims: {e}")))?;
        let record = serde_json::json!([CLAIMS_MEDIA_TYPE, B64URL.encode(payload)]);
        Ok(der::asn1::Utf8StringRef::new(&record.to_string())?.to_der()?)
    }

    /// Reads an id-pe-cmw extension value written by
    /// [`Self::to_extension_value`]: a CMW JSON record of keyward's media
    /// type (an optional third element, the CMW indicator, is accepted and
    /// ignored).
    pub fn from_extension_value(value: &[u8]) -> Result<Self, AttestationError> {
        let malformed = |what: &str| AttestationError::Malformed(what.to_owned());
        let text = der::asn1::Utf8StringRef::from_der(value)?;
        let record: serde_json::Value = serde_json::from_str(text.as_str())
            .map_err(|_| malformed("the CMW record is not JSON"))?;
        let items = record
            .as_array()
            .filter(|items| (2..=3).contains(&items.len()))
            .ok_or_else(|| malformed("the CMW record is not a 2- or 3-element array"))?;
        if items[0].as_str() != Some(CLAIMS_MEDIA_TYPE) {
            return Err(malformed("the CMW record is not keyward's media type"));
        }
        let payload = items[1]
            .as_str()
            .and_then(|b64| B64URL.decode(b64).ok())
            .ok_or_else(|| malformed("the CMW value is not base64url"))?;
        serde_json::from_slice(&payload).map_err(|_| malformed("the claims are not keyward's JSON"))
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestationError {
    #[error("key is not hardware-resident: {0} has the wrong value")]
    NotHardwareResident(&'static str),
    #[error("attestation evidence is malformed: {0}")]
    Malformed(String),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("encoding: {0}")]
    Der(#[from] der::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> AttestationClaims {
        AttestationClaims {
            version: 1,
            format: "pkcs11-key-attributes".into(),
            key_location: "SoftHSM project SoftHSM v2 serial 1 label keyward".into(),
            evidence_sha256: "07".repeat(32),
            policy_version: 3,
            scopes: vec!["orders:read".into()],
        }
    }

    #[test]
    fn claims_round_trip_through_the_extension_value() {
        let value = claims().to_extension_value().unwrap();
        assert_eq!(value[0], 0x0c, "the CMW json choice is a UTF8String");
        assert_eq!(
            AttestationClaims::from_extension_value(&value).unwrap(),
            claims()
        );
    }

    #[test]
    fn the_extension_value_is_a_cmw_json_record_of_keywards_media_type() {
        let value = claims().to_extension_value().unwrap();
        let text = der::asn1::Utf8StringRef::from_der(&value).unwrap();
        let record: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
        assert_eq!(record[0], CLAIMS_MEDIA_TYPE);
        let payload = B64URL.decode(record[1].as_str().unwrap()).unwrap();
        let payload: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(payload["evidence_sha256"], "07".repeat(32));
        assert_eq!(payload["policy_version"], 3);
    }

    #[test]
    fn veraisons_cmw_reader_reads_the_record() {
        let value = claims().to_extension_value().unwrap();
        let text = der::asn1::Utf8StringRef::from_der(&value).unwrap();
        let cmw::CMW::Monad(monad) = cmw::CMW::unmarshal_json(text.as_bytes()).unwrap() else {
            panic!("a single record, not a collection");
        };
        assert_eq!(monad.type_(), CLAIMS_MEDIA_TYPE);
        let payload: AttestationClaims = serde_json::from_slice(&monad.value()).unwrap();
        assert_eq!(payload, claims());
    }

    #[test]
    fn values_that_are_not_keywards_record_are_refused() {
        let utf8 = |s: &str| der::asn1::Utf8StringRef::new(s).unwrap().to_der().unwrap();
        let other_type = utf8(r#"["application/eat+jwt","e30"]"#);
        let not_array = utf8(r#"{"format":"x"}"#);
        let one_item = utf8(&format!(r#"["{CLAIMS_MEDIA_TYPE}"]"#));
        let bad_b64 = utf8(&format!(r#"["{CLAIMS_MEDIA_TYPE}","***"]"#));
        let not_claims = utf8(&format!(r#"["{CLAIMS_MEDIA_TYPE}","e30"]"#));
        let octets = der::asn1::OctetString::new(b"[]".to_vec())
            .unwrap()
            .to_der()
            .unwrap();
        let mut trailing = claims().to_extension_value().unwrap();
        trailing.push(0);
        for value in [
            other_type, not_array, one_item, bad_b64, not_claims, octets, trailing,
        ] {
            assert!(AttestationClaims::from_extension_value(&value).is_err());
        }
    }
}
