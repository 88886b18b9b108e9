-- keyward initial schema (PostgreSQL). Never edit a landed migration; add a new one.
CREATE TABLE agents (
    name            TEXT PRIMARY KEY,
    spiffe_id       TEXT NOT NULL UNIQUE,
    custody         TEXT NOT NULL,
    key_id          TEXT UNIQUE,
    public_key_der  BYTEA,
    attestation_digest TEXT,
    scopes          TEXT NOT NULL,
    status          TEXT NOT NULL,
    created_at      BIGINT NOT NULL
);

CREATE TABLE attestations (
    digest      TEXT PRIMARY KEY,
    format      TEXT NOT NULL,
    evidence    BYTEA NOT NULL,
    created_at  BIGINT NOT NULL
);

CREATE TABLE certificates (
    serial              TEXT PRIMARY KEY,
    agent_name          TEXT NOT NULL REFERENCES agents (name),
    key_id              TEXT,
    public_key_sha256   TEXT NOT NULL,
    not_before          BIGINT NOT NULL,
    not_after           BIGINT NOT NULL,
    der                 BYTEA NOT NULL,
    attestation_digest  TEXT REFERENCES attestations (digest),
    policy_version      BIGINT NOT NULL,
    revoked_at          BIGINT,
    revocation_reason   TEXT,
    created_at          BIGINT NOT NULL
);
CREATE INDEX certificates_by_agent ON certificates (agent_name, not_after);

CREATE TABLE ca_certificates (
    id          BIGSERIAL PRIMARY KEY,
    key_id      TEXT NOT NULL,
    cert_der    BYTEA NOT NULL,
    chain_pem   TEXT NOT NULL,
    active      BIGINT NOT NULL,
    created_at  BIGINT NOT NULL
);
-- At most one active issuing CA, so replicas racing at first start cannot both win.
CREATE UNIQUE INDEX one_active_ca ON ca_certificates (active) WHERE active = 1;

CREATE TABLE service_keys (
    purpose     TEXT PRIMARY KEY,
    key_id      TEXT NOT NULL,
    cert_der    BYTEA NOT NULL,
    created_at  BIGINT NOT NULL
);

CREATE TABLE admin_tokens (
    token_sha256  BYTEA PRIMARY KEY,
    created_at    BIGINT NOT NULL
);

CREATE TABLE audit_events (
    seq         BIGINT PRIMARY KEY,
    at          BIGINT NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    subject     TEXT NOT NULL,
    details     TEXT NOT NULL,
    prev_hash   BYTEA NOT NULL,
    hash        BYTEA NOT NULL
);

-- The head of the hash chain; updating it first in every write transaction
-- serializes audit appends.
CREATE TABLE audit_head (
    id    BIGINT PRIMARY KEY CHECK (id = 1),
    seq   BIGINT NOT NULL,
    hash  BYTEA NOT NULL
);
INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, decode(repeat('00', 32), 'hex'));
