#!/usr/bin/python3
"""The kill loop (`make test-chaos`).

A real PostgreSQL (initdb + pg_ctl in a temp dir, free port) is the central
database; the release binary runs as a child process forwarding to it.
Devices ingest EVENTS events over HTTP (single and batches), MQTT QoS 1
(paho) and WebSocket, each event with a unique id (MQTT: a unique payload)
and a per-device counter `k`. Meanwhile the appliance is SIGKILLed KILLS
times at random points and restarted on the same data dir, and the central
database is crashed (`pg_ctl stop -m immediate`) and restarted PG_RESTARTS
times. Devices resend what was not acked, as real ones do: HTTP and WS with
the same id, MQTT as a DUP=1 redelivery with the same packet id (paho keeps
its in-flight window across reconnects). At the end the backlog must drain
and central must hold every acked event once, in per-device order.

Env: KILLS (100), EVENTS (100000), PG_RESTARTS (10), SEED, KEEP=1.
"""

import asyncio
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests", "powercut"))
from ledger import Ledger, PahoAcks, Verdict, die, free_port, keep_or_remove, log, wait_for  # noqa: E402

BIN = os.environ.get("OUTPOST_BIN", os.path.join(ROOT, "target/release/outpost"))
TENANT = "acme"
SITE = "chaos-site"
# (kind, devices, share of EVENTS)
MIX = [("http", 2, 0.08), ("batch", 2, 0.50), ("mqtt", 3, 0.27), ("ws", 2, 0.15)]



# ---------------------------------------------------------------- PostgreSQL

def pg_bindir():
    out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
    if out.returncode == 0 and os.path.exists(os.path.join(out.stdout.strip(), "initdb")):
        return out.stdout.strip()
    vs = sorted((d for d in os.listdir("/usr/lib/postgresql") if d.isdigit()), key=int)
    return f"/usr/lib/postgresql/{vs[-1]}/bin"


class Pg:
    def __init__(self, work):
        self.dir = os.path.join(work, "pg")
        os.makedirs(self.dir)
        self.port = free_port()
        self.listen, self.max_connections = "127.0.0.1", 50
        self.bindir = pg_bindir()
        self.root = os.geteuid() == 0
        if self.root:
            os.chmod(self.dir, 0o755)
            subprocess.run(["chown", "postgres:postgres", self.dir], check=True)
        self.run("initdb", "-D", self.data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync",
                 "--no-instructions")

    @property
    def data(self):
        return os.path.join(self.dir, "data")

    def run(self, tool, *args):
        cmd = [os.path.join(self.bindir, tool), *args]
        if self.root:
            cmd = ["runuser", "-u", "postgres", "--"] + cmd
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{tool}: {out.stderr}")
        return out.stdout

    def options(self):
        """The server's settings: durability off (the proofs cut the appliance, not the server);
        CENTRAL_PG_OPTIONS adds more (benches: e.g. pg_stat_statements)."""
        return (f"-p {self.port} -k {self.dir} -c listen_addresses={self.listen} -c fsync=off "
                f"-c full_page_writes=off -c max_connections={self.max_connections} "
                + os.environ.get("CENTRAL_PG_OPTIONS", ""))

    def up(self):
        self.run("pg_ctl", "-D", self.data, "-l", os.path.join(self.dir, "server.log"), "-o", self.options(), "-w",
                 "-t", "60", "start")

    def crash(self):
        self.run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")

    def stop_quietly(self):
        """The end of a proof: stopped at once, an error (already down) ignored."""
        try:
            self.crash()
        except Exception:
            pass

    def url(self):
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def central_rows(self, site, device=None):
        """(device, k, site_seq, id) of every central row of `site` (or of one device of it)."""
        where = f"site_id = '{site}'" + (f" AND device_id = '{device}'" if device else "")
        return [(d, int(k), int(seq), i) for d, k, seq, i in self.query(
            f"SELECT device_id, payload->>'k', site_seq, id FROM tenant_{TENANT}.events WHERE {where}")]

    def query(self, sql):
        out = subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "postgres",
                              "-At", "-F", "\t", "-v", "ON_ERROR_STOP=1", "-c", sql],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"psql: {out.stderr}")
        return [line.split("\t") for line in out.stdout.splitlines() if line]


# ---------------------------------------------------------------- appliance

