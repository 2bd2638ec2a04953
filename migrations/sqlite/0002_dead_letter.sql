-- Events the central database rejected for their data. They leave the
-- forwarding queue (so they never block it) but are kept, with the error,
-- until `outpost dead-letter retry` puts them back or `purge` drops them.
CREATE TABLE dead_letter (
    seq          INTEGER PRIMARY KEY,        -- the event's original seq
    id           BLOB    NOT NULL,
    tenant       TEXT    NOT NULL,
    device_id    TEXT    NOT NULL,
    event_type   TEXT    NOT NULL,
    payload      TEXT    NOT NULL,
    ts           INTEGER NOT NULL,
    received_at  INTEGER NOT NULL,
    origin_site  TEXT    NOT NULL,
    error        TEXT    NOT NULL,
    failed_at    INTEGER NOT NULL
);
