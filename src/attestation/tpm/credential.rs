//! TPM2_MakeCredential computed in software (TPM 2.0 Library Part 1,
//! "Protected storage: credential protection" and "Secret sharing").
//!
//! keyward's host has no TPM, yet the blob it produces must be accepted by a
//! real TPM's TPM2_ActivateCredential, which releases the credential only if
//! the named object (the AK) is loaded in the same TPM as the EK. Every byte
//! layout here therefore follows the specification exactly:
//!
//! ```text
//! seed            RSA EK: random, RSA-OAEP(nameAlg, label "IDENTITY\0")
//!                 ECC EK: KDFe(nameAlg, Z, "IDENTITY", ephemeral.x, ek.x)
//! symKey          KDFa(nameAlg, seed, "STORAGE", objectName, "", symKeyBits)
//! encIdentity     AES-CFB(symKey, IV = 0, TPM2B_DIGEST(credential))
//! hmacKey         KDFa(nameAlg, seed, "INTEGRITY", "", "", digestBits)
//! integrityHMAC   HMAC-nameAlg(hmacKey, encIdentity || objectName)
//! idObject        TPM2B_DIGEST(integrityHMAC) || encIdentity
//! ```

use aes::cipher::{AsyncStreamCipher, KeyIvInit};
use aes::{Aes128, Aes256};
use hmac::{Hmac, Mac};
use p256::elliptic_curve::ecdh::EphemeralSecret;
use p256::elliptic_curve::sec1::{FromEncodedPoint, ModulusSize, ToEncodedPoint};
use p256::elliptic_curve::{AffinePoint, CurveArithmetic, FieldBytesSize, PublicKey};
use rand::{CryptoRng, RngCore};
use rsa::traits::PublicKeyParts;
use rsa::{BigUint, Oaep, RsaPublicKey};
use sha2::{Digest, Sha256, Sha384};
use zeroize::Zeroizing;

/// TPM_ALG_SHA256 and TPM_ALG_SHA384 (TPM 2.0 Part 2, TPM_ALG_ID).
const TPM_ALG_SHA256: u16 = 0x000B;
const TPM_ALG_SHA384: u16 = 0x000C;

/// The OAEP label is the KDF label including its terminating zero, because
/// the reference implementation passes the C string with its NUL.
const IDENTITY_OAEP_LABEL: &str = "IDENTITY\0";
const IDENTITY_LABEL: &str = "IDENTITY";
const STORAGE_LABEL: &str = "STORAGE";
const INTEGRITY_LABEL: &str = "INTEGRITY";

/// sizeof(TPMU_NAME): a TPMT_HA with the largest digest the TPM knows
/// (SHA-512). A longer name can never be the name of a TPM object.
const MAX_OBJECT_NAME_LEN: usize = 2 + 64;

/// Below this the credential could be recovered by factoring the EK modulus;
/// every TCG EK template is at least this large.
const MIN_RSA_EK_BITS: usize = 2048;

/// TPM RSA keys store exponent 0 for the default, which means 65537.
const DEFAULT_RSA_EXPONENT: u32 = 65537;

/// The EK's nameAlg, which the TPM uses for every hash in credential
/// protection (seed size, KDFs, OAEP and the integrity HMAC).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameHash {
    Sha256,
    Sha384,
}

impl NameHash {
    pub fn digest_len(self) -> usize {
        match self {
            Self::Sha256 => 32,
            Self::Sha384 => 48,
        }
    }

    pub fn from_tpm_alg(id: u16) -> Option<Self> {
        match id {
            TPM_ALG_SHA256 => Some(Self::Sha256),
            TPM_ALG_SHA384 => Some(Self::Sha384),
            _ => None,
        }
    }

    pub fn digest(self, data: &[u8]) -> Vec<u8> {
        self.digest_parts(&[data])
    }

