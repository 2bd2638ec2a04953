-- per_batch, same payloads in one query: the trigger looped over the sites
-- of new_rows and ran one PERFORM pg_notify per site (a cursor and a query
-- each); a forwarder's batch is one site, so that was two queries and a
-- cursor per batch, about a fifth of what a batch cost central.
CREATE OR REPLACE FUNCTION {{schema}}.notify_event_batch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{{channel}}', json_build_object(
        'site_id', site_id, 'first_seq', min(site_seq),
        'last_seq', max(site_seq), 'count', count(*))::text)
    FROM new_rows GROUP BY site_id;
    RETURN NULL;
END $$;
