#!/usr/bin/env bash
# schemathesis (`--checks all`, every phase, fixed seed and example count)
# against a real appliance, driven by its served OpenAPI document, which is
# first validated as OpenAPI 3.1. Usage: tests/api/run.sh [outpost binary].
# Env: ST_EXAMPLES (default 100 per operation), ST=path to the st CLI.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${1:-target/debug/outpost}
ST=${ST:-target/schemathesis-venv/bin/st}
PY=$(dirname "$ST")/python
EXAMPLES=${ST_EXAMPLES:-100}
work=$(mktemp -d /tmp/outpost-api.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export OUTPOST_SITE__DATA_DIR=$work/data OUTPOST_SITE__ID=api-test
export OUTPOST_HTTP__LISTEN=127.0.0.1:$port OUTPOST_MQTT__LISTEN=127.0.0.1:0
# schemathesis sends hundreds of requests a second from one device.
export OUTPOST_LIMITS__PER_SECOND=1000000 OUTPOST_LIMITS__PER_MINUTE=100000000 OUTPOST_LIMITS__PER_HOUR=1000000000
# Any RFC 3339 timestamp the document allows (years 0001-9999) is within
# reach: the default bounds (30 days back, 1 h ahead of the receive time)
# are relative to now, which a schema cannot state; tests/fair_shares.rs
# proves them.
export OUTPOST_LIMITS__MAX_EVENT_AGE=3200000days OUTPOST_LIMITS__MAX_FUTURE_SKEW=3200000days
export DEVICE_TOKEN ADMIN_TOKEN
DEVICE_TOKEN=$("$BIN" device add --tenant acme --id st-device --perm write_events --perm read_events --perm read_config)
ADMIN_TOKEN=$("$BIN" token issue --admin)
"$BIN" run > "$work/appliance.log" 2>&1 &
pid=$!
cleanup() {
  kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  if [ "${KEEP:-}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
base=http://127.0.0.1:$port
for _ in $(seq 200); do curl -sf "$base/healthz" >/dev/null && break; sleep 0.05; done
curl -sf "$base/api/v1/openapi.json" > "$work/openapi.json"
"$PY" -c 'import json, sys; from openapi_spec_validator import validate; validate(json.load(open(sys.argv[1]))); print("openapi.json: valid OpenAPI 3.1")' "$work/openapi.json"
mkdir -p target/schemathesis
# Every operation, the WebSocket routes too (a plain GET to them is a
# request like any other: 426, or 400 for a bad parameter); only the
# endless SSE streams are left out (tests/stream.rs and tests/status_page.rs
# cover them, as tests/mqtt*.rs and tests/stream.rs cover the upgrades).
HYPOTHESIS_STORAGE_DIRECTORY=target/schemathesis/hypothesis \
"$ST" --config-file tests/api/schemathesis.toml run "$base/api/v1/openapi.json" \
  --checks all --phases examples,coverage,fuzzing,stateful --max-examples "$EXAMPLES" \
  --exclude-operation-id streamSse --exclude-operation-id statusFeed \
  --no-color
