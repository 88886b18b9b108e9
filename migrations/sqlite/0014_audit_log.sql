-- The audit trail becomes a Merkle log (issue 16). Each event is stored as
-- the exact UTF-8 JSON its leaf hashes (`entry`), numbered from 0 (`idx`);
-- actor, action and agent are copies for searching, never what is hashed.
-- The hash chain's columns go: the tree and its signed checkpoints replace
-- them. Existing events become entries with their old number less one.
CREATE TABLE audit_entries (
    idx     INTEGER PRIMARY KEY,
    at_ms   INTEGER NOT NULL,
    actor   TEXT NOT NULL,
    action  TEXT NOT NULL,
    agent   TEXT,
    entry   TEXT NOT NULL
);
INSERT INTO audit_entries (idx, at_ms, actor, action, agent, entry)
SELECT seq - 1, at * 1000, actor, action, NULL,
       json_object('index', seq - 1,
                   'time', strftime('%Y-%m-%dT%H:%M:%S.000Z', at, 'unixepoch'),
                   'actor', actor, 'action', action, 'subject', subject,
                   'details', json(details))
FROM audit_events ORDER BY seq;
DROP TABLE audit_events;
CREATE INDEX audit_entries_by_agent ON audit_entries (agent, idx) WHERE agent IS NOT NULL;

-- `seq` stays the number of entries: the next entry's index.
ALTER TABLE audit_head DROP COLUMN hash;
UPDATE audit_head SET seq = (SELECT COALESCE(MAX(idx) + 1, 0) FROM audit_entries);

ALTER TABLE signatures RENAME COLUMN audit_seq TO audit_index;
UPDATE signatures SET audit_index = audit_index - 1;

-- The tree's tiles (C2SP tlog-tiles, 256 hashes when full): a partial tile
-- is replaced by wider ones as the log grows, and each is a prefix of the
-- next.
CREATE TABLE audit_tiles (
    level   INTEGER NOT NULL,
    idx     INTEGER NOT NULL,
    hashes  BLOB NOT NULL,
    PRIMARY KEY (level, idx)
);

-- Every checkpoint signed, as served (a C2SP signed note).
CREATE TABLE audit_checkpoints (
    size          INTEGER PRIMARY KEY,
    root          BLOB NOT NULL,
    note          TEXT NOT NULL,
    signed_at_ms  INTEGER NOT NULL
);
