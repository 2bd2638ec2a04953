#!/usr/bin/python3
"""The fleet bench (issue #14): N appliances against one central PostgreSQL.

Numbers for notes and docs/scaling.md, never for tests. Each site is a real
`outpost run` process (its own data dir and port, MQTT off) forwarding to
one throwaway PostgreSQL (initdb + pg_ctl, fsync off as in the proofs).
Every site ingests RATE single HTTP events/s into tenant `fleet`; every
SUB_EVERY-th site has a WebSocket subscriber on `fleet`, which timestamps
the other sites' events it receives (each event carries its send time, so
latency is site A's ingest -> central -> site B's subscriber, one clock).
After WARMUP s it measures SECONDS s and prints one table row:

  central rows/s, NOTIFYs/s (the per_batch trigger sends one per insert
  statement: the sites' forward batches), central connections, central CPU
  ms per 1,000 events (postmaster and backends, from /proc), p50/p99
  latency to remote subscribers, and whether central kept up.

usage: tests/bench/fleet.py --sites N [--rate 20] [--sub-every 5] [--seconds 30]
       tests/bench/fleet.py --in-process --sites N [--tenants T] ...
Env: BATCH_WAIT (central.batch_wait, default 20ms), KEEP=1 keeps the work dir,
OUTPOST_BENCH (--in-process: the outpost-bench binary, to compare builds).
Needs target/release/outpost (make release) and PostgreSQL's server binaries.

--in-process (issue #30) runs the N sites inside one `outpost-bench fleet`
process instead (each a real appliance: its own site log, writer, forwarder
and LISTEN connection; events appended to the log directly, subscribers as
in-process feeds), so 1,000 sites fit on this machine and the figure is
central's, not N processes'. Site i writes tenant `fleet<i % T>`. Needs
target/release/outpost-bench (make bench).
"""

import argparse
import asyncio
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests", "chaos"))
sys.path.insert(0, os.path.join(ROOT, "tests", "powercut"))
import chaos  # noqa: E402
from ledger import keep_or_remove, log, wait_for  # noqa: E402
import websockets  # noqa: E402 (Debian python3-websockets)

TENANT = "fleet"
CLK = os.sysconf("SC_CLK_TCK")


class Pg(chaos.Pg):
    def cpu_seconds(self):
        """utime + stime of the postmaster and its children (backends, walwriter, ...)."""
        with open(os.path.join(self.data, "postmaster.pid")) as f:
            master = int(f.readline())
        total = 0
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(pid) == master or int(fields[1]) == master:
                total += int(fields[11]) + int(fields[12])
        return total / CLK


