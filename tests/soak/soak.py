#!/usr/bin/python3
"""The soak (issue #16 item 5): reported, not run in CI.

Proves that the appliance holds steady under a long, realistic load: an
hour at 2,000 events/s, mixed across protocols, with 200 live stream
subscribers and forwarding to a real PostgreSQL throughout. After a warm-up
(10 minutes), resident memory (VmRSS) must drift by less than 5 MB and the
number of open file descriptors must not grow; at the end every acked event
must be in the central database, once and in per-device order.

- Central: a throwaway PostgreSQL (tests/chaos/chaos.py's `Pg`: initdb +
  pg_ctl, free port). The release binary (copied into the work dir, so a
  rebuild during the hour cannot touch it) runs as a child with
  `central.url` pointing at it, production defaults except the per-device
  rate limits (raised) and the site id.
- Load: RATE events/s in total, paced per device (each device sends on its
  own schedule with a random phase: no bursts), mixed as in the chaos proof:
  HTTP single posts, HTTP batches (1-49 events), MQTT QoS 1 (paho 1.6, a
  window of 64 in flight) and WebSocket `event` frames, each device in a
  loop that waits for its ack. Ids are UUIDs derived from (seed, device, k),
  so the ledger of acked events is a bitmap per device, not 7 M strings.
  Each kind runs in its own process (the GIL would otherwise be the limit).
- Subscribers: SUBSCRIBERS live streams held for the whole run, half
  WebSocket (`…/stream?access_token=`), half SSE (`…/sse`). One in ten is
  filtered to one HTTP device (`device_id=`), the others to one event-type
  bucket (`event_types=soak.*.bNNN`; every event carries one of SUBSCRIBERS
  buckets), so each reads 10-20 events/s and together about the ingest rate.
  They read and count every frame and check that seqs only rise; one closed
  as `lagged` reconnects with `after=` its last seq and is counted.
- Every 10 s: VmRSS, VmHWM (and RssAnon/RssFile/RssShmem), open fds (and
  how many are sockets), threads, the accepted-events counters per protocol
  from /metrics, the backlog from /api/v1/status, subscriber figures, the
  site log's size and the free disk space; written to <work>/samples.csv.
- After the load: the backlog must drain, then every acked event is looked
  up in central per device with the shared `Verdict` (tests/powercut/ledger.py).

Pass: RSS at the end minus RSS at the end of the warm-up < 5 MB; fds at the
end <= fds at the end of the warm-up (and never more than 2 above it: a
subscriber reconnecting or a scrape in flight); lost, duplicated and order
violations all 0; no ingest errors. Exit status 1 otherwise.

Run (needs postgresql, python3-paho-mqtt, python3-websockets; as root, the
PostgreSQL cluster runs as `postgres`):

    python3 tests/soak/soak.py                          # the hour
    DURATION=120 WARMUP=30 python3 tests/soak/soak.py   # a quick look

Env: DURATION (3600 s), RATE (2000 ev/s), SUBSCRIBERS (200), WARMUP (600 s),
SAMPLE (10 s), MIX ("http:0.08,batch:0.50,mqtt:0.27,ws:0.15"), SEED, KEEP=1
(keep the work dir /tmp/soak-*: samples.csv, outpost.log, pg/).

The last line is
`soak: 3600 s at N ev/s (http X, mqtt Y, ws Z), S subscribers, delivered D/s,
RSS after warm-up A MB -> B MB (drift C MB, slope E MB/h), fds F -> G, lost: 0`
where the rates are the appliance's own counters (http includes batches).
"""

import asyncio
import csv
import hashlib
import http.client
import json
import multiprocessing as mp
import os
import queue
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests", "powercut"))
sys.path.insert(0, os.path.join(ROOT, "tests", "chaos"))
import chaos  # noqa: E402
from chaos import Appliance, Pg  # noqa: E402
from ledger import PahoAcks, Verdict, die, keep_or_remove, log, wait_for  # noqa: E402

TENANT = chaos.TENANT
SITE = "soak-site"
# kind -> devices of that kind
DEVICES = {"http": 8, "batch": 4, "mqtt": 6, "ws": 10}
VIEWERS = 4          # devices whose tokens the subscribers use
EVENT_FRAME = '{"type":"event","seq":'


def env_int(name, default):
    return int(os.environ.get(name, str(default)))


def parse_mix(s):
    out = {}
    for part in s.split(","):
        kind, share = part.split(":")
        if kind not in DEVICES:
            raise SystemExit(f"MIX: unknown kind {kind!r} (one of {', '.join(DEVICES)})")
        out[kind] = float(share)
    total = sum(out.values())
    return {k: v / total for k, v in out.items()}


def event_id(seed, dev, k):
    """A UUID (v4 layout) derived from the device and its counter: random-looking
    to the appliance's and central's indexes, recomputable by the check."""
    return str(uuid.UUID(bytes=hashlib.md5(f"{seed}:{dev}:{k}".encode()).digest(), version=4))


def event_type(kind, k, buckets):
    return f"soak.{kind}.b{k % buckets:03d}"


class Bits:
    """Acked counters of one device: a growing bitmap (k >= 1)."""

    def __init__(self):
        self.b = bytearray()
        self.n = 0
        self.lock = threading.Lock()

    def set(self, k):
        i, m = k >> 3, 1 << (k & 7)
        with self.lock:
            if i >= len(self.b):
                self.b.extend(bytes(max(i + 1 - len(self.b), 65536)))
            if not self.b[i] & m:
                self.b[i] |= m
                self.n += 1

    @staticmethod
    def keys(b):
        for i, byte in enumerate(b):
            if byte:
                for j in range(8):
                    if byte & (1 << j):
                        yield (i << 3) | j