    fn digest_parts(self, parts: &[&[u8]]) -> Vec<u8> {
        fn run<D: Digest>(parts: &[&[u8]]) -> Vec<u8> {
            let mut hasher = D::new();
            for part in parts {
                hasher.update(part);
            }
            hasher.finalize().to_vec()
        }
        match self {
            Self::Sha256 => run::<Sha256>(parts),
            Self::Sha384 => run::<Sha384>(parts),
        }
    }

    fn hmac_parts(self, key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
        match self {
            Self::Sha256 => {
                let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
                for part in parts {
                    mac.update(part);
                }
                mac.finalize().into_bytes().to_vec()
            }
            Self::Sha384 => {
                let mut mac = Hmac::<Sha384>::new_from_slice(key).expect("any key length");
                for part in parts {
                    mac.update(part);
                }
                mac.finalize().into_bytes().to_vec()
            }
        }
    }
}

/// The EK's public key as read from its TPMT_PUBLIC.
#[derive(Clone, Debug)]
pub enum EkKey {
    /// `modulus` is big-endian; `exponent` 0 is read as 65537, as the TPM does.
    Rsa {
        modulus: Vec<u8>,
        exponent: u32,
    },
    P256(p256::PublicKey),
    P384(p384::PublicKey),
}

impl EkKey {
    pub(crate) fn rsa_exponent(exponent: u32) -> u32 {
        if exponent == 0 {
            DEFAULT_RSA_EXPONENT
        } else {
            exponent
        }
    }
}

/// What the TPM uses to protect a credential for this EK.
#[derive(Clone, Debug)]
pub struct EkProtection {
    pub key: EkKey,
    pub name_hash: NameHash,
    /// AES key size of the EK's symmetric definition (always AES-CFB for a
    /// storage key): 128 or 256.
    pub aes_key_bits: u16,
}

