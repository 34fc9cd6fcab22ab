GO ?= go

.PHONY: all build demo test

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
