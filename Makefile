GO ?= go

.PHONY: all build demo test bench

all: build

build:
	$(GO) build ./...

# demo prints the plan of the configured deployment; with no VPN_BASE_SUBNET
# set it uses the seed's network: 10.240.0.0/12 cut into /20s, 4 instances.
demo:
	@if [ -z "$$VPN_BASE_SUBNET" ]; then \
		export VPN_BASE_SUBNET=10.240.0.0/12 VPN_INSTANCE_SUBNET_BITMASK=20 \
			VPN_INSTANCE_COUNT=$${VPN_INSTANCE_COUNT:-4}; \
	fi; \
	$(GO) run ./cmd/obvpnctl plan

test:
	$(GO) vet ./...
	$(GO) test -race -count=1 ./...

# bench runs every benchmark once (no tests). The figures that matter are
# ratios against a baseline measured in the same run (the direct path,
# HAProxy's relay, a linear scan), since these machines are shared.
bench:
	$(GO) test -run '^$$' -bench . -benchmem -count=1 ./...

# The NSS module: make install-nss builds it, installs it where glibc looks
# for NSS modules, and puts "openvpn" on the hosts line of nsswitch.conf
# (after "files", so that .vpn names are never sent to DNS); running it
# again changes nothing. make uninstall-nss reverts both.
NSS_LIBDIR ?= $(shell d=/lib/$$(gcc -print-multiarch 2>/dev/null); [ -d "$$d" ] && echo "$$d" || echo /lib)
NSSWITCH ?= /etc/nsswitch.conf
NSS_SO ?= bin/libnss_openvpn.so.2

.PHONY: nss install-nss uninstall-nss
nss:
	$(GO) build -buildmode=c-shared -o $(NSS_SO) ./cmd/libnss_openvpn

install-nss: nss
	install -m 0644 $(NSS_SO) $(NSS_LIBDIR)/libnss_openvpn.so.2
	grep -Eq '^hosts:.*[[:space:]]openvpn([[:space:]]|$$)' $(NSSWITCH) || \
		sed -i -E '/^hosts:/{ /[[:space:]]files([[:space:]]|$$)/{ s/([[:space:]]files)([[:space:]]|$$)/\1 openvpn\2/; b }; s/$$/ openvpn/ }' $(NSSWITCH)

uninstall-nss:
	rm -f $(NSS_LIBDIR)/libnss_openvpn.so.2
	sed -i -E '/^hosts:/ s/[[:space:]]openvpn([[:space:]]|$$)/\1/' $(NSSWITCH)
