//! TPM structures as a verifier meets them: bytes from an agent, parsed with
//! tss-esapi's unmarshalling. Names and signatures are computed over exactly
//! the bytes that arrived, and a structure is accepted only if it
//! re-marshals to those bytes, so two parties can never disagree about
//! what was signed or named.

use p256::ecdsa::signature::hazmat::PrehashVerifier;
use rsa::{BigUint, Pkcs1v15Sign, RsaPublicKey};
use sha2::{Digest, Sha256, Sha384};
use tss_esapi::attributes::ObjectAttributes;
use tss_esapi::constants::AlgorithmIdentifier;
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::AesKeyBits;
use tss_esapi::structures::{
    Attest, AttestInfo, EccParameter, EccSignature, Public, Signature, SymmetricDefinitionObject,
};
use tss_esapi::traits::{Marshall, UnMarshall};

use super::credential::{EkKey, EkProtection, NameHash};
use super::TpmAttestationError as Error;

/// `TPM_GENERATED_VALUE`: only the TPM puts this at the start of a
/// structure it signs, and a restricted key signs nothing that starts with
/// it unless the TPM made it.
const TPM_GENERATED_VALUE: [u8; 4] = [0xff, 0x54, 0x43, 0x47];
/// `TPM_ST_ATTEST_CERTIFY`.
const ATTEST_CERTIFY: [u8; 2] = [0x80, 0x17];

/// A `TPMT_PUBLIC` as received, with its parsed form.
#[derive(Clone, Debug)]
pub struct PublicArea {
    /// The marshalled `TPMT_PUBLIC`, without a `TPM2B` size.
    bytes: Vec<u8>,
    public: Public,
}

