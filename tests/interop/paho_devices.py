#!/usr/bin/env python3
"""paho-mqtt 2.x as the devices that exist (issue #31), driven by
tests/devices.rs: for MQTT 3.1.1 and 5.0, a relay logging in with its
short secret (username <tenant>/<id>) that publishes plain text and raw
bytes, and a bridge logging in as a gateway that publishes for a child on
its own topic layout (zigbee2mqtt/<child>), which the relay receives on
that layout through its subscription to zigbee2mqtt/+. Prints one JSON
line per publish: {"case", "acked"}, and one per delivery: {"case",
"topic", "payload"} (none when nothing came within the timeout). The
Rust test checks the site log and the lines; this script asserts nothing
itself.

usage: paho_devices.py HOST MQTT_PORT TENANT RELAY_ID RELAY_SECRET BRIDGE_ID BRIDGE_TOKEN
"""
import json
import sys
import threading

import paho.mqtt.client as mqtt

host, port, tenant, relay, secret, bridge, token = sys.argv[1:8]
TIMEOUT = 10


def client(client_id, user, password, protocol):
    kw = {} if protocol == mqtt.MQTTv5 else {"clean_session": True}
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol, **kw)
    c.username_pw_set(user, password)
    connected = threading.Event()
    c.on_connect = lambda _c, _u, _f, rc, _p=None: connected.set() if rc == 0 else None
    c.connect(host, int(port), keepalive=30)
    c.loop_start()
    if not connected.wait(TIMEOUT):
        raise SystemExit(f"{client_id}: no successful CONNACK")
    return c


def publish(c, case, topic, payload):
    info = c.publish(topic, payload, qos=1)
    try:
        info.wait_for_publish(TIMEOUT)
    except (RuntimeError, ValueError):
        pass
    print(json.dumps({"case": case, "acked": info.is_published()}), flush=True)


for name, protocol in (("3.1.1", mqtt.MQTTv311), ("5.0", mqtt.MQTTv5)):
    r = client(f"{relay}-{name}", f"{tenant}/{relay}", secret, protocol)
    publish(r, f"text {name}", f"{tenant}/devices/{relay}/events/state", b"on")
    publish(r, f"bytes {name}", f"{tenant}/devices/{relay}/events/frame", bytes([0x00, 0xFF, 0x10, 0x80]))
    r.disconnect()
    r.loop_stop()
    # The relay listens on the bridge's layout before the bridge publishes.
    s = client(f"{relay}-sub-{name}", f"{tenant}/{relay}", secret, protocol)
    subscribed, received, got = threading.Event(), threading.Event(), []
    s.on_subscribe = lambda _c, _u, _m, _codes, _p=None: subscribed.set()
    s.on_message = lambda _c, _u, m: got.append(m) or received.set()
    s.subscribe("zigbee2mqtt/+", qos=1)
    if not subscribed.wait(TIMEOUT):
        raise SystemExit(f"{relay}-sub-{name}: no SUBACK")
    b = client(f"{bridge}-{name}", bridge, token, protocol)
    publish(b, f"child {name}", f"zigbee2mqtt/lamp-{name.replace('.', '')}", b'{"state":"ON"}')
    b.disconnect()
    b.loop_stop()
    received.wait(TIMEOUT)
    for m in got:
        print(json.dumps({"case": f"layout {name}", "topic": m.topic, "payload": m.payload.decode()}), flush=True)
    s.disconnect()
    s.loop_stop()
