#!/usr/bin/python3
"""Power cuts of a VM running the appliance (`make test-powercut`).

The site log lives on a virtual disk served by nbdkit's cache filter in
writeback mode: whatever the guest has not flushed is really gone when
nbdkit is SIGKILLed together with qemu. A self-test shows that first (an
unflushed O_DIRECT write is lost at a cut, a flushed one survives), so the
proof cannot pass vacuously. Then, CUTS times: boot the appliance, check
that every event acked so far is there exactly once and in per-device order,
drive continuous HTTP + MQTT QoS 1 load from several devices, and cut the
power at a random moment. Finally boot once more, stop cleanly, and check
the SQLite file itself (integrity_check + the same ledger) and the ext4
image (e2fsck).

Env: CUTS (default 20), SEED, KEEP=1 (keep the work dir), VERBOSE=1,
NEGATIVE_CONTROL=1 (serve the site disk with flushes ignored: the run must
then FAIL with lost acked events, showing the ledger check can fail).
"""

import glob
import hashlib
import http.client
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from ledger import Ledger, PahoAcks, Verdict, die, free_port, keep_or_remove, log, wait_for  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(HERE))
BIN = os.path.join(ROOT, "target/release/outpost")
CACHE = os.path.join(ROOT, "target/powercut")
MODULES = ["virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci",
           "virtio_blk", "failover", "net_failover", "virtio_net"]
TENANT = "acme"
HTTP_DEVS = ["pc-h1", "pc-h2", "pc-h3"]
MQTT_DEVS = ["pc-m1", "pc-m2"]
READER = "pc-reader"
VERBOSE = os.environ.get("VERBOSE") == "1"



def kernel():
    ks = sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64"))
    if not ks:
        die("no /boot/vmlinuz-*-cloud-amd64 (install linux-image-cloud-amd64)")
    k = ks[-1]
    ver = os.path.basename(k)[len("vmlinuz-"):]
    return k, ver


# ---------------------------------------------------------------- VM pieces

def cache_key():
    h = hashlib.sha256()
    for p in [BIN, os.path.join(HERE, "init.sh"), __file__, kernel()[0]]:
        with open(p, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def build_initramfs(dest):
    _, ver = kernel()
    with tempfile.TemporaryDirectory() as root:
        for d in ["bin", "dev", "proc", "sys", "mnt", "tmp", "lib/modules", "etc"]:
            os.makedirs(os.path.join(root, d), exist_ok=True)
        shutil.copy("/bin/busybox", os.path.join(root, "bin/busybox"))
        shutil.copy(os.path.join(HERE, "init.sh"), os.path.join(root, "init"))
        os.chmod(os.path.join(root, "init"), 0o755)
        for m in MODULES:
            found = subprocess.run(["modinfo", "-k", ver, "-n", m], capture_output=True, text=True)
            path = found.stdout.strip()
            if found.returncode != 0 or not path.endswith(".ko"):
                die(f"kernel module {m} not found as a plain .ko: {found.stderr.strip() or path}")
            shutil.copy(path, os.path.join(root, "lib/modules", m + ".ko"))
        shutil.copy(BIN, os.path.join(root, "bin/outpost"))
        # The binary's shared libraries and the loader, at the paths ldd names.
        for line in subprocess.run(["ldd", BIN], capture_output=True, text=True, check=True).stdout.splitlines():
            parts = line.split()
            lib = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
            if lib.startswith("/"):
                dst = os.path.join(root, lib.lstrip("/"))
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.copy(os.path.realpath(lib), dst)
        with open(os.path.join(root, "etc/hosts"), "w") as f:
            f.write("127.0.0.1 localhost\n")
        subprocess.run(f"cd {root} && find . | cpio -o -H newc --quiet | gzip -1 > {dest}",
                       shell=True, check=True)


def build_disk_template(dest, tokens_path):
    """An ext4 image holding data/ with the devices registered by the host's copy of the binary."""
    with tempfile.TemporaryDirectory() as root:
        data = os.path.join(root, "data")
        env = dict(os.environ, OUTPOST_SITE__DATA_DIR=data, OUTPOST_SITE__ID="powercut-vm", RUST_LOG="warn")
        tokens = {}
        for dev in HTTP_DEVS + MQTT_DEVS:
            tokens[dev] = subprocess.run([BIN, "device", "add", "--tenant", TENANT, "--id", dev, "--ttl", "3650d"],
                                         env=env, capture_output=True, text=True, check=True).stdout.strip()
        tokens[READER] = subprocess.run([BIN, "device", "add", "--tenant", TENANT, "--id", READER, "--ttl", "3650d",
                                         "--perm", "read_events"],
                                        env=env, capture_output=True, text=True, check=True).stdout.strip()
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "outpost", "-d", root, dest, "256M"], check=True)
    with open(tokens_path, "w") as f:
        json.dump(tokens, f)


