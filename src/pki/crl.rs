//! X.509 v2 certificate revocation lists (RFC 5280 §5), `x509-cert`'s
//! types with no key anywhere near them: the caller signs the TBSCertList
//! digest through its key pool and hands the signature back to
//! [`assemble`].

use std::time::SystemTime;

use der::asn1::{Any, OctetString, Uint};
use der::{Decode, Encode, Tag};
use x509_cert::certificate::Version;
use x509_cert::crl::{CertificateList, RevokedCert, TbsCertList};
use x509_cert::ext::pkix::{AuthorityKeyIdentifier, CrlNumber, CrlReason, SubjectKeyIdentifier};
use x509_cert::serial_number::SerialNumber;

use super::cert::{self, Certificate};
use super::{profile, CaError};

/// CRLReason (RFC 5280 §5.3.1), without removeFromCRL: keyward publishes
/// full CRLs only, and that value exists for delta CRLs.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Hash)]
pub enum RevocationReason {
    Unspecified,
    KeyCompromise,
    CaCompromise,
    AffiliationChanged,
    Superseded,
    CessationOfOperation,
    CertificateHold,
    PrivilegeWithdrawn,
    AaCompromise,
}

impl RevocationReason {
    /// The RFC 5280 ASN.1 names; the all-lower-case "ca"/"aa" spellings are
    /// accepted too because people write them that way.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "unspecified" => Self::Unspecified,
            "keyCompromise" => Self::KeyCompromise,
            "cACompromise" | "caCompromise" => Self::CaCompromise,
            "affiliationChanged" => Self::AffiliationChanged,
            "superseded" => Self::Superseded,
            "cessationOfOperation" => Self::CessationOfOperation,
            "certificateHold" => Self::CertificateHold,
            "privilegeWithdrawn" => Self::PrivilegeWithdrawn,
            "aACompromise" | "aaCompromise" => Self::AaCompromise,
            _ => return None,
        })
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::KeyCompromise => "keyCompromise",
            Self::CaCompromise => "cACompromise",
            Self::AffiliationChanged => "affiliationChanged",
            Self::Superseded => "superseded",
            Self::CessationOfOperation => "cessationOfOperation",
            Self::CertificateHold => "certificateHold",
            Self::PrivilegeWithdrawn => "privilegeWithdrawn",
            Self::AaCompromise => "aACompromise",
        }
    }

    /// The CRLReason ENUMERATED value; 7 is unused in the standard.
    pub fn code(&self) -> u8 {
        self.to_crl_reason() as u8
    }

    pub(crate) fn to_crl_reason(self) -> CrlReason {
        match self {
            Self::Unspecified => CrlReason::Unspecified,
            Self::KeyCompromise => CrlReason::KeyCompromise,
            Self::CaCompromise => CrlReason::CaCompromise,
            Self::AffiliationChanged => CrlReason::AffiliationChanged,
            Self::Superseded => CrlReason::Superseded,
            Self::CessationOfOperation => CrlReason::CessationOfOperation,
            Self::CertificateHold => CrlReason::CertificateHold,
            Self::PrivilegeWithdrawn => CrlReason::PrivilegeWithdrawn,
            Self::AaCompromise => CrlReason::AaCompromise,
        }
    }
}

impl std::fmt::Display for RevocationReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One revoked certificate.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct RevokedEntry {
    /// The serial's INTEGER content octets, as in the certificate.
    pub serial: Vec<u8>,
    pub revoked_at: SystemTime,
    pub reason: RevocationReason,
}

/// Everything needed to build one CRL.
pub struct CrlRequest<'a> {
    /// The CA certificate whose key signs the CRL.
    pub issuer: &'a Certificate,
    pub entries: &'a [RevokedEntry],
    pub crl_number: u64,
    pub this_update: SystemTime,
    pub next_update: SystemTime,
}

