//! TPM 2.0 key backend over the ESAPI (tss-esapi on libtss2-esys).
//!
//! A TPM holds almost no keys itself: `TPM2_Create` returns the private half
//! encrypted and integrity-protected under the parent's seed-derived storage
//! key, and only this TPM can load it again. So the blobs live on disk in
//! `key_dir` and are loaded on demand under a primary storage key that the
//! TPM re-derives, identically, from its owner seed in every session.
//!
//! A consequence for `destroy`: forgetting a key means deleting its blob.
//! Any copy of the blob (a backup of `key_dir`) stays loadable on this TPM
//! until the owner hierarchy is cleared.

use std::fs;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use p256::ecdsa::Signature;
use p256::{FieldBytes, PublicKey};
use tss_esapi::attributes::{ObjectAttributes, ObjectAttributesBuilder};
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK, TPM2_TRANSIENT_FIRST};
use tss_esapi::constants::{CapabilityType, PropertyTag, Tss2ResponseCodeKind};
use tss_esapi::handles::{KeyHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    CapabilityData, Digest, EccPoint, EccScheme, HashScheme, HashcheckTicket, Private, Public,
    PublicBuffer, PublicBuilder, PublicEccParametersBuilder, Signature as TpmSignature,
    SignatureScheme, SymmetricDefinitionObject,
};
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;
use tss_esapi::{Context, Error as TssError, TctiNameConf, WrapperErrorKind};

use super::{
    BackendKind, KeyAttributes, KeyBackend, KeyError, KeyId, KeySession, TokenDescription,
};

/// Upper bound on signing keys a session keeps loaded. Without a resource
/// manager (swtpm, or `/dev/tpm0`) the TPM itself has only a handful of
/// object slots, so the real bound is also capped by what the TPM reports.
const MAX_LOADED_KEYS: usize = 8;

/// TPM_PT_HR_TRANSIENT_MIN is at least 3 by specification; one slot holds
/// the primary.
const FALLBACK_LOADED_KEYS: usize = 2;

/// Which TPM to talk to and where the key blobs live.
#[derive(Clone, Debug)]
pub struct TpmConfig {
    /// A TCTI configuration string, e.g. `swtpm:host=127.0.0.1,port=2321`
    /// or `device:/dev/tpmrm0`.
    pub tcti: String,
    /// Holds `<id>.pub` (TPM2B_PUBLIC) and `<id>.priv` (TPM2B_PRIVATE) for
    /// every key; the same marshalling tpm2-tools uses, so the blobs can be
    /// inspected with `tpm2_print`.
    pub key_dir: PathBuf,
}

/// Maps a tss-esapi error to what the pool needs to know: retry on a new
/// session, reconnect to the device, or give up.
fn classify(function: &str, e: TssError) -> KeyError {
    let function = function.to_owned();
    let detail = format!("{e} ({e:?})");
    match e {
        TssError::WrapperError(WrapperErrorKind::WrongValueFromTpm) => {
            KeyError::Malformed(format!("{function}: {detail}"))
        }
        TssError::WrapperError(_) => KeyError::Token { function, detail },
        TssError::Tss2Error(rc) => match rc.kind() {
            // The context refers to an object or session the TPM no longer
            // has (restarted, or flushed behind our back); a new context
            // re-creates the primary and reloads keys.
            Some(
                Tss2ResponseCodeKind::ReferenceH0
                | Tss2ResponseCodeKind::ReferenceH1
                | Tss2ResponseCodeKind::ReferenceH2
                | Tss2ResponseCodeKind::ReferenceH3
                | Tss2ResponseCodeKind::ReferenceH4
                | Tss2ResponseCodeKind::ReferenceH5
                | Tss2ResponseCodeKind::ReferenceH6
                | Tss2ResponseCodeKind::ReferenceS0
                | Tss2ResponseCodeKind::ReferenceS1
                | Tss2ResponseCodeKind::ReferenceS2
                | Tss2ResponseCodeKind::ReferenceS3
                | Tss2ResponseCodeKind::ReferenceS4
                | Tss2ResponseCodeKind::ReferenceS5
                | Tss2ResponseCodeKind::ReferenceS6,
            ) => KeyError::SessionLost { function, detail },
            // tss-esapi decodes every TPM-layer code it knows; an unknown one
            // comes from the software stack below (TCTI connection refused,
            // I/O error, malformed response), i.e. the link to the device.
            None | Some(Tss2ResponseCodeKind::Initialize | Tss2ResponseCodeKind::Failure) => {
                KeyError::DeviceFailure { function, detail }
            }
            Some(_) => KeyError::Token { function, detail },
        },
    }
}