def prepare():
    """Builds (or reuses) the initramfs, disk template, self-test image and accel choice."""
    os.makedirs(CACHE, exist_ok=True)
    key = cache_key()
    stamp = os.path.join(CACHE, "stamp")
    files = ["initramfs.gz", "disk-template.img", "tokens.json", "selftest-template.img", "accel"]
    if os.path.exists(stamp) and open(stamp).read() == key and all(
            os.path.exists(os.path.join(CACHE, f)) for f in files):
        log("VM pieces: cached in target/powercut/")
        return
    log("VM pieces: building initramfs, disk images (binary or harness changed)")
    if os.path.exists(stamp):
        os.unlink(stamp)
    build_initramfs(os.path.join(CACHE, "initramfs.gz"))
    build_disk_template(os.path.join(CACHE, "disk-template.img"), os.path.join(CACHE, "tokens.json"))
    with open(os.path.join(CACHE, "selftest-template.img"), "wb") as f:
        f.truncate(16 << 20)  # a raw disk: the self-test mounts no filesystem
    with open(os.path.join(CACHE, "accel"), "w") as f:
        f.write(probe_accel())
    with open(stamp, "w") as f:
        f.write(key)


def probe_accel():
    """KVM only if a test boot with a timeout reaches init; else TCG."""
    if not os.path.exists("/dev/kvm"):
        return "tcg"
    with tempfile.TemporaryDirectory() as d:
        serial = os.path.join(d, "serial.log")
        k, _ = kernel()
        q = subprocess.Popen(["qemu-system-x86_64", "-accel", "kvm", "-m", "256", "-smp", "1", "-display", "none",
                              "-monitor", "none", "-no-reboot", "-nodefaults", "-kernel", k,
                              "-initrd", os.path.join(CACHE, "initramfs.gz"),
                              "-append", "console=ttyS0 panic=-1 quiet outpost.mode=probe",
                              "-serial", f"file:{serial}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: os.path.exists(serial) and b"OUTPOST-INIT" in open(serial, "rb").read(), 20,
                     "a KVM test boot")
            accel = "kvm"
        except TimeoutError:
            accel = "tcg"
        q.kill()
        q.wait()
    log(f"accelerator: {accel} (decided by a test boot)")
    return accel


class VM:
    """qemu + nbdkit (cache=writeback) over one disk image; cut() is the power cut."""

    def __init__(self, work, disk, accel, name):
        self.work, self.disk, self.accel, self.name = work, disk, accel, name
        self.http_port, self.mqtt_port = free_port(), free_port()
        self.q = self.n = None
        self.boots = 0

    def start(self, mode, nonce="x"):
        self.boots += 1
        self.sock = os.path.join(self.work, "nbd.sock")
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.serial = os.path.join(self.work, f"serial-{self.name}-{self.boots:03d}-{mode}.log")
        self.nlog = open(os.path.join(self.work, "nbdkit.log"), "ab")
        # NEGATIVE_CONTROL=1: a disk that ignores flushes (cache=unsafe) for
        # the site disk; the proof must then report lost acked events.
        cache_mode = "unsafe" if os.environ.get("NEGATIVE_CONTROL") == "1" and self.name == "site" else "writeback"
        self.n = subprocess.Popen(["nbdkit", "-f", "--unix", self.sock, "--filter=cache", "file", self.disk,
                                   f"cache={cache_mode}"], stdout=self.nlog, stderr=self.nlog)
        wait_for(lambda: os.path.exists(self.sock) or self.n.poll() is not None, 10, "nbdkit's socket")
        if self.n.poll() is not None:
            die("nbdkit exited at start (see nbdkit.log)")
        k, _ = kernel()
        net = (f"user,id=n,hostfwd=tcp:127.0.0.1:{self.http_port}-:8080,"
               f"hostfwd=tcp:127.0.0.1:{self.mqtt_port}-:1883")
        self.q = subprocess.Popen(
            ["qemu-system-x86_64", "-accel", self.accel, "-m", "384", "-smp", "1", "-display", "none",
             "-monitor", "none", "-no-reboot", "-nodefaults", "-kernel", k,
             "-initrd", os.path.join(CACHE, "initramfs.gz"),
             "-append", f"console=ttyS0 panic=-1 quiet outpost.mode={mode} outpost.nonce={nonce}",
             "-drive", f"file=nbd+unix:///?socket={self.sock},format=raw,if=virtio,cache=none",
             "-netdev", net, "-device", "virtio-net-pci,netdev=n",
             "-serial", f"file:{self.serial}"],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.work, "qemu.log"), "ab"))

    def serial_text(self):
        try:
            with open(self.serial, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def wait_serial(self, marker, timeout):
        def seen():
            if marker in self.serial_text():
                return True
            if self.q.poll() is not None:
                raise RuntimeError(f"qemu exited before {marker!r}; serial:\n{self.serial_text()[-3000:]}")
            if "OUTPOST-FAIL" in self.serial_text():
                raise RuntimeError(f"guest failed before {marker!r}; serial:\n{self.serial_text()[-3000:]}")
            return False
        wait_for(seen, timeout, marker)

    def cut(self):
        """Power cut: qemu and nbdkit SIGKILLed by one kill(1)."""
        subprocess.run(["kill", "-KILL", str(self.q.pid), str(self.n.pid)], check=True)
        self.q.wait()
        self.n.wait()
        self.nlog.close()

    def wait_poweroff(self, timeout):
        """Clean end: the guest powered off (after unmount); then stop nbdkit, which holds no dirty data."""
        try:
            self.q.wait(timeout)
        except subprocess.TimeoutExpired:
            self.cut()
            raise RuntimeError(f"guest did not power off; serial:\n{self.serial_text()[-3000:]}")
        self.n.terminate()
        self.n.wait()
        self.nlog.close()

    def healthz(self):
        try:
            c = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=2)
            c.request("GET", "/healthz")
            ok = c.getresponse().status == 200
            c.close()
            return ok
        except (OSError, http.client.HTTPException):
            return False