/// A serial number from its INTEGER content octets, kept exactly as given
/// (`SerialNumber::new` would reinterpret a leading 0x80.. as positive) and
/// refused if the octets are not a canonical DER INTEGER.
pub(crate) fn serial_from_content(content: &[u8]) -> Result<SerialNumber, CaError> {
    let tlv = Any::new(Tag::Integer, content)?.to_der()?;
    SerialNumber::from_der(&tlv).map_err(|e| {
        CaError::Internal(format!(
            "serial {} is not a DER INTEGER: {e}",
            hex::encode(content)
        ))
    })
}

/// The key identifier relying parties match the CRL to the CA with.
///
/// A CA certificate signed by an external root may lack a subject key
/// identifier; keyward's leaves then still carry the RFC 7093 identifier of
/// the CA key in their AKI, so the CRL uses that same value.
fn issuer_key_identifier(issuer: &Certificate) -> Result<Vec<u8>, CaError> {
    let tbs = &issuer.tbs_certificate;
    if let Some((_, ski)) = tbs.get::<SubjectKeyIdentifier>()? {
        return Ok(ski.0.as_bytes().to_vec());
    }
    let key = profile::p256_key_of(&tbs.subject_public_key_info)?;
    Ok(profile::key_identifier(&key))
}

fn revoked_cert(entry: &RevokedEntry) -> Result<RevokedCert, CaError> {
    // RFC 5280 §5.3.1: omit reasonCode rather than encode unspecified.
    let crl_entry_extensions = match entry.reason {
        RevocationReason::Unspecified => None,
        reason => Some(vec![cert::extension(false, &reason.to_crl_reason())?]),
    };
    Ok(RevokedCert {
        serial_number: serial_from_content(&entry.serial)?,
        revocation_date: profile::x509_time(entry.revoked_at)?,
        crl_entry_extensions,
    })
}

/// DER of the TBSCertList for `req`, ready to be hashed with SHA-256 and
/// signed with the issuer's key.
pub fn tbs_cert_list(req: &CrlRequest) -> Result<Vec<u8>, CaError> {
    let this_update = profile::x509_time(req.this_update)?;
    let next_update = profile::x509_time(req.next_update)?;
    if next_update.to_unix_duration() <= this_update.to_unix_duration() {
        return Err(CaError::Internal(
            "a CRL's nextUpdate must be after its thisUpdate".into(),
        ));
    }
    let revoked = req
        .entries
        .iter()
        .map(revoked_cert)
        .collect::<Result<Vec<_>, _>>()?;
    let aki = AuthorityKeyIdentifier {
        key_identifier: Some(OctetString::new(issuer_key_identifier(req.issuer)?)?),
        authority_cert_issuer: None,
        authority_cert_serial_number: None,
    };
    let crl_number = CrlNumber(Uint::new(&req.crl_number.to_be_bytes())?);
    let tbs = TbsCertList {
        version: Version::V2,
        signature: profile::ecdsa_with_sha256(),
        issuer: req.issuer.tbs_certificate.subject.clone(),
        this_update,
        next_update: Some(next_update),
        // RFC 5280 §5.1.2.6: with no revoked certificates the list is absent,
        // not an empty SEQUENCE.
        revoked_certificates: (!revoked.is_empty()).then_some(revoked),
        crl_extensions: Some(vec![
            cert::extension(false, &aki)?,
            cert::extension(false, &crl_number)?,
        ]),
    };
    Ok(tbs.to_der()?)
}

/// Refuses anything but a DER ECDSA P-256 signature, so a raw `r || s`
/// passed by mistake fails here rather than in every relying party.
pub(crate) fn check_ecdsa_der(signature_der: &[u8]) -> Result<(), CaError> {
    p256::ecdsa::Signature::from_der(signature_der)
        .map(|_| ())
        .map_err(|_| CaError::Internal("the signature is not a DER ECDSA P-256 signature".into()))
}

