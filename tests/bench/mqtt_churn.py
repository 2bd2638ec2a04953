#!/usr/bin/env python3
"""RSS growth of a running appliance under MQTT state churn (a measurement
for notes, not a test): N reconnects with distinct client ids (persistent
sessions, clean_session=0) and N publishes to distinct retained topics.
The front-end bounds what rumqttd keeps (mqtt.max_sessions_per_device,
mqtt.max_retained_per_tenant), so RSS should settle, not grow with N.

    tests/bench/mqtt_churn.py --pid PID --port 1883 --device D --token TOKEN [--tenant acme] [-n 10000]

Run the appliance with OUTPOST_MQTT__MAX_CONNECTS_PER_MINUTE=0: one device
reconnecting thousands of times a minute is what that limit refuses.
"""
import argparse, socket, struct, time


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def s(b):
    return struct.pack(">H", len(b)) + b


def frame(first, body):
    out, n = bytearray([first]), len(body)
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            break
    return bytes(out) + body


def connect(port, client_id, user, token, clean):
    c = socket.create_connection(("127.0.0.1", port))
    flags = 0xC0 | (0x02 if clean else 0)
    body = s(b"MQTT") + bytes([4, flags]) + struct.pack(">H", 30) + s(client_id.encode()) + s(user.encode()) + s(token.encode())
    c.sendall(frame(0x10, body))
    ack = c.recv(4)
    assert ack[:2] == b"\x20\x02" and ack[3] == 0, ack
    return c


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--tenant", default="acme")
    ap.add_argument("--device", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("-n", type=int, default=10000)
    ap.add_argument("--round", default="a", help="prefix of client ids and topics, to run again on the same process")
    a = ap.parse_args()
    # Warm-up, so allocator pools and the router's first segments exist.
    for i in range(200):
        connect(a.port, f"{a.device}-{a.round}warm{i}", a.device, a.token, False).close()
    time.sleep(1)
    before = rss_kb(a.pid)
    t0 = time.time()
    for i in range(a.n):
        c = connect(a.port, f"{a.device}-{a.round}c{i}", a.device, a.token, False)
        c.sendall(b"\xe0\x00")
        c.close()
    after_sessions = rss_kb(a.pid)
    c = connect(a.port, f"{a.device}-retain", a.device, a.token, True)
    for i in range(a.n):
        topic = f"{a.tenant}/devices/{a.device}/events/{a.round}r{i}".encode()
        c.sendall(frame(0x33, s(topic) + struct.pack(">H", i % 65535 + 1) + b'{"r":1}'))
        c.recv(4)  # PUBACK
    c.sendall(b"\xe0\x00")
    c.close()
    time.sleep(1)
    after = rss_kb(a.pid)
    print(f"{a.n} reconnects with distinct client ids (persistent) + {a.n} distinct retained topics in {time.time() - t0:.0f}s")
    print(f"RSS before {before / 1024:.1f} MiB, after reconnects {after_sessions / 1024:.1f} MiB, after retained {after / 1024:.1f} MiB: "
          f"+{(after - before) / 1024:.1f} MiB")


if __name__ == "__main__":
    main()
