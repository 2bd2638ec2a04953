-- Gateways and their child devices (issue #31): a device registered as a
-- gateway (a Zigbee or LoRa bridge, a PLC, a Sparkplug edge node) may
-- publish for its children over its own connection. A child names its
-- gateway in `via` (same tenant); a gateway auto-registers a child it
-- publishes for, within mqtt.gateway_max_children.
ALTER TABLE devices ADD COLUMN gateway INTEGER NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN via TEXT;
CREATE INDEX devices_via ON devices (tenant, via) WHERE via IS NOT NULL;
