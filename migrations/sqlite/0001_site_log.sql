-- The site log: every event this site accepted (pending until forwarded) and
-- every remote event it received from the central stream (stored forwarded).
-- `seq` is the one cursor for every reader; AUTOINCREMENT so a pruned tail
-- is never reused.
CREATE TABLE events (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           BLOB    NOT NULL,           -- 16-byte UUID
    tenant       TEXT    NOT NULL,
    device_id    TEXT    NOT NULL,
    event_type   TEXT    NOT NULL,
    payload      TEXT    NOT NULL,           -- JSON object
    ts           INTEGER NOT NULL,           -- device timestamp, µs since epoch
    received_at  INTEGER NOT NULL,           -- µs since epoch
    forwarded_at INTEGER,                    -- NULL = pending
    origin_site  TEXT    NOT NULL
);
CREATE UNIQUE INDEX events_id ON events (id);
CREATE INDEX events_pending ON events (seq) WHERE forwarded_at IS NULL;
CREATE INDEX events_forwarded ON events (forwarded_at) WHERE forwarded_at IS NOT NULL;
CREATE INDEX events_device ON events (tenant, device_id, seq);

-- Device registry. A revoked device stays here (revoked_at set) so its id
-- cannot quietly come back with its old tokens working again.
CREATE TABLE devices (
    tenant      TEXT    NOT NULL,
    device_id   TEXT    NOT NULL,
    name        TEXT,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER,
    last_seen   INTEGER,
    online      INTEGER NOT NULL DEFAULT 0,
    event_count INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, device_id)
) WITHOUT ROWID;

-- Small counters. `registry_version` changes with every device change so a
-- running appliance notices changes made by the CLI in another process.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO meta (key, value) VALUES ('registry_version', 0);
