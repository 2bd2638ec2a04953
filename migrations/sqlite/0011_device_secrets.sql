-- Per-device secrets (issue #31): a short password for firmware whose MQTT
-- stack cannot hold a 283-character token (ESP-AT: 64 bytes). Only an
-- argon2id hash (PHC string) is kept, with the permissions a login with it
-- gets. Revoking the device ends it like every token of the device.
CREATE TABLE device_secrets (
    tenant     TEXT    NOT NULL,
    device_id  TEXT    NOT NULL,
    hash       TEXT    NOT NULL,
    perms      TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, device_id)
) WITHOUT ROWID;
