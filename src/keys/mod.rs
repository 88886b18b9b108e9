//! Key backends: where private keys live and the only code that talks to them.
//!
//! A backend hands out sessions; a session is owned by exactly one pool worker
//! thread (PKCS#11 sessions must not be shared between threads), so the
//! [`KeySession`] trait takes `&mut self` and is `Send` but not `Sync`.
//! Nothing here knows about X.509: a backend generates P-256 keys, reports
//! their public halves and the token's own account of them, and signs
//! SHA-256 digests.

pub mod pkcs11;
pub mod soft;
pub mod tcti;
pub mod tpm;

use std::fmt;
use std::sync::Arc;

use p256::ecdsa::Signature;
use p256::PublicKey;
use serde::{Deserialize, Serialize};

/// Identifier of a key inside a backend (stored as CKA_ID and CKA_LABEL on a
/// PKCS#11 token).
///
/// Invariant: 1 to 64 bytes of `[a-z0-9-]`, so it is safe in labels, logs
/// and file names.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KeyId(Arc<str>);

impl KeyId {
    /// A fresh identifier `<prefix>-<16 random hex digits>`.
    pub fn random(prefix: &str) -> Self {
        let suffix: [u8; 8] = rand::random();
        Self::parse(&format!("{prefix}-{}", hex::encode(suffix)))
            .expect("prefix is a KeyId-safe literal")
    }

    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            // Arc: ids are cloned into every pool request.
            Ok(Self(Arc::from(s)))
        } else {
            Err(KeyError::InvalidKeyId)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for KeyId {
    type Error = KeyError;
    fn try_from(s: String) -> Result<Self, KeyError> {
        Self::parse(&s)
    }
}

impl From<KeyId> for String {
    fn from(k: KeyId) -> String {
        k.0.to_string()
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which kind of hardware (or not) holds the keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    Pkcs11,
    Tpm,
    /// In-memory keys for unit tests; refused by a production config.
    Software,
}

/// The token's own description of itself, as reported by C_GetTokenInfo.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenDescription {
    pub manufacturer: String,
    pub model: String,
    pub serial: String,
    pub label: String,
}

impl fmt::Display for TokenDescription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} serial {} label {}",
            self.manufacturer, self.model, self.serial, self.label
        )
    }
}

/// What the token says about a private key, read back after generation.
///
/// These are the claims a relying party cares about: the key was generated on
/// the token (`local`), has always been sensitive and can never be exported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyAttributes {
    pub token: TokenDescription,
    pub local: bool,
    pub sensitive: bool,
    pub always_sensitive: bool,
    pub extractable: bool,
    pub never_extractable: bool,
    pub sign: bool,
    pub decrypt: bool,
    pub derive: bool,
    pub unwrap: bool,
    /// CKA_WRAP_WITH_TRUSTED: the key can leave the token only wrapped by
    /// a key the token's security officer marked trusted. Absent from
    /// evidence written before wrapped keys existed, where it was false.
    #[serde(default)]
    pub wrap_with_trusted: bool,
}

impl KeyAttributes {
    /// The attributes a key kept in `storage` must have, as read back right
    /// after generation. Returns the name of the first attribute that is
    /// wrong.
    pub fn check_custody(&self, storage: KeyStorage) -> Result<(), &'static str> {
        // A wrapped key must be extractable (that is how it leaves the
        // token), but only under a trusted wrapping key, never in the clear.
        let (extractable, never_extractable, wrap_with_trusted) = match storage {
            KeyStorage::Token => (false, true, self.wrap_with_trusted),
            KeyStorage::Wrapped => (true, false, true),
        };
        let expectations: [(&'static str, bool, bool); 10] = [
            ("CKA_LOCAL", self.local, true),
            ("CKA_SENSITIVE", self.sensitive, true),
            ("CKA_ALWAYS_SENSITIVE", self.always_sensitive, true),
            ("CKA_EXTRACTABLE", self.extractable, extractable),
            (
                "CKA_NEVER_EXTRACTABLE",
                self.never_extractable,
                never_extractable,
            ),
            (
                "CKA_WRAP_WITH_TRUSTED",
                self.wrap_with_trusted,
                wrap_with_trusted,
            ),
            ("CKA_SIGN", self.sign, true),
            ("CKA_DECRYPT", self.decrypt, false),
            ("CKA_DERIVE", self.derive, false),
            ("CKA_UNWRAP", self.unwrap, false),
        ];
        for (name, actual, expected) in expectations {
            if actual != expected {
                return Err(name);
            }
        }
        Ok(())
    }

