-- MQTT QoS 2 publishes that were stored and answered with PUBREC but whose
-- PUBREL has not arrived: until it does, a PUBLISH with the same packet id
-- from the same client is the same message and is not stored again. Kept
-- here (not in memory) so that holds across reconnects, restarts and kills.
CREATE TABLE mqtt_qos2 (
    tenant      TEXT    NOT NULL,
    client_id   TEXT    NOT NULL,
    pkid        INTEGER NOT NULL,
    seq         INTEGER NOT NULL,           -- the event stored for it
    id          BLOB    NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, client_id, pkid)
) WITHOUT ROWID;

-- Retained MQTT messages per tenant and stream topic. Written in the same
-- transaction as the event they come from, cleared by a zero-byte retained
-- publish, and loaded into the broker at start.
CREATE TABLE mqtt_retained (
    tenant     TEXT    NOT NULL,
    topic      TEXT    NOT NULL,
    payload    BLOB    NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, topic)
) WITHOUT ROWID;
