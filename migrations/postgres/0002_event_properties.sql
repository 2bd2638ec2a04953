-- MQTT 5.0 content type and user properties sent with an event, as
-- {"content_type": "...", "user_properties": [["k", "v"], ...]}; NULL when none.
ALTER TABLE {{schema}}.events ADD COLUMN IF NOT EXISTS properties jsonb;