    /// The attributes of a key that never leaves the token.
    pub fn check_hardware_resident(&self) -> Result<(), &'static str> {
        self.check_custody(KeyStorage::Token)
    }
}

/// Where an agent's custodial key is kept between uses.
///
/// `Token`: a token object, one per agent; the token's object store bounds
/// the number of agents (a YubiHSM 2 holds 256 objects, and SoftHSM2's file
/// store slows with every object). `Wrapped`: generated on the token, then
/// kept in keyward's database encrypted under a wrapping key that never
/// leaves the token (AES key wrap with padding, RFC 5649), and unwrapped
/// into a session object when it signs, as the TPM backend keeps its keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyStorage {
    Token,
    Wrapped,
}

impl KeyStorage {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStorage::Token => "token",
            KeyStorage::Wrapped => "wrapped",
        }
    }
}

/// A custodial key as the pool is asked to use it.
#[derive(Clone, Debug)]
pub enum KeyRef {
    /// A token object, found by its id.
    Token(KeyId),
    /// A key the token wrapped: `blob` is what it unwraps, `public_key` what
    /// the unwrapped key must sign for (a blob stored under the wrong key
    /// id is refused, never used).
    Wrapped {
        id: KeyId,
        blob: Arc<[u8]>,
        public_key: PublicKey,
    },
}

impl KeyRef {
    pub fn id(&self) -> &KeyId {
        match self {
            KeyRef::Token(id) | KeyRef::Wrapped { id, .. } => id,
        }
    }
}

/// A custodial key just generated: its public half, the token's account of
/// it as generated (the evidence's source), and for a wrapped key the blob
/// to store.
#[derive(Clone, Debug)]
pub struct GeneratedKey {
    pub public_key: PublicKey,
    pub attributes: KeyAttributes,
    pub wrapped: Option<Vec<u8>>,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error("key identifier is not of the form [a-z0-9-]{{1,64}}")]
    InvalidKeyId,
    #[error("key {0} not found on the token")]
    NotFound(KeyId),
    #[error("key {0} already exists on the token")]
    AlreadyExists(KeyId),
    #[error("key {key} is not hardware-resident: {attribute} has the wrong value")]
    NotHardwareResident { key: KeyId, attribute: &'static str },
    /// The session is gone (closed underneath us, or the login was lost);
    /// opening a new session is expected to fix it.
    #[error("token session lost during {function}: {detail}")]
    SessionLost { function: String, detail: String },
    /// The device or its connection failed; the module may need to be
    /// finalized and initialized again before anything works.
    #[error("token device failure during {function}: {detail}")]
    DeviceFailure { function: String, detail: String },
    #[error("token refused {function}: {detail}")]
    Token { function: String, detail: String },
    #[error("token returned malformed data: {0}")]
    Malformed(String),
    /// The token refused to unwrap a stored key, or the key it unwrapped is
    /// not the one recorded: the blob is damaged or not this key's.
    #[error("wrapped key {0} does not unwrap to its recorded public key")]
    WrappedKeyInvalid(KeyId),
    #[error("key backend configuration: {0}")]
    Config(String),
}

impl KeyError {
    /// Whether a fresh session (and perhaps a module re-initialization) may
    /// cure this error, so the pool should reconnect rather than give up.
    pub fn is_connection_failure(&self) -> bool {
        matches!(
            self,
            KeyError::SessionLost { .. } | KeyError::DeviceFailure { .. }
        )
    }
}

/// Which key store to open.
#[derive(Clone, Debug)]
pub enum KeyStoreConfig {
    Pkcs11(pkcs11::Pkcs11Config),
    Tpm(tpm::TpmConfig),
}