fn is_object_memory(e: &TssError) -> bool {
    matches!(e, TssError::Tss2Error(rc)
        if matches!(rc.kind(), Some(Tss2ResponseCodeKind::ObjectMemory)))
}

/// Flushes every transient object the TPM lists; how many it flushed.
///
/// Called only when the TPM is out of object slots and the caller holds
/// none of them (it has flushed its own first). Without a resource manager
/// (swtpm, `/dev/tpm0`) the TPM keeps a process's objects after the process
/// dies without flushing them (SIGKILL, a crash): once a killed keyward had
/// left its primary and a key loaded, the next one could not even create
/// its listener's key, until the TPM was reset. Behind a resource manager
/// (`/dev/tpmrm0`) the TPM lists only this connection's objects. A live
/// process whose objects go (a second keyward on one swtpm) sees a stale
/// handle on its next command, which the pool treats as a lost session and
/// recovers from with a new one.
fn flush_transient_objects(ctx: &mut Context) -> Result<usize, KeyError> {
    let mut flushed = 0;
    loop {
        let (handles, _) = ctx
            .execute_without_session(|ctx| {
                ctx.get_capability(CapabilityType::Handles, TPM2_TRANSIENT_FIRST, 32)
            })
            .map_err(|e| classify("GetCapability", e))?;
        let CapabilityData::Handles(handles) = handles else {
            return Err(KeyError::Malformed(
                "GetCapability(handles) returned another capability".into(),
            ));
        };
        let transient: Vec<TpmHandle> = handles
            .into_inner()
            .into_iter()
            .filter(|h| matches!(h, TpmHandle::Transient(_)))
            .collect();
        if transient.is_empty() {
            return Ok(flushed);
        }
        for handle in transient {
            // ReadPublic (behind TR_FromTPMPublic) takes no authorization,
            // and FlushContext none at all.
            let object = ctx
                .execute_without_session(|ctx| ctx.tr_from_tpm_public(handle))
                .map_err(|e| classify("TR_FromTPMPublic", e))?;
            ctx.flush_context(object)
                .map_err(|e| classify("FlushContext", e))?;
            flushed += 1;
        }
    }
}

fn create_primary(ctx: &mut Context) -> Result<KeyHandle, TssError> {
    let template = primary_template()?;
    Ok(ctx
        .create_primary(Hierarchy::Owner, template, None, None, None, None)?
        .key_handle)
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> KeyError {
    KeyError::Config(format!("{what} {}: {e}", path.display()))
}

/// The storage primary under the owner hierarchy. Every field is fixed
/// because CreatePrimary derives the key from the owner seed *and* the
/// template: change anything here and every blob in `key_dir` stops loading.
pub(crate) fn primary_template() -> Result<Public, TssError> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        // Nothing ever authorizes to the primary with a secret, so dictionary
        // attack protection could only lock us out.
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
}

fn ecdsa_sha256() -> HashScheme {
    HashScheme::new(HashingAlgorithm::Sha256)
}

pub(crate) fn signing_key_template() -> Result<Public, TssError> {
    signing_key_template_with(
        ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_sensitive_data_origin(true)
            .with_user_with_auth(true)
            .with_sign_encrypt(true)
            .with_decrypt(false)
            .with_restricted(false)
            .build()?,
    )
}

/// An ECDSA P-256 / SHA-256 key with these attributes. keyward's keys use
/// `signing_key_template`'s; tests make keys that break its rules with
/// this.
pub fn signing_key_template_with(attributes: ObjectAttributes) -> Result<Public, TssError> {
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_unrestricted_signing_key(
                EccScheme::EcDsa(ecdsa_sha256()),
                EccCurve::NistP256,
            )
            .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
}

