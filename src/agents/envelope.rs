//! Signed agent-to-agent messages: JWS compact serialization (RFC 7515)
//! with ES256 (RFC 7518 §3.4) only, the signer identified by its
//! certificate chain in `x5c`. The format, with a worked example, is in
//! docs/envelope.md; anything there that this module does differently is a
//! bug in one of them.
//!
//! Signing does not need the key: [`signing_input`] gives the bytes whose
//! SHA-256 the key (on the token, through the pool) signs, and [`assemble`]
//! appends the P1363 signature. Verification trusts nothing in the token
//! until the chain and the signature have verified: the algorithm is fixed,
//! not read from the header, and the claims are parsed only after the
//! signature over them checked out.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use der::{Decode, Encode};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::pki::cert::Certificate;
use crate::pki::profile::ID_KP_DOCUMENT_SIGNING;
use crate::pki::verify::{self, VerifyError};

/// The only `alg` accepted or produced.
pub const ALG: &str = "ES256";
/// `typ` of every envelope; compared exactly.
pub const TYP: &str = "keyward-msg+jwt";
/// Longest allowed `exp - iat`, in seconds.
pub const MAX_LIFETIME_SECS: i64 = 300;
/// How far in the future `iat` may be, for clocks that disagree.
pub const CLOCK_SKEW_SECS: i64 = 60;
/// Most certificates in `x5c`, leaf included.
pub const MAX_X5C: usize = 5;
/// Longest `intent`, in characters (printable ASCII, so also bytes).
pub const MAX_INTENT_LEN: usize = 256;
/// Random bytes in a `jti`.
pub const JTI_BYTES: usize = 16;
/// Longest token accepted. Five P-256 certificates in base64 and the claims
/// fit in well under half of this; the bound stops oversized input before
/// any decoding.
pub const MAX_TOKEN_LEN: usize = 32 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    #[error("malformed envelope: {0}")]
    Malformed(&'static str),
    #[error("alg {0:?} is not supported: only ES256 is accepted")]
    UnsupportedAlg(Option<String>),
    #[error("typ {0:?} is not {TYP}")]
    WrongType(Option<String>),
    #[error("critical header parameters (crit) are not supported")]
    UnsupportedCritical,
    #[error("the signature is not 64 bytes of r||s with r, s in [1, n-1]")]
    MalformedSignature,
    #[error("the signature does not verify with the signer's key")]
    BadSignature,
    #[error("the signer's certificate chain is not trusted: {0}")]
    UntrustedSigner(#[source] VerifyError),
    /// The signer's certificate is not for a key keyward holds for the
    /// agent (an agent's own client key, say): its signatures never went
    /// through keyward's policy.
    #[error("the signer's certificate is not for message signing (id-kp-documentSigning)")]
    WrongKeyPurpose,
    #[error("iss is not the SPIFFE ID of the signer's certificate")]
    IssuerMismatch,
    #[error("aud is not this recipient")]
    WrongAudience,
    #[error("the message has expired")]
    Expired,
    #[error("iat is more than {CLOCK_SKEW_SECS} s in the future")]
    NotYetValid,
    #[error("exp - iat must be between 1 and {MAX_LIFETIME_SECS} seconds")]
    LifetimeTooLong,
    #[error("intent must be 1 to {MAX_INTENT_LEN} printable ASCII characters")]
    InvalidIntent,
    #[error("this message (jti) has been seen before")]
    Replayed,
    #[error("the replay cache is full; refusing rather than forgetting")]
    ReplayCacheFull,
    #[error("encoding a certificate: {0}")]
    Encoding(String),
}

impl EnvelopeError {
    /// A stable, machine-readable code for API responses and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::UnsupportedAlg(_) => "unsupported_alg",
            Self::WrongType(_) => "wrong_typ",
            Self::UnsupportedCritical => "unsupported_crit",
            Self::MalformedSignature => "malformed_signature",
            Self::BadSignature => "bad_signature",
            Self::UntrustedSigner(_) => "untrusted_signer",
            Self::WrongKeyPurpose => "wrong_key_purpose",
            Self::IssuerMismatch => "issuer_mismatch",
            Self::WrongAudience => "wrong_audience",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::LifetimeTooLong => "lifetime_too_long",
            Self::InvalidIntent => "invalid_intent",
            Self::Replayed => "replayed",
            Self::ReplayCacheFull => "replay_cache_full",
            Self::Encoding(_) => "encoding",
        }
    }

    /// Why the signer's chain was refused, for `untrusted_signer`.
    pub fn chain_error(&self) -> Option<&VerifyError> {
        match self {
            Self::UntrustedSigner(e) => Some(e),
            _ => None,
        }
    }
}

/// The protected header. Always `alg` ES256 and `typ` keyward-msg+jwt; only
/// the certificate chain varies, so that is all this holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    x5c: Vec<String>,
}

