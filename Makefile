GO ?= go

.PHONY: all build demo scale plan test bench bench-proxy

all: build

build:
	$(GO) build ./...

# demo runs examples/local-fleet: the balena API (in memory), the VPN server
# (two OpenVPN instances behind HAProxy, the CONNECT proxy) and simulated
# devices, each a real openvpn client in a network namespace of its own;
# it fetches every device's page through the proxy, prints what it found and
# stays up until Ctrl-C. It needs root, and installs openvpn, haproxy and
# iproute2 when they are missing. DEMO_FLAGS go to local-fleet, e.g.
# make demo DEMO_FLAGS="-devices 20" or DEMO_FLAGS=-once.
DEMO_FLAGS ?=
DEMO_PACKAGES = openvpn haproxy iproute2

demo:
	@if [ "$$(id -u)" != 0 ]; then \
		echo "make demo needs root (network namespaces and tun devices): run it as root, e.g. sudo make demo"; exit 1; \
	fi
	@for c in openvpn haproxy ip; do command -v $$c >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then \
		echo "installing $(DEMO_PACKAGES)…"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(DEMO_PACKAGES) >/dev/null; \
	fi
	$(GO) build -o bin/local-fleet ./examples/local-fleet
	./bin/local-fleet $(DEMO_FLAGS)

# scale runs the 500-device check on this machine: two hosts, every
# device reached through both proxies, host 2 killed and every device back
# and reached, the whole fleet in a memory cgroup limited to 4 GiB; it
# prints the figures and fails when a device was not reached or a target
# was missed (README, Large fleets). It needs root and about 1.3 GiB of
# memory; it is not part of .ci/run.
SCALE_FLAGS ?= -devices 500 -hosts 2 -kill-host 2 -memory-limit 4GiB
scale:
	@if [ "$$(id -u)" != 0 ]; then echo "make scale needs root"; exit 1; fi
	$(GO) build -o bin/local-fleet ./examples/local-fleet
	./bin/local-fleet -once $(SCALE_FLAGS)

# plan prints the address and port plan that the environment configures;
# with no VPN_BASE_SUBNET set it uses the seed's network: 10.240.0.0/12 cut
# into /20s, 4 instances.
plan:
	@if [ -z "$$VPN_BASE_SUBNET" ]; then \
		export VPN_BASE_SUBNET=10.240.0.0/12 VPN_INSTANCE_SUBNET_BITMASK=20 \
			VPN_INSTANCE_COUNT=$${VPN_INSTANCE_COUNT:-4}; \
	fi; \
	$(GO) run ./cmd/obvpnctl plan

# test also runs the checks of the deployment files, a module of their own
# (examples/deploy) so that the library does not depend on k8s.io/api.
test:
	$(GO) vet ./...
	$(GO) test -race -count=1 ./...
	cd examples/deploy && $(GO) vet ./... && $(GO) test -race -count=1 ./...

# bench runs every benchmark once (no tests). The figures that matter are
# ratios against a baseline measured in the same run (the direct path,
# HAProxy's relay, a linear scan), since these machines are shared.
bench:
	$(GO) test -run '^$$' -bench . -benchmem -count=1 ./...

# bench-proxy measures cmd/connect-proxy black-box, as a user gets it: the
# command as its own process in a network namespace of its own, next to
# HAProxy 2.6 as a TCP relay (splice-auto, nbthread 2) and the direct path,
# in rotating rounds (throughput up, down and over 16 streams; connect
# plus first byte; resident memory per idle tunnel in a fresh process).
# It needs root and haproxy. BENCH_PROXY_MIB (512), BENCH_PROXY_ROUNDS (5),
# BENCH_PROXY_SAMPLES (500) and BENCH_PROXY_TUNNELS (2000) size it, e.g.
# make bench-proxy BENCH_PROXY_MIB=128.
BENCH_PROXY_MIB ?=
BENCH_PROXY_ROUNDS ?=
BENCH_PROXY_SAMPLES ?=
BENCH_PROXY_TUNNELS ?=
bench-proxy:
	BENCH_PROXY_MIB=$(BENCH_PROXY_MIB) BENCH_PROXY_ROUNDS=$(BENCH_PROXY_ROUNDS) \
	BENCH_PROXY_SAMPLES=$(BENCH_PROXY_SAMPLES) BENCH_PROXY_TUNNELS=$(BENCH_PROXY_TUNNELS) \
		$(GO) test -run '^$$' -bench '^BenchmarkBlackBox$$' -benchtime 1x -count=1 ./cmd/connect-proxy

# The NSS module: make install-nss builds it, installs it where glibc looks
# for NSS modules, and puts "openvpn" on the hosts line of nsswitch.conf
# (after "files", so that .vpn names are never sent to DNS); running it
# again changes nothing. make uninstall-nss reverts both.
NSS_LIBDIR ?= $(shell d=/lib/$$(gcc -print-multiarch 2>/dev/null); [ -d "$$d" ] && echo "$$d" || echo /lib)
NSSWITCH ?= /etc/nsswitch.conf
NSS_SO ?= bin/libnss_openvpn.so.2

# The module is C (cmd/libnss_openvpn/csrc): it links only libc, and
# exports only the three _nss_openvpn_gethostbyname*_r functions.
NSS_CC ?= gcc
NSS_CFLAGS ?= -O2 -Wall -Wextra
NSS_SRC = cmd/libnss_openvpn/csrc/libnss_openvpn.c
NSS_MAP = cmd/libnss_openvpn/csrc/exports.map

