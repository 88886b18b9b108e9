-- Every signature keyward makes for an agent. Rows are written in batches
-- (group commit); each batch is covered by one audit event whose details
-- hold the SHA-256 of the batch's rows, so the audit chain protects them.
CREATE TABLE signatures (
    id              INTEGER PRIMARY KEY,
    request_id      TEXT NOT NULL,
    agent_name      TEXT NOT NULL REFERENCES agents (name),
    key_id          TEXT NOT NULL,
    digest          TEXT NOT NULL,
    purpose         TEXT NOT NULL,
    -- For envelopes: {"aud","intent","jti","exp"} as JSON; NULL otherwise.
    message         TEXT,
    policy_version  INTEGER NOT NULL,
    signed_at_ms    INTEGER NOT NULL,
    audit_seq       INTEGER NOT NULL
);
CREATE INDEX signatures_by_agent ON signatures (agent_name, signed_at_ms);
CREATE INDEX signatures_by_batch ON signatures (audit_seq);