class Appliance:
    def __init__(self, work, pg):
        self.data = os.path.join(work, "data")
        self.http_port, self.mqtt_port = free_port(), free_port()
        self.env = dict(
            os.environ,
            OUTPOST_SITE__DATA_DIR=self.data, OUTPOST_SITE__ID=SITE,
            OUTPOST_HTTP__LISTEN=f"127.0.0.1:{self.http_port}", OUTPOST_MQTT__LISTEN=f"127.0.0.1:{self.mqtt_port}",
            OUTPOST_CENTRAL__URL=pg.url(), OUTPOST_CENTRAL__TLS="disable",
            OUTPOST_CENTRAL__MAX_BACKOFF="1s", OUTPOST_CENTRAL__BATCH_WAIT="20ms",
            OUTPOST_CENTRAL__CONNECT_TIMEOUT="2s", OUTPOST_CENTRAL__STATEMENT_TIMEOUT="5s",
            OUTPOST_CENTRAL__KEEPALIVE_IDLE="2s",
            OUTPOST_LIMITS__PER_SECOND="1000000", OUTPOST_LIMITS__PER_MINUTE="100000000",
            OUTPOST_LIMITS__PER_HOUR="1000000000", RUST_LOG="warn")
        self.log = open(os.path.join(work, "outpost.log"), "ab")
        self.p = None
        self.starts = 0

    def cli(self, *args):
        return subprocess.run([BIN, *args], env=self.env, capture_output=True, text=True, check=True).stdout.strip()

    def start(self):
        self.starts += 1
        self.log.write(f"--- start {self.starts}\n".encode())
        self.log.flush()
        self.p = subprocess.Popen([BIN, "run"], env=self.env, stdout=self.log, stderr=self.log)

    def kill(self):
        self.p.send_signal(signal.SIGKILL)
        self.p.wait()

    def get(self, path, timeout=5):
        c = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout)
        try:
            c.request("GET", path)
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def status(self):
        """The parsed /api/v1/status, or None while it does not answer."""
        try:
            code, body = self.get("/api/v1/status")
            return json.loads(body) if code == 200 else None
        except (OSError, http.client.HTTPException, ValueError):
            return None

    def drain(self, timeout):
        """Waits for the backlog to reach 0 (dies after `timeout` s); returns the status's `log` part."""
        d0 = time.monotonic()
        try:
            s = wait_for(lambda: (st := self.status()) and st["log"]["backlog_rows"] == 0 and st["log"], timeout,
                         "the backlog to drain", 0.5)
        except TimeoutError:
            die(f"backlog not drained in {timeout} s: {self.status()}")
        log(f"backlog drained {time.monotonic() - d0:.1f}s after the load; dead letters {s['dead_letters']}")
        return s

    def kill_if_running(self):
        if self.p and self.p.poll() is None:
            self.kill()

    def metrics(self):
        """/metrics as {"name{labels}": value}."""
        _, body = self.get("/metrics")
        out = {}
        for line in body.decode().splitlines():
            if not line or line.startswith("#"):
                continue
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
        return out

    def healthy(self):
        try:
            return self.get("/healthz", 1)[0] == 200
        except (OSError, http.client.HTTPException):
            return False


# ---------------------------------------------------------------- devices

class LaggedClose(Exception):
    pass


