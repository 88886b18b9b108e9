-- Anomaly detection (issue 17). Where each credential (an agent's or an
-- admin's client certificate, `cert:<serial>`, or an admin token,
-- `token:<id>`) was last seen from, shared by every replica: a credential
-- used from two addresses on two replicas is one credential from two
-- addresses. Rows are refreshed at most a few times a window per replica,
-- never per request.
CREATE TABLE credential_sightings (
    credential    TEXT NOT NULL,
    address       TEXT NOT NULL,
    agent         TEXT,
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms  INTEGER NOT NULL,
    PRIMARY KEY (credential, address)
);
CREATE INDEX credential_sightings_by_time ON credential_sightings (last_seen_ms);

-- Every detection: what was seen, and what keyward did about it.
CREATE TABLE anomalies (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    kind              TEXT NOT NULL,
    agent             TEXT,
    credential        TEXT NOT NULL,
    response          TEXT NOT NULL,
    first_offense_ms  INTEGER NOT NULL,
    detected_at_ms    INTEGER NOT NULL,
    details           TEXT NOT NULL
);
CREATE INDEX anomalies_by_time ON anomalies (detected_at_ms);
CREATE INDEX anomalies_by_credential ON anomalies (credential, kind, detected_at_ms);