# ---------------------------------------------------------------- self-test

def selftest(work, accel):
    """The harness can fail: an unflushed write must be lost, a flushed one kept.

    Done on the raw disk with no filesystem mounted, so no journal commit in
    the guest can flush the second write however late the cut lands.
    """
    disk = os.path.join(work, "selftest.img")
    shutil.copy(os.path.join(CACHE, "selftest-template.img"), disk)
    vm = VM(work, disk, accel, "selftest")
    nonce = uuid.uuid4().hex[:12]
    vm.start("selftest", nonce)
    vm.wait_serial("OUTPOST-SELFTEST-WRITTEN", 120)
    if f"OUTPOST-READBACK=UNSYNCED-{nonce}" not in vm.serial_text():
        vm.cut()
        die(f"self-test: the unflushed write did not reach the virtual disk; serial:\n{vm.serial_text()[-3000:]}")
    vm.cut()
    vm.start("selftest-check")
    vm.wait_serial("OUTPOST-SELFTEST-READ", 120)
    vm.wait_poweroff(60)
    text = vm.serial_text()
    synced = f"OUTPOST-SYNCED=SYNCED-{nonce}" in text
    unsynced_kept = f"OUTPOST-UNSYNCED=UNSYNCED-{nonce}" in text
    log(f"self-test: flushed write {'survived' if synced else 'LOST'}, "
        f"unflushed O_DIRECT write {'SURVIVED' if unsynced_kept else 'lost'} (it was in the disk's cache before the cut)")
    if not synced:
        die("self-test: a flushed write did not survive a cut; the virtual disk loses flushed data")
    if unsynced_kept:
        die("self-test: an unflushed write survived the cut; this harness could not detect loss")


