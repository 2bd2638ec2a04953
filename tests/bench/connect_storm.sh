#!/bin/bash
# The connect storm (issue #29 item 3), numbers for notes, never for tests:
# 1,000 MQTT devices connect at once and publish 5,000 ev/s for 20 s
# against a fresh appliance forwarding to a throwaway local PostgreSQL on
# the same machine; each build in turn, ROUNDS times (default 3), so drift
# falls on every build alike. `outpost-bench mqtt` prints the PUBACK
# latency over the run and of the publishes sent in the first 5 s.
#
#   make bench && ROUNDS=3 tests/bench/connect_storm.sh OUT.txt BUILD_A [BUILD_B ...]
#
# Needs PostgreSQL's server binaries; runs them as the postgres user (root).
# Uses 127.0.0.1 ports 28591 and 28592 and target/storm.
set -uo pipefail
cd /work/main
OUT=$1; shift
BENCH=target/release/outpost-bench
W=/work/main/target/storm
PG_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
rm -rf "$W"; mkdir -p "$W/pg"; chown postgres:postgres "$W/pg"; : > "$OUT"
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)
as_pg() { runuser -u postgres -- "$@"; }
as_pg "$PGBIN/initdb" -D "$W/pg/data" -U postgres -A trust --no-sync >/dev/null
as_pg "$PGBIN/pg_ctl" -D "$W/pg/data" -o "-p $PG_PORT -k /tmp" -l "$W/pg/log" -w start >/dev/null
trap 'as_pg "$PGBIN/pg_ctl" -D "$W/pg/data" -m immediate stop >/dev/null 2>&1' EXIT
for r in $(seq ${ROUNDS:-3}); do
for BIN in "$@"; do
  rm -rf "$W/data"; mkdir -p "$W/data"
  as_pg psql -q -h /tmp -p $PG_PORT -U postgres -c "DROP SCHEMA IF EXISTS tenant_bench CASCADE" >/dev/null 2>&1
  env OUTPOST_SITE__DATA_DIR="$W/data" OUTPOST_SITE__ID=storm OUTPOST_HTTP__LISTEN=127.0.0.1:28591 \
      OUTPOST_MQTT__LISTEN=127.0.0.1:28592 OUTPOST_MQTT__MAX_CONNECTS_PER_MINUTE=0 OUTPOST_MQTT__MAX_CONNECTIONS=5000 \
      OUTPOST_LIMITS__PER_SECOND=1000000 OUTPOST_LIMITS__PER_MINUTE=100000000 OUTPOST_LIMITS__PER_HOUR=1000000000 \
      OUTPOST_CENTRAL__URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres" OUTPOST_CENTRAL__TLS=disable \
      "$BIN" run > "$W/app.log" 2>&1 &
  PID=$!
  for _ in $(seq 100); do curl -sf http://127.0.0.1:28591/healthz >/dev/null && break; sleep 0.1; done
  echo "== round $r $BIN" >> "$OUT"
  OUTPOST_SITE__DATA_DIR="$W/data" "$BENCH" mqtt --port 28592 --devices 1000 --rate 5000 --duration 20s --no-raw --url http://127.0.0.1:28591 2>&1 | grep -E "latency|acked" >> "$OUT"
  kill $PID; wait $PID 2>/dev/null
done
done
