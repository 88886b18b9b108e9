//! The agent's side of TPM-attested enrollment (`keyward agent enroll
//! --tpm`): everything runs against the agent's own TPM through one ESAPI
//! context, and no private key ever exists outside it.
//!
//! 1. The EK (the TCG RSA-2048 template; its certificate is in NV at
//!    0x01c00002, put there by the manufacturer) and an AK created under
//!    it are sent to keyward, which answers with a credential encrypted to
//!    the EK and bound to the AK's name, and a nonce.
//! 2. TPM2_ActivateCredential recovers the secret: only the TPM holding
//!    both keys can.
//! 3. A P-256 signing key is created under the owner storage primary (the
//!    template keyward's own TPM backend uses, so the key's blobs load in
//!    `keys::tpm`), and the AK certifies it with the nonce as qualifying
//!    data.
//! 4. keyward verifies and issues the certificate.
//!
//! A TPM without a resource manager has about three transient slots, so
//! objects are flushed as soon as they are no longer needed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};

use crate::client::credential::post;
use tss_esapi::abstraction::ak::{create_ak, load_ak};
use tss_esapi::abstraction::ek::{create_ek_object, retrieve_ek_pubcert};
use tss_esapi::abstraction::{AsymmetricAlgorithmSelection, DefaultKey};
use tss_esapi::attributes::SessionAttributesBuilder;
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{KeyHandle, ObjectHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::{
    AsymmetricAlgorithm, HashingAlgorithm, SignatureSchemeAlgorithm,
};
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Data, EncryptedSecret, IdObject, Private, Public, SignatureScheme, SymmetricDefinition,
};
use tss_esapi::traits::Marshall;
use tss_esapi::Context;

use crate::attestation::tpm::evidence::CertifyEvidence;
use crate::keys::KeyId;

/// The agent's TPM with its EK and AK loaded.
pub struct AgentTpm {
    ctx: Context,
    ek: Option<KeyHandle>,
    /// A persistent EK takes no transient slot and must not be flushed.
    ek_persistent: bool,
    ek_public: Public,
    ek_certificate_der: Option<Vec<u8>>,
    ak: KeyHandle,
    ak_public: Public,
}

/// A key created in the agent's TPM, with its blobs on disk. It is loaded
/// only for the command that needs it: the TPM has few object slots.
#[derive(Clone)]
pub struct AgentTpmKey {
    pub key_id: KeyId,
    pub public: Public,
    private: Private,
}

impl AgentTpm {
    /// Connects, re-derives the EK, reads its certificate, and creates and
    /// loads a fresh AK under it.
    pub fn open(tcti: &str) -> anyhow::Result<Self> {
        let mut ctx = crate::keys::tcti::open_context(tcti)
            .with_context(|| format!("connecting to the TPM {tcti}"))?;
        // A TPM without an EK certificate can still enroll if keyward's
        // operator allow-listed its EK (`ek_fingerprint`).
        let ek_certificate_der = retrieve_ek_pubcert(
            &mut ctx,
            AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
        )
        .ok();
        let persistent = ek_certificate_der
            .as_deref()
            .and_then(|der| persistent_ek(&mut ctx, der));
        let (ek, ek_public, ek_persistent) = match persistent {
            Some((ek, public)) => (ek, public, true),
            None => {
                let (ek, public) = template_ek(&mut ctx)?;
                (ek, public, false)
            }
        };
        let ak = create_ak(
            &mut ctx,
            ek,
            HashingAlgorithm::Sha256,
            SignatureSchemeAlgorithm::EcDsa,
            None,
            DefaultKey,
        )
        .context("creating the AK")?;
        let ak_public = ak.out_public.clone();
        let ak =
            load_ak(&mut ctx, ek, None, ak.out_private, ak.out_public).context("loading the AK")?;
        Ok(Self {
            ctx,
            ek: Some(ek),
            ek_persistent,
            ek_public,
            ek_certificate_der,
            ak,
            ak_public,
        })
    }

    /// The EK certificate from NV 0x01c00002, if the TPM has one.
    pub fn ek_certificate_der(&self) -> Option<&[u8]> {
        self.ek_certificate_der.as_deref()
    }

    pub fn ek_public(&self) -> anyhow::Result<Vec<u8>> {
        Ok(self.ek_public.marshall()?)
    }

