-- Revocation: the CRL number (monotonic across replicas) and an index for
-- loading the revocation set. Certificates already carry revoked_at and
-- revocation_reason (RFC 5280 reason names); agents.status may now also be
-- 'suspended' (certificateHold on its certificates) or 'revoked'.
CREATE TABLE crl_state (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    number  BIGINT NOT NULL
);
INSERT INTO crl_state (id, number) VALUES (1, 0);

CREATE INDEX certificates_revoked ON certificates (revoked_at) WHERE revoked_at IS NOT NULL;

-- Revocation hooks: endpoints that receive every revocation, suspension and
-- resumption, HMAC-signed with a per-hook secret.
CREATE TABLE hooks (
    id          BIGSERIAL PRIMARY KEY,
    url         TEXT NOT NULL UNIQUE,
    secret      TEXT NOT NULL,
    active      BIGINT NOT NULL,
    created_at  BIGINT NOT NULL
);

-- The outbox: one row per (hook, event), written in the same transaction
-- as the revocation, so a crash before delivery loses nothing. Delivered in
-- id order per hook (hence per agent); a lease keeps two replicas from
-- sending the same row at once.
CREATE TABLE hook_deliveries (
    id              BIGSERIAL PRIMARY KEY,
    hook_id         BIGINT NOT NULL REFERENCES hooks (id),
    agent_name      TEXT NOT NULL,
    event           TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    lease_until     BIGINT,
    delivered_at    BIGINT,
    last_error      TEXT
);
CREATE INDEX hook_deliveries_pending ON hook_deliveries (hook_id, id) WHERE delivered_at IS NULL;
