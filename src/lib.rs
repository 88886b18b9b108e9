//! keyward: hardware-backed keys, attested short-lived certificates and
//! signing for AI agents.
//!
//! Module map (dependencies point downwards; docs/architecture.md has the
//! whole map, the request walks and the reasons):
//!
//! ```text
//! app          wiring: start, serve, the embedded token, the listener's key
//! api          HTTP only: extract, authorize, one domain call, map the result
//! agents       agents' requests (one sequence: revocation, policy, work or
//!              hold), enrollment, the registry, signing, verification,
//!              signed envelopes
//! approvals    requests held for human approval, typed, and the votes
//! detect       anomaly detectors over the request stream, and quarantine
//! policy       who may do what: partitioning and the versioned policy
//! pki          CA, certificate profiles, CSRs, CRLs, OCSP, path building
//! attestation  evidence that a key is on the token or in a TPM
//! revocation   the in-memory revocation set, and the hooks that announce it
//! pool         the batched key-operation pool: the only caller of `keys`
//! keys         PKCS#11, TPM 2.0 (and software keys for unit tests)
//! store        SQLite / PostgreSQL, audit rows in the same transaction
//! transparency the audit log sealed into signed checkpoints, checked
//!              against them, and served
//! audit        the audit log's formats: entries, tiles, notes, proofs
//! telemetry    metrics and logs
//! runtime      answers handed from threads to tasks, the supervisor of
//!              background tasks, private files
//! identity     AgentName, TrustDomain, Scope: names checked at the edge
//! config       the validated configuration
//! client       the agent's side (HTTPS client, credentials, TPM enrollment)
//! ```

#![forbid(unsafe_code)]

pub mod agents;
pub mod api;
pub mod app;
pub mod approvals;
pub mod attestation;
pub mod audit;
pub mod client;
pub mod config;
pub mod console;
pub mod detect;
pub mod identity;
pub mod keys;
pub mod pki;
pub mod policy;
pub mod pool;
pub mod revocation;
pub mod runtime;
pub mod store;
pub mod telemetry;
pub mod transparency;