# ---------------------------------------------------------------- load

class Load:
    """Continuous load from every device until stop(); records exactly what was acked."""

    def __init__(self, vm, tokens, ledger, counters, pending):
        self.vm, self.tokens, self.ledger = vm, tokens, ledger
        self.counters, self.pending = counters, pending  # per device: next k; HTTP: unacked event to resend
        self.stopping = threading.Event()
        self.threads = []
        self.errors = []
        self.sent = 0

    def start(self):
        for d in HTTP_DEVS:
            self.threads.append(threading.Thread(target=self.http_device, args=(d,), name=d, daemon=True))
        for d in MQTT_DEVS:
            self.threads.append(threading.Thread(target=self.mqtt_device, args=(d,), name=d, daemon=True))
        for t in self.threads:
            t.start()

    def stop(self):
        self.stopping.set()
        for t in self.threads:
            t0 = time.monotonic()
            t.join(30)
            if t.is_alive() or time.monotonic() - t0 > 2:
                log(f"load thread {t.name} took {time.monotonic() - t0:.1f}s to stop")

    def next_k(self, dev):
        k = self.counters[dev]
        self.counters[dev] = k + 1
        return k

    def http_device(self, dev):
        headers = {"Authorization": f"Bearer {self.tokens[dev]}", "Content-Type": "application/json"}
        conn = None
        while not self.stopping.is_set():
            ev = self.pending.get(dev)
            if ev is None:
                k = self.next_k(dev)
                ev = {"id": str(uuid.uuid4()), "device_id": dev, "event_type": "pc.http", "payload": {"k": k}}
                self.pending[dev] = ev
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.vm.http_port, timeout=10)
                conn.request("POST", f"/api/v1/realtime/{TENANT}/event", json.dumps(ev), headers)
                r = conn.getresponse()
                body = r.read()
                self.sent += 1
            except (OSError, http.client.HTTPException):
                # The box is gone (or not up yet): keep the event, resend it with the same id.
                conn = None
                time.sleep(0.05)
                continue
            if r.status == 201:
                got = json.loads(body)
                if got["id"] != ev["id"]:
                    self.errors.append(f"{dev}: ack for {ev['id']} names id {got['id']}")
                    return
                self.ledger.ack(dev, ev["payload"]["k"], ev["id"])
                self.pending[dev] = None
            else:
                self.errors.append(f"{dev}: unexpected HTTP {r.status}: {body[:300]!r}")
                return

    def mqtt_device(self, dev):
        import paho.mqtt.client as mqtt
        window = threading.Semaphore(16)
        c = mqtt.Client(client_id=dev, clean_session=True)
        c.username_pw_set(dev, self.tokens[dev])
        c.max_inflight_messages_set(16)
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(0.05, 0.2)

        def on_ack(k):
            self.ledger.ack(dev, k)
            window.release()

        inflight = PahoAcks(on_ack)
        c.on_publish = lambda _c, _u, mid: inflight.acked(mid)
        try:
            c.connect("127.0.0.1", self.vm.mqtt_port, keepalive=30)
        except OSError:
            return
        c.loop_start()
        try:
            wait_for(lambda: c.is_connected() or self.stopping.is_set(), 20, f"{dev} CONNACK")
        except TimeoutError:
            self.errors.append(f"{dev}: no CONNACK within 20 s")
        topic = f"{TENANT}/devices/{dev}/events/pc.mqtt"
        while not self.stopping.is_set() and c.is_connected():
            if not window.acquire(timeout=0.2):
                continue
            k = self.next_k(dev)
            info = c.publish(topic, json.dumps({"k": k}), qos=1)
            inflight.sent(info.mid, k)
            self.sent += 1
        # The box is gone (or the cut is done): stop, without reconnecting.
        c.disconnect()
        c.loop_stop()


