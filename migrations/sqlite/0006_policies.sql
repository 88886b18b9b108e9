-- Versioned policy: every version is kept; the highest is in force. A
-- rollback is a new version with an old version's content.
CREATE TABLE policies (
    version         BIGINT PRIMARY KEY,
    content         TEXT NOT NULL,
    content_sha256  TEXT NOT NULL,
    author          TEXT NOT NULL,
    -- "apply" or "rollback:<version>"
    source          TEXT NOT NULL,
    created_at      BIGINT NOT NULL
);
