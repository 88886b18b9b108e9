//! keyward's certificate authority: certificate profiles, CSR checks and
//! issuance. Every certificate is signed by the CA key on the token, through
//! the pool; the certificate row and its audit event are written in one
//! transaction before the certificate is handed out.

pub mod cert;
pub mod crl;
pub mod csr;
pub mod ocsp;
pub mod path;
pub mod profile;
pub mod responder;
pub mod status;
pub mod verify;

use std::time::{Duration, SystemTime};

use der::{Decode, Encode, EncodePem};
use p256::PublicKey;
use sha2::{Digest, Sha256};

use crate::audit::AuditEvent;
use crate::identity::{AgentName, TrustDomain};
use crate::keys::KeyId;
use crate::pool::{KeyPool, PoolError};
use crate::store::{
    AttestationRecord, CaRecord, CertificateInsert, CertificateLog, CertificateRecord,
    NewCertificate, StoreError,
};
use crate::telemetry::traces;
pub use cert::{parse_pem_chain, Certificate, CertificateText};
use profile::{AgentKeyPurpose, IssuerKey, Kind, TbsRequest};
use tracing::Instrument as _;
use x509_cert::builder::Builder;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    #[error("invalid CSR: {0}")]
    InvalidCsr(String),
    #[error("the CSR's signature does not verify with its own key")]
    CsrSignature,
    #[error("unsupported key: {0} (only P-256 is accepted)")]
    UnsupportedKey(String),
    #[error("ttl_seconds must be between 1 and {max}")]
    TtlOutOfRange { max: u64 },
    #[error("the CA certificate does not match the CA key on the token")]
    CaKeyMismatch,
    /// The agent was revoked or suspended before its certificate could be
    /// recorded; the certificate was never handed out.
    #[error("agent {agent} is {status}")]
    AgentNotActive { agent: String, status: String },
    /// The key was reported compromised (keyCompromise): never certified.
    #[error("the key was reported compromised: keyward certifies it no more")]
    KeyCompromised,
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("encoding: {0}")]
    Der(#[from] der::Error),
    #[error("{0}")]
    Internal(String),
}

impl From<x509_cert::builder::Error> for CaError {
    fn from(e: x509_cert::builder::Error) -> Self {
        match e {
            x509_cert::builder::Error::Asn1(e) => CaError::Der(e),
            other => CaError::Internal(format!("building a certificate: {other}")),
        }
    }
}

/// Lifetime limits for agent certificates.
#[derive(Clone, Copy, Debug)]
pub struct TtlLimits {
    pub default: Duration,
    pub max: Duration,
}

impl Default for TtlLimits {
    fn default() -> Self {
        Self {
            default: Duration::from_secs(900),
            max: Duration::from_secs(3600),
        }
    }
}

impl TtlLimits {
    /// `None` means the default. Zero or above the maximum is an error, not
    /// a silent clamp: a caller asking for more than it may have should know.
    pub fn resolve(&self, requested: Option<u64>) -> Result<Duration, CaError> {
        match requested {
            None => Ok(self.default),
            Some(secs) if secs == 0 || secs > self.max.as_secs() => Err(CaError::TtlOutOfRange {
                max: self.max.as_secs(),
            }),
            Some(secs) => Ok(Duration::from_secs(secs)),
        }
    }
}

/// An issued certificate, as handed to the caller.
#[derive(Clone, Debug)]
pub struct IssuedCertificate {
    pub serial: String,
    pub der: Vec<u8>,
    pub pem: String,
    pub not_before: i64,
    pub not_after: i64,
}

/// What an agent certificate is for.
pub struct AgentCertificateRequest<'a> {
    pub agent: &'a AgentName,
    /// The custodial key on the token, if the key is keyward's.
    pub key_id: Option<&'a KeyId>,
    pub subject_key: &'a PublicKey,
    pub ttl: Duration,
    /// DER of the attestation extension, if the key is attested.
    pub claims: Option<Vec<u8>>,
    pub attestation_digest: Option<String>,
    /// Evidence not stored yet, written in the certificate's transaction.
    pub new_evidence: Option<&'a AttestationRecord>,
    pub policy_version: i64,
}

/// The issuing CA: its key on the token, its certificate and chain.
pub struct Authority {
    pool: KeyPool,
    certificates: CertificateLog,
    key: KeyId,
    public_key: PublicKey,
    certificate: Certificate,
    /// PEM chain from the issuing certificate up to the root, root last.
    chain_pem: String,
    /// `chain_pem`, decoded.
    chain: Vec<Certificate>,
    trust_domain: TrustDomain,
    ttl: TtlLimits,
    /// Base URL for the CRL and OCSP pointers in issued certificates.
    public_url: Option<String>,
    /// CAs that were active before this one and may still have valid
    /// certificates out there (CA rotation's overlap).
    previous: Vec<PreviousCa>,
}

