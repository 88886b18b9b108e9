//! Evidence for custodial keys in a PKCS#11 token (or in keyward's own TPM,
//! whose backend reports the same attributes from the key's public area):
//! the token's own report of the key's attributes, read back right after
//! generation, signed by
//! keyward's attestation key (also on the token). The claims follow the
//! spirit of draft-ietf-rats-pkix-key-attestation: which hardware, and that
//! the key was generated there and can never leave it.
//!
//! Stored evidence is a JSON document:
//!
//! ```json
//! { "format": "keyward-pkcs11-key-attributes-v1",   // or keyward-tpm2-key-attributes-v1
//!   "statement_b64": "<base64url of the statement JSON>",
//!   "signature_der_b64": "<base64url ECDSA P-256 SHA-256 over statement bytes>",
//!   "signer_certificate_der_b64": "<base64url of the attestation key's certificate>" }
//! ```

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use p256::PublicKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{AttestationError, AttestedKey, Verified};
use crate::keys::{GeneratedKey, KeyAttributes, KeyId, KeyStorage, TokenDescription};
use crate::pool::KeyPool;
use crate::store::AttestationRecord;

pub const FORMAT: &str = "pkcs11-key-attributes";
/// The same evidence for a custodial key in keyward's own TPM: the
/// attributes come from the key's public area (fixedTPM, fixedParent,
/// sensitiveDataOrigin), not from PKCS#11, and the name says so.
pub const TPM_FORMAT: &str = "tpm2-key-attributes";
/// Unit tests' in-memory keys: never hardware, and never called so.
pub const SOFTWARE_FORMAT: &str = "software-key-attributes";

fn format_for(kind: crate::keys::BackendKind) -> &'static str {
    match kind {
        crate::keys::BackendKind::Pkcs11 => FORMAT,
        crate::keys::BackendKind::Tpm => TPM_FORMAT,
        crate::keys::BackendKind::Software => SOFTWARE_FORMAT,
    }
}

/// The attestation key and its certificate (issued by keyward's CA).
#[derive(Clone, Debug)]
pub struct EvidenceSigner {
    pub key: KeyId,
    pub certificate_der: Vec<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Statement {
    pub key_id: String,
    /// SHA-256 of the key's SubjectPublicKeyInfo, hex.
    pub spki_sha256: String,
    pub curve: String,
    pub token: TokenDescription,
    /// Where the key is kept between uses: `token` (a token object) or
    /// `wrapped` (in keyward's database, wrapped under a key that never
    /// leaves the token). Evidence written before wrapped keys existed has
    /// none and means `token`.
    #[serde(default = "token_storage")]
    pub storage: KeyStorage,
    pub attributes: AttributeClaims,
    pub observed_at: i64,
}

fn token_storage() -> KeyStorage {
    KeyStorage::Token
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AttributeClaims {
    pub local: bool,
    pub sensitive: bool,
    pub always_sensitive: bool,
    pub extractable: bool,
    pub never_extractable: bool,
    pub sign: bool,
    pub decrypt: bool,
    pub derive: bool,
    pub unwrap: bool,
    #[serde(default)]
    pub wrap_with_trusted: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct EvidenceDocument {
    pub format: String,
    pub statement_b64: String,
    pub signature_der_b64: String,
    pub signer_certificate_der_b64: String,
}

fn claims_of(a: &KeyAttributes) -> AttributeClaims {
    AttributeClaims {
        local: a.local,
        sensitive: a.sensitive,
        always_sensitive: a.always_sensitive,
        extractable: a.extractable,
        never_extractable: a.never_extractable,
        sign: a.sign,
        decrypt: a.decrypt,
        derive: a.derive,
        unwrap: a.unwrap,
        wrap_with_trusted: a.wrap_with_trusted,
    }
}

/// Takes the token's account of a key as generated, refuses a key whose
/// attributes do not match its storage (never extractable on the token;
/// extractable only under a trusted wrapping key when wrapped), and signs
/// the statement with the attestation key.
pub async fn attest_custodial_key(
    pool: &KeyPool,
    signer: &EvidenceSigner,
    key: &KeyId,
    generated: &GeneratedKey,
) -> Result<Verified<AttestedKey>, AttestationError> {
    use p256::pkcs8::EncodePublicKey;

    let attributes = &generated.attributes;
    let public_key: &PublicKey = &generated.public_key;
    let storage = if generated.wrapped.is_some() {
        KeyStorage::Wrapped
    } else {
        KeyStorage::Token
    };
    attributes
        .check_custody(storage)
        .map_err(AttestationError::NotHardwareResident)?;
    let spki = public_key
        .to_public_key_der()
        .map_err(|e| AttestationError::Malformed(e.to_string()))?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let statement = Statement {
        key_id: key.to_string(),
        spki_sha256: hex::encode(Sha256::digest(spki.as_bytes())),
        curve: "P-256".into(),
        token: attributes.token.clone(),
        storage,
        attributes: claims_of(attributes),
        observed_at: now,
    };
    let statement_bytes = serde_json::to_vec(&statement).expect("plain data serializes");
    let digest: [u8; 32] = Sha256::digest(&statement_bytes).into();
    let signature = pool
        .sign_within(&signer.key, digest, pool.key_creation_deadline())
        .await?;
    let format = format_for(pool.backend_kind());
    let document = EvidenceDocument {
        // The document names its own schema: keyward-<format>-v1.
        format: format!("keyward-{format}-v1"),
        statement_b64: B64.encode(&statement_bytes),
        signature_der_b64: B64.encode(signature.to_der().as_bytes()),
        signer_certificate_der_b64: B64.encode(&signer.certificate_der),
    };
    let evidence = serde_json::to_vec(&document).expect("plain data serializes");
    Ok(Verified::new(AttestedKey {
        format,
        key_location: key_location(&attributes.token, storage),
        evidence: AttestationRecord {
            digest: hex::encode(Sha256::digest(&evidence)),
            format: format.into(),
            evidence,
            created_at: now,
        },
    }))
}

/// Where the evidence says the key is, as certificates and the audit trail
/// name it.
fn key_location(token: &TokenDescription, storage: KeyStorage) -> String {
    match storage {
        KeyStorage::Token => token.to_string(),
        KeyStorage::Wrapped => format!("{token}, wrapped"),
    }
}

/// Re-reads stored evidence that keyward itself produced and stored (the
/// store is trusted; this only recovers the token description).
pub fn from_stored(record: AttestationRecord) -> Result<Verified<AttestedKey>, AttestationError> {
    let document: EvidenceDocument = serde_json::from_slice(&record.evidence)
        .map_err(|e| AttestationError::Malformed(e.to_string()))?;
    let statement_bytes = B64
        .decode(&document.statement_b64)
        .map_err(|e| AttestationError::Malformed(e.to_string()))?;
    let statement: Statement = serde_json::from_slice(&statement_bytes)
        .map_err(|e| AttestationError::Malformed(e.to_string()))?;
    let format = [FORMAT, TPM_FORMAT, SOFTWARE_FORMAT]
        .into_iter()
        .find(|f| *f == record.format)
        .ok_or_else(|| {
            AttestationError::Malformed(format!("unknown evidence format {}", record.format))
        })?;
    Ok(Verified::new(AttestedKey {
        format,
        key_location: key_location(&statement.token, statement.storage),
        evidence: record,
    }))
}
