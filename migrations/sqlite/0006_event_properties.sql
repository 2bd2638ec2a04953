-- MQTT 5.0 content type and user properties a device sent with an event:
-- a JSON object {"content_type": "...", "user_properties": [["k", "v"], ...]},
-- NULL when it sent none. Kept through dead-lettering and forwarded to the
-- central table's `properties` column.
ALTER TABLE events ADD COLUMN properties TEXT;
ALTER TABLE dead_letter ADD COLUMN properties TEXT;