/// An issuing CA replaced by a rotation: it still validates, and answers
/// OCSP for, what it issued, but issues nothing more.
pub struct PreviousCa {
    pub key: KeyId,
    pub certificate: Certificate,
    /// Its chain, issuing certificate first, root last.
    pub chain: Vec<Certificate>,
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Finalizes a drafted certificate, signs its TBSCertificate with `key`
/// through the pool, and assembles it.
async fn sign_and_assemble(
    pool: &KeyPool,
    key: &KeyId,
    mut draft: profile::Draft<'_>,
) -> Result<Certificate, CaError> {
    let digest: [u8; 32] = Sha256::digest(draft.finalize()?).into();
    let signature = pool
        .sign(key, digest)
        .instrument(tracing::debug_span!(target: traces::TARGET, "pool sign"))
        .await?;
    Ok(draft.assemble(profile::signature_bits(signature.to_der().as_bytes())?)?)
}

impl Authority {
    /// Loads the active CA from the store and checks its key is on the
    /// token. Issued certificates are recorded through `certificates`.
    pub async fn load(
        pool: KeyPool,
        certificates: CertificateLog,
        record: &CaRecord,
        trust_domain: TrustDomain,
        ttl: TtlLimits,
    ) -> Result<Self, CaError> {
        let key = KeyId::parse(&record.key_id)
            .map_err(|_| CaError::Internal("stored CA key id is malformed".into()))?;
        let certificate = Certificate::from_der(&record.cert_der)?;
        let public_key = pool.public_key(&key).await?;
        let cert_key = profile::p256_key_of(&certificate.tbs_certificate.subject_public_key_info)?;
        if cert_key != public_key {
            return Err(CaError::CaKeyMismatch);
        }
        let chain = parse_pem_chain(&record.chain_pem)?;
        if chain.is_empty() {
            return Err(CaError::Internal("empty CA chain".into()));
        }
        Ok(Self {
            pool,
            certificates,
            key,
            public_key,
            certificate,
            chain_pem: record.chain_pem.clone(),
            chain,
            trust_domain,
            ttl,
            public_url: None,
            previous: Vec::new(),
        })
    }

    /// Generates a CA key on the token and a self-signed root certificate.
    pub async fn create_root(pool: &KeyPool, validity: Duration) -> Result<CaRecord, CaError> {
        let key = KeyId::random("ca");
        let public_key = pool.generate(&key).await?;
        let suffix: [u8; 4] = rand::random();
        let name = profile::common_name(&format!("keyward CA {}", hex::encode(suffix)))?;
        let now = SystemTime::now();
        let issuer_key = IssuerKey::new(&public_key);
        let draft = profile::draft(TbsRequest {
            kind: Kind::RootCa,
            subject: name.clone(),
            subject_key: &public_key,
            issuer: name,
            issuer_key: &issuer_key,
            not_before: now - profile::BACKDATE,
            not_after: now + validity,
            public_url: None,
        })?;
        let cert = sign_and_assemble(pool, &key, draft).await?;
        Ok(CaRecord {
            key_id: key.to_string(),
            cert_der: cert.to_der()?,
            chain_pem: cert.to_pem_string()?,
            created_at: unix(now),
        })
    }

    /// Signs a digest with the CA key (CRLs, OCSP responses).
    pub async fn sign_digest(&self, digest: [u8; 32]) -> Result<p256::ecdsa::Signature, CaError> {
        Ok(self.pool.sign(&self.key, digest).await?)
    }

    /// Adds the CAs this one replaced, after checking each key is still on
    /// the token (it signs their OCSP answers).
    pub async fn with_previous(mut self, records: &[CaRecord]) -> Result<Self, CaError> {
        for record in records {
            let key = KeyId::parse(&record.key_id)
                .map_err(|_| CaError::Internal("stored CA key id is malformed".into()))?;
            let certificate = Certificate::from_der(&record.cert_der)?;
            let on_token = self.pool.public_key(&key).await?;
            if profile::p256_key_of(&certificate.tbs_certificate.subject_public_key_info)?
                != on_token
            {
                return Err(CaError::CaKeyMismatch);
            }
            let chain = parse_pem_chain(&record.chain_pem)?;
            self.previous.push(PreviousCa {
                key,
                certificate,
                chain,
            });
        }
        Ok(self)
    }

    pub fn previous(&self) -> &[PreviousCa] {
        &self.previous
    }