# ---------------------------------------------------------------- checks

def rows_via_http(vm, tokens):
    rows, after = [], 0
    headers = {"Authorization": f"Bearer {tokens[READER]}"}
    while True:
        c = http.client.HTTPConnection("127.0.0.1", vm.http_port, timeout=30)
        c.request("GET", f"/api/v1/realtime/{TENANT}/events?after={after}&limit=1000", headers=headers)
        r = c.getresponse()
        body = r.read()
        c.close()
        if r.status != 200:
            die(f"reading events back: HTTP {r.status} {body[:300]!r}")
        page = json.loads(body)
        for e in page["events"]:
            rows.append((e["device_id"], e["payload"]["k"], e["seq"], e["id"]))
        if not page["has_more"]:
            return rows
        after = page["next"]


def rows_via_sqlite(db):
    c = sqlite3.connect(db)
    integrity = c.execute("PRAGMA integrity_check").fetchall()
    rows = []
    for dev, payload, seq, hid in c.execute("SELECT device_id, payload, seq, hex(id) FROM events WHERE tenant = ?",
                                            (TENANT,)):
        h = hid.lower()
        rows.append((dev, json.loads(payload)["k"], seq, f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"))
    c.close()
    return integrity, rows


def report_check(what, ledger, rows):
    v = Verdict(ledger.snapshot(), rows)
    if VERBOSE or not v.ok:
        log(f"{what}: acked {v.acked}, stored {v.stored}, present {v.present}, lost {v.lost}, "
            f"duplicated {v.duplicated}, order violations {v.order_violations}")
    return v


# ---------------------------------------------------------------- main

def main():
    cuts = int(os.environ.get("CUTS", "20"))
    seed = int(os.environ.get("SEED", str(random.randrange(1 << 30))))
    rnd = random.Random(seed)
    t0 = time.monotonic()
    if not os.path.exists(BIN):
        die(f"{BIN} missing: run `cargo build --release`")
    prepare()
    accel = open(os.path.join(CACHE, "accel")).read().strip()
    tokens = json.load(open(os.path.join(CACHE, "tokens.json")))
    work = tempfile.mkdtemp(prefix="outpost-powercut-")
    log(f"power-cut proof: {cuts} cuts, seed {seed}, accel {accel}, work dir {work}")
    vm = None
    try:
        selftest(work, accel)
        disk = os.path.join(work, "disk.img")
        shutil.copy(os.path.join(CACHE, "disk-template.img"), disk)
        vm = VM(work, disk, accel, "site")
        ledger = Ledger()
        counters = {d: 1 for d in HTTP_DEVS + MQTT_DEVS}
        pending = {}
        boot_times = []
        boot_cuts = 0
        i = 0
        while i <= cuts:
            vm.start("run")
            b0 = time.monotonic()
            if 0 < i < cuts and rnd.random() < 0.2:
                # About one cut in five lands while the box boots: mounting
                # (journal replay), opening the log (WAL recovery), migrating.
                vm.wait_serial("OUTPOST-MOUNTED", 90)
                delay = rnd.uniform(0.0, 2.0)
                time.sleep(delay)  # the random moment of the cut
                up = vm.healthz()
                vm.cut()
                boot_cuts += 1
                i += 1
                log(f"cut {i}/{cuts} during boot, {delay:.2f}s after the disk was mounted "
                    f"(appliance {'already serving' if up else 'starting'})")
                continue
            try:
                wait_for(lambda: vm.healthz() or (vm.q.poll() is not None) or "OUTPOST-EXIT" in vm.serial_text(),
                         90, "/healthz after boot")
            except TimeoutError:
                die(f"the appliance did not answer /healthz within 90 s after boot {vm.boots}; serial:\n"
                    f"{vm.serial_text()[-3000:]}")
            if not vm.healthz():
                die(f"the appliance did not start after cut {i}; serial:\n{vm.serial_text()[-3000:]}")
            boot_times.append(time.monotonic() - b0)
            v = report_check(f"after boot {i}", ledger, rows_via_http(vm, tokens))
            if not v.ok:
                die(f"after cut {i}: " + "; ".join(v.problems()))
            if i == cuts:
                break
            load = Load(vm, tokens, ledger, counters, pending)
            before = len(ledger)
            load.start()
            delay = rnd.uniform(0.2, 6.0)
            time.sleep(delay)  # the random moment of the cut; the load runs meanwhile
            vm.cut()
            load.stop()
            if load.errors:
                die("; ".join(load.errors))
            i += 1
            log(f"cut {i}/{cuts} at {delay:.2f}s of load: acked {len(ledger) - before} "
                f"(total {len(ledger)}), boot took {boot_times[-1]:.1f}s, check ok ({v.stored} stored)")
        # A final cut with the box idle, then a clean boot and shutdown so the
        # image can be read on the host.
        vm.cut()
        vm.start("final")
        vm.wait_serial("OUTPOST-UMOUNTED", 120)
        vm.wait_poweroff(60)
        if "OUTPOST-EXIT rc=0" not in vm.serial_text():
            die(f"clean shutdown in the final boot failed; serial:\n{vm.serial_text()[-3000:]}")
        fsck = subprocess.run(["e2fsck", "-fn", disk], capture_output=True, text=True)
        if fsck.returncode != 0:
            die(f"e2fsck of the site disk after the final clean shutdown:\n{fsck.stdout}{fsck.stderr}")
        out = os.path.join(work, "extracted")
        os.makedirs(out)
        subprocess.run(["debugfs", "-R", f"rdump /data {out}", disk], capture_output=True, check=True)
        db = os.path.join(out, "data", "site-log.sqlite")
        if not os.path.exists(db):
            die(f"site log not found in the image: {os.listdir(os.path.join(out, 'data'))}")
        integrity, rows = rows_via_sqlite(db)
        v = report_check("site log file after the last cut", ledger, rows)
        log(f"final: {boot_cuts} of the cuts hit a booting box; e2fsck clean, "
            f"PRAGMA integrity_check {integrity}, {v.stored} events in the log, "
            f"boot to /healthz after a cut: min {min(boot_times):.1f}s max {max(boot_times):.1f}s, "
            f"wall {time.monotonic() - t0:.0f}s")
        failed = integrity != [("ok",)] or not v.ok
        for p in v.problems():
            print(p)
        if integrity != [("ok",)]:
            print(f"INTEGRITY CHECK FAILED: {integrity[:10]}")
        print(f"power cuts: {cuts}, acked: {v.acked}, present: {v.present}, lost: {v.lost}, "
              f"duplicated: {v.duplicated}", flush=True)
        if failed:
            sys.exit(1)
    finally:
        if vm and vm.q and vm.q.poll() is None:
            vm.cut()
        keep_or_remove(work)


if __name__ == "__main__":
    main()
