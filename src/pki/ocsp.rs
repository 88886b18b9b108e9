//! RFC 6960 OCSP: requests parsed and responses built with the RustCrypto
//! `x509-ocsp` types. No key is used here: the caller signs the
//! ResponseData digest through its key pool and hands the signature to
//! [`assemble_basic`].
//!
//! Not `x509-ocsp`'s response builder: it signs inside `sign()` with a
//! `signature::Signer`, and keyward's signature comes from the token
//! through an async pool; the types are the same either way.

use std::time::{Duration, SystemTime};

use const_oid::db::rfc5912::{ID_SHA_1, ID_SHA_256};
use const_oid::db::rfc6960::{ID_PKIX_OCSP_BASIC, ID_PKIX_OCSP_NONCE};
use const_oid::ObjectIdentifier;
use der::asn1::{GeneralizedTime, Null, OctetString};
use der::{Decode, Encode};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use x509_cert::ext::Extension;
use x509_ocsp::{
    BasicOcspResponse, OcspGeneralizedTime, OcspRequest, OcspResponse, ResponderId, ResponseBytes,
    ResponseData, RevokedInfo, SingleResponse,
};

pub use x509_ocsp::OcspResponseStatus as ResponseStatus;

use super::cert::{self, Certificate};
use super::crl::{check_ecdsa_der, RevocationReason};
use super::{profile, CaError};

/// More CertIDs than this in one request are refused: openssl and browsers
/// ask about one certificate at a time, and each CertID costs a lookup.
pub const MAX_CERT_IDS: usize = 16;

/// RFC 9654 §2.1: a nonce of 1 to 128 octets; anything else is refused.
const MAX_NONCE_LEN: usize = 128;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OcspError {
    #[error("malformed OCSP request: {0}")]
    Malformed(&'static str),
    #[error("malformed OCSP request: {0}")]
    Der(#[from] der::Error),
    #[error("more than {MAX_CERT_IDS} CertIDs in one OCSP request")]
    TooManyRequests,
    #[error("CertID hash algorithm {0} is not supported (only SHA-1 and SHA-256)")]
    UnsupportedHash(ObjectIdentifier),
}

impl OcspError {
    /// The OCSPResponseStatus to answer with: every refusal of a request is
    /// the client's doing, which RFC 6960 §2.3 calls malformedRequest.
    pub fn response_status(&self) -> ResponseStatus {
        ResponseStatus::MalformedRequest
    }
}

/// The hash of a CertID.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum HashAlg {
    Sha1,
    Sha256,
}

impl HashAlg {
    fn from_oid(oid: ObjectIdentifier) -> Option<Self> {
        match oid {
            ID_SHA_1 => Some(Self::Sha1),
            ID_SHA_256 => Some(Self::Sha256),
            _ => None,
        }
    }

    pub fn output_len(self) -> usize {
        match self {
            Self::Sha1 => 20,
            Self::Sha256 => 32,
        }
    }

    pub fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            Self::Sha1 => Sha1::digest(data).to_vec(),
            Self::Sha256 => Sha256::digest(data).to_vec(),
        }
    }
}

/// A CertID from a request.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct CertId {
    pub hash_algorithm: HashAlg,
    pub issuer_name_hash: Vec<u8>,
    pub issuer_key_hash: Vec<u8>,
    /// The serial's INTEGER content octets, as in a certificate.
    pub serial: Vec<u8>,
    /// The CertID as the client encoded it, echoed in the response because
    /// clients match responses to requests by comparing CertIDs.
    der: Vec<u8>,
}

impl CertId {
    /// The CertID's DER as it appeared in the request.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// Whether this CertID names `issuer`: RFC 6960 §4.1.1 hashes the DER of
    /// the issuer's subject and the value of its subjectPublicKey BIT STRING
    /// (without the unused-bits octet), with the CertID's own algorithm.
    pub fn matches_issuer(&self, issuer: &Certificate) -> bool {
        let tbs = &issuer.tbs_certificate;
        let Ok(name_der) = tbs.subject.to_der() else {
            return false;
        };
        let key_bits = tbs.subject_public_key_info.subject_public_key.raw_bytes();
        self.hash_algorithm.digest(&name_der) == self.issuer_name_hash
            && self.hash_algorithm.digest(key_bits) == self.issuer_key_hash
    }
}

/// What a responder needs from a request.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct OcspRequestInfo {
    pub cert_ids: Vec<CertId>,
    /// The extnValue content of the id-pkix-ocsp-nonce extension (the DER
    /// of the nonce OCTET STRING), to be echoed verbatim.
    pub nonce: Option<Vec<u8>>,
}

/// RFC 6960 §4.4: unrecognized extensions are ignored unless critical.
fn refuse_unknown_critical(
    extensions: Option<&Vec<Extension>>,
    known: &[ObjectIdentifier],
) -> Result<(), OcspError> {
    let unknown_critical = extensions
        .into_iter()
        .flatten()
        .any(|e| e.critical && !known.contains(&e.extn_id));
    if unknown_critical {
        return Err(OcspError::Malformed("unsupported critical extension"));
    }
    Ok(())
}

