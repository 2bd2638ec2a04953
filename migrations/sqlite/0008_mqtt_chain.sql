-- MQTT redelivery without a per-device index. `events_mqtt` put every MQTT
-- event's entry on its device's own leaf page, so a commit of N devices'
-- events wrote N index pages: it doubled the bytes per MQTT event and cost
-- the writer a third of its time. Now each event with a packet id points at
-- its device's previous one (`mqtt_prev`), in its own row; the newest per
-- device (`mqtt_heads`) is kept in memory by the writer and stored with the
-- device counters. A DUP=1 lookup walks back from the head.
ALTER TABLE events ADD COLUMN mqtt_prev INTEGER;
CREATE TABLE mqtt_heads (
    tenant    TEXT    NOT NULL,
    device_id TEXT    NOT NULL,
    seq       INTEGER NOT NULL,
    PRIMARY KEY (tenant, device_id)
) WITHOUT ROWID;
-- Only events a DUP=1 publish can still match need a head: received in
-- the last ten minutes, and (so that upgrading a large log reads only its
-- tail, by rowid: NOT INDEXED keeps the planner off the whole index) among
-- its last million rows, which at 5,000 events/s is the last three minutes.
INSERT INTO mqtt_heads (tenant, device_id, seq)
SELECT tenant, device_id, max(seq) FROM events NOT INDEXED
WHERE seq > (SELECT coalesce(max(seq), 0) FROM events) - 1000000
  AND mqtt_pkid IS NOT NULL
  AND received_at >= (CAST(strftime('%s', 'now') AS INTEGER) - 600) * 1000000
GROUP BY tenant, device_id;
-- The chain rewrites each row it links, so it covers only the last 10,000
-- rows (the WAL of the upgrade stays small on a log near its budget): the
-- publishes a device still waits a PUBACK for when the old binary stops
-- are its newest. It is built while the index can still find each one's
-- predecessor.
UPDATE events SET mqtt_prev = (
    SELECT max(p.seq) FROM events p
    WHERE p.tenant = events.tenant AND p.device_id = events.device_id
      AND p.mqtt_pkid IS NOT NULL AND p.seq < events.seq)
WHERE seq > (SELECT coalesce(max(seq), 0) FROM events) - 10000
  AND mqtt_pkid IS NOT NULL
  AND received_at >= (CAST(strftime('%s', 'now') AS INTEGER) - 600) * 1000000;
-- The heads are complete up to this seq; after a crash the writer finds the
-- newer ones in the events above it.
INSERT INTO meta (key, value) VALUES ('mqtt_heads_upto', coalesce((SELECT max(seq) FROM events), 0));
DROP INDEX events_mqtt;
