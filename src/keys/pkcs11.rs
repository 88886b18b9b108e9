//! PKCS#11 key backend over cryptoki: SoftHSM2, YubiHSM 2, Luna, CloudHSM, or
//! any other module.
//!
//! Sessions are opened once per pool worker and kept. The user login is a
//! property of the whole application on the token (PKCS#11 §5.6), so a
//! session logs in only if the application is not logged in yet and never
//! calls `C_Logout`: logging out one session would log out every worker.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockWriteGuard, TryLockError};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use hashlink::LruCache;
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::PublicKey;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use super::{
    BackendKind, GeneratedKey, KeyAttributes, KeyBackend, KeyError, KeyId, KeySession, KeyStorage,
    TokenDescription,
};

/// CKA_LABEL of the token's wrapping key for custodial keys kept wrapped
/// (`KeyStorage::Wrapped`).
pub const WRAPPING_KEY_LABEL: &str = "keyward-wrapping-key";

/// Unwrapped keys a session keeps live (as session objects) at most; past
/// it the least recently used is destroyed and unwrapped again when next
/// needed. Each worker has its own: a few tens of megabytes in the module.
pub const LIVE_WRAPPED_KEYS_PER_SESSION: usize = 16_384;

/// Wrapped-key ids forgotten lately, for sessions to catch up on; a
/// session further behind drops every live key it holds.
const FORGOTTEN_REMEMBERED: usize = 1024;

/// DER of the namedCurve OID prime256v1 (1.2.840.10045.3.1.7), as CKA_EC_PARAMS.
const P256_EC_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// Where the module is and which token to use.
#[derive(Clone)]
pub struct Pkcs11Config {
    pub module: PathBuf,
    pub token_label: String,
    pub user_pin: SecretString,
}

impl std::fmt::Debug for Pkcs11Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Config")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("user_pin", &"<redacted>")
            .finish()
    }
}

/// Loads a PKCS#11 module and initializes it for multi-threaded use with the
/// OS's locking primitives. A module that is already initialized in this
/// process is accepted as is.
pub fn load_module(path: &Path) -> Result<Pkcs11, KeyError> {
    let ctx = Pkcs11::new(path)
        .map_err(|e| KeyError::Config(format!("loading {}: {e}", path.display())))?;
    initialize(&ctx)?;
    Ok(ctx)
}

fn initialize(ctx: &Pkcs11) -> Result<(), KeyError> {
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
        Err(e) => Err(classify(e)),
    }
}

/// Initializes a fresh token in the module's first free slot and sets its
/// user PIN. Used only for the embedded SoftHSM2 default.
pub fn init_token(
    ctx: &Pkcs11,
    label: &str,
    so_pin: &SecretString,
    user_pin: &SecretString,
) -> Result<(), KeyError> {
    if find_slot(ctx, label).is_ok() {
        return Err(KeyError::Config(format!(
            "a token labelled {label:?} already exists"
        )));
    }
    let slots = ctx.get_slots_with_token().map_err(classify)?;
    let free = slots
        .into_iter()
        .find(|s| ctx.get_token_info(*s).is_ok_and(|t| !t.token_initialized()))
        .ok_or_else(|| KeyError::Config("no slot with an uninitialized token".into()))?;
    let so = AuthPin::from(so_pin.expose_secret());
    ctx.init_token(free, &so, label).map_err(classify)?;
    // SoftHSM2 moves an initialized token to a new slot id: look it up again.
    let slot = find_slot(ctx, label)?;
    let session = ctx.open_rw_session(slot).map_err(classify)?;
    session.login(UserType::So, Some(&so)).map_err(classify)?;
    session
        .init_pin(&AuthPin::from(user_pin.expose_secret()))
        .map_err(classify)?;
    // This session is the only one logged in as SO; logging it out is safe
    // and leaves no SO login behind.
    session.logout().map_err(classify)?;
    Ok(())
}

fn find_slot(ctx: &Pkcs11, label: &str) -> Result<Slot, KeyError> {
    let slots = ctx.get_slots_with_initialized_token().map_err(classify)?;
    for slot in slots {
        let info = ctx.get_token_info(slot).map_err(classify)?;
        if info.label().trim_end() == label {
            return Ok(slot);
        }
    }
    Err(KeyError::Config(format!(
        "no initialized token labelled {label:?}"
    )))
}

fn token_description(ctx: &Pkcs11, slot: Slot) -> Result<TokenDescription, KeyError> {
    let info = ctx.get_token_info(slot).map_err(classify)?;
    Ok(TokenDescription {
        manufacturer: info.manufacturer_id().trim_end().to_owned(),
        model: info.model().trim_end().to_owned(),
        serial: info.serial_number().trim_end().to_owned(),
        label: info.label().trim_end().to_owned(),
    })
}

/// Maps a cryptoki error to what the pool needs to know: retry on a new
/// session, re-initialize the module, or give up.
fn classify(e: CkError) -> KeyError {
    match e {
        CkError::Pkcs11(rv, function) => {
            let function = format!("{function:?}");
            let detail = format!("{rv:?}");
            match rv {
                RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::UserNotLoggedIn => KeyError::SessionLost { function, detail },
                RvError::DeviceError
                | RvError::DeviceRemoved
                | RvError::TokenNotPresent
                | RvError::TokenNotRecognized
                | RvError::CryptokiNotInitialized
                | RvError::GeneralError => KeyError::DeviceFailure { function, detail },
                _ => KeyError::Token { function, detail },
            }
        }
        other => KeyError::Token {
            function: "cryptoki".into(),
            detail: other.to_string(),
        },
    }
}

