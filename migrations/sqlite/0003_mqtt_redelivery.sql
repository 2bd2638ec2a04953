-- MQTT QoS 1 redelivery detection: the packet id and payload digest of
-- events that arrived over MQTT. A DUP=1 publish matching one of the
-- device's recent events is acked without a second row.
ALTER TABLE events ADD COLUMN mqtt_pkid INTEGER;
ALTER TABLE events ADD COLUMN mqtt_digest INTEGER;