impl Header {
    /// `chain[0]` is the signer's certificate, each next one the issuer of
    /// the one before (the root may be included or left out).
    pub fn new(chain: &[Certificate]) -> Result<Self, EnvelopeError> {
        if chain.is_empty() || chain.len() > MAX_X5C {
            return Err(EnvelopeError::Malformed(
                "x5c must hold 1 to 5 certificates",
            ));
        }
        let x5c = chain
            .iter()
            .map(|cert| {
                cert.to_der()
                    .map(|der| STANDARD.encode(der))
                    .map_err(|e| EnvelopeError::Encoding(e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { x5c })
    }

    /// Base64 (standard alphabet, padded) DER certificates, leaf first.
    pub fn x5c(&self) -> &[String] {
        &self.x5c
    }
}

/// The header as serialized, members in this order.
#[derive(Serialize)]
struct HeaderOut<'a> {
    alg: &'static str,
    typ: &'static str,
    x5c: &'a [String],
}

/// The header as received. Every member is optional here so that a missing
/// or wrong `alg` gets its own error; unknown members are refused (the
/// format is closed), and serde refuses duplicate members, so no two JSON
/// parsers can read different headers out of one token.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderIn {
    alg: Option<String>,
    typ: Option<String>,
    x5c: Option<Vec<String>>,
    #[serde(default)]
    crit: Present,
}

/// Whether a member was present at all, whatever its value. `Option` would
/// read `"crit": null` as absent; no extension is understood, so any `crit`
/// is refused.
#[derive(Default)]
struct Present(bool);

impl<'de> Deserialize<'de> for Present {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(deserializer).map(|_| Self(true))
    }
}

/// The claims of one message. Built by [`Claims::new`], which checks them;
/// there is deliberately no `Deserialize`, so received claims exist only
/// inside a [`VerifiedMessage`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Claims {
    iss: String,
    aud: String,
    iat: i64,
    exp: i64,
    jti: String,
    intent: String,
}

/// The claims as received: exactly these members, no others, no
/// duplicates. Checked into [`Claims`] by [`verify()`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClaimsIn {
    iss: String,
    aud: String,
    iat: i64,
    exp: i64,
    jti: String,
    intent: String,
}

impl Claims {
    /// Claims for a message from `iss` to `aud`, issued at `iat` (unix
    /// seconds) and valid for `lifetime_secs`, with a fresh random `jti`.
    pub fn new(
        iss: &str,
        aud: &str,
        intent: &str,
        iat: i64,
        lifetime_secs: i64,
    ) -> Result<Self, EnvelopeError> {
        if !verify::is_spiffe_id(iss) {
            return Err(EnvelopeError::Malformed("iss is not a SPIFFE ID"));
        }
        if !verify::is_spiffe_id(aud) {
            return Err(EnvelopeError::Malformed("aud is not a SPIFFE ID"));
        }
        check_intent(intent)?;
        if !(1..=MAX_LIFETIME_SECS).contains(&lifetime_secs) {
            return Err(EnvelopeError::LifetimeTooLong);
        }
        let exp = iat
            .checked_add(lifetime_secs)
            .ok_or(EnvelopeError::Malformed("iat out of range"))?;
        let jti: [u8; JTI_BYTES] = rand::random();
        Ok(Self {
            iss: iss.to_owned(),
            aud: aud.to_owned(),
            iat,
            exp,
            jti: URL_SAFE_NO_PAD.encode(jti),
            intent: intent.to_owned(),
        })
    }

    pub fn iss(&self) -> &str {
        &self.iss
    }
    pub fn aud(&self) -> &str {
        &self.aud
    }
    pub fn iat(&self) -> i64 {
        self.iat
    }
    pub fn exp(&self) -> i64 {
        self.exp
    }
    pub fn jti(&self) -> &str {
        &self.jti
    }
    pub fn intent(&self) -> &str {
        &self.intent
    }
}

/// `intent` is 1 to 256 printable ASCII characters (0x20 to 0x7e). ASCII
/// only, so that what a person reads in a log or an approval prompt is what
/// was signed: no control characters, bidi overrides or look-alikes.
pub fn check_intent(intent: &str) -> Result<(), EnvelopeError> {
    let ok = (1..=MAX_INTENT_LEN).contains(&intent.len())
        && intent.bytes().all(|b| (0x20..=0x7e).contains(&b));
    if ok {
        Ok(())
    } else {
        Err(EnvelopeError::InvalidIntent)
    }
}

/// `BASE64URL(header) || '.' || BASE64URL(claims)`, the ASCII string whose
/// SHA-256 the signer's key signs.
pub fn signing_input(header: &Header, claims: &Claims) -> String {
    let header = HeaderOut {
        alg: ALG,
        typ: TYP,
        x5c: &header.x5c,
    };
    // Serializing structs of strings and integers to JSON cannot fail:
    // serde_json errors only on non-string map keys or a failing Serialize
    // impl, and neither type has either.
    let header = serde_json::to_vec(&header).expect("a header always serializes");
    let claims = serde_json::to_vec(claims).expect("claims always serialize");
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    )
}

/// What the key signs: SHA-256 of the signing input.
pub fn signing_digest(signing_input: &str) -> [u8; 32] {
    Sha256::digest(signing_input.as_bytes()).into()
}

/// The compact serialization: the signing input, '.', and the base64url of
/// the 64-byte `r || s` signature.
pub fn assemble(signing_input: &str, signature_p1363: &[u8; 64]) -> String {
    format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature_p1363)
    )
}