struct Shared {
    /// Invariant: initialized. Replaced (same library, re-initialized) by
    /// `recover`; token calls hold the read side of `calls` so that
    /// `C_Finalize` never runs while another thread is inside the module,
    /// and creating or destroying token objects holds the write side (see
    /// `generate`).
    ctx: Pkcs11,
    calls: RwLock<()>,
    slot: RwLock<Slot>,
    pin: SecretString,
    token: TokenDescription,
    label: String,
    generation: AtomicU64,
    /// Private-key handles by key id, for every session: PKCS#11 makes a
    /// handle one session can use good for every session of the
    /// application, and a lookup (C_FindObjects) costs time proportional
    /// to the token's objects on SoftHSM2. Filled when a key is generated
    /// or first found; emptied when the module is re-initialized.
    handles: RwLock<HashMap<KeyId, ObjectHandle>>,
    /// Wrapped keys let go of (`forget_wrapped`), numbered: every session
    /// destroys its live copy when it next signs with a wrapped key.
    forgotten: Mutex<VecDeque<(u64, KeyId)>>,
    forgotten_epoch: AtomicU64,
    /// Invariant: >= 1. See `LIVE_WRAPPED_KEYS_PER_SESSION`.
    live_wrapped_capacity: usize,
}

/// Handles the directory keeps at most: a few megabytes. Past it, lookups
/// of keys not in it go to the token again.
const MAX_SHARED_HANDLES: usize = 200_000;

impl Shared {
    fn shared_handle(&self, id: &KeyId) -> Option<ObjectHandle> {
        self.handles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .copied()
    }

    fn remember_handle(&self, id: &KeyId, handle: ObjectHandle) {
        let mut handles = self.handles.write().unwrap_or_else(|p| p.into_inner());
        if handles.len() < MAX_SHARED_HANDLES {
            handles.insert(id.clone(), handle);
        }
    }

    fn forget_handle(&self, id: &KeyId) {
        self.handles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }
}

/// A PKCS#11 token used as keyward's key store.
pub struct Pkcs11Backend {
    shared: Arc<Shared>,
}

impl Pkcs11Backend {
    pub fn open(config: &Pkcs11Config) -> Result<Self, KeyError> {
        let ctx = load_module(&config.module)?;
        let slot = find_slot(&ctx, &config.token_label)?;
        let token = token_description(&ctx, slot)?;
        let backend = Self {
            shared: Arc::new(Shared {
                ctx,
                calls: RwLock::new(()),
                slot: RwLock::new(slot),
                pin: config.user_pin.clone(),
                token,
                label: config.token_label.clone(),
                generation: AtomicU64::new(0),
                handles: RwLock::new(HashMap::new()),
                forgotten: Mutex::new(VecDeque::new()),
                forgotten_epoch: AtomicU64::new(0),
                live_wrapped_capacity: LIVE_WRAPPED_KEYS_PER_SESSION,
            }),
        };
        // Fail at start-up on a wrong PIN rather than on the first request.
        backend.open_pkcs11_session()?;
        Ok(backend)
    }

    pub fn token(&self) -> &TokenDescription {
        &self.shared.token
    }

    /// Keeps at most `capacity` unwrapped keys live per session (default
    /// [`LIVE_WRAPPED_KEYS_PER_SESSION`]). Call before opening sessions.
    pub fn with_live_wrapped_capacity(mut self, capacity: usize) -> Self {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.live_wrapped_capacity = capacity.max(1);
        }
        self
    }

    /// A new logged-in session with its own handle cache.
    pub fn open_pkcs11_session(&self) -> Result<Pkcs11Session, KeyError> {
        let shared = &self.shared;
        let _calls = shared.calls.read().unwrap_or_else(|p| p.into_inner());
        let slot = *shared.slot.read().unwrap_or_else(|p| p.into_inner());
        let session = shared.ctx.open_rw_session(slot).map_err(classify)?;
        let pin = AuthPin::from(shared.pin.expose_secret());
        match session.login(UserType::User, Some(&pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(CkError::Pkcs11(RvError::PinIncorrect | RvError::PinLocked, _)) => {
                return Err(KeyError::Config(
                    "the token refused the user PIN (incorrect or locked)".into(),
                ))
            }
            Err(e) => return Err(classify(e)),
        }
        Ok(Pkcs11Session {
            shared: Arc::clone(&self.shared),
            session,
            private_keys: HashMap::new(),
            wrapping_key: None,
            live_wrapped: LruCache::new(shared.live_wrapped_capacity),
            forgotten_seen: shared.forgotten_epoch.load(Ordering::Acquire),
        })
    }
}

