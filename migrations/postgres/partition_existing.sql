-- Turns an unpartitioned {{schema}}.events into one partitioned by range of
-- "timestamp", keeping every row: run inside one transaction by
-- migrate_tenant, for an empty table (every new tenant) or, with
-- `outpost migrate --central --partition-existing`, for one with rows
-- (it copies them, holding the table's lock until it commits).
--
-- The primary key must include the partition key, so it is (id, timestamp).
-- That keeps inserts exactly-once: a site resends an event with the id and
-- the timestamp it fixed at ingest, so the resend conflicts with its row.
-- $1 is the partition step (central.partition_interval).
SET LOCAL timezone = 'UTC';
CREATE TABLE {{schema}}.events_partitioned (
    id          uuid NOT NULL,
    device_id   varchar(255) NOT NULL,
    event_type  varchar(100) NOT NULL,
    payload     jsonb NOT NULL,
    "timestamp" timestamptz NOT NULL DEFAULT now(),
    processed   boolean DEFAULT false,
    site_id     text,
    site_seq    bigint,
    received_at timestamptz,
    properties  jsonb,
    PRIMARY KEY (id, "timestamp")
) PARTITION BY RANGE ("timestamp");
-- Rows outside every partition (one could not be made) land here.
CREATE TABLE {{schema}}.events_default PARTITION OF {{schema}}.events_partitioned DEFAULT;
SELECT {{schema}}.outpost_ensure_partition(b, {{step}}::interval, 'events_partitioned')
FROM (SELECT DISTINCT date_trunc('day', coalesce("timestamp", received_at, now())) AS b FROM {{schema}}.events
      UNION SELECT now() UNION SELECT now() + {{step}}::interval) d;
INSERT INTO {{schema}}.events_partitioned
    (id, device_id, event_type, payload, "timestamp", processed, site_id, site_seq, received_at, properties)
SELECT id, device_id, event_type, payload, coalesce("timestamp", received_at, now()), processed,
       site_id, site_seq, received_at, properties
FROM {{schema}}.events;
DROP TABLE {{schema}}.events;
ALTER TABLE {{schema}}.events_partitioned RENAME TO events;
ALTER INDEX {{schema}}.events_partitioned_pkey RENAME TO events_pkey;
CREATE INDEX events_device_time ON {{schema}}.events (device_id, "timestamp");
CREATE INDEX events_event_type ON {{schema}}.events (event_type);
CREATE INDEX events_processed ON {{schema}}.events (processed);
CREATE INDEX events_site_seq ON {{schema}}.events (site_id, site_seq);
