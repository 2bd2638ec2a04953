-- MQTT session state is per device, and lives exactly as long as its
-- session. Before, held QoS 2 packet ids were keyed by (tenant, client id):
-- a device using another device's id as its client id (`pump-1` as
-- `pump-1-x`) could release or wipe that device's held ids, and ids held by
-- a session that had ended (expiry 0, or expired) made a later session's
-- new publish under the same id look like a resend: PUBREC, nothing stored.
--
-- `mqtt_sessions` has one row per session the appliance holds: a live
-- connection (`ended_at` NULL) or a persistent session waiting for its
-- client (`ended_at` + `expiry` seconds). `generation` is the connection
-- that owns it now, so a connection that ends after a newer one took its
-- client id over changes nothing of the newer one's; `session_id` is the
-- session itself (kept across its resumes, new at a clean start), and held
-- QoS 2 ids carry it: an id is held, found and released only for the
-- session that holds it, so a connection superseded by a new session can
-- never hold, release or match an id in the new one.
-- `subscriptions` is the front-end's own encoding of the session's
-- subscriptions (restored when the session resumes after a restart).
CREATE TABLE mqtt_sessions (
    tenant        TEXT    NOT NULL,
    device_id     TEXT    NOT NULL,
    client_id     TEXT    NOT NULL,
    generation    INTEGER NOT NULL,
    session_id    INTEGER NOT NULL,
    expiry        INTEGER NOT NULL,           -- seconds after ended_at
    ended_at      INTEGER,                    -- unix µs; NULL while connected
    subscriptions TEXT    NOT NULL DEFAULT '',
    PRIMARY KEY (tenant, device_id, client_id)
) WITHOUT ROWID;

CREATE TABLE mqtt_qos2_v2 (
    tenant      TEXT    NOT NULL,
    device_id   TEXT    NOT NULL,
    client_id   TEXT    NOT NULL,
    pkid        INTEGER NOT NULL,
    session_id  INTEGER NOT NULL,           -- the session holding it
    seq         INTEGER NOT NULL,           -- the event stored for it
    id          BLOB    NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, device_id, client_id, pkid)
) WITHOUT ROWID;

-- An upgraded log keeps the ids it held, under the device whose event each
-- one stored (in the log, or moved to dead letters; an id whose event is
-- gone can no longer be told apart). Their sessions are taken as
-- persistent ones that ended now and last a day (the default
-- mqtt.max_session_expiry; a smaller configured maximum applies at start):
-- a device that was waiting for its PUBCOMP when the old binary stopped
-- still finds its message stored once.
INSERT INTO mqtt_qos2_v2 (tenant, device_id, client_id, pkid, session_id, seq, id, received_at)
SELECT q.tenant, e.device_id, q.client_id, q.pkid, 0, q.seq, q.id, q.received_at
FROM mqtt_qos2 q
JOIN (SELECT seq, tenant, device_id FROM events UNION ALL SELECT seq, tenant, device_id FROM dead_letter) e
  ON e.seq = q.seq AND e.tenant = q.tenant;
INSERT OR IGNORE INTO mqtt_sessions (tenant, device_id, client_id, generation, session_id, expiry, ended_at)
SELECT DISTINCT tenant, device_id, client_id, 0, 0, 86400, CAST(strftime('%s', 'now') AS INTEGER) * 1000000
FROM mqtt_qos2_v2;
DROP TABLE mqtt_qos2;
ALTER TABLE mqtt_qos2_v2 RENAME TO mqtt_qos2;
