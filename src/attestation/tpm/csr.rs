//! TPM evidence carried inside a PKCS#10 request, in the shape of
//! draft-ietf-lamps-csr-attestation: the attribute id-aa-attestation
//! (1.2.840.113549.1.9.16.2.59) holds evidence statements, and a statement
//! of type tcg-attest-tpm-certify (2.23.133.20.1) is
//!
//! ```text
//! TcgAttestCertify ::= SEQUENCE {
//!     tpmSAttest  OCTET STRING,           -- TPMS_ATTEST from TPM2_Certify
//!     signature   OCTET STRING,           -- TPMT_SIGNATURE by the AK
//!     tpmTPublic  OCTET STRING OPTIONAL } -- TPMT_PUBLIC of the key
//! ```
//!
//! Drafts differ on the outer shape: early ones put a `SEQUENCE OF
//! EvidenceStatement` in the attribute, later ones a `SEQUENCE OF
//! EvidenceBundle` whose first field is that sequence. Both are read. The
//! evidence then goes through the same verifier as the JSON route.

use const_oid::ObjectIdentifier;
use der::asn1::OctetString;
use der::{Any, Decode, Encode, Sequence};

use super::evidence::CertifyEvidence;
use super::TpmAttestationError;
use crate::pki::csr::VerifiedCsr;

pub const ID_AA_ATTESTATION: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.16.2.59");
pub const TCG_ATTEST_TPM_CERTIFY: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.23.133.20.1");

#[derive(Clone, Debug, Sequence)]
pub struct EvidenceStatement {
    pub statement_type: ObjectIdentifier,
    pub stmt: Any,
    #[asn1(optional = "true")]
    pub hint: Option<String>,
}

#[derive(Clone, Debug, Sequence)]
struct EvidenceBundle {
    evidences: Vec<EvidenceStatement>,
    #[asn1(optional = "true")]
    certs: Option<Vec<Any>>,
}

#[derive(Clone, Debug, Sequence)]
pub struct TcgAttestCertify {
    pub tpm_s_attest: OctetString,
    pub signature: OctetString,
    #[asn1(optional = "true")]
    pub tpm_t_public: Option<OctetString>,
}

/// The statements in one attribute value, whichever of the drafts' three
/// shapes it has: a bare `SEQUENCE OF AttestationStatement` (early), one
/// `AttestationBundle` (current), or a `SEQUENCE OF EvidenceBundle` (the
/// revisions between).
fn statements_in(der: &[u8]) -> Option<Vec<EvidenceStatement>> {
    if let Ok(statements) = Vec::<EvidenceStatement>::from_der(der) {
        return Some(statements);
    }
    if let Ok(bundle) = EvidenceBundle::from_der(der) {
        return Some(bundle.evidences);
    }
    Vec::<EvidenceBundle>::from_der(der)
        .ok()
        .map(|bundles| bundles.into_iter().flat_map(|b| b.evidences).collect())
}

/// The one tcg-attest-tpm-certify statement in the request. None, several,
/// or one without the key's public area are refused: the verifier must
/// know exactly which key and which evidence it is judging.
pub fn certify_evidence_from_csr(
    csr: &VerifiedCsr,
) -> Result<CertifyEvidence, TpmAttestationError> {
    let malformed = || TpmAttestationError::Malformed("CSR attestation attribute");
    let mut found = Vec::new();
    for value in csr.attribute_values(&ID_AA_ATTESTATION) {
        let der = value.to_der().map_err(|_| malformed())?;
        let statements = statements_in(&der).ok_or_else(malformed)?;
        found.extend(
            statements
                .into_iter()
                .filter(|s| s.statement_type == TCG_ATTEST_TPM_CERTIFY),
        );
    }
    let [statement] = found.as_slice() else {
        return Err(TpmAttestationError::Malformed(
            "CSR must carry exactly one tcg-attest-tpm-certify statement",
        ));
    };
    let certify: TcgAttestCertify = statement.stmt.decode_as().map_err(|_| malformed())?;
    let public = certify.tpm_t_public.ok_or(TpmAttestationError::Malformed(
        "tcg-attest-tpm-certify without tpmTPublic",
    ))?;
    Ok(CertifyEvidence {
        public: public.into_bytes(),
        attest: certify.tpm_s_attest.into_bytes(),
        signature: certify.signature.into_bytes(),
    })
}

/// Builds the attribute value for a request (the agent side and tests), in
/// the current draft's shape: one `AttestationBundle` without certificates.
pub fn attestation_attribute_value(evidence: &CertifyEvidence) -> Result<Any, der::Error> {
    let certify = TcgAttestCertify {
        tpm_s_attest: OctetString::new(evidence.attest.clone())?,
        signature: OctetString::new(evidence.signature.clone())?,
        tpm_t_public: Some(OctetString::new(evidence.public.clone())?),
    };
    let bundle = EvidenceBundle {
        evidences: vec![EvidenceStatement {
            statement_type: TCG_ATTEST_TPM_CERTIFY,
            stmt: Any::encode_from(&certify)?,
            hint: None,
        }],
        certs: None,
    };
    Any::encode_from(&bundle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statement(n: u8) -> EvidenceStatement {
        EvidenceStatement {
            statement_type: TCG_ATTEST_TPM_CERTIFY,
            stmt: Any::encode_from(&OctetString::new(vec![n]).unwrap()).unwrap(),
            hint: None,
        }
    }

    #[test]
    fn all_three_shapes_of_the_attribute_yield_their_statements() {
        let bare = vec![statement(1)].to_der().unwrap();
        let bundle = EvidenceBundle {
            evidences: vec![statement(2)],
            certs: None,
        }
        .to_der()
        .unwrap();
        let bundles = vec![
            EvidenceBundle {
                evidences: vec![statement(3)],
                certs: None,
            },
            EvidenceBundle {
                evidences: vec![statement(4)],
                certs: None,
            },
        ]
        .to_der()
        .unwrap();
        let payloads = |der: &[u8]| -> Vec<Vec<u8>> {
            statements_in(der)
                .unwrap()
                .iter()
                .map(|s| s.stmt.decode_as::<OctetString>().unwrap().into_bytes())
                .collect()
        };
        assert_eq!(payloads(&bare), vec![vec![1]]);
        assert_eq!(payloads(&bundle), vec![vec![2]]);
        assert_eq!(payloads(&bundles), vec![vec![3], vec![4]]);
        assert!(statements_in(&OctetString::new(vec![0]).unwrap().to_der().unwrap()).is_none());
    }
}