/// The two TPM2_ActivateCredential inputs, without their TPM2B size prefixes.
#[derive(Clone, Debug)]
pub struct MadeCredential {
    /// TPM2B_ID_OBJECT contents: TPM2B_DIGEST(integrityHMAC) || encIdentity.
    pub id_object: Vec<u8>,
    /// TPM2B_ENCRYPTED_SECRET contents: the RSA-OAEP ciphertext, or the
    /// ephemeral public key as a marshalled TPMS_ECC_POINT.
    pub encrypted_secret: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialError {
    #[error("the credential must be 1 to {max} bytes (the EK's nameAlg digest size), got {len}")]
    CredentialSize { len: usize, max: usize },
    #[error("the object name must be 1 to {MAX_OBJECT_NAME_LEN} bytes, got {len}")]
    ObjectNameSize { len: usize },
    #[error("EK symmetric key size {0} bits is not supported (only AES-128 and AES-256)")]
    UnsupportedSymmetricKey(u16),
    #[error("the RSA EK public key is not usable: {0}")]
    InvalidRsaKey(&'static str),
    #[error("RSA-OAEP encryption of the seed failed")]
    RsaEncryption,
    #[error("the ECC EK public key is not usable")]
    InvalidEccKey,
    #[error("a field of {0} bytes does not fit a TPM2B")]
    FieldTooLarge(usize),
}

/// Protects `credential` so that only the TPM holding the EK, with the object
/// named `object_name` loaded, can recover it with TPM2_ActivateCredential.
pub fn make_credential<R: CryptoRng + RngCore>(
    ek: &EkProtection,
    object_name: &[u8],
    credential: &[u8],
    rng: &mut R,
) -> Result<MadeCredential, CredentialError> {
    let hash = ek.name_hash;
    // TPM2_MakeCredential refuses larger credentials (TPM_RC_SIZE), so a
    // real TPM could not have produced such a blob either.
    if credential.is_empty() || credential.len() > hash.digest_len() {
        return Err(CredentialError::CredentialSize {
            len: credential.len(),
            max: hash.digest_len(),
        });
    }
    if object_name.is_empty() || object_name.len() > MAX_OBJECT_NAME_LEN {
        return Err(CredentialError::ObjectNameSize {
            len: object_name.len(),
        });
    }
    if !matches!(ek.aes_key_bits, 128 | 256) {
        return Err(CredentialError::UnsupportedSymmetricKey(ek.aes_key_bits));
    }

    let (seed, encrypted_secret) = match &ek.key {
        EkKey::Rsa { modulus, exponent } => rsa_seed(hash, modulus, *exponent, rng)?,
        EkKey::P256(key) => ecc_seed(hash, key, rng)?,
        EkKey::P384(key) => ecc_seed(hash, key, rng)?,
    };
    let id_object = protect(hash, &seed, ek.aes_key_bits, object_name, credential)?;
    Ok(MadeCredential {
        id_object,
        encrypted_secret,
    })
}

/// KDFa (Part 1, 11.4.10.2): SP 800-108 counter mode with HMAC-`hash`,
/// `[i]32 || label || 0x00 || contextU || contextV || [bits]32` per block.
///
/// `label` excludes the terminating zero; as in the reference implementation
/// no second zero is added when the label already ends in one.
pub fn kdfa(
    hash: NameHash,
    key: &[u8],
    label: &str,
    context_u: &[u8],
    context_v: &[u8],
    bits: u32,
) -> Vec<u8> {
    let bits_be = bits.to_be_bytes();
    counter_kdf(hash, bits, |counter| {
        hash.hmac_parts(
            key,
            &[
                &counter.to_be_bytes(),
                label.as_bytes(),
                label_terminator(label),
                context_u,
                context_v,
                &bits_be,
            ],
        )
    })
}

/// KDFe (Part 1, 11.4.10.3): the SP 800-56A concatenation KDF with `hash`,
/// `[i]32 || Z || label || 0x00 || partyUInfo || partyVInfo` per block (no
/// length field, unlike KDFa).
pub fn kdfe(
    hash: NameHash,
    z: &[u8],
    label: &str,
    party_u: &[u8],
    party_v: &[u8],
    bits: u32,
) -> Vec<u8> {
    counter_kdf(hash, bits, |counter| {
        hash.digest_parts(&[
            &counter.to_be_bytes(),
            z,
            label.as_bytes(),
            label_terminator(label),
            party_u,
            party_v,
        ])
    })
}

fn label_terminator(label: &str) -> &'static [u8] {
    if label.ends_with('\0') {
        &[]
    } else {
        &[0]
    }
}

/// Concatenates blocks 1, 2, ... and keeps `bits` bits. When `bits` is not a
/// whole number of octets the TPM keeps the low-order bits of the first
/// octet, so this does too.
fn counter_kdf(hash: NameHash, bits: u32, block: impl Fn(u32) -> Vec<u8>) -> Vec<u8> {
    let len = bits.div_ceil(8) as usize;
    // Sized up front so that growing never leaves copies of key material in
    // freed memory.
    let mut out = Vec::with_capacity(len + hash.digest_len());
    let mut counter: u32 = 0;
    while out.len() < len {
        counter = counter.wrapping_add(1);
        let next = Zeroizing::new(block(counter));
        out.extend_from_slice(&next);
    }
    zeroize::Zeroize::zeroize(&mut out[len..]);
    out.truncate(len);
    let spare_bits = bits % 8;
    if spare_bits != 0 {
        if let Some(first) = out.first_mut() {
            *first &= (1u8 << spare_bits) - 1;
        }
    }
    out
}

type Seed = Zeroizing<Vec<u8>>;

fn rsa_seed<R: CryptoRng + RngCore>(
    hash: NameHash,
    modulus: &[u8],
    exponent: u32,
    rng: &mut R,
) -> Result<(Seed, Vec<u8>), CredentialError> {
    let key = RsaPublicKey::new(
        BigUint::from_bytes_be(modulus),
        BigUint::from(EkKey::rsa_exponent(exponent)),
    )
    .map_err(|_| CredentialError::InvalidRsaKey("modulus or exponent out of range"))?;
    if key.n().bits() < MIN_RSA_EK_BITS {
        return Err(CredentialError::InvalidRsaKey(
            "modulus shorter than 2048 bits",
        ));
    }

    let mut seed = Zeroizing::new(vec![0u8; hash.digest_len()]);
    rng.fill_bytes(&mut seed);
    let padding = match hash {
        NameHash::Sha256 => Oaep::new_with_label::<Sha256, _>(IDENTITY_OAEP_LABEL),
        NameHash::Sha384 => Oaep::new_with_label::<Sha384, _>(IDENTITY_OAEP_LABEL),
    };
    let encrypted = key
        .encrypt(rng, padding, &seed)
        .map_err(|_| CredentialError::RsaEncryption)?;
    Ok((seed, encrypted))
}

/// One-pass ECDH (C(1e, 1s)): only the ephemeral side is ours, and the TPM
/// repeats the computation with the EK's private key.
fn ecc_seed<C, R>(
    hash: NameHash,
    ek: &PublicKey<C>,
    rng: &mut R,
) -> Result<(Seed, Vec<u8>), CredentialError>
where
    C: CurveArithmetic,
    AffinePoint<C>: FromEncodedPoint<C> + ToEncodedPoint<C>,
    FieldBytesSize<C>: ModulusSize,
    R: CryptoRng + RngCore,
{
    let ephemeral = EphemeralSecret::<C>::random(rng);
    let ephemeral_point = ephemeral.public_key().to_encoded_point(false);
    let ek_point = ek.to_encoded_point(false);
    // Uncompressed SEC1 points carry both coordinates at the full field
    // length, which is the fixed-size encoding the TPM uses in the KDF.
    let (Some(ephemeral_x), Some(ephemeral_y), Some(ek_x)) =
        (ephemeral_point.x(), ephemeral_point.y(), ek_point.x())
    else {
        return Err(CredentialError::InvalidEccKey);
    };
    let shared = ephemeral.diffie_hellman(ek);
    let seed = Zeroizing::new(kdfe(
        hash,
        shared.raw_secret_bytes(),
        IDENTITY_LABEL,
        ephemeral_x,
        ek_x,
        digest_bits(hash),
    ));

    let mut encrypted_secret = Vec::with_capacity(4 + ephemeral_x.len() + ephemeral_y.len());
    push_tpm2b(&mut encrypted_secret, ephemeral_x)?;
    push_tpm2b(&mut encrypted_secret, ephemeral_y)?;
    Ok((seed, encrypted_secret))
}

fn protect(
    hash: NameHash,
    seed: &[u8],
    aes_key_bits: u16,
    object_name: &[u8],
    credential: &[u8],
) -> Result<Vec<u8>, CredentialError> {
    let sym_key = Zeroizing::new(kdfa(
        hash,
        seed,
        STORAGE_LABEL,
        object_name,
        &[],
        u32::from(aes_key_bits),
    ));
    // The whole TPM2B, size field included, is encrypted.
    let mut enc_identity = Vec::with_capacity(2 + credential.len());
    push_tpm2b(&mut enc_identity, credential)?;
    // The zero IV is safe only because every seed, and so every key, is
    // fresh per credential.
    let iv = [0u8; 16];
    match aes_key_bits {
        128 => cfb_mode::Encryptor::<Aes128>::new_from_slices(&sym_key, &iv)
            .expect("KDFa yields exactly 16 bytes for 128 bits")
            .encrypt(&mut enc_identity),
        256 => cfb_mode::Encryptor::<Aes256>::new_from_slices(&sym_key, &iv)
            .expect("KDFa yields exactly 32 bytes for 256 bits")
            .encrypt(&mut enc_identity),
        other => return Err(CredentialError::UnsupportedSymmetricKey(other)),
    }

    let hmac_key = Zeroizing::new(kdfa(
        hash,
        seed,
        INTEGRITY_LABEL,
        &[],
        &[],
        digest_bits(hash),
    ));
    let integrity = hash.hmac_parts(&hmac_key, &[&enc_identity, object_name]);

    let mut id_object = Vec::with_capacity(2 + integrity.len() + enc_identity.len());
    push_tpm2b(&mut id_object, &integrity)?;
    id_object.extend_from_slice(&enc_identity);
    Ok(id_object)
}

fn digest_bits(hash: NameHash) -> u32 {
    match hash {
        NameHash::Sha256 => 256,
        NameHash::Sha384 => 384,
    }
}

fn push_tpm2b(out: &mut Vec<u8>, bytes: &[u8]) -> Result<(), CredentialError> {
    let size =
        u16::try_from(bytes.len()).map_err(|_| CredentialError::FieldTooLarge(bytes.len()))?;
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes::cipher::AsyncStreamCipher;
    use p256::elliptic_curve::{NonZeroScalar, SecretKey};
    use rand::rngs::OsRng;
    use rsa::RsaPrivateKey;
    use std::sync::OnceLock;

    /// The TPM's own KDFa self-test vector (reference implementation,
    /// KdfTestData.h): 20-byte key, label "KDFSELFTESTLABEL" (the vector
    /// carries the terminating zero), 8-byte contexts, 160 output bits.
    const SELF_TEST_KEY: [u8; 20] = [
        0x27, 0x1F, 0xA0, 0x8B, 0xBD, 0xC5, 0x06, 0x0E, 0xC3, 0xDF, 0xA9, 0x28, 0xFF, 0x9B, 0x73,
        0x12, 0x3A, 0x12, 0xDA, 0x0C,
    ];
    const SELF_TEST_CONTEXT_U: [u8; 8] = [0xCE, 0x24, 0x4F, 0x39, 0x5D, 0xCA, 0x73, 0x91];
    const SELF_TEST_CONTEXT_V: [u8; 8] = [0xDA, 0x50, 0x40, 0x31, 0xDD, 0xF1, 0x2E, 0x83];

    #[test]
    fn kdfa_matches_the_tpm_self_test_vectors() {
        for (hash, expected) in [
            (NameHash::Sha256, "bb0259e1c8ba607e6a2cd704b69a902e9ade84c4"),
            (NameHash::Sha384, "1dce70c9113eb2dba47bd9cfc72bf46f45b09312"),
        ] {
            let derived = kdfa(
                hash,
                &SELF_TEST_KEY,
                "KDFSELFTESTLABEL",
                &SELF_TEST_CONTEXT_U,
                &SELF_TEST_CONTEXT_V,
                160,
            );
            assert_eq!(hex::encode(&derived), expected, "{hash:?}");
            // The vector's label already ends in a zero; no second one.
            let with_nul = kdfa(
                hash,
                &SELF_TEST_KEY,
                "KDFSELFTESTLABEL\0",
                &SELF_TEST_CONTEXT_U,
                &SELF_TEST_CONTEXT_V,
                160,
            );
            assert_eq!(with_nul, derived);
        }
    }

    /// Plain HMAC over the spelled-out block layout, across several counter
    /// blocks, with a partial final block and a bit count that is not a
    /// whole number of octets.
    #[test]
    fn kdfa_block_layout_counter_and_bits() {
        fn reference(key: &[u8], label: &[u8], u: &[u8], v: &[u8], bits: u32) -> Vec<u8> {
            let mut stream = Vec::new();
            for counter in 1u32..=4 {
                let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
                mac.update(&counter.to_be_bytes());
                mac.update(label);
                mac.update(&[0]);
                mac.update(u);
                mac.update(v);
                mac.update(&bits.to_be_bytes());
                stream.extend_from_slice(&mac.finalize().into_bytes());
            }
            stream.truncate(bits.div_ceil(8) as usize);
            stream
        }
        let (key, u, v) = (b"seed bytes".as_slice(), b"name".as_slice(), b"".as_slice());

        let derived = kdfa(NameHash::Sha256, key, "STORAGE", u, v, 600);
        assert_eq!(derived.len(), 75);
        assert_eq!(derived, reference(key, b"STORAGE", u, v, 600));

        let derived = kdfa(NameHash::Sha256, key, "STORAGE", u, v, 12);
        let mut expected = reference(key, b"STORAGE", u, v, 12);
        expected[0] &= 0x0F;
        assert_eq!(derived, expected);
    }

    #[test]
    fn kdfe_block_layout_and_counter() {
        let (z, u, v) = ([0x11u8; 48], [0x22u8; 48], [0x33u8; 48]);
        let mut stream = Vec::new();
        for counter in 1u32..=2 {
            let mut hasher = Sha384::new();
            hasher.update(counter.to_be_bytes());
            hasher.update(z);
            hasher.update(b"IDENTITY\0");
            hasher.update(u);
            hasher.update(v);
            stream.extend_from_slice(&hasher.finalize());
        }
        stream.truncate(70);
        assert_eq!(kdfe(NameHash::Sha384, &z, "IDENTITY", &u, &v, 560), stream);
        assert_eq!(
            kdfe(NameHash::Sha384, &z, "IDENTITY", &u, &v, 384),
            stream[..48]
        );
    }

    #[test]
    fn name_hash_from_tpm_alg() {
        assert_eq!(NameHash::from_tpm_alg(0x000B), Some(NameHash::Sha256));
        assert_eq!(NameHash::from_tpm_alg(0x000C), Some(NameHash::Sha384));
        assert_eq!(NameHash::from_tpm_alg(0x0004), None);
        assert_eq!(NameHash::Sha384.digest(b"").len(), 48);
    }

    enum EkPrivate {
        Rsa(Box<RsaPrivateKey>),
        P256(p256::SecretKey),
        P384(p384::SecretKey),
    }

    fn rsa_ek() -> &'static RsaPrivateKey {
        static KEY: OnceLock<RsaPrivateKey> = OnceLock::new();
        KEY.get_or_init(|| RsaPrivateKey::new(&mut OsRng, 2048).unwrap())
    }