fn cert_id(asked: &x509_ocsp::CertId) -> Result<CertId, OcspError> {
    let hash_algorithm = HashAlg::from_oid(asked.hash_algorithm.oid)
        .ok_or(OcspError::UnsupportedHash(asked.hash_algorithm.oid))?;
    // Absent and NULL are both seen in the wild for these hashes.
    if let Some(parameters) = &asked.hash_algorithm.parameters {
        if parameters.decode_as::<Null>().is_err() {
            return Err(OcspError::Malformed("hash algorithm parameters"));
        }
    }
    let issuer_name_hash = asked.issuer_name_hash.as_bytes().to_vec();
    let issuer_key_hash = asked.issuer_key_hash.as_bytes().to_vec();
    let len = hash_algorithm.output_len();
    if issuer_name_hash.len() != len || issuer_key_hash.len() != len {
        return Err(OcspError::Malformed("CertID hash of the wrong length"));
    }
    Ok(CertId {
        hash_algorithm,
        issuer_name_hash,
        issuer_key_hash,
        serial: asked.serial_number.as_bytes().to_vec(),
        // DER is canonical, so the re-encoding is the client's own bytes
        // (the parameters stay absent or NULL as they came).
        der: asked.to_der()?,
    })
}

fn nonce(extensions: Option<&Vec<Extension>>) -> Result<Option<Vec<u8>>, OcspError> {
    let mut nonces = extensions
        .into_iter()
        .flatten()
        .filter(|e| e.extn_id == ID_PKIX_OCSP_NONCE);
    let Some(found) = nonces.next() else {
        return Ok(None);
    };
    if nonces.next().is_some() {
        return Err(OcspError::Malformed("more than one nonce"));
    }
    let value = found.extn_value.as_bytes();
    let inner = OctetString::from_der(value)
        .map_err(|_| OcspError::Malformed("the nonce is not an OCTET STRING"))?;
    if inner.as_bytes().is_empty() || inner.as_bytes().len() > MAX_NONCE_LEN {
        return Err(OcspError::Malformed("nonce length outside 1..=128"));
    }
    Ok(Some(value.to_vec()))
}

/// Parses a DER OCSPRequest (trailing bytes refused). Only version 1
/// decodes. A signature, when present, is not checked: keyward answers
/// anyone, so it would change nothing.
pub fn parse_request(der: &[u8]) -> Result<OcspRequestInfo, OcspError> {
    if der.is_empty() {
        return Err(OcspError::Malformed("empty request"));
    }
    let tbs = OcspRequest::from_der(der)?.tbs_request;
    if tbs.request_list.is_empty() {
        return Err(OcspError::Malformed("no CertID"));
    }
    if tbs.request_list.len() > MAX_CERT_IDS {
        return Err(OcspError::TooManyRequests);
    }
    refuse_unknown_critical(tbs.request_extensions.as_ref(), &[ID_PKIX_OCSP_NONCE])?;
    let nonce = nonce(tbs.request_extensions.as_ref())?;
    let cert_ids = tbs
        .request_list
        .iter()
        .map(|r| {
            refuse_unknown_critical(r.single_request_extensions.as_ref(), &[])?;
            cert_id(&r.req_cert)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(OcspRequestInfo { cert_ids, nonce })
}

/// The status of one certificate.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum CertStatus {
    Good,
    Revoked {
        at: SystemTime,
        reason: Option<RevocationReason>,
    },
    Unknown,
}

/// One answer in a response.
pub struct SingleResponseInfo<'a> {
    pub cert_id: &'a CertId,
    pub status: CertStatus,
    pub this_update: SystemTime,
    pub next_update: SystemTime,
}

/// OCSP times are GeneralizedTime at any date, in whole seconds.
fn generalized_time(t: SystemTime) -> Result<OcspGeneralizedTime, CaError> {
    let since_epoch = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|_| CaError::Internal("time before 1970".into()))?;
    GeneralizedTime::from_unix_duration(Duration::from_secs(since_epoch.as_secs()))
        .map(OcspGeneralizedTime)
        .map_err(|e| CaError::Internal(format!("encoding time: {e}")))
}

fn cert_status(status: &CertStatus) -> Result<x509_ocsp::CertStatus, CaError> {
    Ok(match status {
        CertStatus::Good => x509_ocsp::CertStatus::good(),
        CertStatus::Revoked { at, reason } => x509_ocsp::CertStatus::revoked(RevokedInfo {
            revocation_time: generalized_time(*at)?,
            // As in the CRL: unspecified is said by saying nothing.
            revocation_reason: reason
                .filter(|r| *r != RevocationReason::Unspecified)
                .map(RevocationReason::to_crl_reason),
        }),
        CertStatus::Unknown => x509_ocsp::CertStatus::unknown(),
    })
}