    pub fn ak_public(&self) -> anyhow::Result<Vec<u8>> {
        Ok(self.ak_public.marshall()?)
    }

    /// TPM2_ActivateCredential: the secret keyward encrypted to the EK for
    /// this AK. The EK's authorization is its TCG policy (PolicySecret
    /// with the endorsement hierarchy), so it needs a policy session.
    pub fn activate_credential(
        &mut self,
        id_object: &[u8],
        encrypted_secret: &[u8],
    ) -> anyhow::Result<Vec<u8>> {
        let ek = self.ek.context("the credential was activated already")?;
        let id_object = IdObject::try_from(id_object.to_vec()).context("credential blob")?;
        let encrypted_secret =
            EncryptedSecret::try_from(encrypted_secret.to_vec()).context("encrypted secret")?;
        let (attributes, mask) = SessionAttributesBuilder::new()
            .with_decrypt(true)
            .with_encrypt(true)
            .build();
        let policy = self
            .ctx
            .start_auth_session(
                None,
                None,
                None,
                SessionType::Policy,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )?
            .context("no policy session")?;
        self.ctx.tr_sess_set_attributes(policy, attributes, mask)?;
        let result = (|| -> anyhow::Result<Vec<u8>> {
            self.ctx.execute_with_nullauth_session(|ctx| {
                ctx.policy_secret(
                    PolicySession::try_from(policy)?,
                    tss_esapi::handles::AuthHandle::Endorsement,
                    Default::default(),
                    Default::default(),
                    Default::default(),
                    None,
                )
            })?;
            let secret = self.ctx.execute_with_sessions(
                (Some(AuthSession::Password), Some(policy), None),
                |ctx| ctx.activate_credential(self.ak, ek, id_object, encrypted_secret),
            )?;
            Ok(secret.value().to_vec())
        })();
        let _ = self
            .ctx
            .flush_context(ObjectHandle::from(SessionHandle::from(policy)));
        // The EK's work is done; its slot is needed for the key.
        self.release_ek();
        result.context("TPM2_ActivateCredential")
    }

    /// Creates a key from `template` under the owner storage primary and
    /// writes its blobs to `key_dir` (`<id>.pub`, `<id>.priv`, the format
    /// of `keys::tpm`, so keyward's TPM backend can sign with it).
    pub fn create_key(&mut self, key_dir: &Path, template: Public) -> anyhow::Result<AgentTpmKey> {
        std::fs::create_dir_all(key_dir)
            .with_context(|| format!("creating {}", key_dir.display()))?;
        let created = self.with_primary(|ctx, primary| {
            ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.create(primary, template, None, None, None, None)
            })
            .context("creating the key")
        })?;
        let key_id = KeyId::random("agent");
        crate::keys::tpm::write_key_blobs(
            key_dir,
            &key_id,
            &created.out_public,
            &created.out_private,
        )?;
        Ok(AgentTpmKey {
            key_id,
            public: created.out_public,
            private: created.out_private,
        })
    }

    /// Runs `f` with the owner storage primary loaded, then flushes it.
    fn with_primary<T>(
        &mut self,
        f: impl FnOnce(&mut Context, KeyHandle) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let primary = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.create_primary(
                    Hierarchy::Owner,
                    crate::keys::tpm::primary_template()?,
                    None,
                    None,
                    None,
                    None,
                )
            })
            .context("creating the storage primary")?
            .key_handle;
        let result = f(&mut self.ctx, primary);
        let _ = self.ctx.flush_context(primary.into());
        result
    }

    /// Runs `f` with `key` loaded, then flushes it.
    fn with_key<T>(
        &mut self,
        key: &AgentTpmKey,
        f: impl FnOnce(&mut Context, KeyHandle, KeyHandle) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let (private, public) = (key.private.clone(), key.public.clone());
        let handle = self.with_primary(|ctx, primary| {
            ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.load(primary, private, public)
            })
            .context("loading the key")
        })?;
        let ak = self.ak;
        let result = f(&mut self.ctx, handle, ak);
        let _ = self.ctx.flush_context(handle.into());
        result
    }

    /// TPM2_Certify of `key` by the AK, with `qualifying_data` (keyward's
    /// nonce) in the signed structure.
    pub fn certify(
        &mut self,
        key: &AgentTpmKey,
        qualifying_data: &[u8],
    ) -> anyhow::Result<CertifyEvidence> {
        let (attest, signature) = self.with_key(key, |ctx, handle, ak| {
            certify_object(ctx, handle.into(), ak, qualifying_data)
        })?;
        Ok(CertifyEvidence {
            public: key.public.marshall()?,
            attest,
            signature,
        })
    }

    /// Signs a SHA-256 digest with `key` (a CSR's self-signature).
    pub fn sign_digest(
        &mut self,
        key: &AgentTpmKey,
        digest: &[u8; 32],
    ) -> anyhow::Result<p256::ecdsa::Signature> {
        self.with_key(key, |ctx, handle, _| {
            Ok(crate::keys::tpm::sign_digest_with(ctx, handle, digest)?)
        })
    }
}

