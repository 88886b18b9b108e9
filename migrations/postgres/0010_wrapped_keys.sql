-- Custodial keys kept wrapped (custodial_storage = "wrapped"): the key the
-- token generated, encrypted under the token's wrapping key (CKM_AES_KEY_WRAP_PAD),
-- which never leaves the token. NULL for a key that is a token object.
-- A retired key keeps its blob until it is destroyed; destroying a wrapped
-- key is deleting its blob.
ALTER TABLE agents ADD COLUMN key_wrapped BYTEA;
ALTER TABLE retired_keys ADD COLUMN key_wrapped BYTEA;
