-- Requests waiting for a human: the agent's request as it was made, the
-- policy version that required approval, and the votes cast on it.
CREATE TABLE approvals (
    id                  TEXT PRIMARY KEY,
    agent_name          TEXT NOT NULL REFERENCES agents (name),
    kind                TEXT NOT NULL,
    request             TEXT NOT NULL,
    approvals_required  BIGINT NOT NULL,
    policy_version      BIGINT NOT NULL,
    -- pending, approved, denied, expired, completed, failed
    status              TEXT NOT NULL,
    result              TEXT,
    created_at          BIGINT NOT NULL,
    expires_at          BIGINT NOT NULL,
    decided_at          BIGINT
);
CREATE INDEX approvals_pending ON approvals (status, expires_at);

CREATE TABLE approval_votes (
    approval_id  TEXT NOT NULL REFERENCES approvals (id),
    admin        TEXT NOT NULL,
    approve      BIGINT NOT NULL,
    comment      TEXT,
    at           BIGINT NOT NULL,
    PRIMARY KEY (approval_id, admin)
);
