//! In-memory keys for unit tests. A production config refuses this backend
//! (`Config::validate`), and nothing outside `#[cfg(test)]` code and the
//! config's explicit `dangerous_software_keys` switch constructs it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use p256::ecdsa::signature::hazmat::PrehashSigner;
use p256::ecdsa::{Signature, SigningKey};
use p256::PublicKey;

use super::{
    BackendKind, KeyAttributes, KeyBackend, KeyError, KeyId, KeySession, TokenDescription,
};

#[derive(Clone, Default)]
pub struct SoftwareBackend {
    keys: Arc<Mutex<HashMap<KeyId, SigningKey>>>,
}

impl SoftwareBackend {
    pub fn new() -> Self {
        Self::default()
    }

    fn token() -> TokenDescription {
        TokenDescription {
            manufacturer: "keyward".into(),
            model: "software (tests only)".into(),
            serial: "0".into(),
            label: "software".into(),
        }
    }
}

impl KeyBackend for SoftwareBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Software
    }
    fn open_session(&self) -> Result<Box<dyn KeySession>, KeyError> {
        Ok(Box::new(self.clone()))
    }
    fn recover(&self, _generation: u64) -> Result<(), KeyError> {
        Ok(())
    }
    fn generation(&self) -> u64 {
        0
    }
}

impl SoftwareBackend {
    fn with_key<T>(
        &self,
        id: &KeyId,
        f: impl FnOnce(&SigningKey) -> Result<T, KeyError>,
    ) -> Result<T, KeyError> {
        let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let key = keys.get(id).ok_or_else(|| KeyError::NotFound(id.clone()))?;
        f(key)
    }
}

impl KeySession for SoftwareBackend {
    fn generate(&mut self, id: &KeyId) -> Result<PublicKey, KeyError> {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if keys.contains_key(id) {
            return Err(KeyError::AlreadyExists(id.clone()));
        }
        let key = SigningKey::random(&mut rand::rngs::OsRng);
        let public = PublicKey::from(key.verifying_key());
        keys.insert(id.clone(), key);
        Ok(public)
    }

    fn public_key(&mut self, id: &KeyId) -> Result<PublicKey, KeyError> {
        self.with_key(id, |k| Ok(PublicKey::from(k.verifying_key())))
    }

    fn sign_digest(&mut self, id: &KeyId, digest: &[u8; 32]) -> Result<Signature, KeyError> {
        self.with_key(id, |k| {
            let sig: Signature = k
                .sign_prehash(digest)
                .map_err(|e| KeyError::Malformed(e.to_string()))?;
            Ok(sig.normalize_s().unwrap_or(sig))
        })
    }

    fn attributes(&mut self, id: &KeyId) -> Result<KeyAttributes, KeyError> {
        // Honest about what it is: a software key is none of these things.
        self.with_key(id, |_| {
            Ok(KeyAttributes {
                token: Self::token(),
                local: true,
                sensitive: false,
                always_sensitive: false,
                extractable: true,
                never_extractable: false,
                sign: true,
                decrypt: false,
                derive: false,
                unwrap: false,
                wrap_with_trusted: false,
            })
        })
    }

    fn destroy(&mut self, id: &KeyId) -> Result<(), KeyError> {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        keys.remove(id)
            .map(|_| ())
            .ok_or_else(|| KeyError::NotFound(id.clone()))
    }

    fn key_ids(&mut self, prefix: &str) -> Result<Vec<KeyId>, KeyError> {
        let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let mut ids: Vec<KeyId> = keys
            .keys()
            .filter(|id| id.as_str().starts_with(prefix))
            .cloned()
            .collect();
        ids.sort();
        Ok(ids)
    }

    fn ping(&mut self) -> Result<(), KeyError> {
        Ok(())
    }
}
