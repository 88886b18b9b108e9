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
use crate::ca::csr::VerifiedCsr;

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
        let statements = match Vec::<EvidenceStatement>::from_der(&der) {
            Ok(statements) => statements,
            Err(_) => Vec::<EvidenceBundle>::from_der(&der)
                .map_err(|_| malformed())?
                .into_iter()
                .flat_map(|b| b.evidences)
                .collect(),
        };
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

/// Builds the attribute value for a request (the agent side and tests).
pub fn attestation_attribute_value(evidence: &CertifyEvidence) -> Result<Any, der::Error> {
    let certify = TcgAttestCertify {
        tpm_s_attest: OctetString::new(evidence.attest.clone())?,
        signature: OctetString::new(evidence.signature.clone())?,
        tpm_t_public: Some(OctetString::new(evidence.public.clone())?),
    };
    let statements = vec![EvidenceStatement {
        statement_type: TCG_ATTEST_TPM_CERTIFY,
        stmt: Any::encode_from(&certify)?,
        hint: None,
    }];
    Any::encode_from(&statements)
}