impl PublicArea {
    /// Accepts a `TPM2B_PUBLIC` (what tpm2-tools writes) or a bare
    /// `TPMT_PUBLIC` (what tss-esapi marshals). A size prefix is recognised
    /// only when it covers exactly the rest of the input.
    pub fn parse(bytes: &[u8], what: &'static str) -> Result<Self, Error> {
        let bytes = match bytes {
            [hi, lo, rest @ ..] if usize::from(u16::from_be_bytes([*hi, *lo])) == rest.len() => {
                rest
            }
            _ => bytes,
        };
        let public = Public::unmarshall(bytes).map_err(|_| Error::Malformed(what))?;
        let canonical = public.marshall().map_err(|_| Error::Malformed(what))?;
        if canonical != bytes {
            return Err(Error::Malformed(what));
        }
        Ok(Self {
            bytes: bytes.to_vec(),
            public,
        })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn attributes(&self) -> ObjectAttributes {
        self.public.object_attributes()
    }

    /// The object's name: nameAlg || H_nameAlg(TPMT_PUBLIC). SHA-1 names
    /// are refused: a collision would let one name stand for two keys.
    pub fn name(&self) -> Result<Vec<u8>, Error> {
        let hash = name_hash(self.public.name_hashing_algorithm())?;
        let alg: u16 = AlgorithmIdentifier::from(self.public.name_hashing_algorithm()).into();
        let mut name = alg.to_be_bytes().to_vec();
        name.extend(hash.digest(&self.bytes));
        Ok(name)
    }

    /// What MakeCredential needs to encrypt to this EK: its key, nameAlg
    /// and the AES key size of its symmetric definition.
    pub fn ek_protection(&self) -> Result<EkProtection, Error> {
        let attributes = self.attributes();
        if !(attributes.restricted() && attributes.decrypt() && !attributes.sign_encrypt()) {
            return Err(Error::EkUnsuitable("not a restricted decryption key"));
        }
        let name_hash = name_hash(self.public.name_hashing_algorithm())?;
        let (key, symmetric) = match &self.public {
            Public::Rsa {
                parameters, unique, ..
            } => {
                let exponent = match parameters.exponent().value() {
                    0 => 65_537,
                    e => e,
                };
                let key = EkKey::Rsa {
                    modulus: unique.value().to_vec(),
                    exponent,
                };
                (key, parameters.symmetric_definition_object())
            }
            Public::Ecc {
                parameters, unique, ..
            } => {
                let key = match parameters.ecc_curve() {
                    EccCurve::NistP256 => EkKey::P256(
                        p256::PublicKey::from_sec1_bytes(&uncompressed(
                            unique.x(),
                            unique.y(),
                            32,
                        )?)
                        .map_err(|_| Error::EkUnsuitable("EK point is not on P-256"))?,
                    ),
                    EccCurve::NistP384 => EkKey::P384(
                        p384::PublicKey::from_sec1_bytes(&uncompressed(
                            unique.x(),
                            unique.y(),
                            48,
                        )?)
                        .map_err(|_| Error::EkUnsuitable("EK point is not on P-384"))?,
                    ),
                    _ => return Err(Error::EkUnsuitable("EK curve is not P-256 or P-384")),
                };
                (key, parameters.symmetric_definition_object())
            }
            _ => return Err(Error::EkUnsuitable("EK is neither RSA nor ECC")),
        };
        let aes_key_bits = match symmetric {
            SymmetricDefinitionObject::Aes {
                key_bits: AesKeyBits::Aes128,
                ..
            } => 128,
            SymmetricDefinitionObject::Aes {
                key_bits: AesKeyBits::Aes256,
                ..
            } => 256,
            _ => {
                return Err(Error::EkUnsuitable(
                    "EK symmetric is not AES-128 or AES-256",
                ))
            }
        };
        Ok(EkProtection {
            key,
            name_hash,
            aes_key_bits,
        })
    }

    /// The AK as a verifier of attestations: a restricted signing key that
    /// cannot leave its TPM and was made there. A restricted key signs
    /// only digests the TPM computed itself, so its signature over a
    /// `TPMS_ATTEST` proves the TPM produced that structure.
    pub fn attestation_key(&self) -> Result<AttestationKey, Error> {
        let attributes = self.attributes();
        if !attributes.restricted() {
            return Err(Error::AkNotRestricted);
        }
        if !attributes.sign_encrypt() || attributes.decrypt() {
            return Err(Error::AkUnsuitable("not a signing-only key"));
        }
        if !(attributes.fixed_tpm() && attributes.fixed_parent()) {
            return Err(Error::AkUnsuitable(
                "duplicable (fixedTPM or fixedParent clear)",
            ));
        }
        if !attributes.sensitive_data_origin() {
            return Err(Error::AkUnsuitable("not generated in the TPM"));
        }
        match &self.public {
            Public::Ecc {
                parameters, unique, ..
            } => {
                match parameters.ecc_curve() {
                    EccCurve::NistP256 => p256::ecdsa::VerifyingKey::from_sec1_bytes(
                        &uncompressed(unique.x(), unique.y(), 32)?,
                    )
                    .map(AttestationKey::P256)
                    .map_err(|_| Error::AkUnsuitable("point is not on P-256")),
                    EccCurve::NistP384 => p384::ecdsa::VerifyingKey::from_sec1_bytes(
                        &uncompressed(unique.x(), unique.y(), 48)?,
                    )
                    .map(AttestationKey::P384)
                    .map_err(|_| Error::AkUnsuitable("point is not on P-384")),
                    _ => Err(Error::AkUnsuitable("curve is not P-256 or P-384")),
                }
            }
            Public::Rsa {
                parameters, unique, ..
            } => {
                let exponent = match parameters.exponent().value() {
                    0 => 65_537,
                    e => e,
                };
                RsaPublicKey::new(
                    BigUint::from_bytes_be(unique.value()),
                    BigUint::from(exponent),
                )
                .map(AttestationKey::Rsa)
                .map_err(|_| Error::AkUnsuitable("not a usable RSA key"))
            }
            _ => Err(Error::AkUnsuitable("neither RSA nor ECC")),
        }
    }

    /// The key keyward will certify: a P-256 signing key that can never
    /// leave this TPM and was generated inside it.
    pub fn certifiable_key(&self) -> Result<p256::PublicKey, Error> {
        let attributes = self.attributes();
        if !(attributes.fixed_tpm() && attributes.fixed_parent()) {
            return Err(Error::KeyDuplicable);
        }
        if !attributes.sensitive_data_origin() {
            return Err(Error::KeyNotTpmGenerated);
        }
        if !attributes.sign_encrypt() || attributes.decrypt() || attributes.restricted() {
            return Err(Error::KeyNotSignOnly);
        }
        match &self.public {
            Public::Ecc {
                parameters, unique, ..
            } if parameters.ecc_curve() == EccCurve::NistP256 => {
                p256::PublicKey::from_sec1_bytes(&uncompressed(unique.x(), unique.y(), 32)?)
                    .map_err(|_| Error::Malformed("key point is not on P-256"))
            }
            _ => Err(Error::KeyUnsupported),
        }
    }
}

fn name_hash(alg: HashingAlgorithm) -> Result<NameHash, Error> {
    match alg {
        HashingAlgorithm::Sha256 => Ok(NameHash::Sha256),
        HashingAlgorithm::Sha384 => Ok(NameHash::Sha384),
        _ => Err(Error::UnsupportedNameAlg),
    }
}

/// SEC1 uncompressed point from TPM coordinates, which may arrive without
/// their leading zero bytes.
fn uncompressed(x: &EccParameter, y: &EccParameter, len: usize) -> Result<Vec<u8>, Error> {
    let mut point = vec![0x04];
    for coordinate in [x.value(), y.value()] {
        if coordinate.len() > len {
            return Err(Error::Malformed("EC coordinate longer than the curve"));
        }
        point.extend(std::iter::repeat_n(0, len - coordinate.len()));
        point.extend_from_slice(coordinate);
    }
    Ok(point)
}

/// An attestation key's public key, ready to check `TPMT_SIGNATURE`s.
#[derive(Clone, Debug)]
pub enum AttestationKey {
    P256(p256::ecdsa::VerifyingKey),
    P384(p384::ecdsa::VerifyingKey),
    Rsa(RsaPublicKey),
}

impl AttestationKey {
    /// Checks `signature` over `message` (the TPM hashes the message with
    /// the signature's hash algorithm; SHA-256 and SHA-384 are accepted).
    pub fn verify(&self, message: &[u8], signature: &Signature) -> Result<(), Error> {
        let digest = |alg: HashingAlgorithm| -> Result<Vec<u8>, Error> {
            match alg {
                HashingAlgorithm::Sha256 => Ok(Sha256::digest(message).to_vec()),
                HashingAlgorithm::Sha384 => Ok(Sha384::digest(message).to_vec()),
                _ => Err(Error::SignatureInvalid),
            }
        };
        let sig_hash = match signature {
            Signature::EcDsa(sig) => sig.hashing_algorithm(),
            _ => HashingAlgorithm::Null,
        };
        let valid = match (self, signature) {
            (AttestationKey::P256(key), Signature::EcDsa(sig)) => {
                let sig = p256::ecdsa::Signature::from_slice(&ecdsa_r_s(sig, 32)?)
                    .map_err(|_| Error::SignatureInvalid)?;
                key.verify_prehash(&digest(sig_hash)?, &sig).is_ok()
            }
            (AttestationKey::P384(key), Signature::EcDsa(sig)) => {
                let sig = p384::ecdsa::Signature::from_slice(&ecdsa_r_s(sig, 48)?)
                    .map_err(|_| Error::SignatureInvalid)?;
                key.verify_prehash(&digest(sig_hash)?, &sig).is_ok()
            }
            (AttestationKey::Rsa(key), Signature::RsaSsa(sig)) => {
                let hashed = digest(sig.hashing_algorithm())?;
                let scheme = match sig.hashing_algorithm() {
                    HashingAlgorithm::Sha256 => Pkcs1v15Sign::new::<Sha256>(),
                    _ => Pkcs1v15Sign::new::<Sha384>(),
                };
                key.verify(scheme, &hashed, sig.signature().value()).is_ok()
            }
            _ => false,
        };
        if valid {
            Ok(())
        } else {
            Err(Error::SignatureInvalid)
        }
    }
}

/// r || s, each left-padded to the curve's length (the TPM strips leading
/// zero bytes).
fn ecdsa_r_s(sig: &EccSignature, len: usize) -> Result<Vec<u8>, Error> {
    let mut out = Vec::with_capacity(2 * len);
    for scalar in [sig.signature_r().value(), sig.signature_s().value()] {
        let pad = len
            .checked_sub(scalar.len())
            .ok_or(Error::SignatureInvalid)?;
        out.extend(std::iter::repeat_n(0, pad));
        out.extend_from_slice(scalar);
    }
    Ok(out)
}

/// A TPM2_Certify result as received: the new key's public area, the
/// `TPMS_ATTEST` the AK signed, and the AK's `TPMT_SIGNATURE`.
#[derive(Clone, Debug)]
pub struct CertifyEvidence {
    pub public: Vec<u8>,
    pub attest: Vec<u8>,
    pub signature: Vec<u8>,
}

/// Certify evidence that parsed, not yet checked against a challenge.
#[derive(Clone, Debug)]
pub struct ParsedCertify {
    pub key: PublicArea,
    attest_bytes: Vec<u8>,
    attest: Attest,
    signature_bytes: Vec<u8>,
    signature: Signature,
}

impl CertifyEvidence {
    pub fn parse(&self) -> Result<ParsedCertify, Error> {
        let key = PublicArea::parse(&self.public, "key public area")?;
        // A TPM2B_ATTEST is accepted as well as the bare TPMS_ATTEST.
        let attest_bytes = match self.attest.as_slice() {
            [hi, lo, rest @ ..]
                if usize::from(u16::from_be_bytes([*hi, *lo])) == rest.len()
                    && rest.starts_with(&TPM_GENERATED_VALUE) =>
            {
                rest
            }
            all => all,
        };
        // Checked on the bytes, before parsing, so each has its own answer.
        if !attest_bytes.starts_with(&TPM_GENERATED_VALUE) {
            return Err(Error::AttestNotTpmGenerated);
        }
        if attest_bytes.get(4..6) != Some(&ATTEST_CERTIFY[..]) {
            return Err(Error::AttestWrongType);
        }
        let attest =
            Attest::unmarshall(attest_bytes).map_err(|_| Error::Malformed("certify info"))?;
        if attest.marshall().ok().as_deref() != Some(attest_bytes) {
            return Err(Error::Malformed("certify info"));
        }
        let signature = Signature::unmarshall(&self.signature)
            .map_err(|_| Error::Malformed("certify signature"))?;
        if signature.marshall().ok().as_deref() != Some(self.signature.as_slice()) {
            return Err(Error::Malformed("certify signature"));
        }
        Ok(ParsedCertify {
            key,
            attest_bytes: attest_bytes.to_vec(),
            attest,
            signature_bytes: self.signature.clone(),
            signature,
        })
    }
}

impl ParsedCertify {
    /// The qualifying data the TPM put in the attestation: keyward's nonce,
    /// if the evidence is fresh.
    pub fn qualifying_data(&self) -> &[u8] {
        self.attest.extra_data().value()
    }