/// TPM2_Certify of a loaded `object` by the loaded attestation key `ak`,
/// both with empty authorization: the marshalled `TPMS_ATTEST` and
/// `TPMT_SIGNATURE`.
pub fn certify_object(
    ctx: &mut Context,
    object: ObjectHandle,
    ak: KeyHandle,
    qualifying_data: &[u8],
) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let data = Data::try_from(qualifying_data.to_vec()).context("qualifying data")?;
    let (attest, signature) = ctx
        .execute_with_sessions(
            (
                Some(AuthSession::Password),
                Some(AuthSession::Password),
                None,
            ),
            |ctx| ctx.certify(object, ak, data, SignatureScheme::Null),
        )
        .context("TPM2_Certify")?;
    Ok((attest.marshall()?, signature.marshall()?))
}

impl AgentTpm {
    fn release_ek(&mut self) {
        if let Some(ek) = self.ek.take() {
            if !self.ek_persistent {
                let _ = self.ctx.flush_context(ek.into());
            }
        }
    }
}

impl Drop for AgentTpm {
    fn drop(&mut self) {
        self.release_ek();
        let _ = self.ctx.flush_context(self.ak.into());
    }
}

/// The RSA EK from the TCG template (EK Credential Profile, L-1): the TPM
/// derives the same key from its endorsement seed every time.
fn template_ek(ctx: &mut Context) -> anyhow::Result<(KeyHandle, Public)> {
    let ek =
        create_ek_object(ctx, AsymmetricAlgorithm::Rsa, DefaultKey).context("creating the EK")?;
    let (public, _, _) = ctx.read_public(ek).context("reading the EK")?;
    Ok((ek, public))
}

/// What keyward's `[attestation.tpm] ek_allowlist` holds for this TPM: the
/// SHA-256 of its RSA EK's public key (SubjectPublicKeyInfo DER), hex.
pub fn ek_fingerprint(tcti: &str) -> anyhow::Result<String> {
    let mut ctx = crate::keys::tcti::open_context(tcti)
        .with_context(|| format!("connecting to the TPM {tcti}"))?;
    let (ek, public) = template_ek(&mut ctx)?;
    let _ = ctx.flush_context(ek.into());
    let key = crate::attestation::tpm::evidence::PublicArea::parse(&public.marshall()?, "EK")?
        .ek_protection()?
        .key;
    let digest = crate::attestation::tpm::allowlist::ek_public_key_sha256(&key)
        .context("the EK has no SubjectPublicKeyInfo form")?;
    Ok(hex::encode(digest))
}

/// The TCG's persistent RSA EK handle (TCG EK Credential Profile). Many
/// TPMs are provisioned with the EK there; using it saves an RSA key
/// derivation and a transient slot.
const PERSISTENT_RSA_EK: u32 = 0x8101_0001;

/// The EK at its persistent handle, if there is one and it is the key the
/// EK certificate certifies.
fn persistent_ek(ctx: &mut Context, ek_certificate_der: &[u8]) -> Option<(KeyHandle, Public)> {
    use der::Decode;
    use tss_esapi::handles::{PersistentTpmHandle, TpmHandle};
    let handle = PersistentTpmHandle::new(PERSISTENT_RSA_EK).ok()?;
    let object = ctx
        .execute_without_session(|ctx| ctx.tr_from_tpm_public(TpmHandle::Persistent(handle)))
        .ok()?;
    let ek = KeyHandle::from(object);
    let (public, _, _) = ctx.read_public(ek).ok()?;
    let key = crate::attestation::tpm::evidence::PublicArea::parse(&public.marshall().ok()?, "EK")
        .ok()?
        .ek_protection()
        .ok()?
        .key;
    let der = crate::attestation::tpm::ek::without_nv_padding(ek_certificate_der).ok()?;
    let certificate = x509_cert::Certificate::from_der(der).ok()?;
    crate::attestation::tpm::ek::ek_certificate_key_matches(&certificate, &key)
        .then_some((ek, public))
}

