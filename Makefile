# outpost — build, run, test.
#   make run      run the appliance on its built-in defaults (data in ./data)
#   make test     install what the tests need if missing, then run every test
#   make aarch64  stripped release binary for aarch64 boxes
#   make bench    the outpost-bench load generators (target/release/outpost-bench)
#   make bench-fleet  N = 10, 25, 50 appliances against one PostgreSQL (docs/scaling.md)
#   make bench-fleet-sim  N = 50, 200, 1,000 sites in one process (docs/scaling.md)
#   make install  install binary, config and systemd unit on this machine
#   make deb      target/debian/outpost_<version>_{amd64,arm64}.deb
#   make test-deb check both packages (lintian, install/remove/purge; needs root)
#   make test-powercut  power cuts of a VM running the appliance (CUTS=20)
#   make test-chaos     SIGKILL loop + central crashes under mixed load (KILLS=100 EVENTS=100000)
#   make test-soak      one hour at 2,000 ev/s with 200 subscribers: RSS drift and fds (reported, not in CI)
#   make test-network   kernel network faults (blackhole, loss+delay, 1 Mbit/s, RSTs) under ingest; 10 MB drain
#   make test-failover  central fails over to an asynchronous standby: nothing acked is lost (needs root)
#   make test-browser  the status page in headless Chromium (screenshots in target/browser/)
#   make test-api  schemathesis against a running appliance, from its OpenAPI document (ST_EXAMPLES=100)
#   make fuzz     run every fuzz target for FUZZ_SECONDS (default 60) each; fails on a crash

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
CARGO ?= cargo
AARCH64 := aarch64-unknown-linux-gnu
CROSS_TARGET_DIR := target/cross
AARCH64_BIN := $(CROSS_TARGET_DIR)/$(AARCH64)/release/outpost
PREFIX ?= /usr/local
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Debian packages the tests use: PostgreSQL server binaries and PgBouncer, MQTT client
# tools, systemd-analyze, and the aarch64 cross toolchain + qemu for the smoke run.
TEST_PKGS := postgresql pgbouncer mosquitto-clients python3-paho-mqtt python3-websockets python3-venv systemd curl file openssl
# Debian ships paho-mqtt 1.6; the MQTT interop tests also drive paho-mqtt 2.x
# (both protocol versions, and its WebSocket transport), from PyPI, in a venv.
PAHO2_VENV := target/pyenv-paho2
PAHO2_VERSION := 2.1.0
# The HTTP API fuzzed from its OpenAPI document: schemathesis from PyPI, in a venv.
ST_VENV := target/schemathesis-venv
ST_VERSION := 4.32.5
OPENAPI_VALIDATOR_VERSION := 0.9.0
# The proofs: a VM with a disk that forgets unflushed writes (power cuts), and
# the kill loop against a real PostgreSQL.
POWERCUT_PKGS := qemu-system-x86 nbdkit busybox-static linux-image-cloud-amd64 cpio e2fsprogs kmod python3-paho-mqtt curl
CHAOS_PKGS := postgresql python3-paho-mqtt python3-websockets
NETWORK_PKGS := postgresql python3-paho-mqtt python3-websockets iproute2 nftables
CROSS_PKGS := rustc-web cargo-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static
# $(call apt_install,PACKAGES,WHAT[,BEFORE]): installs those of PACKAGES not
# installed, saying "WHAT: <them>", running BEFORE first (only then). A
# package removed with its configuration left (dpkg state "rc", which
# `dpkg -s` accepts) counts as missing: its programs are gone.
apt_install = missing=""; \
	for p in $(1); do [ "$$(dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null)" = "install ok installed" ] || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "$(2):$$missing"; \
	  $(3) \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

.PHONY: debug-bin run build release test test-deps paho2 schemathesis-deps test-api cross-deps unit-tests verify-unit aarch64 cross-build smoke-aarch64 install bench bench-fleet bench-fleet-sim clean
.PHONY: deb deb-deps test-deb test-powercut test-chaos test-soak test-network test-failover powercut-deps chaos-deps network-deps test-browser fuzz

run:
	$(CARGO) run --release -- run

build:
	$(CARGO) build

# target/debug/outpost for the black-box targets. `cargo test` (unit-tests)
# builds it too, with the dev-dependencies' features; `cargo build` would
# rebuild it with its own (about a minute on 2 cores), so it runs only when
# the binary is missing or older than a source.
debug-bin:
	@if [ ! -x target/debug/outpost ] || [ -n "$$(find src migrations Cargo.toml Cargo.lock -newer target/debug/outpost -print -quit)" ]; then \
	  $(CARGO) build; \
	fi

release:
	$(CARGO) build --release