/// A message whose signer, signature, audience and lifetime verified.
/// Only [`verify()`] constructs one.
#[derive(Clone, Debug)]
pub struct VerifiedMessage {
    claims: Claims,
    signer_serial: String,
    /// SHA-256 of the signing input: what the signer's key signed.
    digest: [u8; 32],
}

impl VerifiedMessage {
    /// The signer's SPIFFE ID, equal to its certificate's URI SAN.
    pub fn iss(&self) -> &str {
        &self.claims.iss
    }
    pub fn aud(&self) -> &str {
        &self.claims.aud
    }
    pub fn iat(&self) -> i64 {
        self.claims.iat
    }
    pub fn exp(&self) -> i64 {
        self.claims.exp
    }
    pub fn jti(&self) -> &str {
        &self.claims.jti
    }
    pub fn intent(&self) -> &str {
        &self.claims.intent
    }
    /// What the signer's key signed (SHA-256 of the signing input): how
    /// keyward finds the message in its signature log.
    pub fn digest(&self) -> &[u8; 32] {
        &self.digest
    }
    /// Lower-case hex serial of the signer's certificate.
    pub fn signer_serial(&self) -> &str {
        &self.signer_serial
    }
}

fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

/// Unpadded base64url, canonical: `base64`'s URL_SAFE_NO_PAD refuses `=`,
/// characters outside the alphabet (whitespace included) and non-zero
/// trailing bits, so each byte string has exactly one accepted encoding.
fn b64url(part: &str, what: &'static str) -> Result<Vec<u8>, EnvelopeError> {
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| EnvelopeError::Malformed(what))
}

/// Verifies an envelope for `expected_audience` at `now`.
///
/// Steps, in order (docs/envelope.md §Verification): size, three parts,
/// header decoding, `alg`, `crit`, `typ`, `x5c`; signature encoding; the
/// chain to `trust_bundle` at `now`; the leaf's purpose (message signing);
/// the ES256 signature with the leaf's key; then the claims: shape, `intent`, `jti`, `iss` against the leaf's
/// SPIFFE ID, `aud`, lifetime, `iat`, `exp`. Replay is not checked here:
/// see [`verify_once`].
pub fn verify(
    token: &str,
    trust_bundle: &[Certificate],
    expected_audience: &str,
    now: SystemTime,
) -> Result<VerifiedMessage, EnvelopeError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(EnvelopeError::Malformed("token longer than 32 KiB"));
    }
    let mut parts = token.split('.');
    let (Some(header_b64), Some(claims_b64), Some(signature_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(EnvelopeError::Malformed("not three dot-separated parts"));
    };

    let header_json = b64url(header_b64, "header is not unpadded base64url")?;
    let header: HeaderIn = serde_json::from_slice(&header_json)
        .map_err(|_| EnvelopeError::Malformed("header is not the expected JSON object"))?;
    // The algorithm is fixed; the header can only confirm it.
    if header.alg.as_deref() != Some(ALG) {
        return Err(EnvelopeError::UnsupportedAlg(header.alg));
    }
    if header.crit.0 {
        return Err(EnvelopeError::UnsupportedCritical);
    }
    if header.typ.as_deref() != Some(TYP) {
        return Err(EnvelopeError::WrongType(header.typ));
    }
    let x5c = header
        .x5c
        .ok_or(EnvelopeError::Malformed("x5c is missing"))?;
    if x5c.is_empty() || x5c.len() > MAX_X5C {
        return Err(EnvelopeError::Malformed(
            "x5c must hold 1 to 5 certificates",
        ));
    }
    let chain = x5c
        .iter()
        .map(|b64| {
            let der = STANDARD
                .decode(b64)
                .map_err(|_| EnvelopeError::Malformed("x5c entry is not padded base64"))?;
            Certificate::from_der(&der)
                .map_err(|_| EnvelopeError::Malformed("x5c entry is not a DER certificate"))
        })
        .collect::<Result<Vec<_>, _>>()?;

    let signature = b64url(signature_b64, "signature is not unpadded base64url")?;
    if signature.len() != verify::P1363_LEN {
        return Err(EnvelopeError::MalformedSignature);
    }

    // Checked non-empty above.
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or(EnvelopeError::Malformed("x5c is empty"))?;
    let signer = verify::verify_chain(leaf, intermediates, trust_bundle, now)
        .map_err(EnvelopeError::UntrustedSigner)?;
    if !signer.has_extended_key_usage(ID_KP_DOCUMENT_SIGNING) {
        return Err(EnvelopeError::WrongKeyPurpose);
    }

    // The signing input is the token's own first two parts, as received.
    let (signed, _) = token
        .rsplit_once('.')
        .ok_or(EnvelopeError::Malformed("not three dot-separated parts"))?;
    let digest = signing_digest(signed);
    verify::verify_signature_p1363(signer.public_key(), &digest, &signature).map_err(
        |e| match e {
            VerifyError::MalformedSignature => EnvelopeError::MalformedSignature,
            _ => EnvelopeError::BadSignature,
        },
    )?;

    // From here on the claims are the signer's own words.
    let claims_json = b64url(claims_b64, "claims are not unpadded base64url")?;
    let claims: ClaimsIn = serde_json::from_slice(&claims_json)
        .map_err(|_| EnvelopeError::Malformed("claims are not the expected JSON object"))?;
    check_intent(&claims.intent)?;
    let jti_ok = URL_SAFE_NO_PAD
        .decode(&claims.jti)
        .is_ok_and(|bytes| bytes.len() == JTI_BYTES);
    if !jti_ok {
        return Err(EnvelopeError::Malformed("jti is not 16 bytes of base64url"));
    }
    if signer.spiffe_id() != Some(claims.iss.as_str()) {
        return Err(EnvelopeError::IssuerMismatch);
    }
    if claims.aud != expected_audience {
        return Err(EnvelopeError::WrongAudience);
    }
    let lifetime = claims.exp.checked_sub(claims.iat);
    if !lifetime.is_some_and(|l| (1..=MAX_LIFETIME_SECS).contains(&l)) {
        return Err(EnvelopeError::LifetimeTooLong);
    }
    let now = unix_seconds(now);
    if claims.iat > now.saturating_add(CLOCK_SKEW_SECS) {
        return Err(EnvelopeError::NotYetValid);
    }
    if now >= claims.exp {
        return Err(EnvelopeError::Expired);
    }
    let ClaimsIn {
        iss,
        aud,
        iat,
        exp,
        jti,
        intent,
    } = claims;
    Ok(VerifiedMessage {
        claims: Claims {
            iss,
            aud,
            iat,
            exp,
            jti,
            intent,
        },
        signer_serial: signer.serial_hex().to_owned(),
        digest,
    })
}