    /// Reads a TPM2B from the front of `bytes`.
    fn split_tpm2b(bytes: &[u8]) -> Result<(&[u8], &[u8]), &'static str> {
        let size = bytes.get(..2).ok_or("short TPM2B")?;
        let size = usize::from(u16::from_be_bytes([size[0], size[1]]));
        let rest = &bytes[2..];
        if rest.len() < size {
            return Err("short TPM2B");
        }
        Ok(rest.split_at(size))
    }

    fn ecc_z<C>(
        secret: &SecretKey<C>,
        encrypted_secret: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>), &'static str>
    where
        C: CurveArithmetic,
        AffinePoint<C>: FromEncodedPoint<C> + ToEncodedPoint<C>,
        FieldBytesSize<C>: ModulusSize,
    {
        let (x, rest) = split_tpm2b(encrypted_secret)?;
        let (y, rest) = split_tpm2b(rest)?;
        if !rest.is_empty() {
            return Err("trailing bytes after TPMS_ECC_POINT");
        }
        let mut sec1 = vec![0x04];
        sec1.extend_from_slice(x);
        sec1.extend_from_slice(y);
        let ephemeral =
            PublicKey::<C>::from_sec1_bytes(&sec1).map_err(|_| "ephemeral point invalid")?;
        let scalar: NonZeroScalar<C> = secret.to_nonzero_scalar();
        let shared = p256::elliptic_curve::ecdh::diffie_hellman(scalar, ephemeral.as_affine());
        Ok((shared.raw_secret_bytes().to_vec(), x.to_vec()))
    }

    /// TPM2_ActivateCredential, as the TPM computes it with the EK's
    /// private key (Part 1, credential protection; Part 3, 12.5).
    fn activate_credential(
        ek: &EkPrivate,
        hash: NameHash,
        aes_key_bits: u16,
        object_name: &[u8],
        made: &MadeCredential,
    ) -> Result<Vec<u8>, &'static str> {
        let bits = hash.digest_len() as u32 * 8;
        let seed = match ek {
            EkPrivate::Rsa(key) => {
                let padding = match hash {
                    NameHash::Sha256 => Oaep::new_with_label::<Sha256, _>("IDENTITY\0"),
                    NameHash::Sha384 => Oaep::new_with_label::<Sha384, _>("IDENTITY\0"),
                };
                key.decrypt(padding, &made.encrypted_secret)
                    .map_err(|_| "OAEP decryption failed")?
            }
            EkPrivate::P256(key) => {
                let (z, ephemeral_x) = ecc_z(key, &made.encrypted_secret)?;
                let ek_x = key
                    .public_key()
                    .to_encoded_point(false)
                    .x()
                    .unwrap()
                    .to_vec();
                kdfe(hash, &z, "IDENTITY", &ephemeral_x, &ek_x, bits)
            }
            EkPrivate::P384(key) => {
                let (z, ephemeral_x) = ecc_z(key, &made.encrypted_secret)?;
                let ek_x = key
                    .public_key()
                    .to_encoded_point(false)
                    .x()
                    .unwrap()
                    .to_vec();
                kdfe(hash, &z, "IDENTITY", &ephemeral_x, &ek_x, bits)
            }
        };
        if seed.len() != hash.digest_len() {
            return Err("seed has the wrong size");
        }

        let (integrity, enc_identity) = split_tpm2b(&made.id_object)?;
        let hmac_key = kdfa(hash, &seed, "INTEGRITY", &[], &[], bits);
        let expected = hash.hmac_parts(&hmac_key, &[enc_identity, object_name]);
        if integrity != expected.as_slice() {
            return Err("integrity HMAC mismatch");
        }

        let sym_key = kdfa(
            hash,
            &seed,
            "STORAGE",
            object_name,
            &[],
            aes_key_bits.into(),
        );
        let mut plain = enc_identity.to_vec();
        let iv = [0u8; 16];
        match aes_key_bits {
            128 => cfb_mode::Decryptor::<Aes128>::new_from_slices(&sym_key, &iv)
                .unwrap()
                .decrypt(&mut plain),
            256 => cfb_mode::Decryptor::<Aes256>::new_from_slices(&sym_key, &iv)
                .unwrap()
                .decrypt(&mut plain),
            _ => return Err("unsupported AES key size"),
        }
        let (credential, rest) = split_tpm2b(&plain)?;
        if !rest.is_empty() {
            return Err("trailing bytes after the credential");
        }
        Ok(credential.to_vec())
    }

    fn ak_name() -> Vec<u8> {
        let mut name = vec![0x00, 0x0B];
        name.extend_from_slice(&Sha256::digest(b"an AK's public area"));
        name
    }

    fn round_trip(ek: EkPrivate, protection: EkProtection) {
        let name = ak_name();
        for credential in [
            vec![0x5A],
            (1..=protection.name_hash.digest_len() as u8).collect::<Vec<_>>(),
        ] {
            let made = make_credential(&protection, &name, &credential, &mut OsRng).unwrap();
            let recovered = activate_credential(
                &ek,
                protection.name_hash,
                protection.aes_key_bits,
                &name,
                &made,
            )
            .unwrap();
            assert_eq!(recovered, credential);

            let mut other_name = name.clone();
            other_name[5] ^= 1;
            assert_eq!(
                activate_credential(
                    &ek,
                    protection.name_hash,
                    protection.aes_key_bits,
                    &other_name,
                    &made
                ),
                Err("integrity HMAC mismatch"),
                "a different object must not recover the credential"
            );

            let mut tampered = made.clone();
            let last = tampered.id_object.len() - 1;
            tampered.id_object[last] ^= 0x80;
            assert_eq!(
                activate_credential(
                    &ek,
                    protection.name_hash,
                    protection.aes_key_bits,
                    &name,
                    &tampered
                ),
                Err("integrity HMAC mismatch")
            );
        }
    }

    #[test]
    fn rsa_2048_ek_round_trip() {
        let key = rsa_ek().clone();
        let protection = EkProtection {
            key: EkKey::Rsa {
                modulus: key.n().to_bytes_be(),
                exponent: 65537,
            },
            name_hash: NameHash::Sha256,
            aes_key_bits: 128,
        };
        let made = make_credential(&protection, &ak_name(), b"x", &mut OsRng).unwrap();
        assert_eq!(made.encrypted_secret.len(), 256);
        // integrityHMAC (2 + 32) then the encrypted TPM2B (2 + 1).
        assert_eq!(made.id_object.len(), 2 + 32 + 2 + 1);
        round_trip(EkPrivate::Rsa(Box::new(key)), protection);
    }

    #[test]
    fn rsa_ek_with_sha384_name_alg_round_trip() {
        let key = rsa_ek().clone();
        let protection = EkProtection {
            key: EkKey::Rsa {
                modulus: key.n().to_bytes_be(),
                exponent: 0,
            },
            name_hash: NameHash::Sha384,
            aes_key_bits: 256,
        };
        round_trip(EkPrivate::Rsa(Box::new(key)), protection);
    }

    #[test]
    fn p256_ek_round_trip() {
        let key = p256::SecretKey::random(&mut OsRng);
        let protection = EkProtection {
            key: EkKey::P256(key.public_key()),
            name_hash: NameHash::Sha256,
            aes_key_bits: 128,
        };
        let made = make_credential(&protection, &ak_name(), b"x", &mut OsRng).unwrap();
        assert_eq!(made.encrypted_secret.len(), 2 + 32 + 2 + 32);
        round_trip(EkPrivate::P256(key), protection);
    }

    #[test]
    fn p384_ek_round_trip() {
        let key = p384::SecretKey::random(&mut OsRng);
        let protection = EkProtection {
            key: EkKey::P384(key.public_key()),
            name_hash: NameHash::Sha384,
            aes_key_bits: 256,
        };
        let made = make_credential(&protection, &ak_name(), b"x", &mut OsRng).unwrap();
        assert_eq!(made.encrypted_secret.len(), 2 + 48 + 2 + 48);
        assert_eq!(made.id_object.len(), 2 + 48 + 2 + 1);
        round_trip(EkPrivate::P384(key), protection);
    }

    #[test]
    fn refuses_bad_sizes_and_keys() {
        let p256_ek = EkProtection {
            key: EkKey::P256(p256::SecretKey::random(&mut OsRng).public_key()),
            name_hash: NameHash::Sha256,
            aes_key_bits: 128,
        };
        let name = ak_name();
        assert!(matches!(
            make_credential(&p256_ek, &name, &[], &mut OsRng),
            Err(CredentialError::CredentialSize { len: 0, max: 32 })
        ));
        assert!(matches!(
            make_credential(&p256_ek, &name, &[1; 33], &mut OsRng),
            Err(CredentialError::CredentialSize { len: 33, max: 32 })
        ));
        assert!(matches!(
            make_credential(&p256_ek, &[], b"x", &mut OsRng),
            Err(CredentialError::ObjectNameSize { len: 0 })
        ));
        assert!(matches!(
            make_credential(&p256_ek, &[0; 67], b"x", &mut OsRng),
            Err(CredentialError::ObjectNameSize { len: 67 })
        ));
        let aes_192 = EkProtection {
            aes_key_bits: 192,
            ..p256_ek.clone()
        };
        assert!(matches!(
            make_credential(&aes_192, &name, b"x", &mut OsRng),
            Err(CredentialError::UnsupportedSymmetricKey(192))
        ));

        let small_rsa = RsaPrivateKey::new(&mut OsRng, 1024).unwrap();
        let weak = EkProtection {
            key: EkKey::Rsa {
                modulus: small_rsa.n().to_bytes_be(),
                exponent: 65537,
            },
            ..p256_ek.clone()
        };
        assert!(matches!(
            make_credential(&weak, &name, b"x", &mut OsRng),
            Err(CredentialError::InvalidRsaKey(_))
        ));
        let zero_modulus = EkProtection {
            key: EkKey::Rsa {
                modulus: vec![],
                exponent: 65537,
            },
            ..p256_ek
        };
        assert!(matches!(
            make_credential(&zero_modulus, &name, b"x", &mut OsRng),
            Err(CredentialError::InvalidRsaKey(_))
        ));
    }
}
