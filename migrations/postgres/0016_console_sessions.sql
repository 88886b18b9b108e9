-- The web console (issue 18). A session is one admin credential, signed in
-- through a browser. The session id is the cookie's secret and is never
-- stored: only its SHA-256, so a copy of the database signs no one in.
-- Sessions end after 15 minutes idle or 8 hours in all; expired rows are
-- pruned at the next sign-in.
CREATE TABLE console_sessions (
    id_sha256     TEXT PRIMARY KEY,
    admin         TEXT NOT NULL,
    credential    TEXT NOT NULL,
    created_ms    BIGINT NOT NULL,
    last_seen_ms  BIGINT NOT NULL
);
CREATE INDEX console_sessions_by_last_seen ON console_sessions (last_seen_ms);

-- The console's approvals page lists the recent requests, decided or not.
CREATE INDEX approvals_by_created ON approvals (created_at);
