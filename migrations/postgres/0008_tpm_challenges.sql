-- TPM attestation challenges. Each binds a nonce and a credential secret
-- (kept only as its SHA-256) to one agent, one AK and one EK (ek_sha256: its
-- certificate's SHA-256, or its public key's when the EK was admitted by the
-- allow-list); evidence is accepted once, against an unused, unexpired
-- challenge.
CREATE TABLE tpm_challenges (
    nonce                  BYTEA PRIMARY KEY,
    agent_name             TEXT NOT NULL REFERENCES agents (name),
    secret_sha256          BYTEA NOT NULL,
    ak_public              BYTEA NOT NULL,
    ek_sha256              BYTEA NOT NULL,
    key_location           TEXT NOT NULL,
    created_at             BIGINT NOT NULL,
    expires_at             BIGINT NOT NULL,
    used_at                BIGINT
);
CREATE INDEX tpm_challenges_expiry ON tpm_challenges (expires_at);