impl Pkcs11Backend {
    /// What a naive service does for every signature: open a session, log
    /// in, find the key, sign, log out, close. Kept only so the benchmark
    /// can show what the pool saves; it logs out the whole application, so
    /// nothing else may use the token meanwhile.
    pub fn sign_naively(&self, id: &KeyId, digest: &[u8; 32]) -> Result<Vec<u8>, KeyError> {
        let shared = &self.shared;
        let slot = *shared.slot.read().unwrap_or_else(|p| p.into_inner());
        let session = shared.ctx.open_rw_session(slot).map_err(classify)?;
        let pin = AuthPin::from(shared.pin.expose_secret());
        session
            .login(UserType::User, Some(&pin))
            .map_err(classify)?;
        let template = [
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Id(id.as_str().as_bytes().to_vec()),
        ];
        let key = *session
            .find_objects(&template)
            .map_err(classify)?
            .first()
            .ok_or_else(|| KeyError::NotFound(id.clone()))?;
        let signature = session
            .sign(&Mechanism::Ecdsa, key, digest)
            .map_err(classify)?;
        session.logout().map_err(classify)?;
        session.close().map_err(classify)?;
        Ok(signature)
    }
}

/// How long re-initializing the module waits for the calls in flight.
const RECOVER_WAIT: Duration = Duration::from_secs(5);

/// The module to this thread alone, once the calls in flight have returned,
/// or `None` if one has not within `limit`. A module can hang in a call
/// (seen with p11-kit's client after its server's connection was killed: a
/// C_Sign waiting forever); waiting for it unbounded made the worker that
/// came to re-initialize hang too, and then every worker behind it. Polled
/// with `try_write` so that a waiting re-initialization does not hold back
/// the other workers' calls meanwhile, as a queued writer would.
fn exclusive_within(calls: &RwLock<()>, limit: Duration) -> Option<RwLockWriteGuard<'_, ()>> {
    let give_up = Instant::now() + limit;
    loop {
        match calls.try_write() {
            Ok(exclusive) => return Some(exclusive),
            // A call that panicked holds no state of ours.
            Err(TryLockError::Poisoned(p)) => return Some(p.into_inner()),
            Err(TryLockError::WouldBlock) if Instant::now() < give_up => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(TryLockError::WouldBlock) => return None,
        }
    }
}

impl KeyBackend for Pkcs11Backend {
    fn kind(&self) -> BackendKind {
        BackendKind::Pkcs11
    }

    fn open_session(&self) -> Result<Box<dyn KeySession>, KeyError> {
        Ok(Box::new(self.open_pkcs11_session()?))
    }

    fn recover(&self, generation: u64) -> Result<(), KeyError> {
        let shared = &self.shared;
        let _exclusive = exclusive_within(&shared.calls, RECOVER_WAIT).ok_or_else(|| {
            KeyError::DeviceFailure {
                function: "C_Initialize".into(),
                detail: format!(
                    "not re-initialized: a call to the module has not returned for {} s",
                    RECOVER_WAIT.as_secs()
                ),
            }
        })?;
        if shared.generation.load(Ordering::Acquire) != generation {
            return Ok(()); // another worker already re-initialized the module
        }
        // The module may already consider itself finalized; either way the
        // next C_Initialize starts from a clean state.
        let _ = shared.ctx.clone().finalize();
        initialize(&shared.ctx)?;
        let slot = find_slot(&shared.ctx, &shared.label)?;
        *shared.slot.write().unwrap_or_else(|p| p.into_inner()) = slot;
        shared
            .handles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        shared.generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::Acquire)
    }
}

/// One logged-in PKCS#11 session and its cache of private-key handles.
pub struct Pkcs11Session {
    shared: Arc<Shared>,
    session: Session,
    /// Object handles are stable for the life of the session, so each key is
    /// looked up once (C_FindObjects halves the signing rate on SoftHSM2).
    private_keys: HashMap<KeyId, ObjectHandle>,
    /// The token's wrapping key, once found.
    wrapping_key: Option<ObjectHandle>,
    /// Wrapped keys unwrapped into session objects of this session, least
    /// recently used first. Per session, not shared: this session alone
    /// creates and destroys them, so no other thread can hold a handle to
    /// an object destroyed here (a module may reuse the number for another
    /// agent's key).
    live_wrapped: LruCache<KeyId, ObjectHandle>,
    /// The last `Shared::forgotten_epoch` this session acted on.
    forgotten_seen: u64,
}

/// The private key's handle: from the session's own cache (no lock on the
/// hot path), else the backend's directory, else the token (once for the
/// application, not once per session).
fn cached_private_key(
    shared: &Shared,
    session: &Session,
    cache: &mut HashMap<KeyId, ObjectHandle>,
    id: &KeyId,
) -> Result<ObjectHandle, KeyError> {
    if let Some(handle) = cache.get(id) {
        return Ok(*handle);
    }
    let handle = match shared.shared_handle(id) {
        Some(handle) => handle,
        None => {
            let handle = find_object(session, id, ObjectClass::PRIVATE_KEY)?
                .ok_or_else(|| KeyError::NotFound(id.clone()))?;
            shared.remember_handle(id, handle);
            handle
        }
    };
    cache.insert(id.clone(), handle);
    Ok(handle)
}

