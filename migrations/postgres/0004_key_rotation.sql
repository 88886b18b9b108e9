-- Custodial keys replaced by a rotation. The agent row always names the
-- current key; a retired key may still sign until sign_until (the grace
-- period, for relying parties that pinned the old certificate) and is
-- destroyed on the token after destroy_after (the retention window, while
-- its signatures may still need the key to exist for investigation).
CREATE TABLE retired_keys (
    key_id          TEXT PRIMARY KEY,
    agent_name      TEXT NOT NULL REFERENCES agents (name),
    public_key_der  BYTEA NOT NULL,
    reason          TEXT NOT NULL,
    retired_at      BIGINT NOT NULL,
    sign_until      BIGINT NOT NULL,
    destroy_after   BIGINT NOT NULL,
    destroyed_at    BIGINT
);
CREATE INDEX retired_keys_due ON retired_keys (destroy_after) WHERE destroyed_at IS NULL;

-- CA rotation: when a new issuing CA becomes active, the previous one keeps
-- validating (and answering OCSP for) the certificates it issued until they
-- have expired; retired_at says since when it is no longer active.
ALTER TABLE ca_certificates ADD COLUMN retired_at BIGINT;