impl KeyStoreConfig {
    pub fn open(&self) -> Result<std::sync::Arc<dyn KeyBackend>, KeyError> {
        Ok(match self {
            KeyStoreConfig::Pkcs11(c) => std::sync::Arc::new(pkcs11::Pkcs11Backend::open(c)?),
            KeyStoreConfig::Tpm(c) => std::sync::Arc::new(tpm::TpmBackend::open(c)?),
        })
    }

    /// Pool workers this store can use: a TPM runs one command at a time,
    /// so it gets exactly one (the pool's queue does the batching).
    pub fn max_workers(&self) -> Option<usize> {
        match self {
            KeyStoreConfig::Pkcs11(_) => None,
            KeyStoreConfig::Tpm(_) => Some(1),
        }
    }
}

/// A key store that hands out sessions to pool workers.
pub trait KeyBackend: Send + Sync + 'static {
    fn kind(&self) -> BackendKind;

    /// Opens a session that is logged in and ready to use.
    fn open_session(&self) -> Result<Box<dyn KeySession>, KeyError>;

    /// Brings the backend back after a device failure (for PKCS#11: finalize
    /// and initialize the module again). `generation` is the value of
    /// [`KeyBackend::generation`] the caller saw when its session failed; a
    /// backend already recovered since then does nothing, so several workers
    /// failing at once cause one re-initialization.
    fn recover(&self, generation: u64) -> Result<(), KeyError>;

    /// Increases by one on every successful [`KeyBackend::recover`].
    fn generation(&self) -> u64;
}

/// A custodial key as a token object: generated, then the token's account
/// of it read back.
pub fn generate_on_token<S: KeySession + ?Sized>(
    session: &mut S,
    id: &KeyId,
) -> Result<GeneratedKey, KeyError> {
    let public_key = session.generate(id)?;
    let attributes = session.attributes(id)?;
    Ok(GeneratedKey {
        public_key,
        attributes,
        wrapped: None,
    })
}

/// One logged-in session on the key store. Owned by one thread at a time.
pub trait KeySession: Send {
    /// Generates a P-256 signing key on the token.
    fn generate(&mut self, id: &KeyId) -> Result<PublicKey, KeyError>;

    fn public_key(&mut self, id: &KeyId) -> Result<PublicKey, KeyError>;

    /// Signs a SHA-256 digest with ECDSA. The returned signature is
    /// normalized to low-S.
    fn sign_digest(&mut self, id: &KeyId, digest: &[u8; 32]) -> Result<Signature, KeyError>;

    /// Reads the token's own account of the key.
    fn attributes(&mut self, id: &KeyId) -> Result<KeyAttributes, KeyError>;

    /// Destroys the key (both halves) on the token.
    fn destroy(&mut self, id: &KeyId) -> Result<(), KeyError>;

    /// The ids of the keys the store holds for itself (token objects, TPM
    /// blobs; not wrapped keys, which it never holds) that begin with
    /// `prefix`, each once, in order.
    fn key_ids(&mut self, prefix: &str) -> Result<Vec<KeyId>, KeyError>;

    /// Generates a custodial key kept in `storage`, with the token's
    /// account of it as generated.
    fn generate_custodial(
        &mut self,
        id: &KeyId,
        storage: KeyStorage,
    ) -> Result<GeneratedKey, KeyError> {
        match storage {
            KeyStorage::Token => generate_on_token(self, id),
            KeyStorage::Wrapped => Err(KeyError::Config(
                "this key store keeps no wrapped keys (custodial_storage = \"token\")".into(),
            )),
        }
    }

    /// Signs with a wrapped key (see [`KeyRef::Wrapped`]).
    fn sign_wrapped(
        &mut self,
        id: &KeyId,
        _blob: &[u8],
        _public_key: &PublicKey,
        _digest: &[u8; 32],
    ) -> Result<Signature, KeyError> {
        Err(KeyError::NotFound(id.clone()))
    }

    /// Lets go of a wrapped key: every session drops its unwrapped copy.
    /// The blob itself is the caller's to delete.
    fn forget_wrapped(&mut self, _id: &KeyId) -> Result<(), KeyError> {
        Ok(())
    }

    /// A cheap call that fails when the session or device is unusable.
    fn ping(&mut self) -> Result<(), KeyError>;
}
