#!/bin/bash
# The site log's figures (README, "Flash wear and the site log's figures")
# in one run: every row on a fresh site log, forwarding to a throwaway local
# PostgreSQL, the raw durable append (../shared/bench/raw_append.py when it
# is there, and the bench's own) measured in the same run. Numbers for
# notes, never for tests.
#
#   make bench && tests/bench/site_log_figures.sh [target/release/outpost] [out.txt]
#
# Needs PostgreSQL's server binaries (Debian's postgresql package); as root
# it runs them as the postgres user. Uses 127.0.0.1 ports 28491 and 28492,
# a free port for PostgreSQL, and a scratch directory under target/.
set -uo pipefail
cd "$(dirname "$0")/../.."
BIN=${1:-target/release/outpost}
OUT=${2:-target/site-log-figures.txt}
BENCH=target/release/outpost-bench
W=$(pwd)/target/site-log-figures
PG_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
[ -x "$BIN" ] && [ -x "$BENCH" ] || { echo "needs $BIN and $BENCH: make bench" >&2; exit 2; }
rm -rf "$W"; mkdir -p "$W"; : > "$OUT"

PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
[ -n "$PGBIN" ] || { echo "no /usr/lib/postgresql/*/bin: apt-get install postgresql" >&2; exit 2; }
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
mkdir -p "$W/pg"; [ "$(id -u)" = 0 ] && chown postgres:postgres "$W/pg"
as_pg "$PGBIN/initdb" -D "$W/pg/data" -U postgres -A trust --no-sync >/dev/null
as_pg "$PGBIN/pg_ctl" -D "$W/pg/data" -o "-p $PG_PORT -k /tmp" -l "$W/pg/log" -w start >/dev/null ||
  { echo "PostgreSQL did not start; see $W/pg/log" >&2; exit 1; }
if curl -sf http://127.0.0.1:28491/healthz >/dev/null; then
  echo "something already answers on 127.0.0.1:28491; stop it first" >&2; exit 1
fi
PID=""
cleanup() {
  [ -n "$PID" ] && kill "$PID" 2>/dev/null
  as_pg "$PGBIN/pg_ctl" -D "$W/pg/data" -m immediate stop >/dev/null 2>&1
}
trap cleanup EXIT

app() { # extra environment for this row; LOCAL=1: no central (PostgreSQL elsewhere)
  rm -rf "$W/data"; mkdir -p "$W/data"
  local central=(OUTPOST_CENTRAL__URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres" OUTPOST_CENTRAL__TLS=disable)
  [ "${LOCAL:-0}" = 1 ] && central=()
  env OUTPOST_SITE__DATA_DIR="$W/data" OUTPOST_SITE__ID=figures OUTPOST_HTTP__LISTEN=127.0.0.1:28491 \
      OUTPOST_MQTT__LISTEN=127.0.0.1:28492 OUTPOST_MQTT__MAX_CONNECTS_PER_MINUTE=0 OUTPOST_MQTT__MAX_CONNECTIONS=5000 \
      OUTPOST_LIMITS__PER_SECOND=1000000 OUTPOST_LIMITS__PER_MINUTE=100000000 OUTPOST_LIMITS__PER_HOUR=1000000000 \
      "${central[@]}" "$@" \
      "$BIN" run > "$W/app-$(date +%s%N).log" 2>&1 &
  PID=$!
  for _ in $(seq 100); do curl -sf http://127.0.0.1:28491/healthz >/dev/null && return; sleep 0.1; done
  echo "the appliance did not start; see $W/app-*.log" >&2; exit 1
}
stop() { grep VmHWM "/proc/$PID/status" | sed 's/^/  appliance /' >> "$OUT"; kill "$PID"; wait "$PID" 2>/dev/null; PID=""; }
row() { # title, bench arguments
  echo "== $1" | tee -a "$OUT"; shift
  OUTPOST_SITE__DATA_DIR="$W/data" "$BENCH" "$@" --url http://127.0.0.1:28491 2>&1 | grep -vE "^round|^\s*$" >> "$OUT"
}
RAW=../shared/bench/raw_append.py
[ -f "$RAW" ] && python3 "$RAW" --dir "$W" --seconds 3 --rows 1,100,1000 >> "$OUT" 2>&1
app; row "HTTP batches of 100, 64 devices, max" http --devices 64 --batch 100 --duration 10s; stop
app; row "MQTT QoS 1, 100 devices, max" mqtt --port 28492 --devices 100 --duration 10s --no-raw; stop
# Ingest alone, as on a site whose PostgreSQL is elsewhere (here it shares the two cores).
LOCAL=1 app; row "HTTP batches of 100, 64 devices, max, no central" http --devices 64 --batch 100 --duration 10s; stop
LOCAL=1 app; row "MQTT QoS 1, 100 devices, max, no central" mqtt --port 28492 --devices 100 --duration 10s --no-raw; stop
app; row "HTTP single posts, 64 devices, 5,000 ev/s" http --devices 64 --rate 5000 --duration 10s --no-raw; stop
app; row "MQTT QoS 1, 100 devices, 5,000 ev/s" mqtt --port 28492 --devices 100 --rate 5000 --duration 10s --no-raw; stop
LOCAL=1 app; row "HTTP single posts, 64 devices, 5,000 ev/s, no central" http --devices 64 --rate 5000 --duration 10s --no-raw; stop
LOCAL=1 app; row "MQTT QoS 1, 100 devices, 5,000 ev/s, no central" mqtt --port 28492 --devices 100 --rate 5000 --duration 10s --no-raw; stop
app; row "MQTT QoS 1, 1,000 devices, 5,000 ev/s (VmHWM)" mqtt --port 28492 --devices 1000 --rate 5000 --duration 20s --no-raw; stop
app; row "trickle: 100 ev/s, 20 devices, single posts" http --devices 20 --rate 100 --duration 30s; stop
app OUTPOST_LOG__COMMIT_DELAY=250ms
row "trickle, log.commit_delay = 250ms, 40 devices" http --devices 40 --rate 100 --duration 30s --no-raw; stop
app; row "stream: 1,000 ev/s, 1 WebSocket subscriber" stream --rate 1000 --duration 10s; stop
cat "$OUT"
