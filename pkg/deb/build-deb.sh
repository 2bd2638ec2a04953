#!/bin/bash
# Builds outpost_<version>_<arch>.deb from an already built binary, with plain
# dpkg-deb from a staged tree (no cargo-deb: nothing extra to compile, and the
# cross-built aarch64 binary is packaged exactly as `make aarch64` left it).
#
#   pkg/deb/build-deb.sh ARCH BINARY OUTDIR
#
# ARCH is the Debian architecture (amd64, arm64). The man page is generated
# with help2man from HELP_BIN (default: BINARY), which must run on this
# machine; the help text is the same on every architecture.
# DEB_MAINTAINER overrides the Maintainer field.
set -euo pipefail

die() { echo "build-deb: $*" >&2; exit 1; }

[ $# -eq 3 ] || die "usage: $0 ARCH BINARY OUTDIR"
arch=$1 bin=$2 out=$3
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
help_bin=${HELP_BIN:-$bin}
maintainer=${DEB_MAINTAINER:-outpost maintainers <outpost@example.org>}

case $arch in
  amd64) elf_machine="X86-64" ;;
  arm64) elf_machine="AArch64" ;;
  *) die "unsupported architecture $arch (amd64 or arm64)" ;;
esac
[ -x "$bin" ] || die "no executable at $bin (build it first)"
machine=$(readelf -h "$bin" | sed -n 's/^ *Machine: *//p')
case $machine in
  *"$elf_machine"*) ;;
  *) die "$bin is a \"$machine\" binary, not $arch" ;;
esac
for tool in dpkg-deb dpkg-shlibdeps help2man gzip readelf; do
  command -v "$tool" >/dev/null || die "$tool is missing (apt-get install dpkg-dev help2man binutils)"
done

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/Cargo.toml" | head -n1)
[ -n "$version" ] || die "no version in $root/Cargo.toml"
# Reproducible dates: the last commit's, else now.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$root" log -1 --format=%ct 2>/dev/null || date +%s)}
commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)

mkdir -p "$out"
stage=$(mktemp -d "${TMPDIR:-/tmp}/outpost-deb.XXXXXX")
trap 'rm -rf "$stage"' EXIT
pkg=$stage/root
doc=$pkg/usr/share/doc/outpost
install -d -m 0755 "$pkg/DEBIAN" "$pkg/usr/bin" "$pkg/lib/systemd/system" "$pkg/etc/outpost" \
  "$doc" "$pkg/usr/share/man/man1"

install -m 0755 "$bin" "$pkg/usr/bin/outpost"

# The unit, pointed at /usr/bin; every other line as in systemd/outpost.service.
sed -e 's|^ExecStart=/usr/local/bin/outpost run$|ExecStart=/usr/bin/outpost run|' \
    -e 's|^# outpost edge event appliance\. Install with `make install`.*|# outpost edge event appliance, installed by the outpost Debian package|' \
    -e 's|^# `outpost` user, /etc/outpost/outpost.toml with data_dir=/var/lib/outpost)\.$|# (user `outpost`, /etc/outpost/outpost.toml, data in /var/lib/outpost).|' \
    -e '/^Description=/a Documentation=man:outpost(1)' \
    "$root/systemd/outpost.service" > "$pkg/lib/systemd/system/outpost.service"
chmod 0644 "$pkg/lib/systemd/system/outpost.service"
grep -qx 'ExecStart=/usr/bin/outpost run' "$pkg/lib/systemd/system/outpost.service" ||
  die "systemd/outpost.service has no 'ExecStart=/usr/local/bin/outpost run' line to rewrite"
! grep -q /usr/local "$pkg/lib/systemd/system/outpost.service" ||
  die "the packaged unit still mentions /usr/local"

