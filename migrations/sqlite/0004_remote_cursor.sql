-- How far this site has copied each other site's events of a tenant from the
-- central database (by their site_seq), so a reconnecting LISTEN connection
-- catches up exactly what it missed.
CREATE TABLE remote_cursor (
    tenant   TEXT    NOT NULL,
    site_id  TEXT    NOT NULL,
    last_seq INTEGER NOT NULL,
    PRIMARY KEY (tenant, site_id)
) WITHOUT ROWID;
