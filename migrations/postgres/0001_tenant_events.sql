-- Central schema of one tenant. {{schema}} is tenant_<t> and {{channel}} is
-- tenant_<t>_events; <t> is validated against ^[a-z][a-z0-9_]{0,40}$ before
-- it is substituted. Applied once (tracked in {{schema}}.outpost_migrations)
-- under a per-tenant advisory lock, so many sites may migrate at once.

CREATE TABLE {{schema}}.events (
    id          uuid PRIMARY KEY,
    device_id   varchar(255) NOT NULL,
    event_type  varchar(100) NOT NULL,
    payload     jsonb NOT NULL,
    "timestamp" timestamptz DEFAULT now(),
    processed   boolean DEFAULT false,
    site_id     text,
    site_seq    bigint,
    received_at timestamptz
);
CREATE INDEX events_device_time ON {{schema}}.events (device_id, "timestamp");
CREATE INDEX events_event_type ON {{schema}}.events (event_type);
CREATE INDEX events_processed ON {{schema}}.events (processed);
CREATE INDEX events_site_seq ON {{schema}}.events (site_id, site_seq);

-- per_row: the classic payload listeners written for the field spec expect.
CREATE FUNCTION {{schema}}.notify_event_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{{channel}}', json_build_object(
        'id', NEW.id, 'device_id', NEW.device_id,
        'event_type', NEW.event_type, 'timestamp', NEW."timestamp")::text);
    RETURN NULL;
END $$;

-- per_batch: one small notification per insert statement and site; the
-- listener fetches the rows by (site_id, site_seq). Rows skipped by
-- ON CONFLICT are not in new_rows, so replays notify nothing.
CREATE FUNCTION {{schema}}.notify_event_batch() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE r record;
BEGIN
    FOR r IN SELECT site_id, min(site_seq) AS first_seq, max(site_seq) AS last_seq, count(*) AS n
             FROM new_rows GROUP BY site_id LOOP
        PERFORM pg_notify('{{channel}}', json_build_object(
            'site_id', r.site_id, 'first_seq', r.first_seq,
            'last_seq', r.last_seq, 'count', r.n)::text);
    END LOOP;
    RETURN NULL;
END $$;
