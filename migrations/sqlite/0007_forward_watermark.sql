-- Site log v2: forwarding is recorded by a watermark, not by rewriting each
-- forwarded row (which wrote every event a second time and moved it between
-- two indexes). A row is forwarded when its `forwarded_at` is set (other
-- sites' events; rows marked one by one when a mark could not move the
-- watermark; everything v1 marked), or when its seq is at or below the
-- highest `forward_marks.upto` and it is not in `pending_again`.
CREATE TABLE forward_marks (
    upto INTEGER PRIMARY KEY,               -- seq the watermark moved to
    at   INTEGER NOT NULL                   -- when, µs since epoch
);
-- Rows at or below the watermark that are pending again (`outpost replay`,
-- `outpost dead-letter retry`) until forwarded once more.
CREATE TABLE pending_again (
    seq INTEGER PRIMARY KEY
);
-- v1's pending rows stay pending: the watermark starts just below the first
-- of them (or at the last row when none is pending). v1's forwarded rows
-- above it keep their forwarded_at.
INSERT INTO forward_marks (upto, at)
SELECT coalesce((SELECT min(seq) - 1 FROM events WHERE forwarded_at IS NULL),
                (SELECT max(seq) FROM events), 0),
       CAST(strftime('%s', 'now') AS INTEGER) * 1000000;
-- Marking no longer sets forwarded_at on this site's rows; retention walks
-- seq from the oldest row instead.
DROP INDEX events_forwarded;
-- Only MQTT redelivery looks events up per device, and only events that
-- carried a packet id: HTTP and WebSocket events no longer pay for a wide
-- (tenant, device_id, seq) entry scattered across the index per commit.
DROP INDEX events_device;
CREATE INDEX events_mqtt ON events (tenant, device_id, seq) WHERE mqtt_pkid IS NOT NULL;
