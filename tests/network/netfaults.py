#!/usr/bin/python3
"""Network faults with the real kernel (`make test-network`).

The central PostgreSQL runs in its own network namespace, reached from the
appliance over a veth pair; the faults are the kernel's own:

- a 30 s blackhole: an nftables `drop` of everything to and from central;
- 10% random loss (nftables `numgen random mod 100 < 10 drop`) with 200 ms
  of delay each way (a delaying TCP proxy in central's namespace, since this
  kernel has no netem);
- a 1 Mbit/s link: a `tbf` qdisc on both ends of the veth;
- a RST storm: nftables `reject with tcp reset`, switched on and off, so
  connections are reset mid-batch and reconnects are refused.

HTTP (single and batch), MQTT QoS 1 and WebSocket devices ingest at a steady
RATE throughout, and the appliance runs on its default uplink timeouts. The
blackhole must show in /api/v1/status within 10 s; after the last heal the
backlog must drain, and central must hold every acked event once, in
per-device order. Needs root (namespaces, nftables, tc).

Env: RATE (events/s, default 200), HOLD (seconds per fault, default 30),
KEEP=1 (keep the work dir).
"""

import os
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests", "chaos"))
sys.path.insert(0, os.path.join(ROOT, "tests", "powercut"))
import chaos  # noqa: E402
from ledger import Ledger, Verdict, die, keep_or_remove, log, wait_for  # noqa: E402

TENANT = chaos.TENANT
SITE = "netfault-site"
TAG = f"op{os.getpid() % 100000}"
NS = f"{TAG}-central"
HOST_IF, NS_IF = f"{TAG}h", f"{TAG}c"
HOST_IP, NS_IP = "10.213.7.1", "10.213.7.2"
PG_PORT, PROXY_PORT = 5432, 6432
NFT_TABLE = TAG
# (kind, devices, share of the rate)
MIX = [("http", 2, 0.15), ("batch", 2, 0.45), ("mqtt", 2, 0.25), ("ws", 2, 0.15)]


def sh(*cmd, ns=False, check=True, input=None):
    if ns:
        cmd = ("ip", "netns", "exec", NS) + cmd
    out = subprocess.run(cmd, capture_output=True, text=True, input=input)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip()}")
    return out.stdout