/// The TPM strips leading zero bytes from ECC parameters it returns.
fn field_bytes(value: &[u8], what: &str) -> Result<FieldBytes, KeyError> {
    let mut out = FieldBytes::default();
    if value.len() > out.len() {
        return Err(KeyError::Malformed(format!(
            "{what} is {} bytes, longer than a P-256 field element",
            value.len()
        )));
    }
    let start = out.len() - value.len();
    out[start..].copy_from_slice(value);
    Ok(out)
}

fn p256_public_key(public: &Public) -> Result<PublicKey, KeyError> {
    let Public::Ecc {
        parameters, unique, ..
    } = public
    else {
        return Err(KeyError::Malformed("TPM key is not an ECC key".into()));
    };
    if parameters.ecc_curve() != EccCurve::NistP256 {
        return Err(KeyError::Malformed("TPM key is not on P-256".into()));
    }
    let x = field_bytes(unique.x().value(), "public x")?;
    let y = field_bytes(unique.y().value(), "public y")?;
    let mut sec1 = Vec::with_capacity(65);
    sec1.push(0x04);
    sec1.extend_from_slice(&x);
    sec1.extend_from_slice(&y);
    PublicKey::from_sec1_bytes(&sec1)
        .map_err(|_| KeyError::Malformed("TPM public point is not on P-256".into()))
}

/// The TPM's object attributes expressed in PKCS#11 terms.
fn key_attributes(token: TokenDescription, a: ObjectAttributes) -> KeyAttributes {
    // fixedTPM forbids duplication to another TPM, fixedParent to another
    // parent here; with both set the private half only ever exists wrapped
    // by this TPM's own storage hierarchy.
    let bound = a.fixed_tpm() && a.fixed_parent();
    KeyAttributes {
        token,
        local: a.sensitive_data_origin(),
        sensitive: bound,
        always_sensitive: bound && a.sensitive_data_origin(),
        extractable: !bound,
        // TPM object attributes are immutable, so "not extractable now" is
        // "never was" once the TPM also generated the secret itself (an
        // imported key was known outside before).
        never_extractable: bound && a.sensitive_data_origin(),
        sign: a.sign_encrypt(),
        decrypt: a.decrypt(),
        // TPM2_ECDH_ZGen needs decrypt on an unrestricted key; there is no
        // separate derive permission.
        derive: a.decrypt() && !a.restricted(),
        // Unwrapping (loading or importing children, ActivateCredential) is
        // what a restricted decryption key, i.e. a storage key, does.
        unwrap: a.decrypt() && a.restricted(),
        // TPM keys leave the TPM only as blobs its own storage key
        // protects; PKCS#11's wrap-with-trusted does not apply.
        wrap_with_trusted: false,
    }
}

fn read_token_description(ctx: &mut Context, tcti: &str) -> Result<TokenDescription, KeyError> {
    let mut property = |tag| {
        ctx.get_tpm_property(tag)
            .map_err(|e| classify("GetCapability", e))
    };
    // TPM vendor strings are 4 ASCII bytes per property, NUL padded.
    let ascii = |v: Option<u32>| -> String {
        v.map(|v| {
            v.to_be_bytes()
                .iter()
                .filter(|b| b.is_ascii_graphic() || **b == b' ')
                .map(|b| char::from(*b))
                .collect::<String>()
        })
        .unwrap_or_default()
    };
    let manufacturer = ascii(property(PropertyTag::Manufacturer)?)
        .trim()
        .to_owned();
    let mut model = String::new();
    for tag in [
        PropertyTag::VendorString1,
        PropertyTag::VendorString2,
        PropertyTag::VendorString3,
        PropertyTag::VendorString4,
    ] {
        model.push_str(&ascii(property(tag)?));
    }
    let fw1 = property(PropertyTag::FirmwareVersion1)?.unwrap_or(0);
    let fw2 = property(PropertyTag::FirmwareVersion2)?.unwrap_or(0);
    Ok(TokenDescription {
        manufacturer,
        model: format!("{} firmware {fw1:08x}.{fw2:08x}", model.trim()),
        // A TPM has no serial number property; its identity is the
        // endorsement key, which belongs to attestation, not here.
        serial: String::new(),
        label: tcti.to_owned(),
    })
}

