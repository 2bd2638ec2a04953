"""What the devices were told (acks) against what the store holds.

Shared by the power-cut, chaos, network and soak proofs, with their small
helpers (log, die, wait_for, free_port, keep_or_remove). Every event carries its device's
counter `k` in the payload, so it is found again whatever id it was stored
under (MQTT publishes get their id from the appliance).
"""

import os
import shutil
import socket
import sys
import threading
import time
from collections import Counter, defaultdict


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def die(msg):
    print(f"FAILED: {msg}", flush=True)
    sys.exit(1)


def wait_for(cond, timeout, what, interval=0.05):
    """Polls `cond` until it returns something true (conditions, not sleeps)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def keep_or_remove(work):
    """The end of a proof: its work dir is kept with KEEP=1, else removed."""
    if os.environ.get("KEEP") == "1":
        log(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Ledger:
    """Acked events: (device, k) -> the id the device used (None: assigned by the appliance)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.acked = {}

    def ack(self, dev, k, event_id=None):
        with self.lock:
            self.acked[(dev, k)] = event_id

    def __len__(self):
        with self.lock:
            return len(self.acked)

    def snapshot(self):
        with self.lock:
            return dict(self.acked)


class Verdict:
    def __init__(self, acked, rows):
        """rows: (device, k, seq, id) for every stored event of the proof's devices."""
        self.acked = len(acked)
        counts = Counter((d, k) for d, k, _, _ in rows)
        self.stored = len(rows)
        self.duplicated = sum(c - 1 for c in counts.values() if c > 1)
        self.dup_examples = [key for key, c in counts.items() if c > 1][:5]
        first = {}
        for d, k, seq, i in rows:
            if (d, k) not in first or seq < first[(d, k)][0]:
                first[(d, k)] = (seq, i)
        missing = [key for key in acked if key not in first]
        wrong_id = [key for key, i in acked.items() if i is not None and key in first and first[key][1] != i]
        self.lost = len(missing) + len(wrong_id)
        self.lost_examples = (missing + wrong_id)[:5]
        self.present = self.acked - self.lost
        # Per device, the acked events in store order must have rising k.
        by_dev = defaultdict(list)
        for key in acked:
            if key in first:
                by_dev[key[0]].append((first[key][0], key[1]))
        self.order_violations = 0
        self.order_examples = []
        for dev, lst in by_dev.items():
            lst.sort()
            for (s1, k1), (s2, k2) in zip(lst, lst[1:]):
                if k2 <= k1:
                    self.order_violations += 1
                    if len(self.order_examples) < 5:
                        self.order_examples.append((dev, (s1, k1), (s2, k2)))

    @property
    def ok(self):
        return self.lost == 0 and self.duplicated == 0 and self.order_violations == 0

    def problems(self):
        out = []
        if self.lost:
            out.append(f"LOST {self.lost} acked events, e.g. {self.lost_examples}")
        if self.duplicated:
            out.append(f"DUPLICATED {self.duplicated} events, e.g. {self.dup_examples}")
        if self.order_violations:
            out.append(f"ORDER violated {self.order_violations} times, e.g. {self.order_examples}")
        return out


class PahoAcks:
    """Which counter `k` each in-flight paho QoS 1 publish carries. paho may
    report an ack (on_publish) before publish() has returned the message id,
    so an ack for an id not recorded yet is kept and matched when it is."""

    def __init__(self, on_ack):
        self.lock = threading.Lock()
        self.mids = {}
        self.early = set()
        self.on_ack = on_ack

    def acked(self, mid):
        """From on_publish. paho holds its own message lock here, so nothing
        under `self.lock` may call publish()."""
        with self.lock:
            k = self.mids.pop(mid, None)
            if k is None:
                self.early.add(mid)
                return
        self.on_ack(k)

    def sent(self, mid, k):
        """After publish() returned `mid` for counter `k`."""
        with self.lock:
            if mid in self.early:
                self.early.discard(mid)
            else:
                self.mids[mid] = k
                return
        self.on_ack(k)

    def unacked(self):
        with self.lock:
            return len(self.mids)