class Devices:
    def __init__(self, app, tokens, quotas, ledger):
        self.app, self.tokens, self.quotas, self.ledger = app, tokens, quotas, ledger
        self.errors = []
        self.sent = 0            # send attempts (events), resends included
        self.resent = 0          # events sent again after a failure
        self.dup_acks = 0        # acks the appliance marked duplicate
        self.lagged = 0          # WS ingest sockets closed as "lagged" subscribers
        self.lock = threading.Lock()
        self.threads = []
        self.where = {}          # device -> what it is doing (for a stall report)

    def count(self, sent=0, resent=0, dup=0, lagged=0):
        with self.lock:
            self.lagged += lagged
            self.sent += sent
            self.resent += resent
            self.dup_acks += dup

    def start(self):
        for dev, (kind, quota) in self.quotas.items():
            target = {"http": self.http_device, "batch": self.batch_device, "mqtt": self.mqtt_device,
                      "ws": self.ws_device}[kind]
            t = threading.Thread(target=self.guard, args=(target, dev, quota), name=dev, daemon=True)
            t.start()
            self.threads.append(t)

    def guard(self, target, dev, quota):
        try:
            target(dev, quota)
        except Exception as e:  # a bug in the harness or a protocol surprise: fail loudly
            self.errors.append(f"{dev}: {type(e).__name__}: {e}")

    def stalled_report(self):
        return ", ".join(f"{t.name}: {self.where.get(t.name)}" for t in self.alive())

    def alive(self):
        return [t for t in self.threads if t.is_alive()]

    def event(self, dev, k, kind):
        return {"id": str(uuid.uuid4()), "device_id": dev, "event_type": f"chaos.{kind}", "payload": {"k": k}}

    def post(self, conn, path, body, dev):
        conn.request("POST", path, json.dumps(body),
                     {"Authorization": f"Bearer {self.tokens[dev]}", "Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read()

    def http_device(self, dev, quota):
        conn, k, ev, failed = None, 1, None, False
        while k <= quota:
            if ev is None:
                ev = self.event(dev, k, "http")
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.app.http_port, timeout=10)
                self.count(sent=1, resent=int(failed))
                self.where[dev] = f"k={k} POST (resend={failed})"
                status, body = self.post(conn, f"/api/v1/realtime/{TENANT}/event", ev, dev)
            except (OSError, http.client.HTTPException) as e:
                self.where[dev] = f"k={k} retrying after {type(e).__name__}: {e}"
                conn, failed = None, True  # the box is down: resend the same event (same id)
                time.sleep(0.02)
                continue
            if status != 201:
                raise RuntimeError(f"HTTP {status}: {body[:300]!r}")
            got = json.loads(body)
            if got["id"] != ev["id"]:
                raise RuntimeError(f"ack for {ev['id']} names {got['id']}")
            self.count(dup=int(got["duplicate"]))
            self.ledger.ack(dev, k, ev["id"])
            k, ev, failed = k + 1, None, False

    def batch_device(self, dev, quota):
        rnd = random.Random(dev)
        conn, k, batch, failed = None, 1, None, False
        while k <= quota:
            if batch is None:
                n = min(rnd.randint(1, 200), quota - k + 1)
                batch = [self.event(dev, k + j, "batch") for j in range(n)]
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.app.http_port, timeout=10)
                self.count(sent=len(batch), resent=len(batch) * int(failed))
                self.where[dev] = f"k={k}+{len(batch)} POST (resend={failed})"
                status, body = self.post(conn, f"/api/v1/realtime/{TENANT}/events", batch, dev)
            except (OSError, http.client.HTTPException) as e:
                self.where[dev] = f"k={k} retrying after {type(e).__name__}: {e}"
                conn, failed = None, True
                time.sleep(0.02)
                continue
            if status != 201:
                raise RuntimeError(f"HTTP {status}: {body[:300]!r}")
            got = json.loads(body)
            results = got["results"]
            if len(results) != len(batch):
                raise RuntimeError(f"batch of {len(batch)} answered with {len(results)} results")
            for ev, res in zip(batch, results):
                if res["id"] != ev["id"]:
                    raise RuntimeError(f"batch ack for {ev['id']} names {res['id']}")
                self.ledger.ack(dev, ev["payload"]["k"], ev["id"])
            self.count(dup=got["duplicates"])
            k, batch, failed = k + len(batch), None, False

    def mqtt_device(self, dev, quota):
        import paho.mqtt.client as mqtt
        window = threading.Semaphore(32)
        done = threading.Event()
        acked = [0]
        c = mqtt.Client(client_id=dev, clean_session=True)
        c.username_pw_set(dev, self.tokens[dev])
        c.max_inflight_messages_set(32)
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(0.02, 0.2)

        # paho 1.6 restarts its in-flight count at 0 on a reconnect and sends
        # a publish made before the CONNACK right behind the CONNECT, ahead
        # of the unacked ones it resends on the CONNACK: the appliance then
        # stores them out of the device's order (MQTT-4.6.0-1 requires
        # resends in their original order). So, as a device that keeps its
        # order must, nothing new is published after a reconnect until the
        # resends are acked.
        resent = threading.Event()
        resent.set()

        def on_ack(k):
            self.ledger.ack(dev, k)
            acked[0] += 1
            if acked[0] == quota:
                done.set()
            window.release()
            if inflight.unacked() == 0:
                resent.set()

        inflight = PahoAcks(on_ack)

        def on_disconnect(_c, _u, rc):
            # paho keeps unacked QoS 1 publishes and resends them with DUP=1
            # and the same packet id after the reconnect.
            resent.clear()
            self.count(resent=inflight.unacked())

        def on_connect(_c, _u, _flags, rc):
            if inflight.unacked() == 0:
                resent.set()

        c.on_publish = lambda _c, _u, mid: inflight.acked(mid)
        c.on_disconnect = on_disconnect
        c.on_connect = on_connect
        c.connect_async("127.0.0.1", self.app.mqtt_port, keepalive=10)
        c.loop_start()
        topic = f"{TENANT}/devices/{dev}/events/chaos.mqtt"
        for k in range(1, quota + 1):
            self.where[dev] = f"k={k} window full; connected={c.is_connected()}; unacked={inflight.unacked()}"
            window.acquire()
            while not resent.wait(1):
                self.where[dev] = f"k={k} waiting for resends to be acked; unacked={inflight.unacked()}"
            info = c.publish(topic, json.dumps({"k": k}), qos=1)
            inflight.sent(info.mid, k)
            self.count(sent=1)
        self.where[dev] = f"all published; waiting for acks; connected={c.is_connected()}; unacked={inflight.unacked()}"
        if not done.wait(600):
            raise RuntimeError(f"{quota - acked[0]} publishes never acked")
        c.disconnect()
        c.loop_stop()

    def ws_device(self, dev, quota):
        asyncio.run(self.ws_loop(dev, quota))

    async def ws_loop(self, dev, quota):
        import websockets
        # Filter the stream to nothing: this socket is for ingest and acks only.
        url = (f"ws://127.0.0.1:{self.app.http_port}/api/v1/realtime/{TENANT}/stream"
               f"?access_token={self.tokens[dev]}&device_id={dev}&event_types=none.none")
        k, ev, failed = 1, None, False
        while k <= quota:
            try:
                async with websockets.connect(url, open_timeout=5, close_timeout=1, max_queue=None) as ws:
                    while k <= quota:
                        if ev is None:
                            ev = self.event(dev, k, "ws")
                        self.count(sent=1, resent=int(failed))
                        self.where[dev] = f"k={k} sent, awaiting ack (resend={failed})"
                        await ws.send(json.dumps({"type": "event", "event": ev}))
                        while True:
                            frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
                            if frame.get("type") == "ack":
                                break
                            if frame.get("type") == "error" and frame.get("code") == "lagged":
                                # The socket's stream side fell behind the tenant's
                                # fan-out (even with a filter that matches nothing) and
                                # is closed: reconnect and resend, as a device would.
                                self.count(lagged=1)
                                raise LaggedClose()
                            if frame.get("type") == "error":
                                raise RuntimeError(f"error frame: {frame}")
                        if frame["id"] != ev["id"]:
                            raise RuntimeError(f"ws ack for {ev['id']} names {frame['id']}")
                        self.count(dup=int(frame["duplicate"]))
                        self.ledger.ack(dev, k, ev["id"])
                        k, ev, failed = k + 1, None, False
            except (OSError, asyncio.TimeoutError, websockets.exceptions.WebSocketException, LaggedClose) as e:
                self.where[dev] = f"k={k} reconnecting after {type(e).__name__}: {e}"
                failed = True
                await asyncio.sleep(0.02)


