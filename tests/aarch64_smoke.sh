#!/usr/bin/env bash
# Smoke check of the aarch64 binary under qemu-user: --version, then start,
# register a device, ingest an event, read it back, SIGTERM, exit 0.
set -euo pipefail
bin=$(realpath "$1")
qemu=(qemu-aarch64-static)
work=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
fail() { echo "aarch64 smoke: FAILED: $*"; [ -f "$work/run.log" ] && tail -20 "$work/run.log"; exit 1; }

file "$bin" | grep "ARM aarch64" >/dev/null || fail "$bin is not an aarch64 binary"
"${qemu[@]}" "$bin" --version | grep "^outpost " >/dev/null || fail "--version"

export OUTPOST_SITE__DATA_DIR="$work/data" OUTPOST_HTTP__LISTEN=127.0.0.1:0 OUTPOST_MQTT__LISTEN=127.0.0.1:0 NO_COLOR=1
"${qemu[@]}" "$bin" run >"$work/run.log" 2>&1 &
pid=$!
addr=
for _ in $(seq 1 600); do
  addr=$(grep -o 'http listening on [0-9.:]*' "$work/run.log" | awk '{print $4}' || true)
  [ -n "$addr" ] && break
  kill -0 "$pid" 2>/dev/null || fail "appliance exited during start"
  sleep 0.1
done
[ -n "$addr" ] || fail "no listening line in 60 s"
token=$("${qemu[@]}" "$bin" device add --tenant acme --id smoke-1 2>/dev/null)
code=
for _ in $(seq 1 100); do   # the running appliance picks up the new device within ~1 s
  code=$(curl -s -o "$work/post.json" -w '%{http_code}' -X POST "http://$addr/api/v1/realtime/acme/event" -H 'Content-Type: application/json' \
    -H "Authorization: Bearer $token" -d '{"device_id":"smoke-1","event_type":"smoke","payload":{"ok":true}}')
  [ "$code" = 201 ] && break
  sleep 0.1
done
[ "$code" = 201 ] || fail "POST event answered $code: $(cat "$work/post.json")"
curl -s "http://$addr/api/v1/realtime/acme/events" -H "Authorization: Bearer $token" | grep '"smoke-1"' >/dev/null || fail "event not readable"
mqtt=$(grep -o 'mqtt listening on [0-9.:]*' "$work/run.log" | awk '{print $4}' || true)
[ -n "$mqtt" ] || fail "no mqtt listening line"
mosquitto_pub -h "${mqtt%:*}" -p "${mqtt##*:}" -i smoke-1 -u smoke-1 -P "$token" -q 1 \
  -t acme/devices/smoke-1/events/mqtt.smoke -m '{"via":"mqtt"}' || fail "MQTT QoS 1 publish not acked"
curl -s "http://$addr/api/v1/realtime/acme/events?event_type=mqtt.smoke" -H "Authorization: Bearer $token" \
  | grep '"via":"mqtt"' >/dev/null || fail "MQTT event not stored"
kill -TERM "$pid"
wait "$pid" && status=0 || status=$?
pid=
[ "$status" = 0 ] || fail "exit status $status after SIGTERM"
echo "aarch64 smoke: ok ($(file -b "$bin" | cut -d, -f1-2); $(stat -c %s "$bin") bytes)"
