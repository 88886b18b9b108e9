//! PKCS#10 requests from agents that hold their own keys. Only the key is
//! taken from a CSR: keyward sets subject and SAN itself, so nothing else in
//! the request can influence the certificate.

use der::Encode;
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::PublicKey;
use x509_cert::request::CertReq;

use super::profile::p256_key_of;
use super::CaError;
use const_oid::db::rfc5912::ECDSA_WITH_SHA_256;

/// Largest CSR accepted, in PEM characters; real P-256 CSRs are < 1 KiB.
pub const MAX_CSR_PEM_LEN: usize = 16 * 1024;

/// A CSR whose self-signature verified with its own P-256 key.
#[derive(Debug)]
pub struct VerifiedCsr {
    key: PublicKey,
    attributes: x509_cert::attr::Attributes,
}

impl VerifiedCsr {
    pub fn from_pem(pem: &str) -> Result<Self, CaError> {
        if pem.len() > MAX_CSR_PEM_LEN {
            return Err(CaError::InvalidCsr("larger than 16 KiB".into()));
        }
        let csr = super::cert::from_pem_strict::<CertReq>(pem)
            .map_err(|e| CaError::InvalidCsr(format!("not a PEM PKCS#10 request: {e}")))?;
        let key = p256_key_of(&csr.info.public_key)?;
        if csr.algorithm.oid != ECDSA_WITH_SHA_256 {
            return Err(CaError::InvalidCsr(format!(
                "signature algorithm {} (only ecdsa-with-SHA256 is accepted)",
                csr.algorithm.oid
            )));
        }
        let signature = csr
            .signature
            .as_bytes()
            .and_then(|b| Signature::from_der(b).ok())
            .ok_or_else(|| CaError::InvalidCsr("signature is not a DER ECDSA signature".into()))?;
        let signed = csr.info.to_der()?;
        VerifyingKey::from(&key)
            .verify(&signed, &signature)
            .map_err(|_| CaError::CsrSignature)?;
        Ok(Self {
            key,
            attributes: csr.info.attributes,
        })
    }

    pub fn public_key(&self) -> &PublicKey {
        &self.key
    }

    /// The values of the request's attribute `oid` (none when absent).
    /// They are covered by the verified signature; what they mean is for
    /// the caller to decide.
    pub fn attribute_values(&self, oid: &const_oid::ObjectIdentifier) -> Vec<der::Any> {
        self.attributes
            .iter()
            .filter(|a| &a.oid == oid)
            .flat_map(|a| a.values.iter().cloned())
            .collect()
    }
}