# The aarch64 smoke build starts first, at nice 19, beside the native build
# and the tests: it takes only the CPU they leave idle (on a fresh 2-core
# machine the two builds one after the other were 8 of make test's 15.5
# minutes). Its output is in $(SMOKE_LOG), shown if it fails; a failed test
# stops it (it runs in its own process group). Not setsid: a new session is
# a new scheduler autogroup, which shares the CPU evenly whatever the nice
# (the native build took 8.5 minutes instead of 3.7 that way).
SMOKE_LOG := $(CROSS_TARGET_DIR)/smoke-build.log
test: test-deps
	@mkdir -p $(CROSS_TARGET_DIR); \
	perl -e 'setpgrp; exec @ARGV' nice -n 19 $(MAKE) --no-print-directory cross-build PROFILE=smoke >$(SMOKE_LOG) 2>&1 & smoke=$$!; \
	trap 'kill -- -$$smoke $$smoke 2>/dev/null || true' EXIT; \
	echo "aarch64 smoke build started in the background at nice 19 (log: $(SMOKE_LOG))"; \
	$(MAKE) --no-print-directory unit-tests verify-unit test-api test-browser; \
	if ! wait $$smoke; then tail -40 $(SMOKE_LOG); echo "aarch64 smoke build: FAILED (log: $(SMOKE_LOG))"; exit 1; fi; \
	trap - EXIT; \
	grep -h "Finished" $(SMOKE_LOG) || true; \
	bash tests/aarch64_smoke.sh $(CROSS_TARGET_DIR)/$(AARCH64)/smoke/outpost

unit-tests:
	$(CARGO) test --all-targets 2>&1

# Installs only what is missing, so a prepared machine runs no apt at all.
test-deps:
	@$(call apt_install,$(TEST_PKGS),installing test dependencies)
	@$(MAKE) --no-print-directory cross-deps paho2 schemathesis-deps

paho2:
	@if ! $(PAHO2_VENV)/bin/python -c 'import paho.mqtt, sys; sys.exit(not paho.mqtt.__version__.startswith("2."))' 2>/dev/null; then \
	  echo "installing paho-mqtt $(PAHO2_VERSION) into $(PAHO2_VENV)"; \
	  python3 -m venv $(PAHO2_VENV) && $(PAHO2_VENV)/bin/pip install -q paho-mqtt==$(PAHO2_VERSION); \
	fi

schemathesis-deps:
	@if ! $(ST_VENV)/bin/python -c 'import importlib.metadata as m, sys; sys.exit(m.version("schemathesis") != "$(ST_VERSION)" or m.version("openapi-spec-validator") != "$(OPENAPI_VALIDATOR_VERSION)")' 2>/dev/null; then \
	  echo "installing schemathesis $(ST_VERSION) into $(ST_VENV)"; \
	  python3 -m venv --clear $(ST_VENV) && $(ST_VENV)/bin/pip install -q --disable-pip-version-check \
	    schemathesis==$(ST_VERSION) openapi-spec-validator==$(OPENAPI_VALIDATOR_VERSION); \
	fi

# The API contract: the served OpenAPI document validates as OpenAPI 3.1, and
# schemathesis (--checks all, every phase, fixed seed) finds 0 failures.
test-api: debug-bin schemathesis-deps
	ST=$(ST_VENV)/bin/st tests/api/run.sh target/debug/outpost

cross-deps:
	@if command -v cross >/dev/null && { docker info >/dev/null 2>&1 || podman info >/dev/null 2>&1; }; then exit 0; fi; \
	$(call apt_install,$(CROSS_PKGS),installing the aarch64 cross toolchain,dpkg --print-foreign-architectures | grep -qx arm64 || $(SUDO) dpkg --add-architecture arm64;)

# Installs only what is missing (same as test-deps).
powercut-deps chaos-deps network-deps:
	@$(call apt_install,$(if $(filter powercut-deps,$@),$(POWERCUT_PKGS),$(if $(filter network-deps,$@),$(NETWORK_PKGS),$(CHAOS_PKGS))),installing)

# Power cuts of a VM running the appliance; the site log on a virtual disk
# that loses unflushed writes. Self-test first. CUTS=K sets the count.
# Needs root (runs qemu, nbdkit, debugfs on images it builds in target/powercut/).
test-powercut: release powercut-deps
	/usr/bin/python3 tests/powercut/powercut.py

# SIGKILL loop of the appliance + central PostgreSQL crashes under mixed
# MQTT/HTTP/WebSocket load. KILLS=, EVENTS=, PG_RESTARTS= override.
test-chaos: release chaos-deps
	/usr/bin/python3 tests/chaos/chaos.py