struct Shared {
    tcti: String,
    key_dir: PathBuf,
    token: TokenDescription,
    generation: AtomicU64,
}

/// A TPM 2.0 used as keyward's key store.
pub struct TpmBackend {
    shared: Arc<Shared>,
}

impl TpmBackend {
    /// Connects once to check the TCTI and read the TPM's description, then
    /// disconnects: swtpm serves one connection at a time, so holding this
    /// one would block every session.
    pub fn open(config: &TpmConfig) -> Result<Self, KeyError> {
        TctiNameConf::from_str(&config.tcti)
            .map_err(|e| KeyError::Config(format!("TCTI {:?}: {e}", config.tcti)))?;
        let tcti = config.tcti.clone();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.key_dir)
            .map_err(|e| io_error("creating", &config.key_dir, e))?;
        let mut ctx =
            super::tcti::open_context(&tcti).map_err(|e| classify("Esys_Initialize", e))?;
        let token = read_token_description(&mut ctx, &config.tcti)?;
        drop(ctx);
        Ok(Self {
            shared: Arc::new(Shared {
                tcti,
                key_dir: config.key_dir.clone(),
                token,
                generation: AtomicU64::new(0),
            }),
        })
    }

    pub fn token(&self) -> &TokenDescription {
        &self.shared.token
    }

    /// A new ESAPI context with the storage primary created and loaded.
    pub fn open_tpm_session(&self) -> Result<TpmSession, KeyError> {
        let mut ctx = super::tcti::open_context(&self.shared.tcti)
            .map_err(|e| classify("Esys_Initialize", e))?;
        // Every object here has an empty authValue; a password session
        // carries it without costing a TPM session slot.
        ctx.set_sessions((Some(AuthSession::Password), None, None));
        let primary = match create_primary(&mut ctx) {
            Ok(primary) => primary,
            // This context holds nothing yet: whatever fills the TPM was left
            // by another (see flush_transient_objects).
            Err(e) if is_object_memory(&e) => {
                let flushed = flush_transient_objects(&mut ctx)?;
                tracing::warn!(
                    flushed,
                    "the TPM's object slots were full: flushed what was left in them"
                );
                create_primary(&mut ctx).map_err(|e| classify("CreatePrimary", e))?
            }
            Err(e) => return Err(classify("CreatePrimary", e)),
        };
        let available = ctx
            .get_tpm_property(PropertyTag::HrTransientAvail)
            .map_err(|e| classify("GetCapability", e))?
            .map_or(FALLBACK_LOADED_KEYS, |n| n as usize);
        Ok(TpmSession {
            shared: Arc::clone(&self.shared),
            ctx,
            primary,
            loaded: Vec::new(),
            capacity: available.clamp(1, MAX_LOADED_KEYS),
            reclaimed: false,
        })
    }
}

impl KeyBackend for TpmBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Tpm
    }

    fn open_session(&self) -> Result<Box<dyn KeySession>, KeyError> {
        Ok(Box::new(self.open_tpm_session()?))
    }

    /// There is no module state to reset: each session owns its own ESAPI
    /// context and TCTI connection, so the fresh session the pool opens after
    /// this is the whole recovery. The counter keeps the pool's protocol.
    fn recover(&self, generation: u64) -> Result<(), KeyError> {
        let _ = self.shared.generation.compare_exchange(
            generation,
            generation + 1,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        Ok(())
    }

    fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::Acquire)
    }
}

/// One ESAPI context, its storage primary and its loaded signing keys.
pub struct TpmSession {
    shared: Arc<Shared>,
    /// Dropping the context flushes the primary and every loaded key.
    ctx: Context,
    primary: KeyHandle,
    /// Least recently used first. A linear scan: `capacity` is at most 8.
    loaded: Vec<(KeyId, KeyHandle)>,
    /// Invariant: 1..=MAX_LOADED_KEYS.
    capacity: usize,
    /// Whether this session has flushed objects it did not load.
    reclaimed: bool,
}

struct Blobs {
    public: Public,
    private: Private,
}

impl TpmSession {
    /// How many signing keys this session keeps loaded at most.
    pub fn cache_capacity(&self) -> usize {
        self.capacity
    }