/// The CertificateList DER from the TBSCertList DER and the DER ECDSA
/// signature over it.
pub fn assemble(tbs_der: &[u8], signature_der: &[u8]) -> Result<Vec<u8>, CaError> {
    let tbs: TbsCertList = cert::decode_signed(tbs_der)?;
    if tbs.signature != profile::ecdsa_with_sha256() {
        return Err(CaError::Internal(
            "the TBSCertList names a signature algorithm other than ecdsa-with-SHA256".into(),
        ));
    }
    // The signature covers these bytes: the list must carry them exactly,
    // which a decoded value re-encodes to only if they were DER.
    if tbs.to_der()? != tbs_der {
        return Err(CaError::Internal(
            "the signed TBSCertList is not in DER".into(),
        ));
    }
    check_ecdsa_der(signature_der)?;
    let list = CertificateList {
        tbs_cert_list: tbs,
        signature_algorithm: profile::ecdsa_with_sha256(),
        signature: profile::signature_bits(signature_der)?,
    };
    Ok(list.to_der()?)
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::process::{Command, Output};
    use std::time::Duration;

    use der::pem::LineEnding;
    use p256::ecdsa::signature::hazmat::PrehashSigner;
    use p256::ecdsa::{Signature, SigningKey};
    use sha2::{Digest, Sha256};
    use x509_cert::crl::CertificateList;

    use const_oid::AssociatedOid;

    use super::*;
    use crate::pki::cert::CertificateText;
    use crate::pki::verify::test_pki::{key, public, TestCa};

    const ALL: [RevocationReason; 9] = [
        RevocationReason::Unspecified,
        RevocationReason::KeyCompromise,
        RevocationReason::CaCompromise,
        RevocationReason::AffiliationChanged,
        RevocationReason::Superseded,
        RevocationReason::CessationOfOperation,
        RevocationReason::CertificateHold,
        RevocationReason::PrivilegeWithdrawn,
        RevocationReason::AaCompromise,
    ];

    pub(crate) fn openssl(args: &[&str]) -> Output {
        Command::new("openssl")
            .args(args)
            .output()
            .expect("the openssl binary is required for these tests")
    }

    fn text(output: &Output) -> String {
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    }

    fn sign_with(key: &SigningKey, tbs_der: &[u8]) -> Vec<u8> {
        let signature: Signature = key.sign_prehash(&Sha256::digest(tbs_der)).unwrap();
        signature.to_der().as_bytes().to_vec()
    }

    fn signed_crl(ca: &TestCa, entries: &[RevokedEntry], number: u64) -> Vec<u8> {
        let now = SystemTime::now();
        let tbs = tbs_cert_list(&CrlRequest {
            issuer: &ca.cert,
            entries,
            crl_number: number,
            this_update: now - Duration::from_secs(60),
            next_update: now + Duration::from_secs(3600),
        })
        .unwrap();
        assemble(&tbs, &sign_with(&ca.key, &tbs)).unwrap()
    }

    fn write(path: &Path, bytes: impl AsRef<[u8]>) -> String {
        std::fs::write(path, bytes).unwrap();
        path.to_str().unwrap().to_owned()
    }

    #[test]
    fn reason_names_round_trip_and_codes_follow_rfc_5280() {
        for reason in ALL {
            assert_eq!(RevocationReason::parse(reason.as_str()), Some(reason));
        }
        let codes: Vec<u8> = ALL.iter().map(|r| r.code()).collect();
        assert_eq!(codes, [0, 1, 2, 3, 4, 5, 6, 9, 10]);
        assert_eq!(
            RevocationReason::parse("caCompromise"),
            Some(RevocationReason::CaCompromise)
        );
        assert_eq!(
            RevocationReason::parse("aaCompromise"),
            Some(RevocationReason::AaCompromise)
        );
        for bad in ["removeFromCRL", "KeyCompromise", "key_compromise", "", "7"] {
            assert_eq!(RevocationReason::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn structure_decodes_with_v2_extensions_and_reason_only_when_specified() {
        let ca = TestCa::root("crl structure ca");
        let entries = [
            RevokedEntry {
                serial: vec![0x01, 0x02, 0x03],
                revoked_at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_999),
                reason: RevocationReason::KeyCompromise,
            },
            RevokedEntry {
                serial: vec![0x00, 0x80],
                revoked_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_001),
                reason: RevocationReason::Unspecified,
            },
        ];
        let der = signed_crl(&ca, &entries, 0x0100);
        let crl = CertificateList::from_der(&der).unwrap();
        let tbs = &crl.tbs_cert_list;
        assert_eq!(tbs.version, Version::V2);
        assert_eq!(tbs.issuer, ca.name());
        let revoked = tbs.revoked_certificates.as_ref().unwrap();
        assert_eq!(revoked[0].serial_number.as_bytes(), [0x01, 0x02, 0x03]);
        assert_eq!(revoked[1].serial_number.as_bytes(), [0x00, 0x80]);
        assert_eq!(
            revoked[0].revocation_date.to_unix_duration(),
            Duration::from_secs(1_700_000_000),
            "truncated to whole seconds"
        );
        let reason = &revoked[0].crl_entry_extensions.as_ref().unwrap()[0];
        assert_eq!(reason.extn_id, CrlReason::OID);
        assert!(!reason.critical);
        assert_eq!(
            CrlReason::from_der(reason.extn_value.as_bytes()).unwrap(),
            CrlReason::KeyCompromise
        );
        assert!(revoked[1].crl_entry_extensions.is_none());

        let extensions = tbs.crl_extensions.as_ref().unwrap();
        assert!(extensions.iter().all(|e| !e.critical));
        let aki = extensions
            .iter()
            .find(|e| e.extn_id == AuthorityKeyIdentifier::OID)
            .unwrap();
        let aki = AuthorityKeyIdentifier::from_der(aki.extn_value.as_bytes()).unwrap();
        let (_, ski) = ca
            .cert
            .tbs_certificate
            .get::<SubjectKeyIdentifier>()
            .unwrap()
            .unwrap();
        assert_eq!(aki.key_identifier, Some(ski.0));
        let number = extensions
            .iter()
            .find(|e| e.extn_id == CrlNumber::OID)
            .unwrap();
        assert_eq!(number.extn_value.as_bytes(), [0x02, 0x02, 0x01, 0x00]);
    }

    #[test]
    fn empty_crl_omits_revoked_certificates() {
        let ca = TestCa::root("crl empty ca");
        let crl = CertificateList::from_der(&signed_crl(&ca, &[], 1)).unwrap();
        assert!(crl.tbs_cert_list.revoked_certificates.is_none());
    }

    #[test]
    fn bad_inputs_are_errors() {
        let ca = TestCa::root("crl bad input ca");
        let now = SystemTime::now();
        let request = |entries: &'static [RevokedEntry], next_update| CrlRequest {
            issuer: &ca.cert,
            entries,
            crl_number: 1,
            this_update: now,
            next_update,
        };
        assert!(tbs_cert_list(&request(&[], now)).is_err());
        static NON_CANONICAL: [RevokedEntry; 1] = [RevokedEntry {
            serial: Vec::new(),
            revoked_at: SystemTime::UNIX_EPOCH,
            reason: RevocationReason::Superseded,
        }];
        assert!(tbs_cert_list(&request(&NON_CANONICAL, now + Duration::from_secs(60))).is_err());
        assert!(serial_from_content(&[0x00, 0x01]).is_err());
        assert!(serial_from_content(&[]).is_err());

        let tbs = tbs_cert_list(&request(&[], now + Duration::from_secs(60))).unwrap();
        let raw_signature = [7u8; 64];
        assert!(assemble(&tbs, &raw_signature).is_err());
        let signature = sign_with(&ca.key, &tbs);
        assert!(assemble(&tbs[..tbs.len() - 1], &signature).is_err());
        let mut trailing = tbs.clone();
        trailing.push(0);
        assert!(assemble(&trailing, &signature).is_err());
    }

    #[test]
    fn openssl_reads_verifies_and_enforces_the_crl() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::root("crl openssl ca");
        let revoked_leaf = ca.agent("revoked-agent", &public(&key()));
        let other_leaf = ca.agent("other-agent", &public(&key()));
        let good_leaf = ca.agent("good-agent", &public(&key()));
        let entries = [
            RevokedEntry {
                serial: revoked_leaf
                    .tbs_certificate
                    .serial_number
                    .as_bytes()
                    .to_vec(),
                revoked_at: SystemTime::now() - Duration::from_secs(10),
                reason: RevocationReason::KeyCompromise,
            },
            RevokedEntry {
                serial: other_leaf.tbs_certificate.serial_number.as_bytes().to_vec(),
                revoked_at: SystemTime::now() - Duration::from_secs(5),
                reason: RevocationReason::Unspecified,
            },
        ];
        let crl = signed_crl(&ca, &entries, 42);
        let crl_path = write(&dir.path().join("crl.der"), &crl);
        let ca_pem = ca.cert.to_pem_string().unwrap();
        let ca_path = write(&dir.path().join("ca.pem"), &ca_pem);

        let shown = openssl(&["crl", "-inform", "DER", "-in", &crl_path, "-noout", "-text"]);
        assert!(shown.status.success(), "{}", text(&shown));
        let shown = text(&shown).to_uppercase();
        for leaf in [&revoked_leaf, &other_leaf] {
            assert!(shown.contains(&leaf.serial_hex().to_uppercase()), "{shown}");
        }
        assert!(shown.contains("KEY COMPROMISE"), "{shown}");
        assert!(shown.contains("X509V3 CRL NUMBER"), "{shown}");
        assert!(shown.contains("42"), "{shown}");

        let verified = openssl(&[
            "crl", "-inform", "DER", "-in", &crl_path, "-CAfile", &ca_path, "-noout",
        ]);
        assert!(verified.status.success(), "{}", text(&verified));
        assert!(text(&verified).contains("verify OK"), "{}", text(&verified));

        let crl_pem = der::pem::encode_string("X509 CRL", LineEnding::LF, &crl).unwrap();
        let bundle = write(&dir.path().join("ca+crl.pem"), format!("{ca_pem}{crl_pem}"));
        let check = |leaf: &Certificate, name: &str| {
            let path = write(&dir.path().join(name), leaf.to_pem_string().unwrap());
            openssl(&["verify", "-crl_check", "-CAfile", &bundle, &path])
        };
        let refused = check(&revoked_leaf, "revoked.pem");
        assert!(!refused.status.success());
        assert!(
            text(&refused).contains("certificate revoked"),
            "{}",
            text(&refused)
        );
        let accepted = check(&good_leaf, "good.pem");
        assert!(accepted.status.success(), "{}", text(&accepted));

        // The empty CRL, too, is one openssl checks against and accepts.
        let empty = signed_crl(&ca, &[], 43);
        let empty_path = write(&dir.path().join("empty.der"), &empty);
        let verified = openssl(&[
            "crl",
            "-inform",
            "DER",
            "-in",
            &empty_path,
            "-CAfile",
            &ca_path,
            "-noout",
        ]);
        assert!(text(&verified).contains("verify OK"), "{}", text(&verified));
        let shown = openssl(&[
            "crl",
            "-inform",
            "DER",
            "-in",
            &empty_path,
            "-noout",
            "-text",
        ]);
        assert!(
            text(&shown).contains("No Revoked Certificates"),
            "{}",
            text(&shown)
        );
        let empty_pem = der::pem::encode_string("X509 CRL", LineEnding::LF, &empty).unwrap();
        let bundle = write(
            &dir.path().join("ca+crl.pem"),
            format!("{ca_pem}{empty_pem}"),
        );
        let path = write(
            &dir.path().join("revoked.pem"),
            revoked_leaf.to_pem_string().unwrap(),
        );
        let passes = openssl(&["verify", "-crl_check", "-CAfile", &bundle, &path]);
        assert!(passes.status.success(), "{}", text(&passes));
    }
}
