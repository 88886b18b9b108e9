//! Attestation: evidence that a key lives in hardware, checked once and then
//! carried as [`Verified`], which only this module can construct.
//!
//! The evidence itself is stored (and served by digest); certificates carry
//! only [`AttestationClaims`], a short summary in a non-critical extension.

pub mod pkcs11;
pub mod tpm;

use der::asn1::OctetString;
use der::{Encode, Sequence};

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

/// Contents of the attestation extension (OID in `ca::profile`):
///
/// ```text
/// KeywardAttestation ::= SEQUENCE {
///     version         INTEGER (1),
///     format          UTF8String,   -- "pkcs11-key-attributes" |
///                                   -- "tpm2-key-attributes" | "tpm2-certify"
///     keyLocation     UTF8String,   -- token or TPM description
///     evidenceDigest  OCTET STRING, -- SHA-256 of the stored evidence
///     policyVersion   INTEGER,
///     scopes          SEQUENCE OF UTF8String }
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Sequence)]
pub struct AttestationClaims {
    pub version: u8,
    pub format: String,
    pub key_location: String,
    pub evidence_digest: OctetString,
    pub policy_version: u64,
    pub scopes: Vec<String>,
}

impl AttestationClaims {
    pub fn for_key(
        key: &AttestedKey,
        policy_version: u64,
        scopes: Vec<String>,
    ) -> Result<Self, AttestationError> {
        let digest = hex::decode(&key.evidence.digest)
            .map_err(|_| AttestationError::Malformed("evidence digest is not hex".into()))?;
        Ok(Self {
            version: 1,
            format: key.format.to_owned(),
            key_location: key.key_location.clone(),
            evidence_digest: OctetString::new(digest)?,
            policy_version,
            scopes,
        })
    }

    pub fn to_extension_value(&self) -> Result<Vec<u8>, AttestationError> {
        Ok(self.to_der()?)
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
    use der::Decode;

    #[test]
    fn claims_round_trip_through_der() {
        let claims = AttestationClaims {
            version: 1,
            format: "pkcs11-key-attributes".into(),
            key_location: "SoftHSM project SoftHSM v2 serial 1 label keyward".into(),
            evidence_digest: OctetString::new(vec![7; 32]).unwrap(),
            policy_version: 3,
            scopes: vec!["orders:read".into()],
        };
        let der = claims.to_extension_value().unwrap();
        assert_eq!(AttestationClaims::from_der(&der).unwrap(), claims);
    }
}
