#!/usr/bin/env bash
# Checks the Debian packages built by `make deb`, for real, on this machine
# (needs root: it installs, removes and purges the amd64 package):
#   - lintian: no errors (warnings are printed);
#   - both: control fields and file list (dpkg-deb -I / -c);
#   - arm64: the packaged binary runs under qemu-aarch64-static (--version);
#   - amd64: dpkg -i; --version; the system user; the data dir's owner and
#     mode; the unit (ExecStart, systemd-analyze verify, enabled); the
#     conffile; the service runs as `outpost` on the installed config (by
#     systemd where it is PID 1, else started the way the unit starts it) and
#     a device can be added as the README says; dpkg -r keeps the data and
#     the user; dpkg -P removes both.
# Works with and without a running systemd. Any failed check stops the test
# with "FAIL: …" and a non-zero exit; the package is purged on the way out.
#
#   tests/deb/test_deb.sh DEB_DIR VERSION
set -euo pipefail

[ $# -eq 2 ] || { echo "usage: $0 DEB_DIR VERSION" >&2; exit 2; }
deb_dir=$1 version=$2
amd64=$deb_dir/outpost_${version}_amd64.deb
arm64=$deb_dir/outpost_${version}_arm64.deb

work=$(mktemp -d)
installed=0 pid=
fail() {
  echo "FAIL: $*" >&2
  [ -s "$work/run.log" ] && { echo "--- outpost log:" >&2; tail -20 "$work/run.log" >&2; }
  exit 1
}
ok() { echo "ok: $*"; }
# grep -q exits at the first match; under pipefail the writer then dies of
# SIGPIPE and the pipeline fails although the line was there. Read it all.
qgrep() { grep "$@" >/dev/null; }
cleanup() {
  local rc=$?
  [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null
  if [ "$installed" = 1 ] && dpkg-query -W outpost >/dev/null 2>&1; then
    echo "test-deb: purging the outpost package left installed by the failed test" >&2
    dpkg -P outpost >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
  [ $rc -eq 0 ] && echo "test-deb: all checks passed" || echo "test-deb: FAILED" >&2
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || fail "run as root (it installs and purges the package)"
for f in "$amd64" "$arm64"; do [ -f "$f" ] || fail "$f is missing; run make deb"; done
for tool in lintian dpkg-deb qemu-aarch64-static systemd-analyze runuser setpriv readelf; do
  command -v "$tool" >/dev/null || fail "$tool is missing (make test-deb installs it)"
done
if dpkg-query -W -f='${Status}' outpost 2>/dev/null | qgrep installed || getent passwd outpost >/dev/null ||
  [ -e /var/lib/outpost ]; then
  fail "this machine already has outpost (package, user or /var/lib/outpost); purge it first: dpkg -P outpost"
fi
systemd_running=0
[ -d /run/systemd/system ] && systemd_running=1
echo "test-deb: systemd is $([ $systemd_running = 1 ] && echo running || echo "not running (no /run/systemd/system)")"

# --- lintian: errors fail, warnings are shown.
for deb in "$amd64" "$arm64"; do
  out=$(lintian --fail-on error --tag-display-limit 0 "$deb" 2>&1) || { echo "$out" >&2; fail "lintian reports errors in $deb"; }
  [ -n "$out" ] && echo "$out" | sed 's/^/  lintian: /'
  ok "lintian: no errors in $(basename "$deb")"
done

# --- both packages: control fields and contents.
for arch in amd64 arm64; do
  deb=$deb_dir/outpost_${version}_${arch}.deb
  for field in "Package:outpost" "Version:$version" "Architecture:$arch"; do
    got=$(dpkg-deb -f "$deb" "${field%%:*}")
    [ "$got" = "${field#*:}" ] || fail "$deb: ${field%%:*} is '$got', want '${field#*:}'"
  done
  dpkg-deb -f "$deb" Depends | qgrep 'libc6 (>=' || fail "$deb: Depends lacks libc6: $(dpkg-deb -f "$deb" Depends)"
  dpkg-deb -I "$deb" | qgrep -w postinst || fail "$deb: no postinst"
  list=$(dpkg-deb -c "$deb")
  for path in ./usr/bin/outpost ./lib/systemd/system/outpost.service ./etc/outpost/outpost.toml \
    ./usr/share/doc/outpost/copyright ./usr/share/doc/outpost/changelog.gz ./usr/share/man/man1/outpost.1.gz; do
    echo "$list" | awk '{print $6}' | qgrep -x "$path" || fail "$deb does not contain $path"
  done
  echo "$list" | qgrep ' ./usr/bin/outpost$' && echo "$list" | grep ' ./usr/bin/outpost$' | qgrep '^-rwxr-xr-x root/root' ||
    fail "$deb: /usr/bin/outpost is not -rwxr-xr-x root/root"
  ok "$arch: control fields and contents"
done

# --- arm64: the packaged binary is aarch64 and runs under qemu.
dpkg-deb -x "$arm64" "$work/arm64"
readelf -h "$work/arm64/usr/bin/outpost" | qgrep 'AArch64' || fail "arm64 package: /usr/bin/outpost is not an AArch64 binary"
got=$(qemu-aarch64-static "$work/arm64/usr/bin/outpost" --version 2>&1) || fail "arm64 binary under qemu: $got"
[ "$got" = "outpost $version" ] || fail "arm64 binary under qemu printed '$got', want 'outpost $version'"
ok "arm64: qemu-aarch64-static outpost --version -> $got"
grep -qx 'ExecStart=/usr/bin/outpost run' "$work/arm64/lib/systemd/system/outpost.service" || fail "arm64 unit ExecStart"

# --- amd64: install.
installed=1
dpkg -i "$amd64" > "$work/dpkg-i.log" 2>&1 || { cat "$work/dpkg-i.log" >&2; fail "dpkg -i $amd64"; }
[ "$(dpkg-query -W -f='${Status}' outpost)" = "install ok installed" ] || fail "dpkg status after install: $(dpkg-query -W -f='${Status}' outpost)"
ok "dpkg -i $(basename "$amd64")"

got=$(/usr/bin/outpost --version) || fail "/usr/bin/outpost --version"
[ "$got" = "outpost $version" ] || fail "/usr/bin/outpost --version printed '$got'"
ok "/usr/bin/outpost --version -> $got"

IFS=: read -r _ _ uid gid _ home shell < <(getent passwd outpost) || fail "no user outpost after install"
[ "$uid" -lt 1000 ] || fail "user outpost has uid $uid: not a system user"
[ "$home" = /var/lib/outpost ] || fail "user outpost's home is $home, want /var/lib/outpost"
case $shell in */nologin | /bin/false) ;; *) fail "user outpost has login shell $shell" ;; esac
[ "$(getent group outpost | cut -d: -f3)" = "$gid" ] || fail "user outpost's primary group is not the group outpost"
ok "system user outpost (uid $uid, home $home, shell $shell)"

[ "$(stat -c '%U:%G %a' /var/lib/outpost)" = "outpost:outpost 700" ] ||
  fail "/var/lib/outpost is $(stat -c '%U:%G %a' /var/lib/outpost), want outpost:outpost 700"
ok "/var/lib/outpost is outpost:outpost 0700"

unit=/lib/systemd/system/outpost.service
[ -f "$unit" ] || fail "no $unit"
grep -qx 'ExecStart=/usr/bin/outpost run' "$unit" || fail "$unit: ExecStart is $(grep ^ExecStart "$unit")"
# Without a running systemd, verify cannot add the unit's dependency jobs;
# that line is about this machine, not the unit (as in make verify-unit).
out=$(systemd-analyze verify "$unit" 2>&1 | grep -v -e '^$' -e 'Cannot add dependency job' || true)
[ -z "$out" ] || { echo "$out" >&2; fail "systemd-analyze verify $unit"; }
ok "systemd-analyze verify $unit"
[ "$(readlink /etc/systemd/system/multi-user.target.wants/outpost.service)" = "$unit" ] ||
  fail "outpost.service is not enabled (no multi-user.target.wants symlink)"
ok "outpost.service enabled for multi-user.target"

conffiles=$(dpkg-query -W -f='${Conffiles}' outpost)
echo "$conffiles" | qgrep '^ /etc/outpost/outpost.toml [0-9a-f]\{32\}$' || fail "/etc/outpost/outpost.toml is not a conffile: '$conffiles'"
grep -qx 'data_dir = "/var/lib/outpost"' /etc/outpost/outpost.toml || fail "conffile data_dir is not /var/lib/outpost"
out=$(/usr/bin/outpost config check /etc/outpost/outpost.toml 2>&1) || fail "outpost config check: $out"
ok "conffile /etc/outpost/outpost.toml ($out)"

# --- the service runs as outpost on the installed config.
if [ $systemd_running = 1 ]; then
  for _ in $(seq 1 300); do
    systemctl is-active --quiet outpost && break
    sleep 0.1
  done
  systemctl is-active --quiet outpost || { journalctl -u outpost -n 30 --no-pager >&2 || true; fail "outpost.service is not active after install"; }
  ok "outpost.service is active"
else
  # As the unit runs it (user, config, environment), on loopback ports.
  setpriv --reuid=outpost --regid=outpost --init-groups env -i PATH=/usr/bin:/bin OUTPOST_CONFIG=/etc/outpost/outpost.toml \
    OUTPOST_SITE__DATA_DIR=/var/lib/outpost OUTPOST_HTTP__LISTEN=127.0.0.1:0 OUTPOST_MQTT__LISTEN=127.0.0.1:0 \
    /usr/bin/outpost run > /dev/null 2> "$work/run.log" &
  pid=$!
  for _ in $(seq 1 300); do
    grep -q 'http listening on' "$work/run.log" && break
    kill -0 "$pid" 2>/dev/null || fail "outpost run (as user outpost) exited during start"
    sleep 0.1
  done
  grep -q 'http listening on' "$work/run.log" || fail "outpost run (as user outpost) did not start in 30 s"
  ok "outpost run as user outpost on /etc/outpost/outpost.toml (no systemd: started like the unit)"
fi
token=$(cd / && runuser -u outpost -- /usr/bin/outpost --config /etc/outpost/outpost.toml device add --tenant acme --id pump-1 2>"$work/add.log") ||
  fail "device add as user outpost: $(cat "$work/add.log")"
[ "$(echo "$token" | tr -cd . | wc -c)" = 2 ] || fail "device add printed no token: $token"
ok "device add as the README says (token issued)"
# The doctor, as the README says; its data dir and secret checks must pass
# (ports may be taken by other programs on a test machine: not asserted).
(cd / && runuser -u outpost -- /usr/bin/outpost --config /etc/outpost/outpost.toml doctor > "$work/doctor.log" 2>&1) || true
for check in 'data dir' 'secret' 'config'; do
  grep -q "^ok    $check " "$work/doctor.log" || { cat "$work/doctor.log" >&2; fail "outpost doctor: '$check' is not ok"; }
done
ok "outpost doctor as user outpost: config, data dir and secret ok"
if [ -n "$pid" ]; then
  kill -TERM "$pid"
  wait "$pid" || fail "outpost run exited non-zero after SIGTERM"
  pid=
fi
for f in site-log.sqlite jwt.secret; do
  [ "$(stat -c %U "/var/lib/outpost/$f")" = outpost ] || fail "/var/lib/outpost/$f is owned by $(stat -c %U "/var/lib/outpost/$f")"
done
[ "$(stat -c %a /var/lib/outpost/jwt.secret)" = 600 ] || fail "jwt.secret has mode $(stat -c %a /var/lib/outpost/jwt.secret)"
ok "site log and jwt.secret (0600) owned by outpost"

# --- remove: binary and unit go, data, user and conffile stay.
dpkg -r outpost > "$work/dpkg-r.log" 2>&1 || { cat "$work/dpkg-r.log" >&2; fail "dpkg -r outpost"; }
[ "$(dpkg-query -W -f='${Status}' outpost)" = "deinstall ok config-files" ] || fail "status after dpkg -r: $(dpkg-query -W -f='${Status}' outpost)"
[ ! -e /usr/bin/outpost ] && [ ! -e "$unit" ] || fail "dpkg -r left /usr/bin/outpost or the unit"
[ -f /var/lib/outpost/site-log.sqlite ] || fail "dpkg -r deleted the data in /var/lib/outpost"
getent passwd outpost >/dev/null || fail "dpkg -r deleted the user outpost"
[ -f /etc/outpost/outpost.toml ] || fail "dpkg -r deleted the conffile"
if [ $systemd_running = 1 ]; then
  ! systemctl is-active --quiet outpost || fail "outpost.service still active after dpkg -r"
fi
ok "dpkg -r: program gone; /var/lib/outpost, the user and the conffile kept"

# --- purge: everything goes.
dpkg -P outpost > "$work/dpkg-p.log" 2>&1 || { cat "$work/dpkg-p.log" >&2; fail "dpkg -P outpost"; }
installed=0
! dpkg-query -W outpost >/dev/null 2>&1 || fail "dpkg still knows outpost after purge"
[ ! -e /var/lib/outpost ] || fail "dpkg -P left /var/lib/outpost"
! getent passwd outpost >/dev/null || fail "dpkg -P left the user outpost"
! getent group outpost >/dev/null || fail "dpkg -P left the group outpost"
[ ! -e /etc/outpost/outpost.toml ] || fail "dpkg -P left /etc/outpost/outpost.toml"
[ ! -L /etc/systemd/system/multi-user.target.wants/outpost.service ] || fail "dpkg -P left the enablement symlink"
ok "dpkg -P: data, user, group, conffile and enablement gone"