async def device(app, i, token, rate, stop, sent):
    """Posts one event every 1/rate s (open loop) over one keep-alive connection."""
    r, w = await asyncio.open_connection("127.0.0.1", app.http_port)
    k, t0 = 0, time.monotonic()
    while not stop.is_set():
        body = json.dumps({"device_id": f"d{i}", "event_type": "reading",
                           "payload": {"t": time.time(), "s": i, "k": k}}).encode()
        w.write(f"POST /api/v1/realtime/{TENANT}/event HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await r.readuntil(b"\r\n\r\n")
        n = next(int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:"))
        await r.readexactly(n)
        if head[9:12] != b"201":
            raise RuntimeError(f"site {i}: {head[:12]!r}")
        sent[0] += 1
        k += 1
        await asyncio.sleep(max(0.0, t0 + k / rate - time.monotonic()))
    w.close()


async def subscriber(app, i, token, lat, measuring, ready):
    url = f"ws://127.0.0.1:{app.http_port}/api/v1/realtime/{TENANT}/stream?access_token={token}"
    async with websockets.connect(url, max_size=None) as ws:
        ready.append(i)
        async for frame in ws:
            now = time.time()
            f = json.loads(frame)
            if f.get("type") != "event":
                continue
            p = f["event"]["payload"]
            if p.get("s") != i and measuring.is_set():
                lat.append(now - p["t"])


def pct(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, int(q * (len(v) - 1) + 0.5))] * 1000 if v else float("nan")


async def run(args, pg, apps, tokens):
    stop, measuring = asyncio.Event(), asyncio.Event()
    sent, lat, ready = [0], [], []
    subs = [asyncio.create_task(subscriber(apps[i], i, tokens[i], lat, measuring, ready))
            for i in range(0, len(apps), args.sub_every)]
    while len(ready) < len(subs):
        await asyncio.sleep(0.05)
    devs = [asyncio.create_task(device(a, i, tokens[i], args.rate, stop, sent)) for i, a in enumerate(apps)]
    await asyncio.sleep(args.warmup)
    rows0 = int(pg.query(f"SELECT count(*) FROM tenant_{TENANT}.events")[0][0])
    batches0 = sum(a.metrics().get("outpost_forward_batches_total", 0.0) for a in apps)
    cpu0, t0, sent0 = pg.cpu_seconds(), time.monotonic(), sent[0]
    measuring.set()
    await asyncio.sleep(args.seconds)
    measuring.clear()
    rows1 = int(pg.query(f"SELECT count(*) FROM tenant_{TENANT}.events")[0][0])
    cpu1, t1, sent1 = pg.cpu_seconds(), time.monotonic(), sent[0]
    batches1 = sum(a.metrics().get("outpost_forward_batches_total", 0.0) for a in apps)
    conns = int(pg.query("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'outpost%'")[0][0])
    stop.set()
    for d in devs:
        await d
    for s in subs:
        s.cancel()
    dt = t1 - t0
    return dict(sites=len(apps), rate=args.rate, subs=len(subs), offered=(sent1 - sent0) / dt,
                rows_s=(rows1 - rows0) / dt, notify_s=(batches1 - batches0) / dt, conns=conns,
                cpu_ms_per_1000=(cpu1 - cpu0) * 1e6 / max(1, rows1 - rows0), cpu_pct=(cpu1 - cpu0) / dt * 100,
                p50=pct(lat, 0.5), p99=pct(lat, 0.99), samples=len(lat), sent=sent[0])


def count_rows(pg, tenants):
    parts = " UNION ALL ".join(
        f"SELECT count(*) AS n FROM tenant_fleet{t}.events" for t in range(tenants)
        if pg.query(f"SELECT to_regclass('tenant_fleet{t}.events') IS NOT NULL")[0][0] == "t")
    return int(pg.query(f"SELECT coalesce(sum(n), 0) FROM ({parts}) AS c")[0][0]) if parts else 0


def in_process(args, work):
    """One `outpost-bench fleet` process holds every site; this measures central around it."""
    import subprocess
    pg = Pg(work)
    subs = len(range(0, args.sites, args.sub_every)) if args.sub_every else 0
    pg.max_connections = args.sites + subs + 20
    pg.up()
    bench = os.environ.get("OUTPOST_BENCH") or os.path.join(ROOT, "target", "release", "outpost-bench")
    env = dict(os.environ, OUTPOST_CENTRAL__BATCH_WAIT=os.environ.get("BATCH_WAIT", "20ms"),
               RUST_LOG=os.environ.get("RUST_LOG", "warn"))
    cmd = [bench, "fleet", "--url", pg.url(), "--sites", str(args.sites), "--tenants", str(args.tenants),
           "--rate", f"{args.rate:g}", "--sub-every", str(args.sub_every), "--warmup", f"{args.warmup:g}s",
           "--seconds", f"{args.seconds:g}s", "--dir", os.path.join(work, "sites")]
    err = open(os.path.join(work, "fleet.stderr"), "w")
    p = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        assert p.stdout.readline().strip() == "measuring", "the fleet did not start (see fleet.stderr)"
        rows0, cpu0, t0 = count_rows(pg, args.tenants), pg.cpu_seconds(), time.monotonic()
        assert p.stdout.readline().strip() == "measured"
        rows1, cpu1, t1 = count_rows(pg, args.tenants), pg.cpu_seconds(), time.monotonic()
        conns = int(pg.query("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'outpost%'")[0][0])
        r = json.loads(p.stdout.readline())
        try:
            wait_for(lambda: count_rows(pg, args.tenants) >= r["sent"], 60, "central to catch up", 0.5)
            kept = "yes"
        except TimeoutError:
            kept = "NO"
        p.stdin.write("\n")
        p.stdin.flush()
        p.wait(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
        pg.stop_quietly()
    dt = t1 - t0
    print(f"sites {r['sites']:4d}  tenants {r['tenants']:3d}  subscribers {r['subscribers']:3d}  "
          f"offered {r['offered']:7.0f} ev/s  central {(rows1 - rows0) / dt:7.0f} rows/s  "
          f"batches {r['batches_per_s']:6.0f}/s  connections {conns:4d}  "
          f"central CPU {(cpu1 - cpu0) * 1e6 / max(1, rows1 - rows0):6.0f} ms/1000 ev "
          f"({(cpu1 - cpu0) / dt * 100:4.0f}% of a core)  A->B p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms "
          f"({r['samples']} samples, {r['lagged']} lagged)  remote fetches {r['fetches_per_s']:.0f}/s  "
          f"notifications received {r.get('notifications_per_s', float('nan')):.0f}/s  "
          f"kept up: {kept}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sites", type=int, required=True)
    ap.add_argument("--rate", type=float, default=20)
    ap.add_argument("--sub-every", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--warmup", type=float, default=5)
    ap.add_argument("--in-process", action="store_true")
    ap.add_argument("--tenants", type=int, default=1)
    args = ap.parse_args()
    work = os.path.join(ROOT, "target", "fleet-bench")
    os.system(f"rm -rf {work}")
    os.makedirs(work)
    if args.in_process:
        try:
            in_process(args, work)
        finally:
            keep_or_remove(work)
        return
    pg = Pg(work)
    pg.max_connections = 400  # 2 per site at most, plus the bench's own
    pg.up()
    apps, tokens = [], []
    try:
        for i in range(args.sites):
            d = os.path.join(work, f"site-{i}")
            os.makedirs(d)
            a = chaos.Appliance(d, pg)
            a.env.update(OUTPOST_SITE__ID=f"site-{i}", OUTPOST_MQTT__ENABLED="false",
                         OUTPOST_CENTRAL__BATCH_WAIT=os.environ.get("BATCH_WAIT", "20ms"))
            tokens.append(a.cli("device", "add", "--tenant", TENANT, "--id", f"d{i}").splitlines()[-1])
            a.start()
            apps.append(a)
        for a in apps:
            wait_for(a.healthy, 60, "a site to answer", 0.1)
        wait_for(lambda: pg.query(f"SELECT to_regclass('tenant_{TENANT}.events') IS NOT NULL")[0][0] == "t", 60,
                 "the tenant schema", 0.2)
        log(f"{args.sites} sites up; {args.rate:g} ev/s each; a subscriber at every {args.sub_every}th site")
        r = asyncio.run(run(args, pg, apps, tokens))
        # Kept up: everything sent reaches central within 30 s of the end.
        try:
            wait_for(lambda: int(pg.query(f"SELECT count(*) FROM tenant_{TENANT}.events")[0][0]) >= r["sent"], 30,
                     "central to catch up", 0.5)
            kept = "yes"
        except TimeoutError:
            kept = "NO"
        fetches = sum(a.metrics().get("outpost_remote_fetches_total", 0.0) for a in apps)
        print(f"sites {r['sites']:3d}  subscribers {r['subs']:2d}  offered {r['offered']:7.0f} ev/s  "
              f"central {r['rows_s']:7.0f} rows/s  NOTIFY {r['notify_s']:6.0f}/s  connections {r['conns']:3d}  "
              f"central CPU {r['cpu_ms_per_1000']:6.0f} ms/1000 ev ({r['cpu_pct']:4.0f}% of a core)  "
              f"A->B p50 {r['p50']:6.1f} ms  p99 {r['p99']:6.1f} ms ({r['samples']} samples)  "
              f"remote fetches {fetches:.0f}  kept up: {kept}", flush=True)
    finally:
        for a in apps:
            a.kill_if_running()
        pg.stop_quietly()
        keep_or_remove(work)


if __name__ == "__main__":
    main()