    fn path(&self, id: &KeyId, ext: &str) -> PathBuf {
        self.shared.key_dir.join(format!("{id}.{ext}"))
    }

    fn read_file(&self, id: &KeyId, ext: &str) -> Result<Vec<u8>, KeyError> {
        let path = self.path(id, ext);
        fs::read(&path).map_err(|e| match e.kind() {
            ErrorKind::NotFound => KeyError::NotFound(id.clone()),
            _ => io_error("reading", &path, e),
        })
    }

    fn read_public(&self, id: &KeyId) -> Result<Public, KeyError> {
        let raw = self.read_file(id, "pub")?;
        let buffer = PublicBuffer::unmarshall(&raw)
            .map_err(|e| KeyError::Malformed(format!("{id}.pub: {e}")))?;
        Public::try_from(buffer).map_err(|e| KeyError::Malformed(format!("{id}.pub: {e}")))
    }

    fn read_blobs(&self, id: &KeyId) -> Result<Blobs, KeyError> {
        let public = self.read_public(id)?;
        let raw = self.read_file(id, "priv")?;
        let private = match raw.as_slice() {
            [hi, lo, rest @ ..] if usize::from(u16::from_be_bytes([*hi, *lo])) == rest.len() => {
                Private::try_from(rest.to_vec())
                    .map_err(|e| KeyError::Malformed(format!("{id}.priv: {e}")))?
            }
            _ => {
                return Err(KeyError::Malformed(format!(
                    "{id}.priv is not a TPM2B_PRIVATE"
                )))
            }
        };
        Ok(Blobs { public, private })
    }

    fn write_blobs(&self, id: &KeyId, public: &Public, private: &Private) -> Result<(), KeyError> {
        write_key_blobs(&self.shared.key_dir, id, public, private)
    }

    /// When the TPM has no slot for an object and this session has no key
    /// loaded to evict: flushes its own primary, then everything else the
    /// TPM holds (see `flush_transient_objects`), and makes the primary
    /// again. Once a session: slots taken again after that are a live
    /// process's, not a dead one's.
    fn reclaim_object_slots(&mut self) -> Result<(), KeyError> {
        debug_assert!(self.loaded.is_empty());
        self.reclaimed = true;
        // Past the first flush this session has no primary: a failure must
        // make the pool open a new session, not use this one again.
        let lost = |e: KeyError| KeyError::SessionLost {
            function: "reclaiming the TPM's object slots".into(),
            detail: e.to_string(),
        };
        self.ctx
            .flush_context(self.primary.into())
            .map_err(|e| lost(classify("FlushContext", e)))?;
        let flushed = flush_transient_objects(&mut self.ctx).map_err(lost)?;
        tracing::warn!(
            flushed,
            "the TPM's object slots were full: flushed what was left in them"
        );
        self.primary =
            create_primary(&mut self.ctx).map_err(|e| lost(classify("CreatePrimary", e)))?;
        Ok(())
    }

    /// Drops the handle from the cache and frees its TPM slot.
    fn unload(&mut self, index: usize) -> Result<(), KeyError> {
        let (_, handle) = self.loaded.remove(index);
        self.ctx
            .flush_context(handle.into())
            .map_err(|e| classify("FlushContext", e))
    }

    fn loaded_key(&mut self, id: &KeyId) -> Result<KeyHandle, KeyError> {
        if let Some(i) = self.loaded.iter().position(|(k, _)| k == id) {
            let entry = self.loaded.remove(i);
            let handle = entry.1;
            self.loaded.push(entry);
            return Ok(handle);
        }
        let blobs = self.read_blobs(id)?;
        if self.loaded.len() >= self.capacity {
            self.unload(0)?;
        }
        let handle = loop {
            match self
                .ctx
                .load(self.primary, blobs.private.clone(), blobs.public.clone())
            {
                Ok(handle) => break handle,
                // Someone else (another process without a resource manager)
                // holds slots we counted on: shrink to what fits.
                Err(e) if is_object_memory(&e) && !self.loaded.is_empty() => {
                    self.unload(0)?;
                    self.capacity = self.loaded.len().max(1);
                }
                Err(e) if is_object_memory(&e) && !self.reclaimed => self.reclaim_object_slots()?,
                Err(e) => return Err(classify("Load", e)),
            }
        };
        self.loaded.push((id.clone(), handle));
        Ok(handle)
    }
}