/// [`verify()`], then refuse the message if its `(iss, jti)` was accepted
/// before. Only messages that verified reach the cache, so forged tokens
/// cannot fill it.
pub fn verify_once(
    replay: &ReplayCache,
    token: &str,
    trust_bundle: &[Certificate],
    expected_audience: &str,
    now: SystemTime,
) -> Result<VerifiedMessage, EnvelopeError> {
    let message = verify(token, trust_bundle, expected_audience, now)?;
    // Scoped by signer, so one agent cannot burn another's jti. A SPIFFE ID
    // and a base64url jti contain no space, so the key is unambiguous.
    let key = format!("{} {}", message.iss(), message.jti());
    replay.check_and_insert(&key, message.exp(), unix_seconds(now))?;
    Ok(message)
}

/// Remembers accepted message ids until the messages expire. Bounded: when
/// full of unexpired entries it refuses new messages (`replay_cache_full`)
/// instead of evicting, since forgetting an id would let it be replayed.
/// Per process: recipients behind a load balancer need a shared store or
/// sticky routing for the guarantee to hold across instances.
pub struct ReplayCache {
    capacity: usize,
    state: Mutex<ReplayState>,
}

struct ReplayState {
    /// Key to the expiry (unix seconds) of the message that used it.
    seen: HashMap<String, i64>,
    last_prune: i64,
}

/// Expired entries are swept at least this often (and when the cache is
/// full, at most once per second).
const PRUNE_INTERVAL_SECS: i64 = 30;

impl Default for ReplayCache {
    fn default() -> Self {
        Self::new(Self::DEFAULT_CAPACITY)
    }
}

impl ReplayCache {
    /// Enough for about 330 messages a second at the longest lifetime.
    pub const DEFAULT_CAPACITY: usize = 100_000;