# ---------------------------------------------------------------- main

STALL = 60


def progress_wait(cond, ledger, devices, app, what):
    """Waits for cond; fails if no event was acked for STALL seconds (a hang is a finding)."""
    last, since = len(ledger), time.monotonic()
    while not cond():
        n = len(ledger)
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since > STALL:
            die(f"no ack for {STALL}s while waiting for {what} (acked {n}); appliance running: "
                f"{app.p.poll() is None}, /healthz: {app.healthy()}; devices: {devices.stalled_report()}")
        time.sleep(0.02)

def main():
    kills = int(os.environ.get("KILLS", "100"))
    events = int(os.environ.get("EVENTS", "100000"))
    pg_restarts = int(os.environ.get("PG_RESTARTS", "10"))
    seed = int(os.environ.get("SEED", str(random.randrange(1 << 30))))
    rnd = random.Random(seed)
    if not os.path.exists(BIN):
        die(f"{BIN} missing: run `cargo build --release`")
    t0 = time.monotonic()
    work = tempfile.mkdtemp(prefix="outpost-chaos-")
    os.chmod(work, 0o755)  # the postgres user must reach its data dir
    log(f"chaos: {kills} kills, {pg_restarts} central crashes, {events} events, seed {seed}, work dir {work}")
    pg = app = None
    try:
        pg = Pg(work)
        pg.up()
        app = Appliance(work, pg)
        quotas, tokens = {}, {}
        total = 0
        for kind, n, share in MIX:
            for i in range(n):
                dev = f"{kind}-{i + 1}"
                quotas[dev] = (kind, max(1, int(events * share / n)))
                total += quotas[dev][1]
                tokens[dev] = app.cli("device", "add", "--tenant", TENANT, "--id", dev)
        # Rounding: the last batch device takes the rest.
        last = [d for d in quotas if quotas[d][0] == "batch"][-1]
        quotas[last] = ("batch", quotas[last][1] + events - total)
        app.start()
        wait_for(app.healthy, 30, "first start")
        ledger = Ledger()
        devices = Devices(app, tokens, quotas, ledger)
        devices.start()

        # Kills and central crashes at random points of the run (by progress,
        # plus a random sub-second offset so they land in every phase).
        kill_at = sorted(rnd.uniform(0.01, 0.97) * events for _ in range(kills))
        pg_at = sorted(rnd.uniform(0.03, 0.9) * events for _ in range(pg_restarts))
        pg_done = [0]
        pg_errors = []

        def pg_chaos():
            try:
                for at in pg_at:
                    wait_for(lambda: len(ledger) >= at or not devices.alive(), 3600, "progress")
                    pg.crash()
                    time.sleep(rnd.uniform(0.2, 3.0))  # a random outage length
                    pg.up()
                    pg_done[0] += 1
            except Exception as e:
                pg_errors.append(repr(e))
        pg_thread = threading.Thread(target=pg_chaos, daemon=True)
        pg_thread.start()

        # Every kill happens. When the devices outrun the last kill points
        # (a fast run sends the last few percent in under a second, faster
        # than a kill and restart), the rest land while the backlog drains:
        # still a kill with events pending and batches in flight.
        done_kills = 0
        for at in kill_at:
            progress_wait(lambda: len(ledger) >= at or not devices.alive() or devices.errors, ledger, devices, app,
                          f"{at:.0f} acks")
            if devices.errors:
                break
            time.sleep(rnd.uniform(0, 0.3))
            if app.p.poll() is not None:
                die(f"the appliance exited by itself (code {app.p.returncode}); see {work}/outpost.log")
            app.kill()
            done_kills += 1
            app.start()
            if done_kills % 10 == 0:
                log(f"kill {done_kills}/{kills}: acked {len(ledger)}/{events}, "
                    f"central crashes so far {pg_done[0]}")
        progress_wait(lambda: not devices.alive(), ledger, devices, app, "the devices to finish")
        pg_thread.join(120)
        if devices.errors:
            die("; ".join(devices.errors))
        if pg_errors:
            die(f"central restart failed: {pg_errors}")
        load_s = time.monotonic() - t0
        log(f"load done in {load_s:.0f}s: acked {len(ledger)}, send attempts {devices.sent}, "
            f"resent {devices.resent}, acks marked duplicate {devices.dup_acks}, "
            f"WS sockets closed as lagged {devices.lagged}")

        # Drain: the backlog must reach 0 with the central database up.
        s = app.drain(300)
        if s["dead_letters"]:
            die(f"{s['dead_letters']} dead letters")

        v = Verdict(ledger.snapshot(), pg.central_rows(SITE))
        for p in v.problems():
            print(p)
        log(f"wall {time.monotonic() - t0:.0f}s (appliance started {app.starts} times)")
        print(f"kills: {done_kills}, pg restarts: {pg_done[0]}, acked: {v.acked}, central: {v.stored}, "
              f"lost: {v.lost}, duplicated: {v.duplicated}, order violations: {v.order_violations}", flush=True)
        if not v.ok or done_kills != kills or pg_done[0] != pg_restarts:
            sys.exit(1)
    finally:
        if app:
            app.kill_if_running()
        if pg:
            pg.stop_quietly()
        keep_or_remove(work)


if __name__ == "__main__":
    main()