    /// The CA (active or previous) whose key identifier, in hex, is
    /// `identifier`: the last segment of its CRL's URL.
    pub fn ca_identified_by(&self, identifier: &str) -> Option<(&Certificate, &KeyId)> {
        self.issuer_matching(|certificate| {
            profile::p256_key_of(&certificate.tbs_certificate.subject_public_key_info)
                .is_ok_and(|key| hex::encode(profile::key_identifier(&key)) == identifier)
        })
    }

    /// Every root a relying party should trust now: the active CA's and,
    /// during a rotation's overlap, the previous ones'. No duplicates.
    pub fn roots(&self) -> Vec<Certificate> {
        let mut roots = vec![self.root().clone()];
        for previous in &self.previous {
            if let Some(root) = previous.chain.last() {
                if !roots.contains(root) {
                    roots.push(root.clone());
                }
            }
        }
        roots
    }

    /// Every non-root certificate of the active and previous chains.
    pub fn all_intermediates(&self) -> Vec<Certificate> {
        let mut all = self.intermediates().to_vec();
        for previous in &self.previous {
            let below_root = previous.chain.len().saturating_sub(1);
            for cert in &previous.chain[..below_root] {
                if !all.contains(cert) {
                    all.push(cert.clone());
                }
            }
        }
        all
    }

    /// The roots as PEM: the trust bundle.
    pub fn trust_bundle_pem(&self) -> Result<String, CaError> {
        self.roots().iter().map(|c| c.to_pem_string()).collect()
    }

    /// The active chain, then the previous CAs' roots: what
    /// `/v1/ca/chain.pem` serves.
    pub fn published_chain_pem(&self) -> Result<String, CaError> {
        let mut pem = self.chain_pem.clone();
        let active_root = self.root();
        for root in self.roots().iter().filter(|r| *r != active_root) {
            pem.push_str(&root.to_pem_string()?);
        }
        Ok(pem)
    }

    /// The issuing certificate and key that answer for `matches`: the
    /// active CA or a previous one.
    pub fn issuer_matching(
        &self,
        matches: impl Fn(&Certificate) -> bool,
    ) -> Option<(&Certificate, &KeyId)> {
        self.cas().find(|(certificate, _)| matches(certificate))
    }

    /// The active CA, then those it replaced, each with its key.
    fn cas(&self) -> impl Iterator<Item = (&Certificate, &KeyId)> {
        std::iter::once((&self.certificate, &self.key))
            .chain(self.previous.iter().map(|p| (&p.certificate, &p.key)))
    }

    /// Signs a digest with one of the authority's keys: a CA key (active
    /// or previous) or the OCSP responder's.
    pub async fn sign_digest_with(
        &self,
        key: &KeyId,
        digest: [u8; 32],
    ) -> Result<p256::ecdsa::Signature, CaError> {
        Ok(self.pool.sign(key, digest).await?)
    }

