#!/usr/bin/python3
"""Two builds of the appliance side by side, interleaved (numbers for notes,
never for tests): the same workloads against build A and build B in the
order A B B A per round, so drift and other load on the machine fall on
both alike. Each run starts the build on a fresh data dir (rate limits
raised, MQTT and HTTP on loopback), drives it with `outpost-bench` for
SECONDS, and takes from the appliance itself:

  events/s   committed events (outpost_events_accepted_total) over the run
  CPU µs/ev  the appliance's own user+system CPU (/proc/<pid>/stat) per event

and prints, per workload, each build's median over the rounds and B / A.

usage: tests/bench/ab.py --a OLD_BINARY --b NEW_BINARY [--rounds 3] [--seconds 10]
       [--workloads http-batch,http-single,mqtt-q1,mqtt-q2]
Needs target/release/outpost-bench (make bench). KEEP=1 keeps the work dirs.
"""

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "target", "release", "outpost-bench")
CLK = os.sysconf("SC_CLK_TCK")

WORKLOADS = {
    "http-batch": ["http", "--devices", "64", "--batch", "100"],
    "http-single": ["http", "--devices", "64"],
    "mqtt-q1": ["mqtt", "--devices", "100", "--qos", "1"],
    "mqtt-q2": ["mqtt", "--devices", "100", "--qos", "2"],
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def accepted(http_port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5).read().decode()
    return sum(float(m) for m in re.findall(r"^outpost_events_accepted_total\{[^}]*\} (\S+)$", text, re.M))


def wait_ready(http_port, proc, limit=30):
    deadline = time.time() + limit
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"appliance exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=1)
            return
        except OSError:
            time.sleep(0.1)
    sys.exit("appliance not ready in time")


def run_once(binary, workload, seconds):
    work = tempfile.mkdtemp(prefix="outpost-ab-")
    http_port, mqtt_port = free_port(), free_port()
    config = os.path.join(work, "outpost.toml")
    with open(config, "w") as f:
        f.write(f"""[site]
data_dir = "{work}/data"
[http]
listen = "127.0.0.1:{http_port}"
[mqtt]
listen = "127.0.0.1:{mqtt_port}"
max_connects_per_minute = 0
[limits]
per_second = 1000000
per_minute = 100000000
per_hour = 1000000000
""")
    log = open(os.path.join(work, "appliance.log"), "w")
    proc = subprocess.Popen([binary, "--config", config, "run"], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(http_port, proc)
        args = list(WORKLOADS[workload])
        target = ["--url", f"http://127.0.0.1:{http_port}", "--no-raw"]
        if args[0] == "mqtt":
            target += ["--port", str(mqtt_port)]
        cmd = [BENCH, "--config", config, *args, *target, "--duration", f"{seconds}s"]
        # Registering devices happens first: count from the first event on.
        before_events, before_cpu, started = accepted(http_port), cpu_ticks(proc.pid), time.time()
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"bench failed: {' '.join(cmd)}\n{out.stdout}\n{out.stderr}")
        events, cpu = accepted(http_port) - before_events, cpu_ticks(proc.pid) - before_cpu
        elapsed = time.time() - started
        return events / elapsed, (cpu / CLK) * 1e6 / max(events, 1)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        if os.environ.get("KEEP") != "1":
            shutil.rmtree(work, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--a", required=True, help="build A (the baseline)")
    p.add_argument("--b", required=True, help="build B")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--workloads", default="http-batch,http-single,mqtt-q1,mqtt-q2")
    a = p.parse_args()
    if not os.path.exists(BENCH):
        sys.exit("no target/release/outpost-bench: make bench")
    workloads = a.workloads.split(",")
    results = {(w, b): [] for w in workloads for b in "AB"}
    for r in range(a.rounds):
        for side in ("A", "B", "B", "A") if r % 2 == 0 else ("B", "A", "A", "B"):
            for w in workloads:
                rate, us = run_once(a.a if side == "A" else a.b, w, a.seconds)
                results[(w, side)].append((rate, us))
                print(f"round {r + 1} {side} {w:12} {rate:10.0f} ev/s {us:8.1f} CPU µs/ev", flush=True)
    print(f"\n{'workload':12} {'A ev/s':>10} {'B ev/s':>10} {'B/A':>6} {'A µs/ev':>9} {'B µs/ev':>9} {'B/A':>6}")
    for w in workloads:
        ra, ua = (statistics.median(x[i] for x in results[(w, 'A')]) for i in (0, 1))
        rb, ub = (statistics.median(x[i] for x in results[(w, 'B')]) for i in (0, 1))
        print(f"{w:12} {ra:10.0f} {rb:10.0f} {rb / ra:6.2f} {ua:9.1f} {ub:9.1f} {ub / ua:6.2f}")


if __name__ == "__main__":
    main()
