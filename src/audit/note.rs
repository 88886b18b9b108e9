//! Checkpoints as C2SP signed notes (c2sp.org/tlog-checkpoint,
//! c2sp.org/signed-note), signed by keyward's audit key with signature
//! type 0x02: ECDSA P-256, ASN.1 DER over SHA-256 of the note text, key ID
//! the first four bytes of SHA-256 of the key's DER SubjectPublicKeyInfo
//! (as transparency-dev/witness verifies).
//!
//! The checkpoint body is `tlog_tiles::Checkpoint`'s. The note around it is
//! written here, not with cloudflare's `signed_note`: its `Signer` is
//! synchronous, while the audit key signs through the pool (async, batched
//! with every other signature on the token), and it ships no ECDSA
//! verifier. The note grammar is small: the text, a blank line, and one
//! `— <name> <base64(key ID || signature)>` line per signature.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use p256::ecdsa::signature::Verifier as _;
use p256::pkcs8::EncodePublicKey as _;
use sha2::{Digest, Sha256};
use tlog_tiles::checkpoint::Checkpoint;
use tlog_tiles::tlog::Hash;

use super::merkle::NodeHash;

/// The em dash and space that open a signature line.
const SIGNATURE_LINE: &str = "\u{2014} ";
/// More than any checkpoint keyward writes; a bound for what it reads.
const MAX_NOTE_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NoteError {
    #[error("the checkpoint is malformed: {0}")]
    Malformed(&'static str),
    #[error("the checkpoint is for log {found:?}, not {expected:?}")]
    WrongOrigin { expected: String, found: String },
    #[error("the checkpoint carries no signature by the audit key")]
    NoSignature,
    #[error("the checkpoint's signature by the audit key does not verify")]
    BadSignature,
}

/// The first four bytes of SHA-256 over the key's DER SubjectPublicKeyInfo.
pub fn key_id(key: &p256::PublicKey) -> [u8; 4] {
    let spki = key
        .to_public_key_der()
        .expect("a P-256 point always encodes");
    let digest = Sha256::digest(spki.as_bytes());
    [digest[0], digest[1], digest[2], digest[3]]
}

/// The checkpoint text a signature covers: origin, size and root, each on
/// its own line.
pub fn checkpoint_text(origin: &str, size: u64, root: &NodeHash) -> Result<String, NoteError> {
    if origin.is_empty() || origin.contains(['\n', ' ', '+']) {
        return Err(NoteError::Malformed("an origin is one non-empty word"));
    }
    let checkpoint = Checkpoint::new(origin, size, Hash(*root), "")
        .map_err(|_| NoteError::Malformed("checkpoint fields"))?;
    String::from_utf8(checkpoint.to_bytes()).map_err(|_| NoteError::Malformed("not UTF-8"))
}

/// The digest the audit key signs for `text`.
pub fn signed_digest(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

/// The signed note: `text`, a blank line, and the audit key's signature
/// line under the log's origin (the key name).
pub fn signed_note(
    text: &str,
    origin: &str,
    key: &p256::PublicKey,
    signature: &p256::ecdsa::Signature,
) -> String {
    let mut blob = key_id(key).to_vec();
    blob.extend_from_slice(signature.to_der().as_bytes());
    format!(
        "{text}\n{SIGNATURE_LINE}{origin} {}\n",
        STANDARD.encode(blob)
    )
}

/// A checkpoint whose signature by the audit key has been checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedCheckpoint {
    pub origin: String,
    pub size: u64,
    pub root: NodeHash,
}

/// Parses a signed checkpoint and checks the audit key's signature on it,
/// under `origin` when one is expected. Signatures by other keys (a
/// witness's cosignature) are allowed and ignored.
pub fn verify_checkpoint(
    note: &[u8],
    key: &p256::PublicKey,
    origin: Option<&str>,
) -> Result<VerifiedCheckpoint, NoteError> {
    if note.len() > MAX_NOTE_BYTES {
        return Err(NoteError::Malformed("too large"));
    }
    let note = std::str::from_utf8(note).map_err(|_| NoteError::Malformed("not UTF-8"))?;
    let (text, signatures) = note
        .split_once("\n\n")
        .ok_or(NoteError::Malformed("no blank line before the signatures"))?;
    let text = format!("{text}\n");
    let checkpoint = Checkpoint::from_bytes(text.as_bytes())
        .map_err(|_| NoteError::Malformed("checkpoint body"))?;
    if let Some(expected) = origin {
        if checkpoint.origin() != expected {
            return Err(NoteError::WrongOrigin {
                expected: expected.to_owned(),
                found: checkpoint.origin().to_owned(),
            });
        }
    }
    let wanted_id = key_id(key);
    let verifying_key = p256::ecdsa::VerifyingKey::from(key);
    let mut found = false;
    for line in signatures
        .strip_suffix('\n')
        .unwrap_or(signatures)
        .split('\n')
    {
        let (name, blob) = line
            .strip_prefix(SIGNATURE_LINE)
            .and_then(|rest| rest.rsplit_once(' '))
            .ok_or(NoteError::Malformed("a signature line"))?;
        let blob = STANDARD
            .decode(blob)
            .map_err(|_| NoteError::Malformed("a signature's base64"))?;
        if name != checkpoint.origin() || blob.len() < 5 || blob[..4] != wanted_id {
            continue;
        }
        // The key ID names one key; a signature under it that fails is a
        // forgery, not a line to skip (as C2SP signed-note asks).
        let signature =
            p256::ecdsa::Signature::from_der(&blob[4..]).map_err(|_| NoteError::BadSignature)?;
        verifying_key
            .verify(text.as_bytes(), &signature)
            .map_err(|_| NoteError::BadSignature)?;
        found = true;
    }
    if !found {
        return Err(NoteError::NoSignature);
    }
    Ok(VerifiedCheckpoint {
        origin: checkpoint.origin().to_owned(),
        size: checkpoint.size(),
        root: checkpoint.hash().0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::Signer as _;

    fn key() -> p256::ecdsa::SigningKey {
        p256::ecdsa::SigningKey::from_slice(&[7u8; 32]).unwrap()
    }

    fn note(origin: &str, size: u64) -> (String, p256::PublicKey) {
        let signing = key();
        let public = p256::PublicKey::from(signing.verifying_key());
        let text = checkpoint_text(origin, size, &[1u8; 32]).unwrap();
        let signature: p256::ecdsa::Signature = signing.sign(text.as_bytes());
        (signed_note(&text, origin, &public, &signature), public)
    }

    #[test]
    fn a_signed_checkpoint_verifies_and_reads_back() {
        let (note, key) = note("example.org/audit", 42);
        let checkpoint =
            verify_checkpoint(note.as_bytes(), &key, Some("example.org/audit")).unwrap();
        assert_eq!(checkpoint.size, 42);
        assert_eq!(checkpoint.root, [1u8; 32]);
        assert!(note.starts_with("example.org/audit\n42\n"));
    }

    #[test]
    fn an_edited_size_is_a_bad_signature() {
        let (note, key) = note("example.org/audit", 42);
        let forged = note.replacen("\n42\n", "\n43\n", 1);
        assert_eq!(
            verify_checkpoint(forged.as_bytes(), &key, None),
            Err(NoteError::BadSignature)
        );
    }

    #[test]
    fn another_key_is_no_signature() {
        let (note, _) = note("example.org/audit", 42);
        let other = p256::PublicKey::from(
            p256::ecdsa::SigningKey::from_slice(&[9u8; 32])
                .unwrap()
                .verifying_key(),
        );
        assert_eq!(
            verify_checkpoint(note.as_bytes(), &other, None),
            Err(NoteError::NoSignature)
        );
    }

    #[test]
    fn another_origin_is_refused() {
        let (note, key) = note("example.org/audit", 42);
        assert!(matches!(
            verify_checkpoint(note.as_bytes(), &key, Some("other.org/audit")),
            Err(NoteError::WrongOrigin { .. })
        ));
    }

    #[test]
    fn malformed_notes_are_errors_not_panics() {
        let key = p256::PublicKey::from(key().verifying_key());
        for bad in [
            &b""[..],
            b"\n\n",
            b"origin\n1\n",
            b"origin\nx\nAAAA\n\n\xe2\x80\x94 origin AAAA\n",
            b"origin\n1\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n\nnot a signature line\n",
            b"\xff\xfe",
        ] {
            assert!(verify_checkpoint(bad, &key, None).is_err(), "{bad:?}");
        }
    }
}
