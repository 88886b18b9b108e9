//! EK allow-lists: for TPMs that ship without an EK certificate, an operator
//! can admit individual TPMs by the SHA-256 of their EK's public key
//! (SubjectPublicKeyInfo DER, as `openssl pkey -pubin -outform DER | sha256sum`
//! computes it from `tpm2_readpublic -f pem`, or `keyward agent
//! ek-fingerprint --tpm TCTI` prints it).
//!
//! The file holds one lower- or upper-case hex digest per line; `#` starts
//! a comment, blank lines are ignored, anything else is an error, so a typo
//! does not silently admit nothing.

use std::collections::HashSet;
use std::path::Path;

use p256::pkcs8::EncodePublicKey;
use sha2::{Digest, Sha256};

use super::credential::EkKey;

#[derive(Clone, Debug, Default)]
pub struct EkAllowList {
    digests: HashSet<[u8; 32]>,
}

#[derive(Debug, thiserror::Error)]
pub enum AllowListError {
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} line {line}: not a SHA-256 hex digest")]
    Syntax { path: String, line: usize },
}

impl EkAllowList {
    pub fn load(path: &Path) -> Result<Self, AllowListError> {
        let text = std::fs::read_to_string(path).map_err(|source| AllowListError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|line| AllowListError::Syntax {
            path: path.display().to_string(),
            line,
        })
    }

    /// The digests in `text`, or the number of the first bad line.
    pub fn parse(text: &str) -> Result<Self, usize> {
        let mut digests = HashSet::new();
        for (n, line) in text.lines().enumerate() {
            let entry = line.split('#').next().unwrap_or("").trim();
            if entry.is_empty() {
                continue;
            }
            let digest = hex::decode(entry)
                .ok()
                .and_then(|d| <[u8; 32]>::try_from(d).ok())
                .ok_or(n + 1)?;
            digests.insert(digest);
        }
        Ok(Self { digests })
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    pub fn len(&self) -> usize {
        self.digests.len()
    }

    pub fn contains(&self, digest: &[u8; 32]) -> bool {
        self.digests.contains(digest)
    }
}

/// SHA-256 of the EK's SubjectPublicKeyInfo DER: the allow-list key.
pub fn ek_public_key_sha256(key: &EkKey) -> Option<[u8; 32]> {
    let der = match key {
        EkKey::Rsa { modulus, exponent } => rsa::RsaPublicKey::new(
            rsa::BigUint::from_bytes_be(modulus),
            rsa::BigUint::from(EkKey::rsa_exponent(*exponent)),
        )
        .ok()?
        .to_public_key_der()
        .ok()?,
        EkKey::P256(key) => key.to_public_key_der().ok()?,
        EkKey::P384(key) => key.to_public_key_der().ok()?,
    };
    Some(Sha256::digest(der.as_bytes()).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_comments_and_blank_lines_parse_and_anything_else_is_an_error() {
        let a = "ab".repeat(32);
        let text = format!("# lab TPMs\n\n{a}  # rack 3\n{}\n", "CD".repeat(32));
        let list = EkAllowList::parse(&text).unwrap();
        assert_eq!(list.len(), 2);
        assert!(list.contains(&[0xab; 32]));
        assert!(list.contains(&[0xcd; 32]));
        assert_eq!(EkAllowList::parse("abcd\n").unwrap_err(), 1);
        assert_eq!(
            EkAllowList::parse(&format!("{a}\nnot hex\n")).unwrap_err(),
            2
        );
    }

    #[test]
    fn the_fingerprint_is_the_spki_digest_openssl_computes() {
        let secret = p256::SecretKey::from_slice(&[7; 32]).unwrap();
        let public = secret.public_key();
        let expected: [u8; 32] =
            Sha256::digest(public.to_public_key_der().unwrap().as_bytes()).into();
        assert_eq!(ek_public_key_sha256(&EkKey::P256(public)), Some(expected));
    }
}
