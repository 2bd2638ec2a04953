#!/usr/bin/python3
"""Central's floor per forwarded batch (issue #30): what one batch of n rows
costs PostgreSQL, without the appliance.

Numbers for notes and docs/scaling.md, never for tests. One throwaway
PostgreSQL (initdb + pg_ctl, fsync off as in the fleet bench), one tenant
migrated by `outpost migrate --central`, then pgbench runs the forwarder's
statement (the shape of `src/forward/service.rs`, kept in step by hand: the rows as arrays
unnested into `events`, `ON CONFLICT DO NOTHING`, the `sites` upsert, the
`per_batch` NOTIFY trigger; prepared once per connection) with n rows per
batch, two ways:

  back-to-back  one connection sending batches as fast as it can: the
                statement's own cost, caches warm;
  paced         CLIENTS connections (the sites) together offering RATE rows/s
                in batches of n, each backend asleep between its batches, as
                central sees a fleet.

For each it prints central's CPU (postmaster and every child, from /proc)
per batch and per 1,000 rows, and the same with the trigger disabled. The
bench's own two queries per measurement count in it too (a few ms of
CPU in 10 s). KEEP=1 keeps the work dir.

usage: tests/bench/central_floor.py [--rows 1,2,5,20] [--clients 50]
       [--rate 1000] [--seconds 10]
Needs target/release/outpost (make release), PostgreSQL's server binaries
and pgbench (Debian's postgresql package).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from fleet import Pg  # noqa: E402  (also puts tests/powercut on the path)
from ledger import keep_or_remove  # noqa: E402

TENANT = "floor"
PAYLOAD = '{"t": 1765000000.123, "s": 17, "k": 123456}'


def script(n):
    """A pgbench script: one forwarder batch of n rows from site :s."""
    def arr(item, cast=""):
        return "ARRAY[" + ", ".join(item(i) for i in range(n)) + "]" + cast
    return f"""\\set s random(1, 1000000)
\\set q random(1, 1000000000)
WITH ins AS (
  INSERT INTO tenant_{TENANT}.events (id, device_id, event_type, payload, "timestamp", site_id, site_seq, received_at,
                                      properties)
  SELECT * FROM unnest({arr(lambda i: "gen_random_uuid()")}, {arr(lambda i: f"'d{i}'", "::text[]")},
                       {arr(lambda i: "'reading'", "::text[]")}, {arr(lambda i: repr(PAYLOAD), "::jsonb[]")},
                       {arr(lambda i: "now()")}, {arr(lambda i: "'site-' || :s", "::text[]")},
                       {arr(lambda i: f":q + {i}", "::int8[]")}, {arr(lambda i: "now()")},
                       {arr(lambda i: "NULL", "::jsonb[]")}) ORDER BY 7
  ON CONFLICT DO NOTHING RETURNING 1),
seen AS (INSERT INTO tenant_{TENANT}.sites (site_id, last_seen, last_seq) VALUES ('site-' || :s, now(), :q + {n})
  ON CONFLICT (site_id) DO UPDATE SET last_seen = now(),
    last_seq = greatest(tenant_{TENANT}.sites.last_seq, excluded.last_seq))
SELECT count(*) FROM ins;
"""


def commits(pg):
    return int(pg.query("SELECT xact_commit FROM pg_stat_database WHERE datname = 'postgres'")[0][0])


def measure(pg, path, clients, rate, seconds):
    """(batches/s, central CPU µs per batch) over one pgbench run, 2 s of warm-up left out."""
    cmd = ["pgbench", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres", "-n", "-M", "prepared", "-f", path,
           "-c", str(clients), "-j", "1", "-T", f"{seconds + 4:g}", "postgres"]
    if rate:
        cmd[-1:-1] = ["-R", f"{rate:g}"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(2)
        x0, c0, t0 = commits(pg), pg.cpu_seconds(), time.monotonic()
        time.sleep(seconds)
        x1, c1, t1 = commits(pg), pg.cpu_seconds(), time.monotonic()
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    if p.returncode != 0:
        raise RuntimeError(f"pgbench: {out}")
    n = max(1, x1 - x0)
    return n / (t1 - t0), (c1 - c0) * 1e6 / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,2,5,20")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--rate", type=float, default=1000, help="paced: rows/s offered by all clients together")
    ap.add_argument("--seconds", type=float, default=10)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="outpost-floor-")
    os.chmod(work, 0o755)  # the postgres user must reach its data dir
    pg = Pg(work)
    pg.max_connections = args.clients + 10
    pg.up()
    try:
        env = dict(os.environ, OUTPOST_CENTRAL__URL=pg.url(), OUTPOST_CENTRAL__TLS="disable",
                   OUTPOST_SITE__DATA_DIR=os.path.join(work, "data"), RUST_LOG="warn")
        subprocess.run([os.path.join(ROOT, "target", "release", "outpost"), "migrate", "--central", "--tenant",
                        TENANT], env=env, check=True, capture_output=True)
        print(f"{'rows/batch':>10} {'trigger':>8} {'mode':>13} {'batches/s':>10} {'CPU µs/batch':>13} "
              f"{'CPU ms/1000 rows':>17}", flush=True)
        for n in (int(r) for r in args.rows.split(",")):
            path = os.path.join(work, f"batch{n}.sql")
            with open(path, "w") as f:
                f.write(script(n))
            for trigger in ("on", "off"):
                pg.query(f"ALTER TABLE tenant_{TENANT}.events {'ENABLE' if trigger == 'on' else 'DISABLE'} "
                         "TRIGGER USER")
                for mode, clients, rate in (("back-to-back", 1, 0), ("paced", args.clients, args.rate / n)):
                    per_s, us = measure(pg, path, clients, rate, args.seconds)
                    print(f"{n:10d} {trigger:>8} {mode:>13} {per_s:10.0f} {us:13.0f} {us / n:17.0f}", flush=True)
    finally:
        pg.stop_quietly()
        keep_or_remove(work)


if __name__ == "__main__":
    main()