impl KeySession for TpmSession {
    fn generate(&mut self, id: &KeyId) -> Result<PublicKey, KeyError> {
        if self.path(id, "pub").exists() || self.path(id, "priv").exists() {
            return Err(KeyError::AlreadyExists(id.clone()));
        }
        let template = signing_key_template().map_err(|e| classify("Create", e))?;
        let created = loop {
            match self
                .ctx
                .create(self.primary, template.clone(), None, None, None, None)
            {
                Ok(created) => break created,
                // TPM2_Create needs an object slot of its own; without a
                // resource manager the other sessions' keys may hold them
                // all (seen with swtpm once keyward's own keys were four).
                Err(e) if is_object_memory(&e) && !self.loaded.is_empty() => {
                    self.unload(0)?;
                    self.capacity = self.loaded.len().max(1);
                }
                Err(e) if is_object_memory(&e) && !self.reclaimed => self.reclaim_object_slots()?,
                Err(e) => return Err(classify("Create", e)),
            }
        };
        // The TPM echoes back the attributes it enforced; check them as the
        // PKCS#11 backend does rather than trust our own template.
        let attributes = key_attributes(
            self.shared.token.clone(),
            created.out_public.object_attributes(),
        );
        if let Err(attribute) = attributes.check_hardware_resident() {
            return Err(KeyError::NotHardwareResident {
                key: id.clone(),
                attribute,
            });
        }
        let key = p256_public_key(&created.out_public)?;
        self.write_blobs(id, &created.out_public, &created.out_private)?;
        Ok(key)
    }

    fn public_key(&mut self, id: &KeyId) -> Result<PublicKey, KeyError> {
        p256_public_key(&self.read_public(id)?)
    }

    fn sign_digest(&mut self, id: &KeyId, digest: &[u8; 32]) -> Result<Signature, KeyError> {
        let key = self.loaded_key(id)?;
        sign_digest_with(&mut self.ctx, key, digest)
    }

    /// Reads the public area back from the loaded object rather than from
    /// `<id>.pub`: TPM2_Load verifies the private blob's integrity against
    /// that public area, so these are attributes the TPM actually enforces,
    /// not whatever the file on disk claims.
    fn attributes(&mut self, id: &KeyId) -> Result<KeyAttributes, KeyError> {
        let key = self.loaded_key(id)?;
        // ReadPublic and GetRandom take no authorization; the TPM rejects a
        // password session offered to them.
        let (public, _, _) = self
            .ctx
            .execute_without_session(|ctx| ctx.read_public(key))
            .map_err(|e| classify("ReadPublic", e))?;
        Ok(key_attributes(
            self.shared.token.clone(),
            public.object_attributes(),
        ))
    }

    fn destroy(&mut self, id: &KeyId) -> Result<(), KeyError> {
        if let Some(i) = self.loaded.iter().position(|(k, _)| k == id) {
            self.unload(i)?;
        }
        let mut found = false;
        for ext in ["pub", "priv"] {
            let path = self.path(id, ext);
            match fs::remove_file(&path) {
                Ok(()) => found = true,
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(io_error("removing", &path, e)),
            }
        }
        if found {
            Ok(())
        } else {
            Err(KeyError::NotFound(id.clone()))
        }
    }

    fn key_ids(&mut self, prefix: &str) -> Result<Vec<KeyId>, KeyError> {
        let dir = &self.shared.key_dir;
        let entries = fs::read_dir(dir).map_err(|e| io_error("listing", dir, e))?;
        let mut ids = std::collections::BTreeSet::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_error("listing", dir, e))?;
            let name = entry.file_name();
            // Either blob names the key: a half left by an interrupted
            // write or removal is still the key's, to be removed with it.
            // Temporary files (`.<id>.<ext>.tmp`) start with a dot and are
            // no key's.
            let Some((id, "pub" | "priv")) = name.to_str().and_then(|n| n.rsplit_once('.')) else {
                continue;
            };
            if let (true, Ok(id)) = (id.starts_with(prefix), KeyId::parse(id)) {
                ids.insert(id);
            }
        }
        Ok(ids.into_iter().collect())
    }

    fn ping(&mut self) -> Result<(), KeyError> {
        self.ctx
            .execute_without_session(|ctx| ctx.get_random(1))
            .map(drop)
            .map_err(|e| classify("GetRandom", e))
    }
}

