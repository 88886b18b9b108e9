//! keyward: hardware-backed keys, attested short-lived certificates and
//! signing for AI agents.
//!
//! Module map (dependencies point downwards; see DESIGN.md):
//!
//! ```text
//! api          HTTP only: routes, extractors, ApiError -> status codes
//! policy       authorize(caller, action) -> decision under a policy version
//! agents       the agent registry: custodial keys, certificate issuance
//! envelope     signed agent-to-agent messages: JWS ES256 with an x5c chain
//! verify       ECDSA signature and certificate-chain verification
//! ca           certificate profiles, CSR checks, signing through the pool
//! attestation  evidence -> Verified<AttestedKey>
//! revocation   the in-memory revocation set, kept current on every replica
//! hooks        signed revocation events delivered from a durable outbox
//! pool         the batched key-operation pool: the only caller of `keys`
//! keys         KeyBackend: PKCS#11 (and a software backend for unit tests)
//! store        SQLite / PostgreSQL persistence, audit rows in the same tx
//! audit        hash-chained audit events
//! identity     AgentName, TrustDomain, Scope: checked names
//! handoff      answers from keyward's threads to waiting tasks, a batch at once
//! config, embedded, telemetry, app, client, credential: wiring and operations
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
pub mod identity;
pub mod keys;
pub mod pki;
pub mod policy;
pub mod pool;
pub mod revocation;
pub mod runtime;
pub mod store;
pub mod telemetry;