fn single_response(info: &SingleResponseInfo) -> Result<SingleResponse, CaError> {
    let this_update = generalized_time(info.this_update)?;
    let next_update = generalized_time(info.next_update)?;
    if next_update.0.to_unix_duration() < this_update.0.to_unix_duration() {
        return Err(CaError::Internal(
            "an OCSP response's nextUpdate must not be before its thisUpdate".into(),
        ));
    }
    Ok(SingleResponse {
        cert_id: x509_ocsp::CertId::from_der(info.cert_id.der())?,
        cert_status: cert_status(&info.status)?,
        this_update,
        next_update: Some(next_update),
        single_extensions: None,
    })
}

/// DER of the ResponseData, ready to be hashed with SHA-256 and signed by
/// `responder`'s key. `nonce` is `OcspRequestInfo::nonce`, echoed as is.
pub fn response_data(
    responder: &Certificate,
    responses: &[SingleResponseInfo],
    produced_at: SystemTime,
    nonce: Option<&[u8]>,
) -> Result<Vec<u8>, CaError> {
    if responses.is_empty() {
        return Err(CaError::Internal(
            "an OCSP response answers at least one CertID".into(),
        ));
    }
    // RFC 6960 §4.2.1: KeyHash is the SHA-1 of the key's BIT STRING value,
    // whatever hash the CertIDs use.
    let key_bits = responder
        .tbs_certificate
        .subject_public_key_info
        .subject_public_key
        .raw_bytes();
    let response_extensions = match nonce {
        None => None,
        Some(value) => Some(vec![Extension {
            extn_id: ID_PKIX_OCSP_NONCE,
            critical: false,
            extn_value: OctetString::new(value)?,
        }]),
    };
    let data = ResponseData {
        version: x509_ocsp::Version::V1,
        responder_id: ResponderId::ByKey(OctetString::new(Sha1::digest(key_bits).to_vec())?),
        produced_at: generalized_time(produced_at)?,
        responses: responses
            .iter()
            .map(single_response)
            .collect::<Result<_, _>>()?,
        response_extensions,
    };
    Ok(data.to_der()?)
}

/// A successful OCSPResponse (id-pkix-ocsp-basic) from the ResponseData
/// DER, the DER ECDSA signature over it (ecdsa-with-SHA256) and the
/// certificates the client needs to find the signer: none when the CA
/// signs, the responder's certificate when a delegated responder signs.
pub fn assemble_basic(
    response_data_der: &[u8],
    signature_der: &[u8],
    certs: &[Certificate],
) -> Result<Vec<u8>, CaError> {
    let data: ResponseData = cert::decode_signed(response_data_der)?;
    check_ecdsa_der(signature_der)?;
    let basic = BasicOcspResponse {
        tbs_response_data: data,
        signature_algorithm: profile::ecdsa_with_sha256(),
        signature: profile::signature_bits(signature_der)?,
        certs: (!certs.is_empty()).then(|| certs.to_vec()),
    };
    let response = OcspResponse {
        response_status: ResponseStatus::Successful,
        response_bytes: Some(ResponseBytes {
            response_type: ID_PKIX_OCSP_BASIC,
            response: OctetString::new(basic.to_der()?)?,
        }),
    };
    Ok(response.to_der()?)
}

