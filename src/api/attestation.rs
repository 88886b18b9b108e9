//! TPM-attested enrollment for agents that hold their key in their own TPM
//! (`custody = "agent-tpm"`): `POST /v1/attestation/challenges`, then
//! `POST /v1/attestation/tpm/certificates`. The agent's enrollment token is
//! the credential for both; only a certificate spends it.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use der::Decode;
use serde::{Deserialize, Serialize};

use super::agents::{issued, rfc3339, IssuedCertificateView};
use super::error::ApiError;
use super::extract::{Json, Unparsed};
use super::signing::{b64, decode_b64};
use super::AppState;
use crate::agents::enrollment::TpmEvidence;
use crate::attestation::tpm::evidence::CertifyEvidence;
use crate::attestation::tpm::ChallengeRequest;
use crate::pki::csr::VerifiedCsr;
use base64::Engine;

/// More than any real EK chain needs; bounds the work one request causes.
const MAX_EK_INTERMEDIATES: usize = 4;

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/attestation/challenges", post(challenge))
        .route("/v1/attestation/tpm/certificates", post(certificate))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChallengeInput {
    enrollment_token: String,
    /// The EK certificate, PEM; or `ek_certificate_b64`, DER; or neither,
    /// for a TPM without one whose EK is on the allow-list.
    ek_certificate_pem: Option<String>,
    ek_certificate_b64: Option<String>,
    /// Intermediate CA certificates the agent holds, PEM.
    ek_intermediates_pem: Option<String>,
    /// The EK's and the AK's `TPM2B_PUBLIC` (or `TPMT_PUBLIC`).
    ek_public_b64: String,
    ak_public_b64: String,
}

#[derive(Serialize)]
struct ChallengeOutput {
    agent: String,
    /// TPM2_Certify's qualifying data must be exactly this.
    nonce_b64: String,
    /// `TPM2B_ID_OBJECT` and `TPM2B_ENCRYPTED_SECRET` contents (no size
    /// prefix), the inputs of TPM2_ActivateCredential.
    credential_blob_b64: String,
    encrypted_secret_b64: String,
    expires_at: String,
}

fn certificates_der(pem: &str) -> Result<Vec<Vec<u8>>, ApiError> {
    let bad = || {
        ApiError::bad_request(
            "invalid_certificate",
            "ek_intermediates_pem is not a list of PEM certificates",
        )
    };
    let certs = x509_cert::Certificate::load_pem_chain(pem.as_bytes()).map_err(|_| bad())?;
    if certs.len() > MAX_EK_INTERMEDIATES {
        return Err(ApiError::bad_request(
            "too_many_certificates",
            format!("at most {MAX_EK_INTERMEDIATES} intermediates"),
        ));
    }
    certs
        .iter()
        .map(|c| der::Encode::to_der(c).map_err(|_| bad()))
        .collect()
}

async fn challenge(
    State(state): State<Arc<AppState>>,
    body: Unparsed<ChallengeInput>,
) -> Result<(StatusCode, Json<ChallengeOutput>), ApiError> {
    let body = body.parse()?;
    let enrollee = state.requests.tpm_enrollee(&body.enrollment_token).await?;
    let ek_certificate_der = match (&body.ek_certificate_pem, &body.ek_certificate_b64) {
        (None, None) => None,
        (Some(pem), None) => Some({
            let cert =
                crate::pki::cert::from_pem_strict::<x509_cert::Certificate>(pem).map_err(|_| {
                    ApiError::bad_request(
                        "invalid_certificate",
                        "ek_certificate_pem is not a PEM certificate",
                    )
                })?;
            der::Encode::to_der(&cert).map_err(ApiError::internal)?
        }),
        (None, Some(der_b64)) => Some({
            let der = decode_b64("ek_certificate_b64", der_b64)?;
            // Read from NV, the certificate may come with the index's fill.
            crate::attestation::tpm::ek::without_nv_padding(&der)
                .ok()
                .and_then(|cert| x509_cert::Certificate::from_der(cert).ok())
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_certificate",
                        "ek_certificate_b64 is not a DER certificate",
                    )
                })?;
            der
        }),
        _ => {
            return Err(ApiError::bad_request(
                "invalid_field",
                "give at most one of ek_certificate_pem and ek_certificate_b64",
            ))
        }
    };
    let request = ChallengeRequest {
        ek_certificate_der,
        ek_intermediates_der: match &body.ek_intermediates_pem {
            Some(pem) => certificates_der(pem)?,
            None => Vec::new(),
        },
        ek_public: decode_b64("ek_public_b64", &body.ek_public_b64)?,
        ak_public: decode_b64("ak_public_b64", &body.ak_public_b64)?,
    };
    let issued = state.requests.tpm_challenge(&enrollee, &request).await?;
    Ok((
        StatusCode::CREATED,
        Json(ChallengeOutput {
            agent: enrollee.name.to_string(),
            nonce_b64: b64().encode(&issued.record.nonce),
            credential_blob_b64: b64().encode(&issued.credential.id_object),
            encrypted_secret_b64: b64().encode(&issued.credential.encrypted_secret),
            expires_at: rfc3339(issued.record.expires_at),
        }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CertificateInput {
    enrollment_token: String,
    /// What TPM2_ActivateCredential recovered.
    credential_b64: String,
    /// The evidence as three fields: the new key's `TPM2B_PUBLIC` (or
    /// `TPMT_PUBLIC`), TPM2_Certify's `TPMS_ATTEST` and `TPMT_SIGNATURE`...
    public_b64: Option<String>,
    certify_info_b64: Option<String>,
    signature_b64: Option<String>,
    /// ...or a CSR signed by the new key, carrying them in its
    /// id-aa-attestation attribute (draft-ietf-lamps-csr-attestation).
    csr_pem: Option<String>,
    ttl_seconds: Option<u64>,
}

impl CertificateInput {
    fn evidence(&self) -> Result<TpmEvidence, ApiError> {
        match (
            &self.public_b64,
            &self.certify_info_b64,
            &self.signature_b64,
            &self.csr_pem,
        ) {
            (Some(public), Some(attest), Some(signature), None) => {
                Ok(TpmEvidence::Certify(CertifyEvidence {
                    public: decode_b64("public_b64", public)?,
                    attest: decode_b64("certify_info_b64", attest)?,
                    signature: decode_b64("signature_b64", signature)?,
                }))
            }
            (None, None, None, Some(pem)) => Ok(TpmEvidence::Csr(VerifiedCsr::from_pem(pem)?)),
            _ => Err(ApiError::bad_request(
                "invalid_field",
                "give public_b64, certify_info_b64 and signature_b64, or csr_pem alone",
            )),
        }
    }
}

/// Verifies the evidence against the challenge its qualifying data names,
/// spends that challenge and the enrollment token together, and issues
/// the certificate with the attestation extension.
async fn certificate(
    State(state): State<Arc<AppState>>,
    body: Unparsed<CertificateInput>,
) -> Result<(StatusCode, Json<IssuedCertificateView>), ApiError> {
    let body = body.parse()?;
    let enrollee = state.requests.tpm_enrollee(&body.enrollment_token).await?;
    let evidence = body.evidence()?;
    let secret = decode_b64("credential_b64", &body.credential_b64)?;
    let certified = state
        .requests
        .tpm_certificate(&enrollee, evidence, &secret, body.ttl_seconds)
        .await?;
    Ok(issued(&state, certified))
}