/// The P-256 signing key keyward certifies: non-duplicable, made in the
/// TPM, sign-only.
pub fn signing_key_template() -> anyhow::Result<Public> {
    Ok(crate::keys::tpm::signing_key_template()?)
}

/// Where to reach keyward and where to write the result.
pub struct EnrollOptions {
    pub url: String,
    pub ca_file: Option<PathBuf>,
    pub tcti: String,
    pub token: String,
    pub out: PathBuf,
    pub ttl_seconds: Option<u64>,
}

fn http_client(ca_file: Option<&Path>) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(ca_file.is_none())
        .timeout(Duration::from_secs(30));
    if let Some(ca_file) = ca_file {
        let ca =
            std::fs::read(ca_file).with_context(|| format!("reading {}", ca_file.display()))?;
        for cert in reqwest::Certificate::from_pem_bundle(&ca)? {
            builder = builder.add_root_certificate(cert);
        }
    }
    Ok(builder.build()?)
}

fn field(value: &Value, name: &str) -> anyhow::Result<Vec<u8>> {
    let text = value[name]
        .as_str()
        .with_context(|| format!("keyward's answer has no {name}"))?;
    Ok(B64.decode(text)?)
}

/// The whole flow against the agent's TPM. Writes `cert.pem` and
/// `chain.pem` to `options.out`, the key's TPM blobs to
/// `options.out/tpm-keys`, and `tpm-key.json` naming them.
pub async fn enroll(options: &EnrollOptions) -> anyhow::Result<Value> {
    let client = http_client(options.ca_file.as_deref())?;
    let mut tpm = AgentTpm::open(&options.tcti)?;
    let challenge = post(
        &client,
        format!("{}/v1/attestation/challenges", options.url),
        json!({
            "enrollment_token": options.token,
            "ek_certificate_b64": tpm.ek_certificate_der().map(|der| B64.encode(der)),
            "ek_public_b64": B64.encode(tpm.ek_public()?),
            "ak_public_b64": B64.encode(tpm.ak_public()?),
        }),
    )
    .await
    .context("asking keyward for a challenge")?;
    let secret = tpm.activate_credential(
        &field(&challenge, "credential_blob_b64")?,
        &field(&challenge, "encrypted_secret_b64")?,
    )?;
    let key_dir = options.out.join("tpm-keys");
    let key = tpm.create_key(&key_dir, signing_key_template()?)?;
    let evidence = tpm.certify(&key, &field(&challenge, "nonce_b64")?)?;
    let issued = post(
        &client,
        format!("{}/v1/attestation/tpm/certificates", options.url),
        json!({
            "enrollment_token": options.token,
            "credential_b64": B64.encode(&secret),
            "public_b64": B64.encode(&evidence.public),
            "certify_info_b64": B64.encode(&evidence.attest),
            "signature_b64": B64.encode(&evidence.signature),
            "ttl_seconds": options.ttl_seconds,
        }),
    )
    .await
    .context("presenting the evidence to keyward")?;
    let key_id = key.key_id.clone();
    let text = |name: &str| -> anyhow::Result<String> {
        Ok(issued[name]
            .as_str()
            .with_context(|| format!("keyward's answer has no {name}"))?
            .to_owned())
    };
    std::fs::write(options.out.join("cert.pem"), text("certificate_pem")?)?;
    std::fs::write(options.out.join("chain.pem"), text("chain_pem")?)?;
    let description = json!({
        "tcti": options.tcti,
        "key_dir": key_dir,
        "key_id": key_id.to_string(),
        "certificate_serial": issued["serial"],
        "attestation": issued["attestation"],
    });
    std::fs::write(
        options.out.join("tpm-key.json"),
        serde_json::to_vec_pretty(&description)?,
    )?;
    Ok(issued)
}
