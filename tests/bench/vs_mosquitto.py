#!/usr/bin/python3
"""The appliance against Debian's mosquitto with the same bench client,
interleaved (numbers for notes, never for tests): MQTT 3.1.1 QoS 1 from 100
devices at full speed, for SECONDS each, in the order A M M A per round, so
drift and other load on the machine fall on both alike. mosquitto runs in
memory (`persistence false`): it acks without storing anything, while the
appliance acks only what its site log committed (fsync).

  events/s   acked publishes over the run
  CPU µs/ev  the broker's own user+system CPU (/proc/<pid>/stat) per event

usage: tests/bench/vs_mosquitto.py [--binary target/release/outpost] [--rounds 3] [--seconds 10]
Needs target/release/outpost-bench (make bench) and /usr/sbin/mosquitto
(apt-get install mosquitto; its own service may stay stopped).
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ab  # noqa: E402  (run_once, free_port, cpu_ticks, CLK, BENCH)

MOSQUITTO = "/usr/sbin/mosquitto"


def mosquitto_once(seconds):
    work = tempfile.mkdtemp(prefix="outpost-vs-mosquitto-")
    port = ab.free_port()
    conf = os.path.join(work, "mosquitto.conf")
    with open(conf, "w") as f:
        f.write(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest none\n")
    proc = subprocess.Popen([MOSQUITTO, "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        before = ab.cpu_ticks(proc.pid)
        cmd = [ab.BENCH, "mqtt", "--plain", "--devices", "100", "--qos", "1", "--port", str(port),
               "--duration", f"{seconds}s", "--no-raw"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"bench failed: {' '.join(cmd)}\n{out.stdout}\n{out.stderr}")
        cpu = ab.cpu_ticks(proc.pid) - before
        m = re.search(r"acked (\d+) publishes in ([\d.]+)s = (\d+) events/s", out.stdout)
        if not m:
            sys.exit(f"no rate in bench output:\n{out.stdout}")
        acked, rate = int(m.group(1)), float(m.group(3))
        return rate, (cpu / ab.CLK) * 1e6 / max(acked, 1)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def wait_port(port, proc):
    import socket
    import time
    for _ in range(100):
        if proc.poll() is not None:
            sys.exit("mosquitto exited at start")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit("mosquitto not listening in time")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--binary", default=os.path.join(ab.ROOT, "target", "release", "outpost"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=10)
    a = p.parse_args()
    for need in (ab.BENCH, MOSQUITTO, a.binary):
        if not os.path.exists(need):
            sys.exit(f"missing {need}")
    runs = {"outpost": [], "mosquitto": []}
    for r in range(a.rounds):
        for side in ("outpost", "mosquitto", "mosquitto", "outpost"):
            rate, us = ab.run_once(a.binary, "mqtt-q1", a.seconds) if side == "outpost" else mosquitto_once(a.seconds)
            runs[side].append((rate, us))
            print(f"round {r + 1} {side:9} {rate:10.0f} ev/s {us:8.1f} CPU µs/ev", flush=True)
    med = {s: [statistics.median(x[i] for x in v) for i in (0, 1)] for s, v in runs.items()}
    print(f"\n{'broker':10} {'ev/s':>10} {'CPU µs/ev':>10}")
    for s, (rate, us) in med.items():
        print(f"{s:10} {rate:10.0f} {us:10.1f}")
    print(f"outpost / mosquitto: {med['outpost'][0] / med['mosquitto'][0]:.2f}x events/s, "
          f"{med['outpost'][1] / med['mosquitto'][1]:.2f}x CPU per event")


if __name__ == "__main__":
    main()
