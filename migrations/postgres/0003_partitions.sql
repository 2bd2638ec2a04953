-- Time partitions of {{schema}}.events (when it is partitioned by range of
-- "timestamp": every tenant created from this version on, and older ones
-- after `outpost migrate --central --partition-existing`).
--
-- outpost_ensure_partition(at, step[, parent]) makes sure the partition of
-- `step` ('1 month', or whole days) holding `at` exists, and returns its
-- name; NULL when it cannot be made, in which case rows land in the
-- default partition and nothing blocks:
--   * the table is not partitioned (left for --partition-existing);
--   * a partition of another step already covers part of the range;
--   * the default partition holds rows of that range.
-- Partitions are created under a per-tenant advisory lock, so many sites
-- may ask at once.
-- Both functions compute in UTC whatever the session's time zone (a month
-- or a day in local time would shift across DST and leave gaps).
CREATE OR REPLACE FUNCTION {{schema}}.outpost_ensure_partition(
    at timestamptz, step interval, parent text DEFAULT 'events') RETURNS text
LANGUAGE plpgsql SET timezone = 'UTC' AS $$
DECLARE lo timestamptz; hi timestamptz; name text;
BEGIN
    IF (SELECT c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = '{{schema}}' AND c.relname = parent) IS DISTINCT FROM 'p' THEN
        RETURN NULL;
    END IF;
    -- Not `step = interval '1 month'`: PostgreSQL counts a month as 30 days
    -- there, so '30 days' would compare equal.
    IF date_part('month', step) = 1 AND date_part('day', step) = 0 AND date_part('epoch', step - interval '1 month') = 0 THEN
        lo := date_trunc('month', at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    ELSE
        lo := 'epoch'::timestamptz
              + floor(extract(epoch FROM at) / extract(epoch FROM step)) * step;
    END IF;
    hi := lo + step;
    name := 'events_p' || to_char(lo AT TIME ZONE 'UTC', 'YYYYMMDD');
    IF to_regclass(format('%I.%I', '{{schema}}', name)) IS NOT NULL THEN
        RETURN name;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('outpost:partition:{{schema}}'));
    IF to_regclass(format('%I.%I', '{{schema}}', name)) IS NULL THEN
        BEGIN
            EXECUTE format('CREATE TABLE %I.%I PARTITION OF %I.%I FOR VALUES FROM (%L) TO (%L)',
                           '{{schema}}', name, '{{schema}}', parent, lo, hi);
        EXCEPTION WHEN invalid_object_definition OR check_violation THEN
            RAISE WARNING 'outpost: partition % of {{schema}}.% not created: %', name, parent, SQLERRM;
            RETURN NULL;
        END;
    END IF;
    RETURN name;
END $$;

-- outpost_drop_partitions(before) detaches and drops every range partition
-- of {{schema}}.events whose upper bound is at or before `before`
-- (central.retention). Returns how many it dropped.
CREATE OR REPLACE FUNCTION {{schema}}.outpost_drop_partitions(before timestamptz) RETURNS int
LANGUAGE plpgsql SET timezone = 'UTC' AS $$
DECLARE r record; n int := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('outpost:partition:{{schema}}'));
    FOR r IN
        SELECT c.relname,
               (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \(''([^'']+)''\)'))[1]::timestamptz AS hi
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        JOIN pg_class p ON p.oid = i.inhparent
        JOIN pg_namespace n ON n.oid = p.relnamespace
        WHERE n.nspname = '{{schema}}' AND p.relname = 'events'
    LOOP
        IF r.hi IS NOT NULL AND r.hi <= before THEN
            EXECUTE format('ALTER TABLE %I.events DETACH PARTITION %I.%I', '{{schema}}', '{{schema}}', r.relname);
            EXECUTE format('DROP TABLE %I.%I', '{{schema}}', r.relname);
            n := n + 1;
        END IF;
    END LOOP;
    RETURN n;
END $$;
