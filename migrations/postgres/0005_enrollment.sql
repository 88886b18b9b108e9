-- Enrollment tokens: how an agent gets its first client certificate. Only
-- the SHA-256 of a token is kept; a token works once, before expires_at.
CREATE TABLE enrollment_tokens (
    token_sha256  BYTEA PRIMARY KEY,
    agent_name    TEXT NOT NULL REFERENCES agents (name),
    created_at    BIGINT NOT NULL,
    expires_at    BIGINT NOT NULL,
    used_at       BIGINT
);