/// TPM2_Sign of a SHA-256 digest with a loaded, unrestricted P-256 key
/// (empty authorization); the signature is low-S. Shared by keyward's
/// backend and the agent side of TPM enrollment.
pub(crate) fn sign_digest_with(
    ctx: &mut Context,
    key: KeyHandle,
    digest: &[u8; 32],
) -> Result<Signature, KeyError> {
    let digest = Digest::try_from(digest.to_vec()).map_err(|e| classify("Sign", e))?;
    // A null ticket is what an unrestricted key accepts: only restricted
    // keys insist on proof that the TPM hashed the message itself.
    let validation = HashcheckTicket::try_from(TPMT_TK_HASHCHECK {
        tag: TPM2_ST_HASHCHECK,
        hierarchy: TPM2_RH_NULL,
        digest: Default::default(),
    })
    .map_err(|e| classify("Sign", e))?;
    let scheme = SignatureScheme::EcDsa {
        hash_scheme: ecdsa_sha256(),
    };
    // The key's authValue is empty: a password session carries it without
    // costing a TPM session (this is the signing hot path).
    let signature = match ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
        ctx.sign(key, digest, scheme, validation)
    }) {
        Ok(TpmSignature::EcDsa(s)) => s,
        Ok(other) => {
            return Err(KeyError::Malformed(format!(
                "TPM2_Sign returned a {:?} signature",
                other.algorithm()
            )))
        }
        Err(e) => return Err(classify("Sign", e)),
    };
    let r = field_bytes(signature.signature_r().value(), "signature r")?;
    let s = field_bytes(signature.signature_s().value(), "signature s")?;
    let signature = Signature::from_scalars(r, s)
        .map_err(|_| KeyError::Malformed("TPM2_Sign returned r or s out of range".into()))?;
    Ok(signature.normalize_s().unwrap_or(signature))
}

/// Writes both blobs under temporary names, then renames them into
/// place, `.pub` last: a key counts as present once its `.pub` exists,
/// so a crash never leaves a half-written key that looks whole.
pub(crate) fn write_key_blobs(
    key_dir: &Path,
    id: &KeyId,
    public: &Public,
    private: &Private,
) -> Result<(), KeyError> {
    let public = PublicBuffer::try_from(public.clone())
        .and_then(|b| b.marshall())
        .map_err(|e| classify("Tss2_MU_TPM2B_PUBLIC_Marshal", e))?;
    let secret = private.value();
    let len = u16::try_from(secret.len())
        .map_err(|_| KeyError::Malformed("TPM2B_PRIVATE longer than 65535 bytes".into()))?;
    let mut private_bytes = len.to_be_bytes().to_vec();
    private_bytes.extend_from_slice(secret);

    let mut staged = Vec::new();
    let result = (|| {
        for (ext, bytes) in [("priv", &private_bytes), ("pub", &public)] {
            let tmp = key_dir.join(format!(".{id}.{ext}.tmp"));
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| match e.kind() {
                    // Another session is generating the same id.
                    ErrorKind::AlreadyExists => KeyError::AlreadyExists(id.clone()),
                    _ => io_error("creating", &tmp, e),
                })?;
            staged.push(tmp.clone());
            file.write_all(bytes)
                .and_then(|()| file.sync_all())
                .map_err(|e| io_error("writing", &tmp, e))?;
        }
        for (tmp, ext) in staged.iter().zip(["priv", "pub"]) {
            let path = key_dir.join(format!("{id}.{ext}"));
            fs::rename(tmp, &path).map_err(|e| io_error("renaming to", &path, e))?;
        }
        staged.clear();
        fs::File::open(key_dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_error("syncing", key_dir, e))
    })();
    for tmp in staged {
        let _ = fs::remove_file(tmp);
    }
    result
}