.PHONY: nss install-nss uninstall-nss bench-nss
nss:
	@mkdir -p $(dir $(NSS_SO))
	$(NSS_CC) $(NSS_CFLAGS) -shared -fPIC -fvisibility=hidden -Wl,-soname,libnss_openvpn.so.2 \
		-Wl,--version-script=$(NSS_MAP) -Wl,-z,defs -Wl,-z,now -o $(NSS_SO) $(NSS_SRC)

# bench-nss times the module against 4,000, 100,000 and 1,000,000 clients
# (dlopen plus the first lookup, later lookups, a miss, a forked child);
# with NSS_REFERENCE_SO naming the reference module (libnss-openvpn,
# built outside this repository) it times that one in the same run.
NSS_REFERENCE_SO ?=
bench-nss:
	NSS_REFERENCE_SO=$(NSS_REFERENCE_SO) $(GO) test -run '^$$' -bench . -benchtime 1x -count=1 ./cmd/libnss_openvpn

install-nss: nss
	install -m 0644 $(NSS_SO) $(NSS_LIBDIR)/libnss_openvpn.so.2
	grep -Eq '^hosts:.*[[:space:]]openvpn([[:space:]]|$$)' $(NSSWITCH) || \
		sed -i -E '/^hosts:/{ /[[:space:]]files([[:space:]]|$$)/{ s/([[:space:]]files)([[:space:]]|$$)/\1 openvpn\2/; b }; s/$$/ openvpn/ }' $(NSSWITCH)

uninstall-nss:
	rm -f $(NSS_LIBDIR)/libnss_openvpn.so.2
	sed -i -E '/^hosts:/ s/[[:space:]]openvpn([[:space:]]|$$)/\1/' $(NSSWITCH)

# The container image (examples/deploy/Dockerfile), built with podman on a
# machine that reaches Debian's archive and the Go module proxy but no image
# registry. make base-images makes the Dockerfile's two base images locally
# (mmdebstrap, the machine's Go toolchain, podman import) once, and again
# only when what they are made from changes (examples/deploy/podman/
# base-images.sh); make image fetches the Go modules on the host and mounts
# them, and a Go build cache, into the build (GOPROXY=off), so that a
# rebuild after a Go change takes seconds. Both need root, podman, runc and
# mmdebstrap (installed when missing, as make demo does). Podman reads
# CONTAINERS_CONF=$(IMAGE_CACHE)/containers.conf (examples/deploy/podman/
# containers-conf.sh: runc, and limits this machine allows), never the
# machine's own configuration. make image-test runs the live test of the
# image (examples/deploy/live_test.go); make compose-test brings
# compose.yaml up with podman-compose and a fake balena API, and down.
PODMAN ?= podman
IMAGE ?= localhost/obvpn/open-balena-vpn:local
GO_IMAGE ?= localhost/obvpn/golang:1.26-bookworm
DEBIAN_IMAGE ?= localhost/obvpn/debian:bookworm-slim
IMAGE_CACHE ?= $(HOME)/.cache/obvpn-image
IMAGE_PACKAGES = podman runc catatonit mmdebstrap podman-compose uidmap iptables openvpn iproute2
PODMAN_CONF = $(IMAGE_CACHE)/containers.conf
export CONTAINERS_CONF := $(PODMAN_CONF)

.PHONY: image-tools podman-conf base-images image image-test compose-test

image-tools:
	@if [ "$$(id -u)" != 0 ]; then \
		echo "make image needs root (mmdebstrap, rootful podman): run it as root, e.g. sudo make image"; exit 1; \
	fi
	@for c in podman runc mmdebstrap podman-compose iptables /usr/libexec/podman/catatonit; do command -v $$c >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then \
		echo "installing $(IMAGE_PACKAGES)…"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(IMAGE_PACKAGES) >/dev/null; \
	fi

podman-conf: image-tools
	@mkdir -p $(IMAGE_CACHE)
	@bash examples/deploy/podman/containers-conf.sh >$(PODMAN_CONF).tmp && mv $(PODMAN_CONF).tmp $(PODMAN_CONF)

base-images: podman-conf
	PODMAN=$(PODMAN) GO="$(GO)" GO_IMAGE=$(GO_IMAGE) DEBIAN_IMAGE=$(DEBIAN_IMAGE) bash examples/deploy/podman/base-images.sh

image: base-images
	$(GO) mod download
	@mkdir -p $(IMAGE_CACHE)/go-build
	$(PODMAN) build --network host --layers --ignorefile examples/deploy/Dockerfile.dockerignore \
		-f examples/deploy/Dockerfile -t $(IMAGE) \
		--build-arg GO_IMAGE=$(GO_IMAGE) --build-arg DEBIAN_IMAGE=$(DEBIAN_IMAGE) \
		--build-arg GOPROXY=off --build-arg GOFLAGS=-mod=readonly \
		-v "$$($(GO) env GOMODCACHE):/go/pkg/mod:ro" -v "$(IMAGE_CACHE)/go-build:/root/.cache/go-build" .

# The live tests of the image: make image-test runs the image as
# compose.yaml configures it, with real devices (TestImageLive); make
# compose-test brings compose.yaml up and down with podman-compose
# (TestComposeUp). Both build the image first, need root, and fail rather
# than skip (OBVPN_E2E=1).
image-test: image
	cd examples/deploy && OBVPN_E2E=1 $(GO) test -race -count=1 -run '^TestImageLive$$' -v . -args -image $(IMAGE)

compose-test: image
	$(PODMAN) tag $(IMAGE) obvpn/open-balena-vpn:local
	cd examples/deploy && OBVPN_E2E=1 $(GO) test -race -count=1 -run '^TestComposeUp$$' -v .