/// CKM_ECDSA over `digest` (computed here: SoftHSM2 does not offer
/// CKM_ECDSA_SHA256, and hashing in process is cheaper anyway) with the
/// key's cached handle. A handle the module no longer knows is looked up
/// again once: the key may have been destroyed (rotation), or the module
/// dropped every handle when the application's last session closed, as
/// SoftHSM2 does.
fn sign_with_cached_key(
    shared: &Shared,
    session: &Session,
    cache: &mut HashMap<KeyId, ObjectHandle>,
    id: &KeyId,
    digest: &[u8; 32],
) -> Result<Vec<u8>, KeyError> {
    let mut retried = false;
    loop {
        let key = cached_private_key(shared, session, cache, id)?;
        match session.sign(&Mechanism::Ecdsa, key, digest) {
            Err(CkError::Pkcs11(RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid, _))
                if !retried =>
            {
                cache.remove(id);
                shared.forget_handle(id);
                retried = true;
            }
            Err(CkError::Pkcs11(RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid, _)) => {
                return Err(KeyError::NotFound(id.clone()))
            }
            other => return other.map_err(classify),
        }
    }
}

fn find_object(
    session: &Session,
    id: &KeyId,
    class: ObjectClass,
) -> Result<Option<ObjectHandle>, KeyError> {
    let template = [
        Attribute::Class(class),
        Attribute::Id(id.as_str().as_bytes().to_vec()),
    ];
    let found = session.find_objects(&template).map_err(classify)?;
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        _ => Err(KeyError::Malformed(format!(
            "several objects share the id {id}"
        ))),
    }
}

impl Pkcs11Session {
    fn find(&self, id: &KeyId, class: ObjectClass) -> Result<Option<ObjectHandle>, KeyError> {
        find_object(&self.session, id, class)
    }

    fn private_key(&mut self, id: &KeyId) -> Result<ObjectHandle, KeyError> {
        cached_private_key(&self.shared, &self.session, &mut self.private_keys, id)
    }

    /// Signs with the raw session, for the benchmark's `raw` mode.
    pub fn sign_raw(&mut self, id: &KeyId, digest: &[u8; 32]) -> Result<Vec<u8>, KeyError> {
        sign_with_cached_key(
            &self.shared,
            &self.session,
            &mut self.private_keys,
            id,
            digest,
        )
    }

    fn read_attributes(&self, key: ObjectHandle) -> Result<KeyAttributes, KeyError> {
        let wanted = [
            AttributeType::Local,
            AttributeType::Sensitive,
            AttributeType::AlwaysSensitive,
            AttributeType::Extractable,
            AttributeType::NeverExtractable,
            AttributeType::Sign,
            AttributeType::Decrypt,
            AttributeType::Derive,
            AttributeType::Unwrap,
            AttributeType::WrapWithTrusted,
        ];
        let values = self
            .session
            .get_attributes(key, &wanted)
            .map_err(classify)?;
        let mut attrs = KeyAttributes {
            token: self.shared.token.clone(),
            local: false,
            sensitive: false,
            always_sensitive: false,
            // Unknown means "not proven safe": start from the unsafe value.
            extractable: true,
            never_extractable: false,
            sign: false,
            decrypt: true,
            derive: true,
            unwrap: true,
            wrap_with_trusted: false,
        };
        for value in values {
            match value {
                Attribute::Local(v) => attrs.local = v,
                Attribute::Sensitive(v) => attrs.sensitive = v,
                Attribute::AlwaysSensitive(v) => attrs.always_sensitive = v,
                Attribute::Extractable(v) => attrs.extractable = v,
                Attribute::NeverExtractable(v) => attrs.never_extractable = v,
                Attribute::Sign(v) => attrs.sign = v,
                Attribute::Decrypt(v) => attrs.decrypt = v,
                Attribute::Derive(v) => attrs.derive = v,
                Attribute::Unwrap(v) => attrs.unwrap = v,
                Attribute::WrapWithTrusted(v) => attrs.wrap_with_trusted = v,
                _ => {}
            }
        }
        Ok(attrs)
    }
}

fn parse_ec_point(raw: &[u8]) -> Result<PublicKey, KeyError> {
    // CKA_EC_POINT is a DER OCTET STRING holding the SEC1 point; a few
    // modules return the bare point instead.
    let point = match raw {
        [0x04, 0x41, rest @ ..] if rest.len() == 0x41 => rest,
        _ => raw,
    };
    PublicKey::from_sec1_bytes(point)
        .map_err(|_| KeyError::Malformed("CKA_EC_POINT is not a P-256 point".into()))
}

/// The private-key template of a P-256 signing key: sensitive, sign-only,
/// uncopyable, every protective attribute set explicitly (SoftHSM2's
/// defaults, and some HSMs', would make the key extractable). What differs
/// is where it is kept:
///
/// - `Generated(Token)`: a token object that can never leave the token;
/// - `Generated(Wrapped)`: a session object extractable only under a
///   trusted wrapping key (CKA_WRAP_WITH_TRUSTED), which is how it leaves;
/// - `Unwrapped`: a wrapped key's live copy, never wrapped again (the
///   stored blob is its only form outside the token).
fn private_key_template(id: &KeyId, made: Made) -> Vec<Attribute> {
    let id_bytes = id.as_str().as_bytes().to_vec();
    let mut template = match made {
        Made::Generated(KeyStorage::Token) => {
            vec![Attribute::Token(true), Attribute::Extractable(false)]
        }
        Made::Generated(KeyStorage::Wrapped) => vec![
            Attribute::Token(false),
            Attribute::Extractable(true),
            Attribute::WrapWithTrusted(true),
        ],
        Made::Unwrapped => vec![
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Token(false),
            Attribute::Extractable(false),
        ],
    };
    template.extend([
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::KeyType(KeyType::EC),
        Attribute::Sign(true),
        Attribute::SignRecover(false),
        Attribute::Decrypt(false),
        Attribute::Derive(false),
        Attribute::Unwrap(false),
        Attribute::Copyable(false),
        Attribute::Id(id_bytes.clone()),
        Attribute::Label(id_bytes),
    ]);
    template
}