class Net:
    """The namespace, the veth pair and the fault switches."""

    def up(self):
        sh("ip", "netns", "add", NS)
        sh("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF)
        sh("ip", "link", "set", NS_IF, "netns", NS)
        sh("ip", "addr", "add", f"{HOST_IP}/30", "dev", HOST_IF)
        sh("ip", "link", "set", HOST_IF, "up")
        sh("ip", "addr", "add", f"{NS_IP}/30", "dev", NS_IF, ns=True)
        sh("ip", "link", "set", NS_IF, "up", ns=True)
        sh("ip", "link", "set", "lo", "up", ns=True)
        # Faults go in one chain, hooked on the host's side for both
        # directions of everything to and from central.
        sh("nft", "-f", "-", input=f"""
table inet {NFT_TABLE} {{
  chain faults {{ }}
  chain out {{ type filter hook output priority 0; ip daddr {NS_IP} jump faults; }}
  chain in {{ type filter hook input priority 0; ip saddr {NS_IP} jump faults; }}
}}""")

    def faults(self, *rules):
        """Replaces the fault rules (none: a healthy link)."""
        script = f"flush chain inet {NFT_TABLE} faults\n" + "".join(
            f"add rule inet {NFT_TABLE} faults {r}\n" for r in rules)
        sh("nft", "-f", "-", input=script)

    def matched(self):
        """Packets the fault rules matched since they were set."""
        out = sh("nft", "list", "chain", "inet", NFT_TABLE, "faults")
        return sum(int(w.split()[1]) for w in out.split("counter")[1:])

    def rate(self, rate):
        """A tbf bottleneck on both ends of the veth (None: removed)."""
        for ns, dev in ((False, HOST_IF), (True, NS_IF)):
            if rate:
                sh("tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", "16kb",
                   "latency", "300ms", ns=ns)
            else:
                sh("tc", "qdisc", "del", "dev", dev, "root", ns=ns, check=False)

    def down(self):
        sh("nft", "delete", "table", "inet", NFT_TABLE, check=False)
        sh("ip", "link", "del", HOST_IF, check=False)
        sh("ip", "netns", "del", NS, check=False)


class NsPg(chaos.Pg):
    """The central PostgreSQL, inside the namespace."""

    def __init__(self, work):
        super().__init__(work)
        self.port, self.listen = PG_PORT, NS_IP
        with open(os.path.join(self.data, "pg_hba.conf"), "a") as f:
            f.write(f"host all all {HOST_IP}/30 trust\n")

    def up(self):
        cmd = ["ip", "netns", "exec", NS, "runuser", "-u", "postgres", "--", os.path.join(self.bindir, "pg_ctl"),
               "-D", self.data, "-l", os.path.join(self.dir, "server.log"), "-o", self.options(), "-w", "-t", "60",
               "start"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"pg_ctl start: {out.stderr}")

    def url(self):
        return f"postgres://postgres@{NS_IP}:{PROXY_PORT}/postgres"

    def query(self, sql):
        out = subprocess.run(["psql", "-h", NS_IP, "-p", str(PG_PORT), "-U", "postgres", "-d", "postgres", "-At",
                              "-F", "\t", "-v", "ON_ERROR_STOP=1", "-c", sql], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"psql: {out.stderr}")
        return [line.split("\t") for line in out.stdout.splitlines() if line]


class Proxy:
    """The delaying proxy in central's namespace, in front of PostgreSQL."""

    def __init__(self, work):
        self.p = subprocess.Popen(
            ["ip", "netns", "exec", NS, sys.executable, os.path.join(HERE, "delayproxy.py"),
             f"{NS_IP}:{PROXY_PORT}", f"{NS_IP}:{PG_PORT}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(os.path.join(work, "proxy.log"), "ab"),
            text=True)
        if self.p.stdout.readline().strip() != "ready":
            raise RuntimeError("delay proxy did not start (see proxy.log)")

    def delay(self, seconds):
        self.p.stdin.write(f"delay {seconds}\n")
        self.p.stdin.flush()
        self.p.stdout.readline()

    def stop(self):
        self.p.kill()
        self.p.wait()


class Paced(chaos.Devices):
    """chaos.py's devices, each held to its share of RATE (a device's thread
    is named after it)."""

    def __init__(self, app, tokens, quotas, ledger, intervals):
        super().__init__(app, tokens, quotas, ledger)
        self.intervals = intervals  # device -> seconds per event
        self.next_at = {}

    def count(self, sent=0, resent=0, dup=0, lagged=0):
        dev = threading.current_thread().name
        if sent and dev in self.intervals:
            now = time.monotonic()
            at = max(self.next_at.get(dev, now), now - 0.5) + sent * self.intervals[dev]
            self.next_at[dev] = at
            if at > now:
                time.sleep(at - now)
        super().count(sent, resent, dup, lagged)


def uplink(app):
    s = app.status()
    return s["uplink"]["state"] if s else None


def hold(seconds, devices):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if devices.errors:
            die("; ".join(devices.errors))
        time.sleep(0.1)


def main():
    if os.geteuid() != 0:
        die("needs root: network namespaces, nftables and tc")
    rate = float(os.environ.get("RATE", "200"))
    hold_s = float(os.environ.get("HOLD", "30"))
    if not os.path.exists(chaos.BIN):
        die(f"{chaos.BIN} missing: run `cargo build --release`")
    t0 = time.monotonic()
    work = tempfile.mkdtemp(prefix="outpost-netfaults-")
    os.chmod(work, 0o755)
    net, pg, proxy, app = Net(), None, None, None
    # Scenarios plus the quiet time between them, with room to spare: the
    # devices stop on their quotas, after the last fault is healed.
    load_s = 4 * hold_s + 60
    events = int(rate * load_s)
    log(f"network faults: RATE {rate:.0f} ev/s, {hold_s:.0f} s per fault, {events} events, work dir {work}")
    try:
        net.up()
        pg = NsPg(work)
        pg.up()
        proxy = Proxy(work)
        app = chaos.Appliance(work, pg)
        # The uplink on its defaults: only the site and the rate limits are set.
        for k in [k for k in app.env if k.startswith("OUTPOST_CENTRAL__") and k not in (
                "OUTPOST_CENTRAL__URL", "OUTPOST_CENTRAL__TLS")]:
            del app.env[k]
        app.env["OUTPOST_SITE__ID"] = SITE
        quotas, tokens, intervals = {}, {}, {}
        for kind, n, share in MIX:
            for i in range(n):
                dev = f"{kind}-{i + 1}"
                quotas[dev] = (kind, max(1, int(events * share / n)))
                intervals[dev] = n / (rate * share)
                tokens[dev] = app.cli("device", "add", "--tenant", TENANT, "--id", dev)
        app.start()
        wait_for(app.healthy, 30, "the appliance to start")
        wait_for(lambda: uplink(app) == "up", 30, "the uplink to come up")
        ledger = Ledger()
        devices = Paced(app, tokens, quotas, ledger, intervals)
        devices.start()
        hold(5, devices)

        # 1. Blackhole.
        acked0 = len(ledger)
        net.faults("counter drop")
        b0 = time.monotonic()
        try:
            wait_for(lambda: uplink(app) not in ("up", None), 10, "the blackhole to show in /api/v1/status", 0.1)
        except TimeoutError:
            die(f"blackhole NOT noticed within 10 s: {app.status()}")
        noticed = time.monotonic() - b0
        log(f"blackhole: shown {uplink(app)} after {noticed:.1f} s")
        hold(hold_s - (time.monotonic() - b0), devices)
        dropped = net.matched()
        net.faults()
        h0 = time.monotonic()
        wait_for(lambda: uplink(app) == "up", 60, "the uplink to come back after the blackhole", 0.1)
        log(f"blackhole healed: shown up after {time.monotonic() - h0:.1f} s; {dropped} packets dropped, "
            f"{len(ledger) - acked0} events acked during it")

        # 2. 10% loss and 200 ms delay each way.
        acked0 = len(ledger)
        proxy.delay(0.2)
        net.faults("numgen random mod 100 < 10 counter drop")
        hold(hold_s, devices)
        lost = net.matched()
        net.faults()
        proxy.delay(0)
        log(f"10% loss + 200 ms delay: {lost} packets dropped, {len(ledger) - acked0} events acked, "
            f"uplink {uplink(app)}")

        # 3. 1 Mbit/s.
        acked0 = len(ledger)
        net.rate("1mbit")
        hold(hold_s, devices)
        net.rate(None)
        log(f"1 Mbit/s: {len(ledger) - acked0} events acked, uplink {uplink(app)}")

        # 4. RST storm: resets on for 0.5 s of every 1.5 s. RSTs themselves
        # pass, or the reset meant for the appliance's socket (made from one
        # of its own packets) would be rejected on its way in.
        acked0 = len(ledger)
        end = time.monotonic() + hold_s
        resets = 0
        while time.monotonic() < end:
            net.faults("tcp flags & rst == 0 counter reject with tcp reset")
            hold(0.5, devices)
            resets += net.matched()
            net.faults()
            hold(1.0, devices)
        log(f"RST storm: {resets} packets answered with a reset, {len(ledger) - acked0} events acked, "
            f"uplink {uplink(app)}")
        if resets == 0:
            die("the RST storm reset nothing: the fault is not in the path")

        wait_for(lambda: not devices.alive() or devices.errors, 600, "the devices to finish their quotas", 0.5)
        if devices.errors:
            die("; ".join(devices.errors))
        log(f"load done: acked {len(ledger)}, resent {devices.resent}, acks marked duplicate {devices.dup_acks}")
        s = app.drain(300)
        if s["dead_letters"]:
            die(f"{s['dead_letters']} dead letters")
        v = Verdict(ledger.snapshot(), pg.central_rows(SITE))
        for p in v.problems():
            print(p)
        log(f"wall {time.monotonic() - t0:.0f} s")
        print(f"scenarios: 4, acked: {v.acked}, central: {v.stored}, lost: {v.lost}, duplicated: {v.duplicated}, "
              f"blackhole noticed in {noticed:.1f} s", flush=True)
        if not v.ok:
            sys.exit(1)
    finally:
        if app:
            app.kill_if_running()
        if proxy:
            proxy.stop()
        if pg:
            pg.stop_quietly()
        net.down()
        keep_or_remove(work)


if __name__ == "__main__":
    main()
