# Two commands do all the set-up on a fresh Debian machine (run as root):
#   make demo   local registry + containerd + our daemon, lazy pull of an eStargz image, run it
#   make test   install what the tests need, then run every test (unit + integration)
SHELL := /bin/bash
CARGO ?= cargo
APT_PACKAGES := containerd docker-registry fuse3 skopeo stargz-snapshotter runc debootstrap \
	iproute2 curl jq golang-github-containerd-containerd-dev prometheus

.PHONY: all build release deps test test-unit clippy demo bench fuzz clean

all: build

# Installs the real parts the tests and the demo use (containerd 1.6, registry, runc, Go's
# ctr-remote as an interop peer, Prometheus for the metrics test). Idempotent: does nothing when everything is there.
deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi
	@modprobe fuse 2>/dev/null || true; modprobe overlay 2>/dev/null || true

build:
	$(CARGO) build --bins

release:
	$(CARGO) build --release --bins

# The test command (CI runs it through .ci/run). Integration tests need root and /dev/fuse.
test: deps
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) build --bins
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --no-fail-fast; \
	else \
		$(CARGO) test --no-fail-fast; \
	fi

test-unit:
	$(CARGO) test --lib

clippy:
	$(CARGO) clippy --all-targets -- -D warnings

demo: deps release
	bash scripts/demo.sh

bench: deps release
	bash scripts/bench.sh

# Fuzzing: the stable driver (seed corpus plus generated and mutated inputs) always; with a nightly
# toolchain and cargo-fuzz installed, also 60 s of libFuzzer on each target in fuzz/.
fuzz:
	$(CARGO) test --test estargz_fuzz
	@if $(CARGO) +nightly fuzz --version >/dev/null 2>&1; then \
		cd fuzz && for t in footer toc toc_member open_blob; do \
			$(CARGO) +nightly fuzz run $$t -- -max_total_time=60 || exit 1; \
		done; \
	else \
		echo "fuzz: no nightly toolchain with cargo-fuzz: ran only the stable driver (tests/estargz_fuzz.rs)"; \
	fi

clean:
	$(CARGO) clean