    pub fn attest_bytes(&self) -> &[u8] {
        &self.attest_bytes
    }

    pub fn signature_bytes(&self) -> &[u8] {
        &self.signature_bytes
    }

    /// Checks the AK's signature, that the certified object is this key,
    /// and that the key is one keyward certifies. The nonce is the
    /// caller's to check against its challenge.
    pub fn verify(&self, ak: &PublicArea) -> Result<p256::PublicKey, Error> {
        ak.attestation_key()?
            .verify(&self.attest_bytes, &self.signature)?;
        let AttestInfo::Certify { info } = self.attest.attested() else {
            return Err(Error::AttestWrongType);
        };
        if info.name().value() != self.key.name()?.as_slice() {
            return Err(Error::NameMismatch);
        }
        self.key.certifiable_key()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn signing_key_public() -> Vec<u8> {
        crate::keys::tpm::signing_key_template()
            .unwrap()
            .marshall()
            .unwrap()
    }

    #[test]
    fn a_public_area_is_accepted_with_or_without_its_size_prefix_and_named_over_its_bytes() {
        let bare = signing_key_public();
        let mut prefixed = (bare.len() as u16).to_be_bytes().to_vec();
        prefixed.extend(&bare);
        let a = PublicArea::parse(&bare, "key").unwrap();
        let b = PublicArea::parse(&prefixed, "key").unwrap();
        assert_eq!(a.bytes(), b.bytes());
        let name = a.name().unwrap();
        assert_eq!(&name[..2], &[0x00, 0x0b], "nameAlg SHA-256");
        assert_eq!(name[2..], Sha256::digest(&bare)[..]);
    }

    #[test]
    fn trailing_bytes_make_a_public_area_malformed() {
        let mut bytes = signing_key_public();
        bytes.push(0);
        assert!(matches!(
            PublicArea::parse(&bytes, "key"),
            Err(Error::Malformed("key"))
        ));
    }

    #[test]
    fn a_signing_key_is_neither_an_attestation_key_nor_an_ek() {
        let area = PublicArea::parse(&signing_key_public(), "key").unwrap();
        // The template's unique point is empty: not on the curve.
        assert!(matches!(area.certifiable_key(), Err(Error::Malformed(_))));
        assert!(matches!(
            area.attestation_key(),
            Err(Error::AkNotRestricted)
        ));
        assert!(matches!(area.ek_protection(), Err(Error::EkUnsuitable(_))));
    }

    /// Random and mutated inputs: every one is refused or accepted, none
    /// panics.
    #[test]
    fn garbage_and_mutated_structures_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let valid = signing_key_public();
        for round in 0..3000 {
            let mut bytes = if round % 2 == 0 {
                let len = rng.gen_range(0..200);
                (0..len).map(|_| rng.gen()).collect::<Vec<u8>>()
            } else {
                valid.clone()
            };
            if !bytes.is_empty() {
                for _ in 0..rng.gen_range(1..4) {
                    let i = rng.gen_range(0..bytes.len());
                    bytes[i] = rng.gen();
                }
            }
            if let Ok(area) = PublicArea::parse(&bytes, "key") {
                let _ = area.name();
                let _ = area.certifiable_key();
                let _ = area.attestation_key();
                let _ = area.ek_protection();
            }
            let mut attest = TPM_GENERATED_VALUE.to_vec();
            attest.extend(ATTEST_CERTIFY);
            attest.extend(&bytes);
            let evidence = CertifyEvidence {
                public: bytes.clone(),
                attest,
                signature: bytes.clone(),
            };
            let _ = evidence.parse();
        }
    }
}