class Pacer:
    """Events due at a steady rate from a random phase. A device more than a
    second behind its schedule restarts it from now (counted: `behind`),
    rather than catching up in a burst."""

    def __init__(self, rate, rnd):
        self.interval = 1.0 / rate
        self.next = time.monotonic() + rnd.random() * min(self.interval, 1.0)
        self.behind = 0

    def delay(self, n=1):
        now = time.monotonic()
        if self.next < now - 1.0:
            self.next = now
            self.behind += 1
        d = self.next - now
        self.next += n * self.interval
        return max(d, 0.0)


class Stats:
    """Counters of one worker process, reported to the main process."""

    def __init__(self, name, q):
        self.name, self.q = name, q
        self.c = {}
        self.lock = threading.Lock()
        self.first_errors = []

    def add(self, key, n=1):
        with self.lock:
            self.c[key] = self.c.get(key, 0) + n

    def error(self, msg):
        self.add("errors")
        with self.lock:
            if len(self.first_errors) < 5:
                self.first_errors.append(msg)

    def report(self):
        with self.lock:
            c = dict(self.c)
            c["first_errors"] = list(self.first_errors)
        self.q.put(("stats", self.name, c))

    def reporter(self, stop, every=5.0):
        def run():
            while not stop.wait(every):
                self.report()
        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t


# ---------------------------------------------------------------- ingest workers

