#!/bin/bash
# Issue #10's status-scrape figure: HTTP ingest p99 alone, and beside 200
# concurrent status scrapers, on a site log holding a 2,000,000-row backlog
# (ROWS). Numbers for notes, never for tests.
#
#   make bench && tests/bench/scrape_figures.sh [out.txt]
#
# Each round runs 20 s of single-event HTTP ingest (16 devices, RATE ev/s,
# default 2,000; RATE=max for a saturated box) four ways: alone; with 200
# scrapers once a second each (/metrics, /api/v1/status, /); with the same
# 200 back to back; and with 200 back to back on a 404 path, the control
# that costs HTTP itself and no status work. ROUNDS (default 3) rounds,
# interleaved so drift hits every mode alike. Uses 127.0.0.1:28493 and a
# scratch directory under target/.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-target/scrape-figures.txt}
BIN=target/release/outpost; BENCH=target/release/outpost-bench
ROWS=${ROWS:-2000000}; ROUNDS=${ROUNDS:-3}; RATE=${RATE:-2000}; PORT=28493
W=$(pwd)/target/scrape-figures
[ -x "$BIN" ] && [ -x "$BENCH" ] || { echo "needs $BIN and $BENCH: make bench" >&2; exit 2; }
command -v sqlite3 >/dev/null || { echo "needs the sqlite3 shell: apt-get install sqlite3" >&2; exit 2; }
rm -rf "$W"; mkdir -p "$W/data"; : > "$OUT"
export OUTPOST_SITE__DATA_DIR="$W/data" OUTPOST_SITE__ID=scrape-figures OUTPOST_HTTP__LISTEN=127.0.0.1:$PORT \
  OUTPOST_MQTT__ENABLED=false OUTPOST_LOG__MAX_BYTES=34359738368 \
  OUTPOST_LIMITS__PER_SECOND=1000000 OUTPOST_LIMITS__PER_MINUTE=100000000 OUTPOST_LIMITS__PER_HOUR=1000000000
PID=""
trap '[ -n "$PID" ] && kill "$PID" 2>/dev/null' EXIT
start() {
  "$BIN" run >> "$W/app.log" 2>&1 &
  PID=$!
  for _ in $(seq 600); do curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && return; sleep 0.1; done
  echo "the appliance did not start; see $W/app.log" >&2; exit 1
}
# The backlog: a migrated log (one start), then ROWS pending events written
# straight into it, then the appliance on it (no central: nothing drains).
start; kill "$PID"; wait "$PID"; PID=""
sqlite3 "$W/data/site-log.sqlite" <<SQL > /dev/null
PRAGMA synchronous=OFF; PRAGMA cache_size=-1000000;
BEGIN;
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < $ROWS)
INSERT INTO events (id, tenant, device_id, event_type, payload, ts, received_at, origin_site)
SELECT randomblob(16), 'backlog', 'dev-' || (i % 100), 'bench.reading',
  '{"seq":' || i || ',"pad":"' || substr(hex(zeroblob(60)), 1, 100) || '"}',
  CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER) - ($ROWS - i),
  CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER) - ($ROWS - i),
  'scrape-figures' FROM n;
COMMIT;
PRAGMA wal_checkpoint(TRUNCATE);
SQL
start
backlog=$(curl -sf "http://127.0.0.1:$PORT/api/v1/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["log"]["backlog_rows"])')
echo "backlog: $backlog rows; ingest: 16 devices, single posts, rate $RATE; 20 s per mode; $ROUNDS rounds" | tee -a "$OUT"
SCRAPE=tests/bench/scrapers.py
for r in $(seq "$ROUNDS"); do
  for mode in alone paced tight control; do
    sp=""
    case $mode in
      paced) python3 $SCRAPE $PORT 24 "$W/$mode-$r.json" 1.0 > /dev/null & sp=$!;;
      tight) python3 $SCRAPE $PORT 24 "$W/$mode-$r.json" 0 > /dev/null & sp=$!;;
      control) python3 $SCRAPE $PORT 24 "$W/$mode-$r.json" 0 404 > /dev/null & sp=$!;;
    esac
    [ -n "$sp" ] && sleep 2 # the scrapers connected and running
    p99=$("$BENCH" http --url "http://127.0.0.1:$PORT" --devices 16 --rate "$RATE" --duration 20s --batch 1 --no-raw 2>&1 |
      tee -a "$W/bench.log" | sed -n 's/.*p99 \([0-9.]*\) ms.*/\1/p')
    scrapes=""
    if [ -n "$sp" ]; then
      wait "$sp"
      scrapes=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["total_rps"])' "$W/$mode-$r.json")
    fi
    echo "round $r $mode ingest_p99_ms $p99 scrapes_per_s ${scrapes:-0}" | tee -a "$OUT"
  done
done
python3 - "$OUT" <<'PY' | tee -a "$OUT"
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.startswith("round ")]
p99 = {}
for r in rows:
    p99.setdefault(r[2], []).append(float(r[4]))
base = statistics.median(p99["alone"])
for mode in ("alone", "paced", "tight", "control"):
    m = statistics.median(p99[mode])
    print(f"{mode:8} median ingest p99 {m:7.2f} ms  x{m / base:.2f} of alone")
PY
