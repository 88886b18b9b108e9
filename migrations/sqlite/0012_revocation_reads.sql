-- The revocation set is read again every second on every replica. Its
-- inactive agents are read through this index instead of a scan of every
-- agent (100,000 rows on the scale benchmark), as its revoked certificates
-- are through certificates_revoked and its retired keys through
-- retired_keys_due.
CREATE INDEX agents_inactive ON agents (name) WHERE status <> 'active';