def http_worker(cfg, devs, q, go, stop):
    """HTTP single posts and batches: one thread (and keep-alive connection) per device."""
    st = Stats("http", q)
    bits = {dev: Bits() for dev, _, _, _ in devs}
    go.wait()
    st.reporter(stop)
    threads = []
    for dev, kind, rate, token in devs:
        t = threading.Thread(target=http_device, args=(cfg, dev, kind, rate, token, bits[dev], st, stop), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    st.report()
    q.put(("final", "http", {d: (bytes(b.b), b.n) for d, b in bits.items()}))


def http_device(cfg, dev, kind, rate, token, bits, st, stop):
    rnd = random.Random(f"{cfg['seed']}:{dev}")
    pacer = Pacer(rate, rnd)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    path = f"/api/v1/realtime/{TENANT}/" + ("event" if kind == "http" else "events")
    conn, k = None, 1
    try:
        while not stop.is_set():
            n = 1 if kind == "http" else rnd.randint(1, 49)
            d = pacer.delay(n)
            if d:
                time.sleep(d)
            evs = [{"id": event_id(cfg["seed"], dev, k + j), "device_id": dev,
                    "event_type": event_type(kind, k + j, cfg["buckets"]),
                    "payload": {"k": k + j, "v": round(rnd.uniform(0, 100), 2)}} for j in range(n)]
            body = json.dumps(evs[0] if kind == "http" else evs)
            attempt = 0
            while True:
                attempt += 1
                if attempt > 1:
                    st.add(f"{kind}_resent", n)
                    if stop.is_set() and attempt > 3:
                        return  # not acked: not in the ledger
                    time.sleep(0.2)
                try:
                    if conn is None:
                        conn = http.client.HTTPConnection("127.0.0.1", cfg["http_port"], timeout=30)
                    conn.request("POST", path, body, headers)
                    r = conn.getresponse()
                    status, resp = r.status, r.read()
                except (OSError, http.client.HTTPException) as e:
                    st.error(f"{dev}: {type(e).__name__}: {e}")
                    conn = None
                    continue
                if status != 201:
                    st.error(f"{dev}: HTTP {status}: {resp[:200]!r}")
                    continue
                got = json.loads(resp)
                results = [got] if kind == "http" else got["results"]
                if len(results) != n or any(r["id"] != e["id"] for r, e in zip(results, evs)):
                    st.error(f"{dev}: ack does not match the request: {resp[:200]!r}")
                    continue
                for j in range(n):
                    bits.set(k + j)
                st.add(f"{kind}_acked", n)
                st.add(f"{kind}_requests")
                break
            k += n
    finally:
        st.add(f"{kind}_behind", pacer.behind)


def mqtt_worker(cfg, devs, q, go, stop):
    """MQTT QoS 1 over paho 1.6: a client (and its loop thread) plus a pacing thread per device."""
    st = Stats("mqtt", q)
    bits = {dev: Bits() for dev, _, _, _ in devs}
    go.wait()
    st.reporter(stop)
    threads = []
    for dev, _, rate, token in devs:
        t = threading.Thread(target=mqtt_device, args=(cfg, dev, rate, token, bits[dev], st, stop), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    st.report()
    q.put(("final", "mqtt", {d: (bytes(b.b), b.n) for d, b in bits.items()}))


def mqtt_device(cfg, dev, rate, token, bits, st, stop):
    import paho.mqtt.client as mqtt
    rnd = random.Random(f"{cfg['seed']}:{dev}")
    pacer = Pacer(rate, rnd)
    window = threading.Semaphore(64)

    def on_ack(k):
        bits.set(k)
        st.add("mqtt_acked")
        window.release()

    inflight = PahoAcks(on_ack)
    c = mqtt.Client(client_id=dev, clean_session=True)
    c.username_pw_set(dev, token)
    c.max_inflight_messages_set(64)
    c.max_queued_messages_set(0)
    c.reconnect_delay_set(0.1, 2)
    c.on_publish = lambda _c, _u, mid: inflight.acked(mid)
    c.on_disconnect = lambda _c, _u, rc: st.add("mqtt_disconnects") if rc != 0 else None
    c.on_connect = lambda _c, _u, _f, rc: st.add("mqtt_connects") if rc == 0 else st.error(f"{dev}: CONNACK {rc}")
    c.connect_async("127.0.0.1", cfg["mqtt_port"], keepalive=30)
    c.loop_start()
    try:
        wait_for(c.is_connected, 30, f"{dev} to connect")
        k = 1
        while not stop.is_set():
            d = pacer.delay()
            if d:
                time.sleep(d)
            while not window.acquire(timeout=0.5):
                st.add("mqtt_window_full")
                if stop.is_set():
                    return
            topic = f"{TENANT}/devices/{dev}/events/{event_type('mqtt', k, cfg['buckets'])}"
            info = c.publish(topic, json.dumps({"k": k, "v": round(rnd.uniform(0, 100), 2)}), qos=1)
            inflight.sent(info.mid, k)
            k += 1
        end = time.monotonic() + 60
        while inflight.unacked() and time.monotonic() < end:
            time.sleep(0.05)
        if inflight.unacked():
            st.error(f"{dev}: {inflight.unacked()} publishes not acked 60 s after the load")
    finally:
        st.add("mqtt_behind", pacer.behind)
        c.disconnect()
        c.loop_stop()


def ws_worker(cfg, devs, q, go, stop):
    """WebSocket `event` frames: one asyncio task (and socket) per device, each
    sending its next event once the previous one is acked."""
    st = Stats("ws", q)
    bits = {dev: Bits() for dev, _, _, _ in devs}
    go.wait()
    st.reporter(stop)

    async def main():
        await asyncio.gather(*(ws_device(cfg, dev, rate, token, bits[dev], st, stop) for dev, _, rate, token in devs))

    asyncio.run(main())
    st.report()
    q.put(("final", "ws", {d: (bytes(b.b), b.n) for d, b in bits.items()}))


async def ws_device(cfg, dev, rate, token, bits, st, stop):
    import websockets
    rnd = random.Random(f"{cfg['seed']}:{dev}")
    pacer = Pacer(rate, rnd)
    # The socket is for ingest and acks: its stream side is filtered to nothing.
    url = (f"ws://127.0.0.1:{cfg['http_port']}/api/v1/realtime/{TENANT}/stream"
           f"?access_token={token}&device_id={dev}&event_types=none.none")
    k, ev, resend = 1, None, False
    while not stop.is_set():
        try:
            async with websockets.connect(url, open_timeout=10, close_timeout=2, max_queue=None,
                                          ping_interval=None) as ws:
                st.add("ws_connects")
                while not stop.is_set():
                    if ev is None:
                        d = pacer.delay()
                        if d:
                            await asyncio.sleep(d)
                        ev = {"id": event_id(cfg["seed"], dev, k), "device_id": dev,
                              "event_type": event_type("ws", k, cfg["buckets"]),
                              "payload": {"k": k, "v": round(rnd.uniform(0, 100), 2)}}
                    if resend:
                        st.add("ws_resent")
                    await ws.send(json.dumps({"type": "event", "event": ev}))
                    while True:
                        frame = json.loads(await asyncio.wait_for(ws.recv(), 30))
                        if frame.get("type") == "ack":
                            break
                        if frame.get("type") == "error" and frame.get("code") == "lagged":
                            st.add("ws_ingest_lagged")
                            raise ConnectionResetError("closed as a lagged subscriber")
                        if frame.get("type") == "error":
                            raise RuntimeError(f"error frame: {frame}")
                    if frame["id"] != ev["id"]:
                        raise RuntimeError(f"ws ack for {ev['id']} names {frame['id']}")
                    bits.set(k)
                    st.add("ws_acked")
                    k, ev, resend = k + 1, None, False
        except (OSError, asyncio.TimeoutError, websockets.exceptions.WebSocketException, RuntimeError) as e:
            if not isinstance(e, ConnectionResetError):
                st.error(f"{dev}: {type(e).__name__}: {e}")
            resend = True
            await asyncio.sleep(0.2)
    st.add("ws_behind", pacer.behind)


# ---------------------------------------------------------------- subscribers

def subs_worker(cfg, kind, subs, q, stop):
    """`subs`: (index, query filter, token). Counts frames; reconnects lagged ones with after=."""
    st = Stats(f"subs-{kind}", q)
    st.reporter(stop, 2.0)
    st.c.update({"connected": 0, "delivered": 0, "lagged": 0, "reconnects": 0, "seq_regressions": 0,
                 "presence": 0, "other_frames": 0})

    async def main():
        one = ws_sub if kind == "ws" else sse_sub
        tasks = [asyncio.create_task(one(cfg, i, filt, token, st)) for i, filt, token in subs]
        while not stop.is_set():
            await asyncio.sleep(0.2)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    st.report()
    q.put(("final", f"subs-{kind}", None))


class SubState:
    def __init__(self):
        self.last = None       # seq of the last event delivered (None: none yet, start live)
        self.attempts = 0

    def connect_to(self, base, st):
        """`base` resumed after the last seq seen; every attempt after the first counts as a reconnect."""
        if self.attempts:
            st.add("reconnects")
        self.attempts += 1
        return base if self.last is None else f"{base}&after={self.last}"

    def event(self, seq, st):
        if self.last is not None and seq <= self.last:
            st.add("seq_regressions")
        self.last = seq
        st.add("delivered")


async def ws_sub(cfg, i, filt, token, st):
    import websockets
    s = SubState()
    while True:
        url = s.connect_to(
            f"ws://127.0.0.1:{cfg['http_port']}/api/v1/realtime/{TENANT}/stream?access_token={token}&{filt}", st)
        try:
            async with websockets.connect(url, open_timeout=20, close_timeout=2, max_queue=None,
                                          ping_interval=None) as ws:
                st.add("connected")
                try:
                    async for msg in ws:
                        if msg.startswith(EVENT_FRAME):
                            s.event(int(msg[len(EVENT_FRAME):msg.index(",", len(EVENT_FRAME))]), st)
                            continue
                        f = json.loads(msg)
                        if f.get("type") == "presence":
                            st.add("presence")
                        elif f.get("type") == "error" and f.get("code") == "lagged":
                            st.add("lagged")
                            if f.get("last_seq") is not None and s.last is not None and f["last_seq"] != s.last:
                                st.error(f"ws sub {i}: lagged at {f['last_seq']}, last seen {s.last}")
                            break
                        else:
                            st.add("other_frames")
                            st.error(f"ws sub {i}: {msg[:200]}")
                finally:
                    st.add("connected", -1)
        except asyncio.CancelledError:
            raise
        except (OSError, asyncio.TimeoutError, websockets.exceptions.WebSocketException) as e:
            st.error(f"ws sub {i}: {type(e).__name__}: {e}")
            await asyncio.sleep(0.5)


async def sse_sub(cfg, i, filt, token, st):
    s = SubState()
    while True:
        path = s.connect_to(f"/api/v1/realtime/{TENANT}/sse?{filt}", st)
        writer = None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", cfg["http_port"]), 20)
            writer.write((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
                          f"Accept: text/event-stream\r\n\r\n").encode())
            await writer.drain()
            status = (await asyncio.wait_for(reader.readline(), 20)).decode()
            headers = {}
            while True:
                line = (await asyncio.wait_for(reader.readline(), 20)).decode().strip()
                if not line:
                    break
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if " 200 " not in status:
                raise ConnectionError(f"SSE answered {status.strip()}")
            chunked = headers.get("transfer-encoding", "").lower() == "chunked"
            st.add("connected")
            try:
                buf = b""
                while True:
                    if chunked:
                        size = int((await asyncio.wait_for(reader.readline(), 60)).split(b";")[0], 16)
                        if size == 0:
                            raise ConnectionError("SSE stream ended")
                        data = await asyncio.wait_for(reader.readexactly(size + 2), 60)
                        buf += data[:-2]
                    else:
                        data = await asyncio.wait_for(reader.read(65536), 60)
                        if not data:
                            raise ConnectionError("SSE stream ended")
                        buf += data
                    lagged = False
                    while b"\n\n" in buf:
                        block, buf = buf.split(b"\n\n", 1)
                        ev_name, ev_id, ev_data = "message", None, None
                        for line in block.decode().split("\n"):
                            if line.startswith(":"):
                                continue
                            field, _, value = line.partition(":")
                            value = value[1:] if value.startswith(" ") else value
                            if field == "event":
                                ev_name = value
                            elif field == "id":
                                ev_id = value
                            elif field == "data":
                                ev_data = value
                        if ev_name == "event":
                            s.event(int(ev_id), st)
                        elif ev_name == "presence":
                            st.add("presence")
                        elif ev_name == "error":
                            f = json.loads(ev_data)
                            if f.get("code") == "lagged":
                                st.add("lagged")
                                lagged = True
                            else:
                                st.error(f"sse sub {i}: {ev_data[:200]}")
                        elif ev_data is not None:
                            st.add("other_frames")
                    if lagged:
                        break
            finally:
                st.add("connected", -1)
        except asyncio.CancelledError:
            raise
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
            st.error(f"sse sub {i}: {type(e).__name__}: {e}")
            await asyncio.sleep(0.5)
        finally:
            if writer is not None:
                writer.close()


# ---------------------------------------------------------------- sampling

def proc_status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem", "Threads"):
                out[key] = int(value.split()[0])
    return out


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_names(pid):
    names = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/comm") as f:
                n = f.read().strip()
        except OSError:
            continue
        names[n] = names.get(n, 0) + 1
    return ", ".join(f"{n} x{c}" for n, c in sorted(names.items(), key=lambda x: -x[1]))


def fd_counts(pid):
    d = f"/proc/{pid}/fd"
    names = os.listdir(d)
    sockets = 0
    for n in names:
        try:
            if os.readlink(os.path.join(d, n)).startswith("socket:"):
                sockets += 1
        except OSError:
            pass
    return len(names), sockets


def accepted(m, proto):
    return m.get(f'outpost_events_accepted_total{{protocol="{proto}"}}', 0.0)


def metric_sum(m, prefix):
    return sum(v for k, v in m.items() if k == prefix or k.startswith(prefix + "{"))


def dir_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def lsq_slope(xs, ys):
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0


# ---------------------------------------------------------------- main

def main():
    duration = env_int("DURATION", 3600)
    rate = env_int("RATE", 2000)
    n_subs = env_int("SUBSCRIBERS", 200)
    warmup = env_int("WARMUP", 600)
    every = env_int("SAMPLE", 10)
    seed = env_int("SEED", random.randrange(1 << 30))
    mix = parse_mix(os.environ.get("MIX", "http:0.08,batch:0.50,mqtt:0.27,ws:0.15"))
    if warmup >= duration:
        die("WARMUP must be shorter than DURATION")
    src = os.path.join(ROOT, "target/release/outpost")
    if not os.path.exists(src):
        die(f"{src} missing: run `cargo build --release`")
    t_start = time.monotonic()
    work = tempfile.mkdtemp(prefix="soak-", dir="/tmp")
    os.chmod(work, 0o755)  # the postgres user must reach its data dir
    # A copy: a rebuild of target/release during the hour cannot touch the run.
    chaos.BIN = os.path.join(work, "outpost")
    shutil.copy2(src, chaos.BIN)
    sha = hashlib.sha256(open(chaos.BIN, "rb").read()).hexdigest()[:16]
    version = subprocess.run([chaos.BIN, "--version"], capture_output=True, text=True).stdout.strip()
    log(f"soak: {duration} s at {rate} ev/s, {n_subs} subscribers, warm-up {warmup} s, sample every {every} s, "
        f"mix {mix}, seed {seed}, work dir {work}")
    log(f"binary: {src} ({version}, sha256 {sha}…, built "
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(os.path.getmtime(src)))}), run from the copy")
    pg = app = None
    procs = []
    stop_ingest, stop_subs, go = mp.Event(), mp.Event(), mp.Event()
    q = mp.Queue()
    ok = True
    try:
        pg = Pg(work)
        pg.up()
        app = Appliance(work, pg)
        # Production defaults, but for the raised per-device rate limits and the site id.
        for key in ("OUTPOST_CENTRAL__MAX_BACKOFF", "OUTPOST_CENTRAL__BATCH_WAIT", "OUTPOST_CENTRAL__CONNECT_TIMEOUT",
                    "OUTPOST_CENTRAL__STATEMENT_TIMEOUT", "OUTPOST_CENTRAL__KEEPALIVE_IDLE", "RUST_LOG"):
            app.env.pop(key, None)
        app.env["OUTPOST_SITE__ID"] = SITE
        cfg = {"seed": seed, "http_port": app.http_port, "mqtt_port": app.mqtt_port, "buckets": max(n_subs, 1)}

        devices = {}   # kind -> [(dev, kind, rate, token)]
        for kind, n in DEVICES.items():
            share = mix.get(kind, 0.0)
            if share <= 0:
                continue
            devices[kind] = [(f"{kind}-{i + 1}", kind, rate * share / n,
                              app.cli("device", "add", "--tenant", TENANT, "--id", f"{kind}-{i + 1}"))
                             for i in range(n)]
        viewers = [app.cli("device", "add", "--tenant", TENANT, "--id", f"viewer-{i + 1}") for i in range(VIEWERS)]
        app.start()
        wait_for(app.healthy, 30, "the appliance to start")
        log(f"appliance pid {app.p.pid}, http :{app.http_port}, mqtt :{app.mqtt_port}, central :{pg.port}")
        for kind, devs in devices.items():
            log(f"  {kind}: {len(devs)} devices at {devs[0][2]:.1f} ev/s each ({devs[0][2] * len(devs):.0f} ev/s)")

        # Subscribers first, so they are all there when the load starts.
        http_devs = [d for d, *_ in devices.get("http", [])] or ["http-1"]
        subs = {"ws": [], "sse": []}
        for i in range(n_subs):
            if i % 10 == 0:
                filt = f"device_id={http_devs[(i // 10) % len(http_devs)]}"
            else:
                filt = f"event_types=soak.*.b{i % cfg['buckets']:03d}"
            subs["ws" if i % 2 == 0 else "sse"].append((i, filt, viewers[i % VIEWERS]))
        for kind, lst in subs.items():
            if lst:
                p = mp.Process(target=subs_worker, args=(cfg, kind, lst, q, stop_subs), name=f"subs-{kind}",
                               daemon=True)
                p.start()
                procs.append(p)
        stats = {}

        def drain_q(timeout=0.0):
            finals = []
            end = time.monotonic() + timeout
            while True:
                try:
                    msg = q.get(timeout=max(0.0, end - time.monotonic()) if timeout else 0.01)
                except queue.Empty:
                    return finals
                if msg[0] == "stats":
                    stats[msg[1]] = msg[2]
                else:
                    finals.append(msg)
                if timeout and time.monotonic() >= end:
                    return finals

        def subs_sum(key):
            return sum(v.get(key, 0) for k, v in stats.items() if k.startswith("subs-"))

        def subs_connected():
            drain_q()
            return subs_sum("connected") >= n_subs

        try:
            wait_for(subs_connected, 120, f"{n_subs} subscribers to connect", 0.5)
        except TimeoutError:
            die(f"only {subs_sum('connected')} of {n_subs} subscribers connected: {stats}")
        m0 = app.metrics()
        log(f"{subs_sum('connected')} subscribers connected (appliance: "
            f"{metric_sum(m0, 'outpost_stream_subscribers'):.0f} stream subscribers)")

        targets = {"mqtt": mqtt_worker, "ws": ws_worker}
        n_sub_procs = len(procs)
        http_like = devices.get("http", []) + devices.get("batch", [])
        if http_like:
            procs.append(mp.Process(target=http_worker, args=(cfg, http_like, q, go, stop_ingest), name="http",
                                    daemon=True))
        for kind in ("mqtt", "ws"):
            if kind in devices:
                procs.append(mp.Process(target=targets[kind], args=(cfg, devices[kind], q, go, stop_ingest),
                                        name=kind, daemon=True))
        for p in procs[n_sub_procs:]:
            p.start()
        ingest_names = [p.name for p in procs[n_sub_procs:]]

        # ------------------------------------------------ the load, sampled
        csv_path = os.path.join(work, "samples.csv")
        fields = ["t_s", "phase", "rss_kb", "hwm_kb", "rss_anon_kb", "rss_file_kb", "rss_shmem_kb", "fds",
                  "fd_sockets", "threads", "cpu_s", "loadavg1", "acc_http", "acc_mqtt", "acc_ws", "acc_total", "rate_ev_s",
                  "backlog_rows", "stream_subscribers", "stream_delivered", "stream_lagged", "subs_connected",
                  "subs_delivered", "subs_lagged", "ingest_errors", "log_dir_mb", "pg_dir_mb", "disk_free_mb"]
        f_csv = open(csv_path, "w", newline="")
        w = csv.DictWriter(f_csv, fieldnames=fields)
        w.writeheader()
        samples = []
        pid = app.p.pid
        go.set()
        t0 = time.monotonic()
        base = None
        aborted = None
        i = 0
        while True:
            due = t0 + i * every
            d = due - time.monotonic()
            if d > 0:
                drain_q(d)
            t = time.monotonic() - t0
            if app.p.poll() is not None:
                aborted = f"the appliance exited (code {app.p.returncode}); see {work}/outpost.log"
                break
            dead = [p.name for p in procs if p.exitcode is not None]
            if dead:
                aborted = f"worker process(es) {dead} exited early"
                break
            ps = proc_status(pid)
            fds, socks = fd_counts(pid)
            try:
                m = app.metrics()
                s = json.loads(app.get("/api/v1/status")[1])
            except (OSError, http.client.HTTPException, ValueError) as e:
                log(f"sample at {t:.0f}s: /metrics or /api/v1/status failed: {e}")
                i += 1
                continue
            acc = {p_: accepted(m, p_) for p_ in ("http", "mqtt", "ws")}
            total = sum(acc.values())
            if base is None:
                base = dict(acc, t=t)
            prev = samples[-1] if samples else None
            r = (total - prev["acc_total"]) / (t - prev["t_s"]) if prev and t > prev["t_s"] else 0.0
            free = os.statvfs(work)
            row = {"t_s": round(t, 1), "phase": "warmup" if t < warmup else "steady",
                   "rss_kb": ps["VmRSS"], "hwm_kb": ps["VmHWM"], "rss_anon_kb": ps.get("RssAnon"),
                   "rss_file_kb": ps.get("RssFile"), "rss_shmem_kb": ps.get("RssShmem"), "fds": fds,
                   "fd_sockets": socks, "threads": ps["Threads"], "cpu_s": round(cpu_seconds(pid), 2),
                   "loadavg1": float(open("/proc/loadavg").read().split()[0]),
                   "acc_http": int(acc["http"]), "acc_mqtt": int(acc["mqtt"]), "acc_ws": int(acc["ws"]),
                   "acc_total": int(total), "rate_ev_s": round(r, 1),
                   "backlog_rows": s["log"]["backlog_rows"],
                   "stream_subscribers": int(metric_sum(m, "outpost_stream_subscribers")),
                   "stream_delivered": int(metric_sum(m, "outpost_stream_delivered_total")),
                   "stream_lagged": int(metric_sum(m, "outpost_stream_lagged_disconnects_total")),
                   "subs_connected": subs_sum("connected"), "subs_delivered": subs_sum("delivered"),
                   "subs_lagged": subs_sum("lagged"),
                   "ingest_errors": sum(stats.get(n, {}).get("errors", 0) for n in ingest_names),
                   "log_dir_mb": round(dir_bytes(app.data) / 1e6, 1),
                   "pg_dir_mb": round(dir_bytes(pg.data) / 1e6, 1),
                   "disk_free_mb": free.f_bavail * free.f_frsize // 1000000}
            if prev and prev["phase"] == "warmup" and row["phase"] == "steady" or t >= duration:
                log(f"appliance threads at t={t:.0f}s: {thread_names(pid)}")
            samples.append(row)
            w.writerow(row)
            f_csv.flush()
            if i % max(1, 60 // every) == 0 or t >= duration:
                cpu = (row["cpu_s"] - prev["cpu_s"]) / (t - prev["t_s"]) * 100 if prev and t > prev["t_s"] else 0
                log(f"t={t:5.0f}s {row['phase']:6} rate {r:6.0f} ev/s  RSS {ps['VmRSS'] / 1024:6.1f} MB "
                    f"(anon {ps.get('RssAnon', 0) / 1024:.1f}, file {ps.get('RssFile', 0) / 1024:.1f}, "
                    f"shmem {ps.get('RssShmem', 0) / 1024:.1f})  HWM {ps['VmHWM'] / 1024:.1f} MB  fds {fds} "
                    f"({socks} sockets)  threads {ps['Threads']}  backlog {row['backlog_rows']}  "
                    f"subs {row['subs_connected']}/{n_subs}  delivered {row['subs_delivered']}  "
                    f"lagged {row['subs_lagged']}  errors {row['ingest_errors']}  log {row['log_dir_mb']:.0f} MB  "
                    f"pg {row['pg_dir_mb']:.0f} MB  free {row['disk_free_mb']} MB  appliance CPU {cpu:.0f}%  "
                    f"load {row['loadavg1']}")
            if t >= duration:
                break
            if row["disk_free_mb"] < 1500:
                aborted = f"disk nearly full ({row['disk_free_mb']} MB free)"
                break
            i += 1
        f_csv.close()
        load_s = samples[-1]["t_s"] if samples else 0.0
        end_row = samples[-1] if samples else None
        stop_ingest.set()

        # ------------------------------------------------ the ingest workers' ledgers
        ledgers, got = {}, set()
        end = time.monotonic() + 150
        while got != set(ingest_names) and time.monotonic() < end:
            for msg in drain_q(1.0):
                if msg[0] == "final" and not msg[1].startswith("subs-"):
                    ledgers.update(msg[2])
                    got.add(msg[1])
        if got != set(ingest_names):
            die(f"ingest workers {set(ingest_names) - got} did not report their ledgers")
        time.sleep(2)  # the last deliveries
        drain_q(0.5)
        stop_subs.set()
        end = time.monotonic() + 30
        subs_done = set()
        while len(subs_done) < n_sub_procs and time.monotonic() < end:
            for msg in drain_q(1.0):
                if msg[0] == "final":
                    subs_done.add(msg[1])
        for p in procs:
            p.join(10)
        drain_q(0.5)
        if aborted:
            log(f"ABORTED after {load_s:.0f}s: {aborted}")
            ok = False

        # ------------------------------------------------ drain and the ledger check
        s_log = app.drain(600)
        m_end = app.metrics()

        acked = lost = dup = order = stored = 0
        problems = []
        for dev in sorted(ledgers):
            b, n = ledgers[dev]
            kind = dev.rsplit("-", 1)[0]
            ids = kind != "mqtt"
            keys = {(dev, k): (event_id(seed, dev, k) if ids else None) for k in Bits.keys(b)}
            if len(keys) != n:
                problems.append(f"{dev}: ledger holds {len(keys)} keys, counted {n}")
            v = Verdict(keys, pg.central_rows(SITE, dev))
            acked += v.acked
            lost += v.lost
            dup += v.duplicated
            order += v.order_violations
            stored += v.stored
            problems += [f"{dev}: {p_}" for p_ in v.problems()]
        central_total = int(pg.query(f"SELECT count(*) FROM tenant_{TENANT}.events WHERE site_id = '{SITE}'")[0][0])
        for p_ in problems:
            print(p_)

        # ------------------------------------------------ figures
        if not samples or end_row is None:
            die("no samples")
        warm = next((r_ for r_ in samples if r_["t_s"] >= warmup), samples[-1])
        post = [r_ for r_ in samples if r_["t_s"] >= warm["t_s"]]
        mb = lambda kb: kb / 1024  # noqa: E731
        rss_w, rss_e = mb(warm["rss_kb"]), mb(end_row["rss_kb"])
        rss_min, rss_max = mb(min(r_["rss_kb"] for r_ in post)), mb(max(r_["rss_kb"] for r_ in post))
        slope = lsq_slope([r_["t_s"] / 3600 for r_ in post], [mb(r_["rss_kb"]) for r_ in post])
        drift = rss_e - rss_w
        fd_w, fd_e = warm["fds"], end_row["fds"]
        fd_min, fd_max = min(r_["fds"] for r_ in post), max(r_["fds"] for r_ in post)
        anon_slope = lsq_slope([r_["t_s"] / 3600 for r_ in post], [mb(r_["rss_anon_kb"] or 0) for r_ in post])
        el = end_row["t_s"] - base["t"]
        rates = {p_: (end_row[f"acc_{p_}"] - base[p_]) / el for p_ in ("http", "mqtt", "ws")}
        total_rate = sum(rates.values())
        stw = {p_: (end_row[f"acc_{p_}"] - warm[f"acc_{p_}"]) / max(end_row["t_s"] - warm["t_s"], 1e-9)
               for p_ in ("http", "mqtt", "ws")}
        ist = {k: v for n_ in ingest_names for k, v in stats.get(n_, {}).items() if k != "first_errors"}
        errs = [e for n_ in ingest_names for e in stats.get(n_, {}).get("first_errors", [])]
        sub_errs = [e for k, v in stats.items() if k.startswith("subs-") for e in v.get("first_errors", [])]
        delivered = end_row["subs_delivered"]
        log_lines = open(os.path.join(work, "outpost.log"), "rb").read().decode(errors="replace").splitlines()
        warn_n = sum(bool(re.search(r"\bWARN", ln)) for ln in log_lines)
        err_n = sum(bool(re.search(r"\bERROR", ln)) for ln in log_lines)

        print()
        print(f"work dir: {work}   samples: {csv_path} ({len(samples)} rows, every {every} s)")
        print(f"load: {el:.0f} s; accepted {end_row['acc_total'] - sum(base[p_] for p_ in rates):.0f} events: "
              f"{total_rate:.0f} ev/s (http {rates['http']:.0f} [single + batch], mqtt {rates['mqtt']:.0f}, "
              f"ws {rates['ws']:.0f}); after warm-up {sum(stw.values()):.0f} ev/s; target {rate}")
        print(f"  acked by the devices: http single {ist.get('http_acked', 0)} in {ist.get('http_requests', 0)} "
              f"requests, batch {ist.get('batch_acked', 0)} in {ist.get('batch_requests', 0)} requests, "
              f"mqtt {ist.get('mqtt_acked', 0)}, ws {ist.get('ws_acked', 0)}; schedule restarts (a device >1 s "
              f"behind): http {ist.get('http_behind', 0)}, batch {ist.get('batch_behind', 0)}, "
              f"mqtt {ist.get('mqtt_behind', 0)}, ws {ist.get('ws_behind', 0)}; mqtt window full "
              f"{ist.get('mqtt_window_full', 0)}x; resent http {ist.get('http_resent', 0)}, batch "
              f"{ist.get('batch_resent', 0)}, ws {ist.get('ws_resent', 0)}; mqtt disconnects "
              f"{ist.get('mqtt_disconnects', 0)}; ws ingest sockets closed as lagged {ist.get('ws_ingest_lagged', 0)}")
        print(f"  ingest errors: {ist.get('errors', 0)}{' e.g. ' + '; '.join(errs[:3]) if errs else ''}")
        print(f"subscribers: {n_subs} ({len(subs['ws'])} WebSocket, {len(subs['sse'])} SSE), connected at the end "
              f"{end_row['subs_connected']}; delivered {delivered} during the load = {delivered / el:.0f}/s "
              f"(appliance counter {end_row['stream_delivered'] - m0.get('outpost_stream_delivered_total', 0):.0f}); "
              f"lagged reconnects {end_row['subs_lagged']} (appliance: {end_row['stream_lagged']} lagged closes, "
              f"ws ingest sockets included); other reconnects {subs_sum('reconnects') - subs_sum('lagged')}; "
              f"seq regressions {subs_sum('seq_regressions')}; presence frames {subs_sum('presence')}; "
              f"subscriber errors {subs_sum('errors')}{' e.g. ' + '; '.join(sub_errs[:3]) if sub_errs else ''}")
        print(f"RSS (MB)   warm-up end {rss_w:.1f} (t={warm['t_s']:.0f}s), min {rss_min:.1f}, max {rss_max:.1f}, "
              f"end {rss_e:.1f} (t={end_row['t_s']:.0f}s); drift {drift:+.2f} MB; least-squares slope "
              f"{slope:+.2f} MB/h over {len(post)} samples (RssAnon slope {anon_slope:+.2f} MB/h); "
              f"HWM {mb(end_row['hwm_kb']):.1f}; at start {mb(samples[0]['rss_kb']):.1f}")
        cpu_pct = (end_row["cpu_s"] - samples[0]["cpu_s"]) / el * 100
        load_avg = sum(r_["loadavg1"] for r_ in samples) / len(samples)
        print(f"appliance CPU {cpu_pct:.0f}% of one core over the load; mean 1-min load average of the machine "
              f"{load_avg:.2f} (2 cores, shared)")
        print(f"fds        warm-up end {fd_w}, min {fd_min}, max {fd_max}, end {fd_e} "
              f"(sockets {warm['fd_sockets']} -> {end_row['fd_sockets']}); threads {warm['threads']} -> "
              f"{end_row['threads']}")
        print(f"site log {end_row['log_dir_mb']:.0f} MB, central {end_row['pg_dir_mb']:.0f} MB at the end of the "
              f"load; appliance log: {warn_n} WARN, {err_n} ERROR lines ({work}/outpost.log)")
        print(f"central: acked {acked}, stored {stored} (all rows of the site: {central_total}), lost {lost}, "
              f"duplicated {dup}, order violations {order}; dead letters "
              f"{m_end.get('outpost_dead_letters_total', s_log.get('dead_letters'))}")
        rss_ok = drift < 5.0
        fd_ok = fd_e <= fd_w and fd_max <= fd_w + 2
        ok = ok and rss_ok and fd_ok and lost == 0 and dup == 0 and order == 0 and not problems \
            and ist.get("errors", 0) == 0 and end_row["t_s"] >= duration
        print(f"criteria: RSS drift {drift:+.2f} MB < 5 MB: {'PASS' if rss_ok else 'FAIL'}; fds {fd_w} -> {fd_e} "
              f"(max {fd_max}): {'PASS' if fd_ok else 'FAIL'}; lost 0: {'PASS' if lost == 0 else 'FAIL'}; "
              f"overall {'PASS' if ok else 'FAIL'}; wall {time.monotonic() - t_start:.0f} s")
        print(f"soak: {end_row['t_s']:.0f} s at {total_rate:.0f} ev/s (http {rates['http']:.0f}, "
              f"mqtt {rates['mqtt']:.0f}, ws {rates['ws']:.0f}), {end_row['subs_connected']} subscribers, "
              f"delivered {delivered / el:.0f}/s, RSS after warm-up {rss_w:.1f} MB -> {rss_e:.1f} MB "
              f"(drift {drift:+.2f} MB, slope {slope:+.2f} MB/h), fds {fd_w} -> {fd_e}, lost: {lost}", flush=True)
        if not ok:
            sys.exit(1)
    finally:
        stop_ingest.set()
        stop_subs.set()
        for p in procs:
            if p.is_alive():
                p.join(5)
            if p.is_alive():
                p.terminate()
        if app and app.p and app.p.poll() is None:
            app.p.terminate()  # SIGTERM: a clean shutdown
            try:
                app.p.wait(30)
            except subprocess.TimeoutExpired:
                app.kill()
        if pg:
            pg.stop_quietly()
        keep_or_remove(work)


if __name__ == "__main__":
    main()
