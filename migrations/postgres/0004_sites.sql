-- The sites that write this tenant: one row per site, kept by each site's
-- forwarder in the transaction of every batch it commits. Other sites'
-- listeners read it to learn who has news for them (last_seq beyond their
-- cursor) instead of scanning events for DISTINCT site_id.
CREATE TABLE IF NOT EXISTS {{schema}}.sites (
    site_id   text PRIMARY KEY,
    last_seen timestamptz NOT NULL,
    last_seq  bigint NOT NULL
);
INSERT INTO {{schema}}.sites (site_id, last_seen, last_seq)
SELECT site_id, coalesce(max(received_at), now()), max(site_seq)
FROM {{schema}}.events WHERE site_id IS NOT NULL AND site_seq IS NOT NULL
GROUP BY site_id
ON CONFLICT (site_id) DO NOTHING;