# The conffile: the annotated defaults with the data in /var/lib/outpost.
sed 's|^data_dir = "./data"$|data_dir = "/var/lib/outpost"|' "$root/config/outpost.toml" > "$pkg/etc/outpost/outpost.toml"
chmod 0644 "$pkg/etc/outpost/outpost.toml"
grep -qx 'data_dir = "/var/lib/outpost"' "$pkg/etc/outpost/outpost.toml" ||
  die "config/outpost.toml has no 'data_dir = \"./data\"' line to rewrite"
echo /etc/outpost/outpost.toml > "$pkg/DEBIAN/conffiles"

# Documentation: copyright, changelog (native package: changelog.gz), README.
install -m 0644 "$here/copyright" "$doc/copyright"
{
  echo "outpost ($version) unstable; urgency=medium"
  echo
  echo "  * Release $version (git $commit). See README.md for what it does."
  echo
  echo " -- $maintainer  $(date -u -R -d "@$SOURCE_DATE_EPOCH")"
} > "$stage/changelog"
gzip -9n < "$stage/changelog" > "$doc/changelog.gz"
gzip -9n < "$root/README.md" > "$doc/README.md.gz"
chmod 0644 "$doc/changelog.gz" "$doc/README.md.gz"

# Man page from --help (every subcommand has its own --help).
env -u OUTPOST_CONFIG help2man --no-info --section 1 --name "durable event ingest for edge sites" \
  --include "$here/outpost.h2m" --output "$stage/outpost.1" "$help_bin" ||
  die "help2man failed on $help_bin"
gzip -9n < "$stage/outpost.1" > "$pkg/usr/share/man/man1/outpost.1.gz"
chmod 0644 "$pkg/usr/share/man/man1/outpost.1.gz"

install -m 0755 "$here/postinst" "$here/prerm" "$here/postrm" "$pkg/DEBIAN/"

# Shared-library dependencies as debhelper computes them (dpkg-shlibdeps
# reads the ELF's NEEDED entries and the libraries' symbols files; for
# arm64 those of libc6:arm64, installed with the cross toolchain).
mkdir -p "$stage/src/debian"
printf 'Source: outpost\n\nPackage: outpost\nArchitecture: any\n' > "$stage/src/debian/control"
shlibs=$(cd "$stage/src" && DEB_HOST_ARCH=$arch dpkg-shlibdeps -O -e"$pkg/usr/bin/outpost" 2>"$stage/shlibdeps.err" |
  sed -n 's/^shlibs:Depends=//p') || { cat "$stage/shlibdeps.err" >&2; die "dpkg-shlibdeps failed for $arch"; }
[ -n "$shlibs" ] || { cat "$stage/shlibdeps.err" >&2; die "dpkg-shlibdeps found no dependencies for $arch"; }

installed_size=$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
cat > "$pkg/DEBIAN/control" <<EOF
Package: outpost
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $installed_size
Depends: $shlibs, adduser
Section: net
Priority: optional
Description: durable event ingest appliance for edge sites
 outpost takes events from field devices over HTTP, MQTT and WebSocket,
 authenticates them with JWT device tokens, rate-limits them and commits
 each one to a local SQLite log before acknowledging it, so an uplink
 outage, a crash or a power cut loses nothing that was acknowledged.
 .
 The log is forwarded in batches to a central PostgreSQL database, exactly
 once and in per-device order. Dashboards and devices subscribe to live
 streams over WebSocket, Server-Sent Events, long-poll and MQTT.
 .
 This package runs it as the systemd service outpost.service under the
 system user outpost, configured by /etc/outpost/outpost.toml, with its
 data in /var/lib/outpost.
EOF

(cd "$pkg" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | LC_ALL=C sort -z | xargs -0 md5sum) > "$pkg/DEBIAN/md5sums"
chmod 0644 "$pkg/DEBIAN/control" "$pkg/DEBIAN/conffiles" "$pkg/DEBIAN/md5sums"

deb=$out/outpost_${version}_${arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$pkg" "$deb" >/dev/null
echo "$deb"