/// The public half of a P-256 key pair: verify-only, a token object or a
/// session object.
fn public_key_template(id: &KeyId, token: bool) -> Vec<Attribute> {
    let id_bytes = id.as_str().as_bytes().to_vec();
    vec![
        Attribute::Token(token),
        Attribute::Private(false),
        Attribute::KeyType(KeyType::EC),
        Attribute::EcParams(P256_EC_PARAMS.to_vec()),
        Attribute::Verify(true),
        Attribute::Encrypt(false),
        Attribute::Wrap(false),
        Attribute::Derive(false),
        Attribute::Id(id_bytes.clone()),
        Attribute::Label(id_bytes),
    ]
}

/// How a private key comes to be on the token.
#[derive(Clone, Copy)]
enum Made {
    Generated(KeyStorage),
    Unwrapped,
}

/// The digest an unwrapped key signs once to show it is the key its
/// record names.
fn probe_digest(id: &KeyId) -> [u8; 32] {
    Sha256::new()
        .chain_update(b"keyward wrapped-key probe\0")
        .chain_update(id.as_str())
        .finalize()
        .into()
}

/// Creates the token's wrapping key for custodial keys kept wrapped, if it
/// has none: an AES-256 key that wraps and unwraps only, is sensitive, can
/// never be extracted, is marked CKA_TRUSTED (so keys generated with
/// CKA_WRAP_WITH_TRUSTED can leave the token under it and under nothing
/// else), and is private (so no session without the user PIN can unwrap
/// with it). Returns whether it created one.
///
/// Only the security officer may set CKA_TRUSTED, and the security officer
/// cannot create private objects (PKCS#11 §4.1), so the key is born public
/// and copyable under the SO, copied by the user into a private,
/// uncopyable object (the copy keeps CKA_TRUSTED), and the public original
/// destroyed. Runs with no other session logged in on the token.
pub fn create_wrapping_key(
    ctx: &Pkcs11,
    token_label: &str,
    so_pin: &SecretString,
    user_pin: &SecretString,
) -> Result<bool, KeyError> {
    let slot = find_slot(ctx, token_label)?;
    let user = ctx.open_rw_session(slot).map_err(classify)?;
    let user_pin = AuthPin::from(user_pin.expose_secret());
    match user.login(UserType::User, Some(&user_pin)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => return Err(classify(e)),
    }
    if find_wrapping_key(&user)?.is_some() {
        return Ok(false);
    }
    user.logout().map_err(classify)?;
    let so = ctx.open_rw_session(slot).map_err(classify)?;
    so.login(UserType::So, Some(&AuthPin::from(so_pin.expose_secret())))
        .map_err(classify)?;
    let born = so
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(true),
                Attribute::Private(false),
                Attribute::ValueLen(32.into()),
                Attribute::Trusted(true),
                Attribute::Wrap(true),
                Attribute::Unwrap(true),
                Attribute::Encrypt(false),
                Attribute::Decrypt(false),
                Attribute::Sign(false),
                Attribute::Verify(false),
                Attribute::Derive(false),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Copyable(true),
                Attribute::Label(b"keyward-wrapping-key-unsealed".to_vec()),
            ],
        )
        .map_err(classify)?;
    so.logout().map_err(classify)?;
    drop(so);
    user.login(UserType::User, Some(&user_pin))
        .map_err(classify)?;
    let copied = user.copy_object(
        born,
        &[
            Attribute::Private(true),
            Attribute::Label(WRAPPING_KEY_LABEL.as_bytes().to_vec()),
        ],
    );
    let destroyed = user.destroy_object(born);
    let key = copied.map_err(classify)?;
    destroyed.map_err(classify)?;
    // Copies could only be as strong (sensitive, unextractable), but there
    // is no use for one; a module that keeps CKA_COPYABLE read-only keeps it.
    let _ = user.update_attributes(key, &[Attribute::Copyable(false)]);
    check_wrapping_key(&user, key)?;
    user.logout().map_err(classify)?;
    Ok(true)
}

fn find_wrapping_key(session: &Session) -> Result<Option<ObjectHandle>, KeyError> {
    let template = [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Label(WRAPPING_KEY_LABEL.as_bytes().to_vec()),
    ];
    let found = session.find_objects(&template).map_err(classify)?;
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        _ => Err(KeyError::Config(format!(
            "several keys on the token are labelled {WRAPPING_KEY_LABEL}"
        ))),
    }
}

