#!/usr/bin/env python3
"""paho-mqtt 2.x against a running outpost, driven by tests/mqtt_protocol.rs.

For each protocol (3.1.1, 5.0) x transport (tcp, websockets at /mqtt) x
QoS (0, 1, 2): a subscriber at QoS 2 and a publisher at that QoS, both paho.
Prints one JSON line per case: {"case", "acked", "received_qos", "payload"}.
The Rust test checks the lines against the site log; this script asserts
nothing itself.

usage: paho2.py HOST MQTT_PORT HTTP_PORT TENANT PUB_ID PUB_TOKEN SUB_ID SUB_TOKEN
"""
import json
import sys
import threading

import paho.mqtt.client as mqtt

host, mqtt_port, http_port, tenant, pub_id, pub_tok, sub_id, sub_tok = sys.argv[1:9]
TIMEOUT = 10


def client(client_id, user, token, protocol, transport):
    kw = {} if protocol == mqtt.MQTTv5 else {"clean_session": True}
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol, transport=transport, **kw)
    if transport == "websockets":
        c.ws_set_options(path="/mqtt")
    c.username_pw_set(user, token)
    connected = threading.Event()
    c.on_connect = lambda *a: connected.set()
    port = int(http_port) if transport == "websockets" else int(mqtt_port)
    c.connect(host, port, keepalive=30)
    c.loop_start()
    if not connected.wait(TIMEOUT):
        raise SystemExit(f"{client_id}: no CONNACK")
    return c


for proto_name, protocol in (("3.1.1", mqtt.MQTTv311), ("5.0", mqtt.MQTTv5)):
    for transport in ("tcp", "websockets"):
        got = {}
        arrived = threading.Condition()

        def on_message(_c, _u, msg, got=got, arrived=arrived):
            with arrived:
                got[msg.payload.decode()] = msg.qos
                arrived.notify_all()

        subscribed = threading.Event()
        sub = client(f"{sub_id}-{transport}", sub_id, sub_tok, protocol, transport)
        sub.on_message = on_message
        sub.on_subscribe = lambda *a: subscribed.set()
        sub.subscribe(f"{tenant}/events/{pub_id}/#", qos=2)
        if not subscribed.wait(TIMEOUT):
            raise SystemExit("no SUBACK")
        pub = client(f"{pub_id}-{transport}", pub_id, pub_tok, protocol, transport)
        for qos in (0, 1, 2):
            case = f"{proto_name}/{transport}/qos{qos}"
            payload = json.dumps({"case": case})
            info = pub.publish(f"{tenant}/devices/{pub_id}/events/paho", payload, qos=qos)
            info.wait_for_publish(TIMEOUT)
            with arrived:
                arrived.wait_for(lambda: payload in got, TIMEOUT)
            print(json.dumps({"case": case, "acked": info.is_published(), "received_qos": got.get(payload),
                              "payload": payload}), flush=True)
        pub.disconnect()
        pub.loop_stop()
        sub.disconnect()
        sub.loop_stop()