    /// A cache holding at most `capacity` live ids (0 refuses everything).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            state: Mutex::new(ReplayState {
                seen: HashMap::new(),
                last_prune: i64::MIN,
            }),
        }
    }

    /// Records `jti` (any replay key) as used until `exp`, or refuses it if
    /// it is already recorded and not yet expired. Times are unix seconds.
    pub fn check_and_insert(&self, jti: &str, exp: i64, now: i64) -> Result<(), EnvelopeError> {
        if exp <= now {
            return Err(EnvelopeError::Expired);
        }
        // A panic elsewhere while holding the lock cannot leave the map
        // half-updated in a way that matters: entries are independent.
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.seen.get(jti).is_some_and(|&until| until > now) {
            return Err(EnvelopeError::Replayed);
        }
        let due = now.abs_diff(state.last_prune) >= PRUNE_INTERVAL_SECS.unsigned_abs();
        let full = state.seen.len() >= self.capacity;
        if due || (full && now != state.last_prune) {
            state.seen.retain(|_, until| *until > now);
            state.last_prune = now;
        }
        if state.seen.len() >= self.capacity && !state.seen.contains_key(jti) {
            return Err(EnvelopeError::ReplayCacheFull);
        }
        state.seen.insert(jti.to_owned(), exp);
        Ok(())
    }

    /// Entries currently held, expired ones not yet swept included.
    pub fn len(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .seen
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use p256::ecdsa::signature::hazmat::PrehashSigner;
    use p256::ecdsa::{Signature, SigningKey};

    use super::*;
    use crate::pki::verify::test_pki::{self, TestCa};
    use crate::pki::CertificateText;

    const AUD: &str = "spiffe://example.org/agent/bravo";

    struct Fixture {
        ca: TestCa,
        key: SigningKey,
        leaf: Certificate,
    }

    impl Fixture {
        fn new() -> Self {
            // Valid well around "now", so that message times, not the
            // certificates, decide the time-based tests.
            let t = SystemTime::now();
            let ca = TestCa::root_valid(
                "test ca",
                t - Duration::from_secs(3600),
                t + Duration::from_secs(86_400),
            );
            let key = test_pki::key();
            let leaf = ca.agent_valid(
                "alpha",
                &test_pki::public(&key),
                t - Duration::from_secs(600),
                t + Duration::from_secs(1800),
            );
            Self { ca, key, leaf }
        }

        fn bundle(&self) -> Vec<Certificate> {
            vec![self.ca.cert.clone()]
        }

        fn claims(&self, iat: i64) -> Claims {
            Claims::new(
                &test_pki::spiffe_id("alpha"),
                AUD,
                "orders:read 42",
                iat,
                120,
            )
            .unwrap()
        }

        fn token(&self, claims: &Claims) -> String {
            let header = Header::new(&[self.leaf.clone(), self.ca.cert.clone()]).unwrap();
            let input = signing_input(&header, claims);
            assemble(&input, &sign(&self.key, &input))
        }

        /// A token from raw JSON, signed properly: for headers and claims
        /// the typed API refuses to produce.
        fn raw(&self, header: &serde_json::Value, claims: &serde_json::Value) -> String {
            let input = format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(header.to_string()),
                URL_SAFE_NO_PAD.encode(claims.to_string())
            );
            assemble(&input, &sign(&self.key, &input))
        }

        fn x5c(&self) -> Vec<String> {
            Header::new(std::slice::from_ref(&self.leaf)).unwrap().x5c
        }

        fn header_json(&self) -> serde_json::Value {
            serde_json::json!({"alg": ALG, "typ": TYP, "x5c": self.x5c()})
        }

        fn claims_json(&self, iat: i64) -> serde_json::Value {
            serde_json::to_value(self.claims(iat)).unwrap()
        }
    }

    fn sign(key: &SigningKey, input: &str) -> [u8; 64] {
        let signature: Signature = key.sign_prehash(&signing_digest(input)).unwrap();
        signature.to_bytes().into()
    }

    fn at(unix: i64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(unix as u64)
    }

    fn now() -> i64 {
        unix_seconds(SystemTime::now())
    }

    fn reason(result: Result<VerifiedMessage, EnvelopeError>) -> &'static str {
        result.unwrap_err().reason()
    }

    /// The review's forged envelope: an agent signs with the key of its own
    /// client certificate, which keyward never held, so no policy saw it.
    #[test]
    fn a_message_signed_with_a_client_authentication_key_is_refused() {
        let f = Fixture::new();
        let t = now();
        let own_key = test_pki::key();
        let client = f.ca.client("alpha", &test_pki::public(&own_key));
        let header = Header::new(&[client, f.ca.cert.clone()]).unwrap();
        let input = signing_input(&header, &f.claims(t));
        let forged = assemble(&input, &sign(&own_key, &input));
        assert_eq!(
            reason(verify(&forged, &f.bundle(), AUD, at(t + 1))),
            "wrong_key_purpose"
        );
        // The same message signed with a key certified for signing passes.
        assert!(verify(&f.token(&f.claims(t)), &f.bundle(), AUD, at(t + 1)).is_ok());
    }

    #[test]
    fn a_signed_message_round_trips() {
        let f = Fixture::new();
        let t = now();
        let claims = f.claims(t);
        let token = f.token(&claims);
        let message = verify(&token, &f.bundle(), AUD, at(t + 1)).unwrap();
        assert_eq!(message.iss(), "spiffe://example.org/agent/alpha");
        assert_eq!(message.aud(), AUD);
        assert_eq!(message.iat(), t);
        assert_eq!(message.exp(), t + 120);
        assert_eq!(message.jti(), claims.jti());
        assert_eq!(message.jti().len(), 22);
        assert_eq!(message.intent(), "orders:read 42");
        assert_eq!(message.signer_serial(), f.leaf.serial_hex());
        let (signed, _) = token.rsplit_once('.').unwrap();
        assert_eq!(message.digest(), &signing_digest(signed));
    }

    #[test]
    fn the_header_is_exactly_the_documented_one() {
        let f = Fixture::new();
        let claims = f.claims(now());
        let token = f.token(&claims);
        let header = URL_SAFE_NO_PAD
            .decode(token.split('.').next().unwrap())
            .unwrap();
        let header = String::from_utf8(header).unwrap();
        let leaf = STANDARD.encode(f.leaf.to_der().unwrap());
        let root = STANDARD.encode(f.ca.cert.to_der().unwrap());
        assert_eq!(
            header,
            format!(r#"{{"alg":"ES256","typ":"keyward-msg+jwt","x5c":["{leaf}","{root}"]}}"#)
        );
        let claims_json = URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).unwrap())
            .unwrap();
        assert!(String::from_utf8(claims_json)
            .unwrap()
            .starts_with(r#"{"iss":"spiffe://example.org/agent/alpha","aud":""#));
    }

    #[test]
    fn alg_none_and_other_algorithms_are_refused() {
        let f = Fixture::new();
        let t = now();
        let claims = f.claims_json(t);
        for alg in ["none", "HS256", "ES384", "RS256", "es256", "ES256 "] {
            let mut header = f.header_json();
            header["alg"] = alg.into();
            let token = f.raw(&header, &claims);
            let err = verify(&token, &f.bundle(), AUD, at(t)).unwrap_err();
            assert!(
                matches!(&err, EnvelopeError::UnsupportedAlg(Some(a)) if a == alg),
                "{alg}: {err:?}"
            );
            assert_eq!(err.reason(), "unsupported_alg");
        }
        // The classic unsigned token: alg none and an empty signature.
        let header = serde_json::json!({"alg": "none", "typ": TYP, "x5c": f.x5c()});
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let token = format!("{input}.");
        assert_eq!(
            reason(verify(&token, &f.bundle(), AUD, at(t))),
            "unsupported_alg"
        );
        // Missing alg.
        let header = serde_json::json!({"typ": TYP, "x5c": f.x5c()});
        let err = verify(&f.raw(&header, &claims), &f.bundle(), AUD, at(t)).unwrap_err();
        assert!(matches!(err, EnvelopeError::UnsupportedAlg(None)));
    }

    #[test]
    fn an_hs256_token_keyed_with_the_public_certificate_is_refused() {
        // Algorithm confusion: HMAC "signed" with public material.
        let f = Fixture::new();
        let t = now();
        let header = serde_json::json!({"alg": "HS256", "typ": TYP, "x5c": f.x5c()});
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(f.claims_json(t).to_string())
        );
        let mac = Sha256::digest(format!("{}{input}", f.x5c()[0]));
        let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(mac));
        assert_eq!(
            reason(verify(&token, &f.bundle(), AUD, at(t))),
            "unsupported_alg"
        );
    }

    #[test]
    fn header_shape_is_enforced() {
        let f = Fixture::new();
        let t = now();
        let claims = f.claims_json(t);
        for crit in [
            serde_json::json!(["b64"]),
            serde_json::json!([]),
            serde_json::Value::Null,
        ] {
            let mut header = f.header_json();
            header["crit"] = crit;
            assert_eq!(
                reason(verify(&f.raw(&header, &claims), &f.bundle(), AUD, at(t))),
                "unsupported_crit"
            );
        }

        let mut header = f.header_json();
        header["typ"] = "JWT".into();
        assert_eq!(
            reason(verify(&f.raw(&header, &claims), &f.bundle(), AUD, at(t))),
            "wrong_typ"
        );

        let mut header = f.header_json();
        header["jku"] = "https://attacker.example/keys".into();
        assert_eq!(
            reason(verify(&f.raw(&header, &claims), &f.bundle(), AUD, at(t))),
            "malformed"
        );

        for x5c in [
            serde_json::json!([]),
            serde_json::json!(vec![f.x5c()[0].clone(); 6]),
        ] {
            let mut header = f.header_json();
            header["x5c"] = x5c;
            assert_eq!(
                reason(verify(&f.raw(&header, &claims), &f.bundle(), AUD, at(t))),
                "malformed"
            );
        }

        // x5c entries are padded standard base64, not base64url.
        let mut header = f.header_json();
        let der = f.leaf.to_der().unwrap();
        header["x5c"] = serde_json::json!([URL_SAFE_NO_PAD.encode(der)]);
        assert_eq!(
            reason(verify(&f.raw(&header, &claims), &f.bundle(), AUD, at(t))),
            "malformed"
        );

        // Duplicate members: two parsers could disagree on which one counts.
        let header = format!(
            r#"{{"alg":"ES256","alg":"none","typ":"{TYP}","x5c":["{}"]}}"#,
            f.x5c()[0]
        );
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let token = assemble(&input, &sign(&f.key, &input));
        assert_eq!(reason(verify(&token, &f.bundle(), AUD, at(t))), "malformed");
    }

    #[test]
    fn the_compact_form_is_parsed_strictly() {
        let f = Fixture::new();
        let t = now();
        let token = f.token(&f.claims(t));
        let bundle = f.bundle();
        let check = |token: &str| reason(verify(token, &bundle, AUD, at(t)));
        assert_eq!(check(&format!("{token}.")), "malformed");
        assert_eq!(check(token.rsplit_once('.').unwrap().0), "malformed");
        assert_eq!(check(""), "malformed");
        assert_eq!(check(&format!(" {token}")), "malformed");
        assert_eq!(check(&"a".repeat(MAX_TOKEN_LEN + 1)), "malformed");

        let (input, signature) = token.rsplit_once('.').unwrap();
        // Padding is refused.
        assert_eq!(check(&format!("{input}.{signature}=")), "malformed");
        let (header, claims) = input.split_once('.').unwrap();
        assert_eq!(
            check(&format!("{header}==.{claims}.{signature}")),
            "malformed"
        );
        // So is a non-canonical last character (non-zero trailing bits):
        // 64 bytes take 86 characters, the last carrying 4 unused bits.
        assert_eq!(signature.len(), 86);
        let last = signature.chars().last().unwrap();
        let bumped = URL_SAFE_NO_PAD_ALPHABET
            .chars()
            .skip_while(|c| *c != last)
            .nth(1)
            .unwrap_or('A');
        let non_canonical = format!("{}{bumped}", &signature[..85]);
        assert_eq!(check(&format!("{input}.{non_canonical}")), "malformed");
        // And standard-alphabet characters.
        let swapped: String = token
            .chars()
            .map(|c| match c {
                '-' => '+',
                '_' => '/',
                c => c,
            })
            .collect();
        if swapped != token {
            assert_eq!(check(&swapped), "malformed");
        }
    }

    const URL_SAFE_NO_PAD_ALPHABET: &str =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

    #[test]
    fn signatures_must_be_p1363_and_must_verify() {
        let f = Fixture::new();
        let t = now();
        let claims = f.claims(t);
        let token = f.token(&claims);
        let (input, _) = token.rsplit_once('.').unwrap();

        // A DER signature, although valid, is not ES256.
        let signature: Signature = f.key.sign_prehash(&signing_digest(input)).unwrap();
        let der = URL_SAFE_NO_PAD.encode(signature.to_der().as_bytes());
        assert_eq!(
            reason(verify(&format!("{input}.{der}"), &f.bundle(), AUD, at(t))),
            "malformed_signature"
        );
        // r = 0.
        let zero = URL_SAFE_NO_PAD.encode([0u8; 64]);
        assert_eq!(
            reason(verify(&format!("{input}.{zero}"), &f.bundle(), AUD, at(t))),
            "malformed_signature"
        );
        // Another key's signature.
        let other = sign(&test_pki::key(), input);
        assert_eq!(
            reason(verify(&assemble(input, &other), &f.bundle(), AUD, at(t))),
            "bad_signature"
        );
    }

    #[test]
    fn tampered_claims_are_refused() {
        let f = Fixture::new();
        let t = now();
        let token = f.token(&f.claims(t));
        let parts: Vec<&str> = token.split('.').collect();
        let mut claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        claims["intent"] = "orders:delete *".into();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(claims.to_string()),
            parts[2]
        );
        assert_eq!(
            reason(verify(&forged, &f.bundle(), AUD, at(t))),
            "bad_signature"
        );
    }

    #[test]
    fn the_wrong_audience_is_refused() {
        let f = Fixture::new();
        let t = now();
        let token = f.token(&f.claims(t));
        assert_eq!(
            reason(verify(
                &token,
                &f.bundle(),
                "spiffe://example.org/agent/charlie",
                at(t)
            )),
            "wrong_audience"
        );
    }

    #[test]
    fn message_lifetime_is_enforced() {
        let f = Fixture::new();
        let t = now();
        let token = f.token(&f.claims(t));
        let bundle = f.bundle();
        // Valid through exp - 1, expired at exp.
        verify(&token, &bundle, AUD, at(t + 119)).unwrap();
        assert_eq!(reason(verify(&token, &bundle, AUD, at(t + 120))), "expired");
        // iat up to 60 s ahead of the verifier's clock is tolerated.
        verify(&token, &bundle, AUD, at(t - 60)).unwrap();
        assert_eq!(
            reason(verify(&token, &bundle, AUD, at(t - 61))),
            "not_yet_valid"
        );

        let mut claims = f.claims_json(t);
        claims["exp"] = (t + MAX_LIFETIME_SECS + 1).into();
        assert_eq!(
            reason(verify(
                &f.raw(&f.header_json(), &claims),
                &bundle,
                AUD,
                at(t)
            )),
            "lifetime_too_long"
        );
        claims["exp"] = t.into();
        assert_eq!(
            reason(verify(
                &f.raw(&f.header_json(), &claims),
                &bundle,
                AUD,
                at(t)
            )),
            "lifetime_too_long"
        );
        claims["exp"] = i64::MAX.into();
        claims["iat"] = i64::MIN.into();
        assert_eq!(
            reason(verify(
                &f.raw(&f.header_json(), &claims),
                &bundle,
                AUD,
                at(t)
            )),
            "lifetime_too_long"
        );
    }

    #[test]
    fn the_signer_certificate_must_be_valid_now() {
        let f = Fixture::new();
        let t = now();
        let token = f.token(&f.claims(t + 3600));
        let err = verify(&token, &f.bundle(), AUD, at(t + 3600)).unwrap_err();
        assert_eq!(err.reason(), "untrusted_signer");
        assert_eq!(err.chain_error().map(VerifyError::reason), Some("expired"));
    }

    #[test]
    fn a_replay_is_refused() {
        let f = Fixture::new();
        let t = now();
        let token = f.token(&f.claims(t));
        let cache = ReplayCache::default();
        verify_once(&cache, &token, &f.bundle(), AUD, at(t)).unwrap();
        assert_eq!(
            reason(verify_once(&cache, &token, &f.bundle(), AUD, at(t + 1))),
            "replayed"
        );
        // A fresh message from the same signer is fine.
        let other = f.token(&f.claims(t));
        verify_once(&cache, &other, &f.bundle(), AUD, at(t + 1)).unwrap();
        // A forged token never reaches the cache.
        let forged = format!("{}A", &token[..token.len() - 1]);
        assert!(verify_once(&cache, &forged, &f.bundle(), AUD, at(t)).is_err());
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn the_replay_cache_is_bounded_and_forgets_only_expired_ids() {
        let cache = ReplayCache::new(2);
        cache.check_and_insert("a", 110, 100).unwrap();
        cache.check_and_insert("b", 120, 100).unwrap();
        assert_eq!(
            cache.check_and_insert("a", 110, 105).unwrap_err().reason(),
            "replayed"
        );
        // Full of live ids: refuse rather than evict.
        assert_eq!(
            cache.check_and_insert("c", 130, 101).unwrap_err().reason(),
            "replay_cache_full"
        );
        // Once "a" has expired it is swept and its slot reused.
        cache.check_and_insert("c", 130, 110).unwrap();
        assert_eq!(cache.len(), 2);
        // "b" is still live.
        assert_eq!(
            cache.check_and_insert("b", 125, 119).unwrap_err().reason(),
            "replayed"
        );
        assert_eq!(
            cache.check_and_insert("d", 100, 100).unwrap_err().reason(),
            "expired"
        );
    }

    #[test]
    fn a_signer_from_another_ca_is_refused() {
        let f = Fixture::new();
        let other = TestCa::root("other ca");
        let key = test_pki::key();
        let leaf = other.agent("alpha", &test_pki::public(&key));
        let t = now();
        let header = Header::new(&[leaf, other.cert]).unwrap();
        let input = signing_input(&header, &f.claims(t));
        let token = assemble(&input, &sign(&key, &input));
        let err = verify(&token, &f.bundle(), AUD, at(t)).unwrap_err();
        assert_eq!(err.reason(), "untrusted_signer");
        assert_eq!(
            err.chain_error().map(VerifyError::reason),
            Some("untrusted_chain")
        );
    }

    #[test]
    fn iss_must_be_the_signer_certificate_identity() {
        let f = Fixture::new();
        let t = now();
        let claims = Claims::new(&test_pki::spiffe_id("charlie"), AUD, "pay 100", t, 60).unwrap();
        assert_eq!(
            reason(verify(&f.token(&claims), &f.bundle(), AUD, at(t))),
            "issuer_mismatch"
        );
    }

    #[test]
    fn claims_shape_is_enforced_after_the_signature() {
        let f = Fixture::new();
        let t = now();
        let bundle = f.bundle();
        let mut claims = f.claims_json(t);
        claims["nbf"] = (t + 100).into();
        assert_eq!(
            reason(verify(
                &f.raw(&f.header_json(), &claims),
                &bundle,
                AUD,
                at(t)
            )),
            "malformed"
        );
        let mut claims = f.claims_json(t);
        claims["aud"] = serde_json::json!([AUD]);
        assert_eq!(
            reason(verify(
                &f.raw(&f.header_json(), &claims),
                &bundle,
                AUD,
                at(t)
            )),
            "malformed"
        );
        let mut claims = f.claims_json(t);
        claims["jti"] = "short".into();
        assert_eq!(
            reason(verify(
                &f.raw(&f.header_json(), &claims),
                &bundle,
                AUD,
                at(t)
            )),
            "malformed"
        );
        let mut claims = f.claims_json(t);
        claims["intent"] = "line\nbreak".into();
        assert_eq!(
            reason(verify(
                &f.raw(&f.header_json(), &claims),
                &bundle,
                AUD,
                at(t)
            )),
            "invalid_intent"
        );
    }

    #[test]
    fn claims_are_checked_when_built() {
        let iss = test_pki::spiffe_id("alpha");
        assert!(Claims::new(&iss, AUD, "x", 0, 300).is_ok());
        assert!(Claims::new(&iss, AUD, &"x".repeat(256), 0, 300).is_ok());
        for bad in ["", "\u{202e}evil", "tab\there", "é", &"x".repeat(257)] {
            assert_eq!(
                Claims::new(&iss, AUD, bad, 0, 60).unwrap_err().reason(),
                "invalid_intent",
                "{bad:?}"
            );
        }
        for lifetime in [0, -1, 301] {
            assert_eq!(
                Claims::new(&iss, AUD, "x", 0, lifetime)
                    .unwrap_err()
                    .reason(),
                "lifetime_too_long"
            );
        }
        assert!(Claims::new("alpha", AUD, "x", 0, 60).is_err());
        assert!(Claims::new(&iss, "bravo", "x", 0, 60).is_err());
        let a = Claims::new(&iss, AUD, "x", 0, 60).unwrap();
        let b = Claims::new(&iss, AUD, "x", 0, 60).unwrap();
        assert_ne!(a.jti(), b.jti());
        assert!(Header::new(&[]).is_err());
    }

    /// Keeps docs/envelope.md's worked example honest: the token and root
    /// printed there verify at the time the document states.
    #[test]
    fn the_documented_example_verifies() {
        let doc = include_str!("../../docs/envelope.md");
        let between = |start: &str, end: &str| {
            let from = doc.find(start).expect(start) + start.len();
            let to = from + doc[from..].find(end).expect(end);
            doc[from..to].trim().to_owned()
        };
        let token: String = between("<!-- example-token -->\n```text", "```")
            .split_whitespace()
            .collect();
        let root = between("<!-- example-root -->\n```text", "```");
        let at_unix: i64 = between("<!-- example-time -->", "<!--").parse().unwrap();
        let root = Certificate::from_pem_str(&root).unwrap();
        let message = verify(&token, &[root], AUD, at(at_unix)).unwrap();
        assert_eq!(message.iss(), "spiffe://example.org/agent/alpha");
        assert_eq!(message.intent(), "orders:read 42");
    }
}