    /// Issued certificates will point at `<url>/v1/crl` and `<url>/v1/ocsp`.
    pub fn with_public_url(mut self, url: Option<String>) -> Self {
        self.public_url = url;
        self
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn ttl_limits(&self) -> TtlLimits {
        self.ttl
    }

    pub fn key_id(&self) -> &KeyId {
        &self.key
    }

    pub fn certificate(&self) -> &Certificate {
        &self.certificate
    }

    /// The chain served to clients: issuing certificate first, root last.
    pub fn chain_pem(&self) -> &str {
        &self.chain_pem
    }

    /// The chain decoded: issuing certificate first, root last; never empty.
    pub fn chain(&self) -> &[Certificate] {
        &self.chain
    }

    /// The last certificate of the chain: what relying parties trust.
    pub fn root(&self) -> &Certificate {
        // `load` refuses an empty chain.
        &self.chain[self.chain.len() - 1]
    }

    /// The certificates between an agent's certificate and the root.
    pub fn intermediates(&self) -> &[Certificate] {
        &self.chain[..self.chain.len() - 1]
    }

    pub fn root_pem(&self) -> Result<String, CaError> {
        self.root().to_pem_string()
    }

    fn not_after_cap(&self) -> SystemTime {
        self.certificate
            .tbs_certificate
            .validity
            .not_after
            .to_system_time()
    }

    async fn issue(
        &self,
        kind: Kind<'_>,
        subject_cn: &str,
        subject_key: &PublicKey,
        lifetime: Duration,
    ) -> Result<Certificate, CaError> {
        let now = SystemTime::now();
        let not_after = (now + lifetime).min(self.not_after_cap());
        let issuer_key = IssuerKey::new(&self.public_key);
        let draft = profile::draft(TbsRequest {
            kind,
            subject: profile::common_name(subject_cn)?,
            subject_key,
            issuer: self.certificate.tbs_certificate.subject.clone(),
            issuer_key: &issuer_key,
            not_before: now - profile::BACKDATE,
            not_after,
            public_url: self.public_url.as_deref(),
        })?;
        sign_and_assemble(&self.pool, &self.key, draft).await
    }

    /// Issues an agent certificate and records it (with any new evidence
    /// and an audit event) before returning it.
    pub async fn issue_agent_certificate(
        &self,
        actor: &str,
        request: AgentCertificateRequest<'_>,
    ) -> Result<IssuedCertificate, CaError> {
        let AgentCertificateRequest {
            agent,
            key_id,
            subject_key,
            ttl,
            claims,
            attestation_digest,
            new_evidence,
            policy_version,
        } = request;
        let spiffe_id = self.trust_domain.agent_spiffe_id(agent);
        // A key on keyward's token signs only through keyward; any other
        // key is the agent's own, good for authenticating and nothing else.
        let purpose = match key_id {
            Some(_) => AgentKeyPurpose::Signing,
            None => AgentKeyPurpose::ClientAuth,
        };
        let kind = Kind::Agent {
            spiffe_id: &spiffe_id,
            attestation: claims,
            purpose,
        };
        let cert = self.issue(kind, agent.as_str(), subject_key, ttl).await?;
        let issued = self.describe(&cert)?;
        let spki_der = cert.tbs_certificate.subject_public_key_info.to_der()?;
        let record = CertificateRecord {
            serial: issued.serial.clone(),
            agent_name: agent.to_string(),
            key_id: key_id.map(|k| k.to_string()),
            public_key_sha256: crate::store::public_key_sha256(&spki_der),
            not_before: issued.not_before,
            not_after: issued.not_after,
            der: issued.der.clone(),
            attestation_digest: attestation_digest.clone(),
            policy_version,
            created_at: unix(SystemTime::now()),
            revoked_at: None,
            revocation_reason: None,
        };
        let audit = AuditEvent::new(actor, "certificate.issue", agent.as_str())
            .agent(agent.as_str())
            .decided(policy_version, "allow", None)
            .with("serial", issued.serial.clone())
            .with("not_after", issued.not_after)
            .with("key_id", key_id.map(|k| k.to_string()))
            .with("attestation_digest", attestation_digest);
        // Checked again where the row is written, under the locks a
        // revocation takes: a certificate signed while its agent was being
        // revoked is dropped here, never recorded and never handed out.
        let recorded = self
            .certificates
            .record(NewCertificate {
                record,
                evidence: new_evidence.cloned(),
                audit,
            })
            .instrument(tracing::debug_span!(target: traces::TARGET, "store commit"))
            .await?;
        match recorded {
            CertificateInsert::Inserted => Ok(issued),
            CertificateInsert::AgentNotActive { status } => Err(CaError::AgentNotActive {
                agent: agent.to_string(),
                status,
            }),
            CertificateInsert::KeyCompromised => Err(CaError::KeyCompromised),
        }
    }

    /// A certificate for keyward's own HTTPS listener (key held in memory by
    /// the TLS stack; see SECURITY.md).
    pub async fn issue_server_certificate(
        &self,
        key: &PublicKey,
        dns_names: &[String],
        ips: &[std::net::IpAddr],
        lifetime: Duration,
    ) -> Result<Certificate, CaError> {
        self.issue(
            Kind::Server { dns_names, ips },
            "keyward server",
            key,
            lifetime,
        )
        .await
    }

    /// The OCSP responder's certificate from the CA whose key is `ca_key`
    /// (the active one or one it replaced: RFC 6960 §4.2.2.2 wants the
    /// responder certified by the CA that issued what it answers for),
    /// signed by that CA's key. No revocation pointers: it carries
    /// id-pkix-ocsp-nocheck.
    pub async fn issue_ocsp_responder_certificate(
        &self,
        ca_key: &KeyId,
        responder_key: &PublicKey,
        lifetime: Duration,
    ) -> Result<Certificate, CaError> {
        let (ca, key) = self
            .cas()
            .find(|(_, key)| *key == ca_key)
            .ok_or_else(|| CaError::Internal(format!("no CA with key {ca_key}")))?;
        let issuer_key = IssuerKey::new(&profile::p256_key_of(
            &ca.tbs_certificate.subject_public_key_info,
        )?);
        let now = SystemTime::now();
        let ca_not_after = ca.tbs_certificate.validity.not_after.to_system_time();
        let draft = profile::draft(TbsRequest {
            kind: Kind::OcspResponder,
            subject: profile::common_name("keyward OCSP responder")?,
            subject_key: responder_key,
            issuer: ca.tbs_certificate.subject.clone(),
            issuer_key: &issuer_key,
            not_before: now - profile::BACKDATE,
            not_after: (now + lifetime).min(ca_not_after),
            public_url: None,
        })?;
        sign_and_assemble(&self.pool, key, draft).await
    }

    /// A certificate for a key keyward signs its own statements with.
    /// An admin's client certificate: SAN `spiffe://<td>/admin/<name>`,
    /// client auth. Not recorded with agents' certificates; keep it short.
    pub async fn issue_admin_certificate(
        &self,
        name: &AgentName,
        key: &PublicKey,
        lifetime: Duration,
    ) -> Result<IssuedCertificate, CaError> {
        let spiffe_id = self.trust_domain.admin_spiffe_id(name);
        let kind = Kind::Agent {
            spiffe_id: &spiffe_id,
            attestation: None,
            purpose: AgentKeyPurpose::ClientAuth,
        };
        let cert = self
            .issue(kind, &format!("admin {name}"), key, lifetime)
            .await?;
        self.describe(&cert)
    }

    pub async fn issue_service_certificate(
        &self,
        purpose: &str,
        key: &PublicKey,
        lifetime: Duration,
    ) -> Result<Certificate, CaError> {
        self.issue(
            Kind::ServiceSigner,
            &format!("keyward {purpose}"),
            key,
            lifetime,
        )
        .await
    }

    fn describe(&self, cert: &Certificate) -> Result<IssuedCertificate, CaError> {
        let validity = &cert.tbs_certificate.validity;
        Ok(IssuedCertificate {
            serial: cert.serial_hex(),
            der: cert.to_der()?,
            pem: cert.to_pem_string()?,
            not_before: unix(validity.not_before.to_system_time()),
            not_after: unix(validity.not_after.to_system_time()),
        })
    }

    /// A PKCS#10 request for the CA key, for an external root to sign.
    pub async fn certificate_request(&self) -> Result<String, CaError> {
        use x509_cert::request::{CertReq, CertReqInfo, Version};
        let info = CertReqInfo {
            version: Version::V1,
            subject: self.certificate.tbs_certificate.subject.clone(),
            public_key: profile::spki_of(&self.public_key),
            attributes: Default::default(),
        };
        let digest: [u8; 32] = Sha256::digest(info.to_der()?).into();
        let signature = self.pool.sign(&self.key, digest).await?;
        let csr = CertReq {
            info,
            algorithm: profile::ecdsa_with_sha256(),
            signature: profile::signature_bits(signature.to_der().as_bytes())?,
        };
        Ok(csr.to_pem(der::pem::LineEnding::LF)?)
    }

    /// Checks an externally signed certificate for the CA key and its chain
    /// (up to the external root), and returns the record that makes it the
    /// issuing CA.
    pub fn import_signed(&self, cert_pem: &str, chain_pem: &str) -> Result<CaRecord, CaError> {
        let cert = Certificate::from_pem_str(cert_pem)?;
        let key = profile::p256_key_of(&cert.tbs_certificate.subject_public_key_info)?;
        if key != self.public_key {
            return Err(CaError::CaKeyMismatch);
        }
        let chain = parse_pem_chain(chain_pem)?;
        if chain.is_empty() {
            return Err(CaError::Internal(
                "the chain must contain at least the root".into(),
            ));
        }
        let mut bundle = cert.to_pem_string()?;
        for c in &chain {
            bundle.push_str(&c.to_pem_string()?);
        }
        Ok(CaRecord {
            key_id: self.key.to_string(),
            cert_der: cert.to_der()?,
            chain_pem: bundle,
            created_at: unix(SystemTime::now()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_zero_or_above_max_is_refused_not_clamped() {
        let limits = TtlLimits::default();
        assert!(matches!(
            limits.resolve(Some(0)),
            Err(CaError::TtlOutOfRange { max: 3600 })
        ));
        assert!(matches!(
            limits.resolve(Some(3601)),
            Err(CaError::TtlOutOfRange { .. })
        ));
        assert_eq!(
            limits.resolve(Some(3600)).unwrap(),
            Duration::from_secs(3600)
        );
        assert_eq!(limits.resolve(None).unwrap(), Duration::from_secs(900));
    }

    #[test]
    fn serials_are_sixteen_positive_bytes() {
        for _ in 0..256 {
            let serial = profile::random_serial();
            let bytes = serial.as_bytes();
            assert_eq!(bytes.len(), 16);
            assert!(bytes[0] != 0 && bytes[0] < 0x80);
        }
    }
}