/// Refuses a wrapping key that could let a custodial key out in the clear
/// or be used without the user PIN.
fn check_wrapping_key(session: &Session, key: ObjectHandle) -> Result<(), KeyError> {
    let wanted = [
        AttributeType::Trusted,
        AttributeType::Private,
        AttributeType::Sensitive,
        AttributeType::Extractable,
        AttributeType::KeyType,
    ];
    let values = session.get_attributes(key, &wanted).map_err(classify)?;
    let mut ok = [false; 5];
    for value in values {
        match value {
            Attribute::Trusted(v) => ok[0] = v,
            Attribute::Private(v) => ok[1] = v,
            Attribute::Sensitive(v) => ok[2] = v,
            Attribute::Extractable(v) => ok[3] = !v,
            Attribute::KeyType(t) => ok[4] = t == KeyType::AES,
            _ => {}
        }
    }
    let names = [
        "CKA_TRUSTED true",
        "CKA_PRIVATE true",
        "CKA_SENSITIVE true",
        "CKA_EXTRACTABLE false",
        "CKA_KEY_TYPE CKK_AES",
    ];
    match ok.iter().position(|good| !good) {
        None => Ok(()),
        Some(i) => Err(KeyError::Config(format!(
            "the token's {WRAPPING_KEY_LABEL} must have {}",
            names[i]
        ))),
    }
}

/// Maps a failed C_UnwrapKey: a blob the token cannot open is the blob's
/// fault, not the device's (SoftHSM2 answers a damaged one with
/// CKR_GENERAL_ERROR, which elsewhere means re-initialize the module).
fn classify_unwrap(e: CkError, id: &KeyId) -> KeyError {
    match classify(e) {
        KeyError::DeviceFailure { detail, .. } if detail.contains("GeneralError") => {
            KeyError::WrappedKeyInvalid(id.clone())
        }
        KeyError::Token { detail, .. }
            if detail.contains("WrappedKey")
                || detail.contains("EncryptedData")
                || detail.contains("TemplateInconsistent") =>
        {
            KeyError::WrappedKeyInvalid(id.clone())
        }
        other => other,
    }
}

impl Pkcs11Session {
    fn wrapping_key(&mut self) -> Result<ObjectHandle, KeyError> {
        if let Some(key) = self.wrapping_key {
            return Ok(key);
        }
        let key = find_wrapping_key(&self.session)?.ok_or_else(|| {
            KeyError::Config(format!(
                "custodial_storage = \"wrapped\" needs a key labelled {WRAPPING_KEY_LABEL} on \
                 the token (keyward keys create-wrapping-key)"
            ))
        })?;
        check_wrapping_key(&self.session, key)?;
        self.wrapping_key = Some(key);
        Ok(key)
    }

    /// Destroys the live copies of wrapped keys forgotten since this
    /// session last looked.
    fn catch_up_on_forgotten(&mut self) {
        let epoch = self.shared.forgotten_epoch.load(Ordering::Acquire);
        if epoch == self.forgotten_seen {
            return;
        }
        let forgotten: Vec<(u64, KeyId)> = {
            let list = self
                .shared
                .forgotten
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            list.iter()
                .filter(|(n, _)| *n > self.forgotten_seen)
                .cloned()
                .collect()
        };
        let fell_behind = forgotten
            .first()
            .is_none_or(|(n, _)| *n > self.forgotten_seen + 1);
        if fell_behind {
            self.drop_live_wrapped();
        } else {
            for (_, id) in &forgotten {
                if let Some(handle) = self.live_wrapped.remove(id) {
                    let _ = self.session.destroy_object(handle);
                }
            }
        }
        self.forgotten_seen = epoch;
    }

    fn drop_live_wrapped(&mut self) {
        let handles: Vec<ObjectHandle> = self.live_wrapped.iter().map(|(_, h)| *h).collect();
        self.live_wrapped.clear();
        for handle in handles {
            let _ = self.session.destroy_object(handle);
        }
    }

    fn keep_live(&mut self, id: &KeyId, handle: ObjectHandle) {
        if self.live_wrapped.len() >= self.live_wrapped.capacity() {
            if let Some((_, oldest)) = self.live_wrapped.remove_lru() {
                let _ = self.session.destroy_object(oldest);
            }
        }
        self.live_wrapped.insert(id.clone(), handle);
    }

    /// Unwraps `blob` into a session object and proves it is the key whose
    /// public half the caller recorded.
    fn unwrap_live(
        &mut self,
        id: &KeyId,
        blob: &[u8],
        public_key: &PublicKey,
    ) -> Result<ObjectHandle, KeyError> {
        let wrapping = self.wrapping_key()?;
        let handle = self
            .session
            .unwrap_key(
                &Mechanism::AesKeyWrapPad,
                wrapping,
                blob,
                &private_key_template(id, Made::Unwrapped),
            )
            .map_err(|e| classify_unwrap(e, id))?;
        let probe = probe_digest(id);
        let proven = self
            .session
            .sign(&Mechanism::Ecdsa, handle, &probe)
            .map_err(classify)
            .and_then(|raw| {
                Signature::from_slice(&raw)
                    .map_err(|_| KeyError::Malformed("C_Sign returned no P-256 (r, s) pair".into()))
            })
            .map(|signature| {
                VerifyingKey::from(public_key)
                    .verify_prehash(&probe, &signature)
                    .is_ok()
            });
        match proven {
            Ok(true) => Ok(handle),
            Ok(false) => {
                let _ = self.session.destroy_object(handle);
                Err(KeyError::WrappedKeyInvalid(id.clone()))
            }
            Err(e) => {
                let _ = self.session.destroy_object(handle);
                Err(e)
            }
        }
    }

