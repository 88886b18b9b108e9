-- TPM attestation challenges. Each binds a nonce and a credential secret
-- (kept only as its SHA-256) to one agent, one AK and one EK certificate;
-- evidence is accepted once, against an unused, unexpired challenge.
CREATE TABLE tpm_challenges (
    nonce                  BLOB PRIMARY KEY,
    agent_name             TEXT NOT NULL REFERENCES agents (name),
    secret_sha256          BLOB NOT NULL,
    ak_public              BLOB NOT NULL,
    ek_certificate_sha256  BLOB NOT NULL,
    key_location           TEXT NOT NULL,
    created_at             BIGINT NOT NULL,
    expires_at             BIGINT NOT NULL,
    used_at                BIGINT
);
CREATE INDEX tpm_challenges_expiry ON tpm_challenges (expires_at);