/// An OCSPResponse carrying only an error status.
pub fn error_response(status: ResponseStatus) -> Vec<u8> {
    let response = OcspResponse {
        response_status: status,
        response_bytes: None,
    };
    // A SEQUENCE holding one ENUMERATED: its encoding has nothing that can
    // fail, but should it, an empty body is still an answer the client
    // refuses rather than a panic.
    response.to_der().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::process::{Command, Output};

    use p256::ecdsa::signature::hazmat::PrehashSigner;
    use p256::ecdsa::{Signature, SigningKey};
    use p256::pkcs8::{EncodePrivateKey, LineEnding};
    use rand::{Rng, RngCore};

    use der::asn1::Any;
    use der::Sequence;
    use spki::AlgorithmIdentifierOwned;
    use x509_cert::serial_number::SerialNumber;

    use super::*;
    use crate::pki::cert::CertificateText;
    use crate::pki::profile::Kind;
    use crate::pki::verify::test_pki::{key, public, sign, TestCa};

    fn openssl(args: &[&str]) -> Output {
        Command::new("openssl")
            .args(args)
            .output()
            .expect("the openssl binary is required for these tests")
    }

    fn stdout(output: &Output) -> String {
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn stderr(output: &Output) -> String {
        String::from_utf8_lossy(&output.stderr).into_owned()
    }

    fn sign_with(key: &SigningKey, data: &[u8]) -> Vec<u8> {
        let signature: Signature = key.sign_prehash(&Sha256::digest(data)).unwrap();
        signature.to_der().as_bytes().to_vec()
    }

    /// A CA, two of its agent certificates, and all of them as PEM files.
    struct Fixture {
        dir: tempfile::TempDir,
        ca: TestCa,
        revoked: Certificate,
        good: Certificate,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let ca = TestCa::root("ocsp test ca");
            let revoked = ca.agent("revoked-agent", &public(&key()));
            let good = ca.agent("good-agent", &public(&key()));
            let fixture = Self {
                dir,
                ca,
                revoked,
                good,
            };
            fixture.write("ca.pem", fixture.ca.cert.to_pem_string().unwrap());
            fixture.write("revoked.pem", fixture.revoked.to_pem_string().unwrap());
            fixture.write("good.pem", fixture.good.to_pem_string().unwrap());
            fixture
        }

        fn path(&self, name: &str) -> String {
            self.dir.path().join(name).to_str().unwrap().to_owned()
        }

        fn write(&self, name: &str, bytes: impl AsRef<[u8]>) -> String {
            std::fs::write(self.dir.path().join(name), bytes).unwrap();
            self.path(name)
        }

        fn read(&self, name: &str) -> Vec<u8> {
            std::fs::read(PathBuf::from(self.path(name))).unwrap()
        }

        /// An OCSP request made by `openssl ocsp` for the named certificates;
        /// `extra` goes first because openssl wants a digest before -cert.
        fn openssl_request(&self, certs: &[&str], extra: &[&str]) -> Vec<u8> {
            let ca = self.path("ca.pem");
            let out = self.path("req.der");
            let mut args = vec!["ocsp"];
            args.extend(extra);
            args.extend(["-issuer", ca.as_str()]);
            let paths: Vec<String> = certs.iter().map(|c| self.path(c)).collect();
            for path in &paths {
                args.extend(["-cert", path.as_str()]);
            }
            args.extend(["-reqout", out.as_str()]);
            let made = openssl(&args);
            assert!(made.status.success(), "{}", stderr(&made));
            self.read("req.der")
        }

        /// openssl's check of `resp.der` for `certs` (its own CertIDs,
        /// no nonce), trusting `ca.pem`.
        fn openssl_check(&self, certs: &[&str], extra: &[&str]) -> Output {
            let (ca, response) = (self.path("ca.pem"), self.path("resp.der"));
            let mut args = vec!["ocsp"];
            args.extend(extra);
            args.extend(["-issuer", ca.as_str()]);
            let paths: Vec<String> = certs.iter().map(|c| self.path(c)).collect();
            for path in &paths {
                args.extend(["-cert", path.as_str()]);
            }
            args.extend([
                "-respin",
                response.as_str(),
                "-CAfile",
                ca.as_str(),
                "-no_nonce",
            ]);
            openssl(&args)
        }

        /// openssl's check of `resp.der` against the request in `req.der`,
        /// its nonce included, trusting `ca.pem`.
        fn openssl_check_against_request(&self) -> Output {
            let (ca, request, response) = (
                self.path("ca.pem"),
                self.path("req.der"),
                self.path("resp.der"),
            );
            openssl(&[
                "ocsp", "-reqin", &request, "-respin", &response, "-issuer", &ca, "-CAfile", &ca,
            ])
        }

        fn status_for(&self, cert_id: &CertId) -> CertStatus {
            if cert_id.serial == self.revoked.tbs_certificate.serial_number.as_bytes() {
                CertStatus::Revoked {
                    at: SystemTime::now() - Duration::from_secs(120),
                    reason: Some(RevocationReason::KeyCompromise),
                }
            } else if cert_id.serial == self.good.tbs_certificate.serial_number.as_bytes() {
                CertStatus::Good
            } else {
                CertStatus::Unknown
            }
        }

        /// A response to `request` signed by the CA, echoing the nonce if
        /// `echo_nonce`.
        fn ca_response(&self, request: &OcspRequestInfo, echo_nonce: bool) -> Vec<u8> {
            let now = SystemTime::now();
            let singles: Vec<SingleResponseInfo> = request
                .cert_ids
                .iter()
                .map(|id| SingleResponseInfo {
                    cert_id: id,
                    status: self.status_for(id),
                    this_update: now - Duration::from_secs(60),
                    next_update: now + Duration::from_secs(3600),
                })
                .collect();
            let nonce = request.nonce.as_deref().filter(|_| echo_nonce);
            let data = response_data(&self.ca.cert, &singles, now, nonce).unwrap();
            assemble_basic(&data, &sign_with(&self.ca.key, &data), &[]).unwrap()
        }
    }

    #[test]
    fn openssl_requests_parse_with_and_without_nonce() {
        let fx = Fixture::new();
        let other_ca = TestCa::root("another ca");

        let plain = parse_request(&fx.openssl_request(&["revoked.pem"], &["-no_nonce"])).unwrap();
        assert_eq!(plain.nonce, None);
        assert_eq!(plain.cert_ids.len(), 1);
        let id = &plain.cert_ids[0];
        assert_eq!(id.hash_algorithm, HashAlg::Sha1, "openssl's default");
        assert!(id.matches_issuer(&fx.ca.cert));
        assert!(!id.matches_issuer(&other_ca.cert));
        assert!(!id.matches_issuer(&fx.revoked));
        assert_eq!(
            id.serial,
            fx.revoked.tbs_certificate.serial_number.as_bytes()
        );

        let with_nonce = parse_request(&fx.openssl_request(&["good.pem"], &[])).unwrap();
        let nonce = with_nonce.nonce.as_ref().unwrap();
        // openssl's default: the extnValue is the DER of a 16-octet OCTET STRING.
        assert_eq!(nonce.len(), 18);
        assert_eq!(nonce[..2], [0x04, 0x10]);
        assert!(with_nonce.cert_ids[0].matches_issuer(&fx.ca.cert));
        assert_eq!(
            with_nonce.cert_ids[0].serial,
            fx.good.tbs_certificate.serial_number.as_bytes()
        );

        let sha256 = parse_request(&fx.openssl_request(&["good.pem"], &["-sha256"])).unwrap();
        let id = &sha256.cert_ids[0];
        assert_eq!(id.hash_algorithm, HashAlg::Sha256);
        assert_eq!(id.issuer_key_hash.len(), 32);
        assert!(id.matches_issuer(&fx.ca.cert));
        assert!(!id.matches_issuer(&other_ca.cert));

        let both = parse_request(&fx.openssl_request(&["revoked.pem", "good.pem"], &[])).unwrap();
        assert_eq!(both.cert_ids.len(), 2);
        assert!(both
            .cert_ids
            .iter()
            .all(|id| id.matches_issuer(&fx.ca.cert)));
    }

    #[test]
    fn signed_requests_are_accepted_and_their_signature_ignored() {
        let fx = Fixture::new();
        let signer_key = key();
        let signer = fx.ca.agent("requesting-agent", &public(&signer_key));
        let signer_pem = fx.write("signer.pem", signer.to_pem_string().unwrap());
        let key_pem = signer_key.to_pkcs8_pem(LineEnding::LF).unwrap();
        let key_path = fx.write("signer.key", key_pem.as_bytes());
        let der = fx.openssl_request(
            &["good.pem"],
            &["-signer", &signer_pem, "-signkey", &key_path],
        );
        let shown = openssl(&["ocsp", "-reqin", &fx.path("req.der"), "-req_text"]);
        assert!(
            stdout(&shown).contains("Signature Algorithm"),
            "{}",
            stdout(&shown)
        );
        let parsed = parse_request(&der).unwrap();
        assert_eq!(parsed.cert_ids.len(), 1);
        assert!(parsed.cert_ids[0].matches_issuer(&fx.ca.cert));
        assert!(parsed.nonce.is_some());
    }

    #[test]
    fn openssl_verifies_ca_signed_responses_and_their_nonce() {
        let fx = Fixture::new();
        let request_der = fx.openssl_request(&["revoked.pem", "good.pem"], &[]);
        let request = parse_request(&request_der).unwrap();
        fx.write("resp.der", fx.ca_response(&request, true));

        // With only -reqin, openssl checks the response against that
        // request's nonce.
        let checked = fx.openssl_check_against_request();
        let err = stderr(&checked);
        assert!(checked.status.success(), "{err}");
        assert!(err.contains("Response verify OK"), "{err}");
        assert!(!err.contains("WARNING"), "{err}");
        assert!(!err.contains("Nonce Verify error"), "{err}");

        // With -cert, openssl builds its own CertIDs and prints each status.
        let statuses = fx.openssl_check(&["revoked.pem", "good.pem"], &[]);
        let out = stdout(&statuses);
        assert!(statuses.status.success(), "{}", stderr(&statuses));
        assert!(stderr(&statuses).contains("Response verify OK"));
        assert!(out.contains("revoked.pem: revoked"), "{out}");
        assert!(out.contains("Reason: keyCompromise"), "{out}");
        assert!(out.contains("good.pem: good"), "{out}");

        // The control: the same response without the nonce is flagged.
        fx.write("resp.der", fx.ca_response(&request, false));
        let checked = fx.openssl_check_against_request();
        assert!(
            stderr(&checked).contains("WARNING: no nonce in response"),
            "{}",
            stderr(&checked)
        );
    }

    #[test]
    fn sha256_cert_ids_are_echoed_so_openssl_finds_them() {
        let fx = Fixture::new();
        let request =
            parse_request(&fx.openssl_request(&["good.pem"], &["-sha256", "-no_nonce"])).unwrap();
        fx.write("resp.der", fx.ca_response(&request, true));
        let statuses = fx.openssl_check(&["good.pem"], &["-sha256"]);
        assert!(
            stdout(&statuses).contains("good.pem: good"),
            "{}",
            stdout(&statuses)
        );
    }

    #[test]
    fn unknown_and_unspecified_statuses_encode() {
        let fx = Fixture::new();
        let other = fx.ca.agent("unknown-agent", &public(&key()));
        fx.write("other.pem", other.to_pem_string().unwrap());
        let request = parse_request(&fx.openssl_request(&["other.pem"], &["-no_nonce"])).unwrap();
        let now = SystemTime::now();
        let single = |status| SingleResponseInfo {
            cert_id: &request.cert_ids[0],
            status,
            this_update: now,
            next_update: now + Duration::from_secs(600),
        };
        let check = |status, expected: &str| {
            let data = response_data(&fx.ca.cert, &[single(status)], now, None).unwrap();
            let der = assemble_basic(&data, &sign_with(&fx.ca.key, &data), &[]).unwrap();
            fx.write("resp.der", der);
            let out = fx.openssl_check(&["other.pem"], &[]);
            assert!(
                stderr(&out).contains("Response verify OK"),
                "{}",
                stderr(&out)
            );
            stdout(&out).contains(expected)
        };
        assert!(check(CertStatus::Unknown, "other.pem: unknown"));
        assert!(check(
            CertStatus::Revoked {
                at: now,
                reason: Some(RevocationReason::Unspecified)
            },
            "other.pem: revoked"
        ));
        assert!(!check(
            CertStatus::Revoked {
                at: now,
                reason: Some(RevocationReason::Unspecified)
            },
            "Reason:"
        ));
        assert!(check(
            CertStatus::Revoked {
                at: now,
                reason: Some(RevocationReason::Superseded)
            },
            "Reason: superseded"
        ));
    }

    #[test]
    fn responder_id_is_the_sha1_of_the_key_and_delegated_certs_are_included() {
        let fx = Fixture::new();
        let responder_key = key();
        let now = SystemTime::now();
        let responder = sign(
            profile::build_tbs(profile::TbsRequest {
                kind: Kind::ServiceSigner,
                subject: profile::common_name("keyward ocsp").unwrap(),
                subject_key: &public(&responder_key),
                issuer: fx.ca.name(),
                issuer_key: &profile::IssuerKey::new(&public(&fx.ca.key)),
                not_before: now - profile::BACKDATE,
                not_after: now + Duration::from_secs(3600),
                public_url: None,
            })
            .unwrap(),
            &fx.ca.key,
        );
        let request = parse_request(&fx.openssl_request(&["good.pem"], &["-no_nonce"])).unwrap();
        let singles = [SingleResponseInfo {
            cert_id: &request.cert_ids[0],
            status: CertStatus::Good,
            this_update: now,
            next_update: now + Duration::from_secs(600),
        }];
        let data = response_data(&responder, &singles, now, None).unwrap();
        let decoded = ResponseData::from_der(&data).unwrap();
        let key_bits = responder
            .tbs_certificate
            .subject_public_key_info
            .subject_public_key
            .raw_bytes();
        assert_eq!(
            decoded.responder_id,
            ResponderId::ByKey(OctetString::new(Sha1::digest(key_bits).to_vec()).unwrap())
        );
        assert_eq!(
            decoded.responses[0].cert_id.to_der().unwrap(),
            request.cert_ids[0].der()
        );
        assert!(decoded.response_extensions.is_none());

        let der = assemble_basic(
            &data,
            &sign_with(&responder_key, &data),
            std::slice::from_ref(&responder),
        )
        .unwrap();
        let outer = OcspResponse::from_der(&der).unwrap();
        let bytes = outer.response_bytes.unwrap();
        assert_eq!(bytes.response_type, ID_PKIX_OCSP_BASIC);
        let basic = BasicOcspResponse::from_der(bytes.response.as_bytes()).unwrap();
        assert_eq!(basic.tbs_response_data.to_der().unwrap(), data);
        assert_eq!(basic.certs, Some(vec![responder.clone()]));

        fx.write("resp.der", der);
        let shown = openssl(&[
            "ocsp",
            "-respin",
            &fx.path("resp.der"),
            "-resp_text",
            "-noverify",
        ]);
        let out = stdout(&shown);
        assert!(out.contains("Responder Id: "), "{out}");
        assert!(
            out.contains("CN = keyward ocsp") || out.contains("CN=keyward ocsp"),
            "{out}"
        );
        assert!(out.contains("Cert Status: good"), "{out}");
    }

    #[test]
    fn error_responses_have_only_a_status() {
        let dir = tempfile::tempdir().unwrap();
        for (status, name) in [
            (ResponseStatus::MalformedRequest, "malformedrequest (1)"),
            (ResponseStatus::InternalError, "internalerror (2)"),
            (ResponseStatus::TryLater, "trylater (3)"),
            (ResponseStatus::Unauthorized, "unauthorized (6)"),
        ] {
            let der = error_response(status);
            let decoded = OcspResponse::from_der(&der).unwrap();
            assert_eq!(decoded.response_status, status);
            assert!(decoded.response_bytes.is_none());
            let path = dir.path().join("err.der");
            std::fs::write(&path, &der).unwrap();
            let shown = openssl(&["ocsp", "-respin", path.to_str().unwrap(), "-resp_text"]);
            let all = format!("{}{}", stdout(&shown), stderr(&shown));
            assert!(all.contains(name), "{all}");
        }
    }

    fn sha1_cert_id(name_hash: Vec<u8>, key_hash: Vec<u8>, oid: ObjectIdentifier) -> Any {
        Any::encode_from(&x509_ocsp::CertId {
            hash_algorithm: AlgorithmIdentifierOwned {
                oid,
                parameters: Some(Any::from(Null)),
            },
            issuer_name_hash: OctetString::new(name_hash).unwrap(),
            issuer_key_hash: OctetString::new(key_hash).unwrap(),
            serial_number: SerialNumber::new(&[1, 2, 3]).unwrap(),
        })
        .unwrap()
    }

    /// OCSPRequest with a free version number and CertIDs as any DER
    /// value: requests `x509-ocsp`'s types cannot express, to prove they
    /// are refused.
    #[derive(Sequence)]
    struct RawRequest {
        tbs_request: RawTbsRequest,
    }

    #[derive(Sequence)]
    struct RawTbsRequest {
        #[asn1(
            context_specific = "0",
            tag_mode = "EXPLICIT",
            default = "Default::default"
        )]
        version: u8,
        request_list: Vec<RawSingleRequest>,
        #[asn1(context_specific = "2", tag_mode = "EXPLICIT", optional = "true")]
        request_extensions: Option<Vec<Extension>>,
    }

    #[derive(Sequence)]
    struct RawSingleRequest {
        req_cert: Any,
    }

    fn request_der(cert_ids: Vec<Any>, extensions: Option<Vec<Extension>>, version: u8) -> Vec<u8> {
        RawRequest {
            tbs_request: RawTbsRequest {
                version,
                request_list: cert_ids
                    .into_iter()
                    .map(|req_cert| RawSingleRequest { req_cert })
                    .collect(),
                request_extensions: extensions,
            },
        }
        .to_der()
        .unwrap()
    }

    fn good_id() -> Any {
        sha1_cert_id(vec![1; 20], vec![2; 20], ID_SHA_1)
    }

    fn nonce_extension(value: Vec<u8>, critical: bool) -> Extension {
        Extension {
            extn_id: ID_PKIX_OCSP_NONCE,
            critical,
            extn_value: OctetString::new(value).unwrap(),
        }
    }

    fn octet_string(len: usize) -> Vec<u8> {
        OctetString::new(vec![0x5a; len]).unwrap().to_der().unwrap()
    }

    #[test]
    fn hand_built_requests_parse_within_the_limits() {
        let parsed = parse_request(&request_der(vec![good_id()], None, 0)).unwrap();
        assert_eq!(parsed.cert_ids[0].serial, [1, 2, 3]);
        assert_eq!(parsed.cert_ids[0].der(), good_id().to_der().unwrap());

        let sixteen = request_der(vec![good_id(); MAX_CERT_IDS], None, 0);
        assert_eq!(parse_request(&sixteen).unwrap().cert_ids.len(), 16);

        for len in [1, 32, 128] {
            let value = octet_string(len);
            let der = request_der(
                vec![good_id()],
                Some(vec![nonce_extension(value.clone(), true)]),
                0,
            );
            assert_eq!(parse_request(&der).unwrap().nonce, Some(value));
        }

        // An unknown, non-critical extension is ignored.
        let other = Extension {
            extn_id: ObjectIdentifier::new_unwrap("1.3.6.1.4.1.99999.1"),
            critical: false,
            extn_value: OctetString::new(vec![0x05, 0x00]).unwrap(),
        };
        assert!(parse_request(&request_der(vec![good_id()], Some(vec![other]), 0)).is_ok());

        // Absent hash parameters are as good as NULL.
        let absent = Any::encode_from(&x509_ocsp::CertId {
            hash_algorithm: AlgorithmIdentifierOwned {
                oid: ID_SHA_256,
                parameters: None,
            },
            issuer_name_hash: OctetString::new(vec![1; 32]).unwrap(),
            issuer_key_hash: OctetString::new(vec![2; 32]).unwrap(),
            serial_number: SerialNumber::new(&[9]).unwrap(),
        })
        .unwrap();
        let parsed = parse_request(&request_der(vec![absent], None, 0)).unwrap();
        assert_eq!(parsed.cert_ids[0].hash_algorithm, HashAlg::Sha256);
    }

    #[test]
    fn malformed_requests_are_refused() {
        let valid = request_der(vec![good_id()], None, 0);
        assert!(matches!(parse_request(&[]), Err(OcspError::Malformed(_))));
        let mut trailing = valid.clone();
        trailing.push(0);
        assert!(matches!(parse_request(&trailing), Err(OcspError::Der(_))));
        for cut in 0..valid.len() {
            assert!(
                parse_request(&valid[..cut]).is_err(),
                "prefix of {cut} bytes"
            );
        }

        assert!(matches!(
            parse_request(&request_der(vec![good_id(); MAX_CERT_IDS + 1], None, 0)),
            Err(OcspError::TooManyRequests)
        ));
        assert!(matches!(
            parse_request(&request_der(Vec::new(), None, 0)),
            Err(OcspError::Malformed(_))
        ));
        // Version 2 does not exist: only v1 decodes.
        assert!(parse_request(&request_der(vec![good_id()], None, 1)).is_err());

        let sha384 = const_oid::db::rfc5912::ID_SHA_384;
        let unknown_hash = sha1_cert_id(vec![1; 48], vec![2; 48], sha384);
        assert!(matches!(
            parse_request(&request_der(vec![unknown_hash], None, 0)),
            Err(OcspError::UnsupportedHash(oid)) if oid == sha384
        ));
        let short_hash = sha1_cert_id(vec![1; 19], vec![2; 20], ID_SHA_1);
        assert!(parse_request(&request_der(vec![short_hash], None, 0)).is_err());
        let sha256_with_sha1_lengths = sha1_cert_id(vec![1; 20], vec![2; 20], ID_SHA_256);
        assert!(parse_request(&request_der(vec![sha256_with_sha1_lengths], None, 0)).is_err());

        let bad_nonces = [
            octet_string(0),
            octet_string(129),
            vec![0x05, 0x00],
            vec![0x5a; 16],
        ];
        for value in bad_nonces {
            let der = request_der(
                vec![good_id()],
                Some(vec![nonce_extension(value, false)]),
                0,
            );
            assert!(matches!(parse_request(&der), Err(OcspError::Malformed(_))));
        }
        let twice = vec![
            nonce_extension(octet_string(16), false),
            nonce_extension(octet_string(16), false),
        ];
        assert!(parse_request(&request_der(vec![good_id()], Some(twice), 0)).is_err());
        let critical = Extension {
            extn_id: ObjectIdentifier::new_unwrap("1.3.6.1.4.1.99999.1"),
            critical: true,
            extn_value: OctetString::new(vec![0x05, 0x00]).unwrap(),
        };
        assert!(matches!(
            parse_request(&request_der(vec![good_id()], Some(vec![critical]), 0)),
            Err(OcspError::Malformed(_))
        ));
        // A CertID that is not a SEQUENCE at all.
        let not_a_cert_id = Any::encode_from(&Null).unwrap();
        assert!(parse_request(&request_der(vec![not_a_cert_id], None, 0)).is_err());
    }

    #[test]
    fn random_bytes_are_refused_without_panicking() {
        let mut rng = rand::thread_rng();
        let valid = request_der(
            vec![good_id()],
            Some(vec![nonce_extension(octet_string(16), false)]),
            0,
        );
        for _ in 0..2000 {
            let mut bytes = vec![0u8; rng.gen_range(0..200)];
            rng.fill_bytes(&mut bytes);
            assert!(parse_request(&bytes).is_err());
            // Flipped bits in a valid request may still parse; they must
            // not panic.
            let mut mutated = valid.clone();
            let at = rng.gen_range(0..mutated.len());
            mutated[at] ^= 1 << rng.gen_range(0..8);
            let _ = parse_request(&mutated);
        }
    }

    #[test]
    fn responses_refuse_bad_inputs() {
        let fx = Fixture::new();
        let request = parse_request(&request_der(vec![good_id()], None, 0)).unwrap();
        let now = SystemTime::now();
        assert!(response_data(&fx.ca.cert, &[], now, None).is_err());
        let backwards = SingleResponseInfo {
            cert_id: &request.cert_ids[0],
            status: CertStatus::Good,
            this_update: now,
            next_update: now - Duration::from_secs(1),
        };
        assert!(response_data(&fx.ca.cert, &[backwards], now, None).is_err());
        let ok = SingleResponseInfo {
            cert_id: &request.cert_ids[0],
            status: CertStatus::Good,
            this_update: now,
            next_update: now,
        };
        let data = response_data(&fx.ca.cert, &[ok], now, None).unwrap();
        assert!(assemble_basic(&data, &[1u8; 64], &[]).is_err());
        let signature = sign_with(&fx.ca.key, &data);
        assert!(assemble_basic(&data[1..], &signature, &[]).is_err());
        assert!(assemble_basic(b"", &signature, &[]).is_err());

        // The same ResponseData with its default version written out
        // ([0] INTEGER 0): whether or not it decodes, it cannot be carried
        // as signed, because its re-encoding drops the version.
        let body_start = if data[1] & 0x80 == 0 {
            2
        } else {
            2 + (data[1] & 0x7f) as usize
        };
        let mut body = vec![0xa0, 0x03, 0x02, 0x01, 0x00];
        body.extend_from_slice(&data[body_start..]);
        let explicit_version = der::asn1::Any::new(der::Tag::Sequence, body)
            .unwrap()
            .to_der()
            .unwrap();
        let signature = sign_with(&fx.ca.key, &explicit_version);
        assert!(assemble_basic(&explicit_version, &signature, &[]).is_err());
    }
}