    fn generate_wrapped(&mut self, id: &KeyId) -> Result<GeneratedKey, KeyError> {
        let wrapping = self.wrapping_key()?;
        // The public half lives only until its point is read.
        let public_template = public_key_template(id, false);
        let (public, private) = self
            .session
            .generate_key_pair(
                &Mechanism::EccKeyPairGen,
                &public_template,
                &private_key_template(id, Made::Generated(KeyStorage::Wrapped)),
            )
            .map_err(classify)?;
        let made = self.finish_wrapped(id, wrapping, public, private);
        // The public half is in the blob's record, not on the token.
        let _ = self.session.destroy_object(public);
        match made {
            Ok(generated) => {
                self.keep_live(id, private);
                Ok(generated)
            }
            Err(e) => {
                let _ = self.session.destroy_object(private);
                Err(e)
            }
        }
    }

    fn finish_wrapped(
        &mut self,
        id: &KeyId,
        wrapping: ObjectHandle,
        public: ObjectHandle,
        private: ObjectHandle,
    ) -> Result<GeneratedKey, KeyError> {
        let attributes = self.read_attributes(private)?;
        attributes
            .check_custody(KeyStorage::Wrapped)
            .map_err(|attribute| KeyError::NotHardwareResident {
                key: id.clone(),
                attribute,
            })?;
        let public_key = self.read_public_point(public)?;
        let blob = self
            .session
            .wrap_key(&Mechanism::AesKeyWrapPad, wrapping, private)
            .map_err(classify)?;
        Ok(GeneratedKey {
            public_key,
            attributes,
            wrapped: Some(blob),
        })
    }

    fn read_public_point(&self, public: ObjectHandle) -> Result<PublicKey, KeyError> {
        let point = self
            .session
            .get_attributes(public, &[AttributeType::EcPoint])
            .map_err(classify)?;
        match point.as_slice() {
            [Attribute::EcPoint(p)] => parse_ec_point(p),
            _ => Err(KeyError::Malformed(
                "no CKA_EC_POINT on the public key".into(),
            )),
        }
    }
}

impl KeySession for Pkcs11Session {
    fn generate(&mut self, id: &KeyId) -> Result<PublicKey, KeyError> {
        // Alone in the module while token objects are created or
        // destroyed: SoftHSM2's file store fails C_GenerateKeyPair with
        // CKR_GENERAL_ERROR when another session works beside it (measured:
        // 1 to 7 of 200 registrations by 16 clients, with generation alone
        // serialized too), and that error reads as a device failure that
        // re-initializes the module under every other session. Creating
        // keys is rare next to signing; a token that scales to many agents
        // keeps their keys out of its object store (wrapped keys).
        let _exclusive = self.shared.calls.write().unwrap_or_else(|p| p.into_inner());
        if self.find(id, ObjectClass::PRIVATE_KEY)?.is_some()
            || self.find(id, ObjectClass::PUBLIC_KEY)?.is_some()
        {
            return Err(KeyError::AlreadyExists(id.clone()));
        }
        let public_template = public_key_template(id, true);
        let private_template = private_key_template(id, Made::Generated(KeyStorage::Token));
        let (public, private) = self
            .session
            .generate_key_pair(
                &Mechanism::EccKeyPairGen,
                &public_template,
                &private_template,
            )
            .map_err(classify)?;
        let verdict = self
            .read_attributes(private)
            .map(|a| a.check_hardware_resident());
        match verdict {
            Ok(Ok(())) => {}
            Ok(Err(attribute)) => {
                let _ = self.session.destroy_object(private);
                let _ = self.session.destroy_object(public);
                return Err(KeyError::NotHardwareResident {
                    key: id.clone(),
                    attribute,
                });
            }
            Err(e) => {
                let _ = self.session.destroy_object(private);
                let _ = self.session.destroy_object(public);
                return Err(e);
            }
        }
        let key = self.read_public_point(public)?;
        self.private_keys.insert(id.clone(), private);
        self.shared.remember_handle(id, private);
        Ok(key)
    }

    fn public_key(&mut self, id: &KeyId) -> Result<PublicKey, KeyError> {
        let _calls = self.shared.calls.read().unwrap_or_else(|p| p.into_inner());
        let public = self
            .find(id, ObjectClass::PUBLIC_KEY)?
            .ok_or_else(|| KeyError::NotFound(id.clone()))?;
        self.read_public_point(public)
    }

    fn sign_digest(&mut self, id: &KeyId, digest: &[u8; 32]) -> Result<Signature, KeyError> {
        // Borrowing fields, not `self`, lets the guard live beside the key
        // cache without cloning the shared Arc per signature (two workers
        // doing that bounce its counter between cores).
        let _calls = self.shared.calls.read().unwrap_or_else(|p| p.into_inner());
        let raw = sign_with_cached_key(
            &self.shared,
            &self.session,
            &mut self.private_keys,
            id,
            digest,
        )?;
        let signature = Signature::from_slice(&raw)
            .map_err(|_| KeyError::Malformed("C_Sign returned no P-256 (r, s) pair".into()))?;
        Ok(signature.normalize_s().unwrap_or(signature))
    }

    fn attributes(&mut self, id: &KeyId) -> Result<KeyAttributes, KeyError> {
        let shared = Arc::clone(&self.shared);
        let _calls = shared.calls.read().unwrap_or_else(|p| p.into_inner());
        let key = self.private_key(id)?;
        self.read_attributes(key)
    }