# The soak: an hour of mixed ingest at 2,000 ev/s with 200 stream
# subscribers; RSS drift after warm-up < 5 MB, no fd growth, nothing lost.
# Reported in notes, not run by .ci/run (it takes an hour).
test-soak: release chaos-deps
	/usr/bin/python3 tests/soak/soak.py

# Network faults with the real kernel (namespace + veth to central;
# nftables blackhole, loss and resets; tbf; a delaying proxy) under steady
# ingest, then the 10 MB backlog drained over 1 Mbit/s through the test
# fault proxy (batches halve on timeouts).
test-network: release network-deps
	/usr/bin/python3 tests/network/netfaults.py
	$(CARGO) test --test forward -- --ignored --nocapture 2>&1

# A real primary and streaming standby; replication cut with nftables while
# batches commit, the primary killed, the standby promoted (tests/failover.rs).
test-failover: network-deps
	$(CARGO) test --test failover -- --ignored --test-threads=1 2>&1

# The unit must pass systemd-analyze verify (with ExecStart pointed at a real binary).
verify-unit: debug-bin
	@tmp=$$(mktemp -d); \
	sed "s|^ExecStart=/usr/local/bin/outpost|ExecStart=$$PWD/target/debug/outpost|" systemd/outpost.service > $$tmp/outpost.service; \
	out=$$(systemd-analyze verify $$tmp/outpost.service 2>&1 | grep -v -e "^$$" -e "Failed to resolve user" -e "Cannot add dependency job" || true); \
	rm -rf $$tmp; \
	if [ -n "$$out" ]; then echo "$$out"; echo "systemd-analyze verify: FAILED"; exit 1; fi; \
	echo "systemd-analyze verify systemd/outpost.service: ok"

# With cross-rs where a container engine exists; otherwise Debian's arm64 std
# and cross gcc (cross.toml stays the config for cross-rs users).
aarch64:
	@$(MAKE) --no-print-directory cross-build PROFILE=release
	@aarch64-linux-gnu-strip $(AARCH64_BIN) 2>/dev/null || true
	@file $(AARCH64_BIN) 2>/dev/null || true

# PROFILE=release (the shipped binary) or smoke (make test's qemu run).
cross-build:
	@if command -v cross >/dev/null && { docker info >/dev/null 2>&1 || podman info >/dev/null 2>&1; }; then \
	  cross build --profile $(PROFILE) --target $(AARCH64) --target-dir $(CROSS_TARGET_DIR); \
	else \
	  $(MAKE) --no-print-directory cross-deps; \
	  RUSTC=/usr/bin/rustc \
	  CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
	  CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc \
	  AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar \
	  /usr/bin/cargo build --profile $(PROFILE) --locked --target $(AARCH64) --target-dir $(CROSS_TARGET_DIR); \
	fi

# The aarch64 build of the smoke profile (unoptimised: a third of the cold
# release cross build) under qemu; the release binary is `make aarch64`'s.
smoke-aarch64:
	@$(MAKE) --no-print-directory cross-build PROFILE=smoke
	bash tests/aarch64_smoke.sh $(CROSS_TARGET_DIR)/$(AARCH64)/smoke/outpost

install: release
	id outpost >/dev/null 2>&1 || $(SUDO) useradd --system --home-dir /var/lib/outpost --shell /usr/sbin/nologin outpost
	$(SUDO) install -m 0755 target/release/outpost $(PREFIX)/bin/outpost
	$(SUDO) install -d -m 0755 /etc/outpost
	[ -e /etc/outpost/outpost.toml ] || sed 's|^data_dir = "./data"|data_dir = "/var/lib/outpost"|' config/outpost.toml | $(SUDO) tee /etc/outpost/outpost.toml >/dev/null
	$(SUDO) install -m 0644 systemd/outpost.service /etc/systemd/system/outpost.service
	$(SUDO) systemctl daemon-reload
	@echo "installed; start with: sudo systemctl enable --now outpost"

# The status page in headless Chromium against the real binary: values
# match /api/v1/status, an MQTT publish shows up live, screenshots at 360 px
# and 1280 px in target/browser/. Debian's chromium; no browser download.
BROWSER_PKGS := chromium mosquitto-clients python3-websockets

test-browser: debug-bin
	@$(call apt_install,$(BROWSER_PKGS),installing browser test dependencies)
	/usr/bin/python3 tests/browser/status_page.py target/debug/outpost

# Debian packages, built with dpkg-deb from a staged tree (pkg/deb/build-deb.sh).
VERSION := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' Cargo.toml | head -n1)
DEB_DIR := target/debian
DEB_PKGS := dpkg-dev help2man binutils lintian qemu-user-static systemd util-linux

