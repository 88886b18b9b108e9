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