    fn destroy(&mut self, id: &KeyId) -> Result<(), KeyError> {
        // Alone in the module while token objects are created or
        // destroyed: SoftHSM2's file store fails C_GenerateKeyPair with
        // CKR_GENERAL_ERROR when another session works beside it (measured:
        // 1 to 7 of 200 registrations by 16 clients, with generation alone
        // serialized too), and that error reads as a device failure that
        // re-initializes the module under every other session. Creating
        // keys is rare next to signing; a token that scales to many agents
        // keeps their keys out of its object store (wrapped keys).
        let _exclusive = self.shared.calls.write().unwrap_or_else(|p| p.into_inner());
        self.private_keys.remove(id);
        self.shared.forget_handle(id);
        let mut found = false;
        for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
            if let Some(handle) = self.find(id, class)? {
                self.session.destroy_object(handle).map_err(classify)?;
                found = true;
            }
        }
        if found {
            Ok(())
        } else {
            Err(KeyError::NotFound(id.clone()))
        }
    }

    fn key_ids(&mut self, prefix: &str) -> Result<Vec<KeyId>, KeyError> {
        let shared = Arc::clone(&self.shared);
        let _calls = shared.calls.read().unwrap_or_else(|p| p.into_inner());
        let mut ids = std::collections::BTreeSet::new();
        // Both halves: a pair whose removal stopped half-way leaves a
        // public key that is still the key's, to be removed with it.
        for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
            let handles = self
                .session
                .find_objects(&[Attribute::Class(class), Attribute::Token(true)])
                .map_err(classify)?;
            for handle in handles {
                let found = self
                    .session
                    .get_attributes(handle, &[AttributeType::Id])
                    .map_err(classify)?;
                let Some(Attribute::Id(raw)) = found.first() else {
                    continue;
                };
                // Objects keyward did not make may carry any id at all.
                let id = std::str::from_utf8(raw).ok().map(KeyId::parse);
                if let Some(Ok(id)) = id.filter(|_| raw.starts_with(prefix.as_bytes())) {
                    ids.insert(id);
                }
            }
        }
        Ok(ids.into_iter().collect())
    }

    fn generate_custodial(
        &mut self,
        id: &KeyId,
        storage: KeyStorage,
    ) -> Result<GeneratedKey, KeyError> {
        match storage {
            KeyStorage::Token => super::generate_on_token(self, id),
            // Session objects only: nothing is written to the token's
            // object store, so generations need not run alone.
            KeyStorage::Wrapped => {
                let shared = Arc::clone(&self.shared);
                let _calls = shared.calls.read().unwrap_or_else(|p| p.into_inner());
                self.catch_up_on_forgotten();
                self.generate_wrapped(id)
            }
        }
    }

    fn sign_wrapped(
        &mut self,
        id: &KeyId,
        blob: &[u8],
        public_key: &PublicKey,
        digest: &[u8; 32],
    ) -> Result<Signature, KeyError> {
        let shared = Arc::clone(&self.shared);
        let _calls = shared.calls.read().unwrap_or_else(|p| p.into_inner());
        self.catch_up_on_forgotten();
        let mut retried = false;
        let raw = loop {
            let handle = match self.live_wrapped.get(id) {
                Some(handle) => *handle,
                None => {
                    let handle = self.unwrap_live(id, blob, public_key)?;
                    self.keep_live(id, handle);
                    handle
                }
            };
            match self.session.sign(&Mechanism::Ecdsa, handle, digest) {
                // The module dropped the object (it cannot have been
                // another key's: only this session destroys its objects).
                Err(CkError::Pkcs11(
                    RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid,
                    _,
                )) if !retried => {
                    self.live_wrapped.remove(id);
                    retried = true;
                }
                other => break other.map_err(classify)?,
            }
        };
        let signature = Signature::from_slice(&raw)
            .map_err(|_| KeyError::Malformed("C_Sign returned no P-256 (r, s) pair".into()))?;
        Ok(signature.normalize_s().unwrap_or(signature))
    }

    fn forget_wrapped(&mut self, id: &KeyId) -> Result<(), KeyError> {
        {
            let mut list = self
                .shared
                .forgotten
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let epoch = self.shared.forgotten_epoch.load(Ordering::Acquire) + 1;
            list.push_back((epoch, id.clone()));
            while list.len() > FORGOTTEN_REMEMBERED {
                list.pop_front();
            }
            self.shared.forgotten_epoch.store(epoch, Ordering::Release);
        }
        let shared = Arc::clone(&self.shared);
        let _calls = shared.calls.read().unwrap_or_else(|p| p.into_inner());
        self.catch_up_on_forgotten();
        Ok(())
    }

    fn ping(&mut self) -> Result<(), KeyError> {
        let _calls = self.shared.calls.read().unwrap_or_else(|p| p.into_inner());
        let info = self.session.get_session_info().map_err(classify)?;
        match info.session_state() {
            SessionState::RwUser | SessionState::RoUser => Ok(()),
            _ => Err(KeyError::SessionLost {
                function: format!("{:?}", Function::GetSessionInfo),
                detail: "session is no longer logged in".into(),
            }),
        }
    }
}