deb-deps:
	@$(call apt_install,$(DEB_PKGS),installing packaging tools)

deb: deb-deps release aarch64
	bash pkg/deb/build-deb.sh amd64 target/release/outpost $(DEB_DIR)
	HELP_BIN=target/release/outpost bash pkg/deb/build-deb.sh arm64 $(AARCH64_BIN) $(DEB_DIR)

test-deb: deb
	$(SUDO) bash tests/deb/test_deb.sh $(DEB_DIR) $(VERSION)

# The load generators are their own binary (feature `bench`), never in the product.
# The fleet bench (issue #14): one row per N, numbers for docs/scaling.md.
FLEET_SITES ?= 10 25 50
bench-fleet: release chaos-deps
	@for n in $(FLEET_SITES); do /usr/bin/python3 tests/bench/fleet.py --sites $$n || exit 1; done

# The in-process fleet (issue #30): N = 50, 200, 1,000 sites in one process,
# about 1,000 ev/s in all (20, 5 and 1 ev/s a site), a subscriber at every
# 5th site, ~50 sites per tenant. Numbers for docs/scaling.md.
bench-fleet-sim: bench chaos-deps
	@BATCH_WAIT=100ms /usr/bin/python3 tests/bench/fleet.py --in-process --sites 50 --rate 20
	@BATCH_WAIT=100ms /usr/bin/python3 tests/bench/fleet.py --in-process --sites 200 --tenants 4 --rate 5
	@BATCH_WAIT=100ms /usr/bin/python3 tests/bench/fleet.py --in-process --sites 1000 --tenants 20 --rate 1

bench: release
	$(CARGO) build --release --features bench --bin outpost-bench
	@echo "start the appliance with raised limits, e.g.:"
	@echo "  OUTPOST_LIMITS__PER_SECOND=1000000 OUTPOST_LIMITS__PER_MINUTE=100000000 OUTPOST_LIMITS__PER_HOUR=1000000000 target/release/outpost run"
	@echo "then: target/release/outpost-bench http --devices 64 --batch 100"
	@echo "  or: target/release/outpost-bench mqtt --devices 100 --compare --rounds 3"

clean:
	$(CARGO) clean

# Fuzzing (fuzz/, cargo-fuzz on the stable toolchain via RUSTC_BOOTSTRAP).
# Each target starts from the committed seeds (fuzz/corpus/<t>) plus what
# earlier runs found (target/fuzz-corpus/<t>, where new inputs are written);
# crashes land in fuzz/artifacts/<t>/. No sanitizer: the code is safe Rust
# (bundled SQLite aside) and speed buys executions.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= event_json batch config token mqtt_session
FUZZ := RUSTC_BOOTSTRAP=1 $(CARGO) fuzz
FUZZ_FLAGS := --sanitizer none

fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install --locked cargo-fuzz
	$(FUZZ) build $(FUZZ_FLAGS)
	@mkdir -p target/fuzz-logs; failed=""; summary=""; start=$$(date +%s); \
	for t in $(FUZZ_TARGETS); do \
	  mkdir -p target/fuzz-corpus/$$t; \
	  echo "fuzz $$t: $(FUZZ_SECONDS) s (log target/fuzz-logs/$$t.log)"; \
	  if $(FUZZ) run $(FUZZ_FLAGS) $$t target/fuzz-corpus/$$t fuzz/corpus/$$t -- \
	       -max_total_time=$(FUZZ_SECONDS) -timeout=20 -print_final_stats=1 > target/fuzz-logs/$$t.log 2>&1; then \
	    status=ok; \
	  else \
	    status=CRASH; failed="$$failed $$t"; \
	    grep -E "panicked|ERROR: libFuzzer|SUMMARY|Test unit written|artifact" target/fuzz-logs/$$t.log | head -n 20 || true; \
	  fi; \
	  rm -rf /dev/shm/outpost-fuzz-* 2>/dev/null || true; \
	  execs=$$(sed -n 's/^stat::number_of_executed_units: *//p' target/fuzz-logs/$$t.log | tail -n1); \
	  done_line=$$(grep -E '^#[0-9]+[[:space:]]+DONE' target/fuzz-logs/$$t.log | tail -n1 || true); \
	  summary="$$summary$$(printf '%-14s %-5s executions: %-12s %s' $$t $$status "$${execs:-?}" "$$done_line")\n"; \
	done; \
	printf '\nfuzz summary (%s s):\n%b' "$$(( $$(date +%s) - start ))" "$$summary"; \
	if [ -n "$$failed" ]; then echo "fuzz: crashes in:$$failed (inputs under fuzz/artifacts/)"; exit 1; fi
