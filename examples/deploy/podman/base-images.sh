#!/usr/bin/env bash
# base-images.sh makes the two base images the Dockerfile builds FROM, on a
# machine that reaches Debian's archive but no image registry:
#
#   $DEBIAN_IMAGE (debian:bookworm-slim's stand-in): Debian bookworm,
#       minbase, made with mmdebstrap from Debian's archive;
#   $GO_IMAGE (golang:1.26-bookworm's stand-in): the same with gcc and
#       libc6-dev (the NSS module), ca-certificates and git, and this
#       machine's Go toolchain ($(go env GOROOT)) in /usr/local/go.
#
# Each is imported into podman's storage with the label obvpn.base-key, a
# hash of what it is made from (this script, the suite, the mirror, the Go
# version); an image whose label matches is kept, so that the images are
# made once and reused. Needs root, podman and mmdebstrap.
set -euo pipefail

PODMAN=${PODMAN:-podman}
DEBIAN_IMAGE=${DEBIAN_IMAGE:-localhost/obvpn/debian:bookworm-slim}
GO_IMAGE=${GO_IMAGE:-localhost/obvpn/golang:1.26-bookworm}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
GO=${GO:-go}

for c in mmdebstrap "$PODMAN" "$GO"; do
	command -v "$c" >/dev/null || { echo "base-images.sh: $c is not installed (apt-get install podman runc mmdebstrap)" >&2; exit 1; }
done

goroot=$("$GO" env GOROOT)
gover=$("$GO" env GOVERSION)
self=$(sha256sum "$0" | cut -c1-16)

# As Debian's slim images: no documentation, manual pages or locales
# beyond English.
slim=(
	--dpkgopt='path-exclude=/usr/share/man/*'
	--dpkgopt='path-exclude=/usr/share/doc/*'
	--dpkgopt='path-include=/usr/share/doc/*/copyright'
	--dpkgopt='path-exclude=/usr/share/locale/*'
	--dpkgopt='path-include=/usr/share/locale/locale.alias'
	--dpkgopt='path-exclude=/usr/share/info/*'
	--aptopt='APT::Install-Recommends "false"'
)
sources=(
	"deb $MIRROR $SUITE main"
	"deb $MIRROR $SUITE-updates main"
	"deb $SECURITY_MIRROR $SUITE-security main"
)

key_of() { printf '%s\n' "$self" "$SUITE" "${sources[@]}" "$@" | sha256sum | cut -c1-16; }

# current IMAGE KEY: is IMAGE there with label KEY?
current() {
	[ "$("$PODMAN" image inspect --format '{{index .Labels "obvpn.base-key"}}' "$1" 2>/dev/null)" = "$2" ]
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# make IMAGE KEY [mmdebstrap options…] -- [podman import --change …]
make_image() {
	local image=$1 key=$2
	shift 2
	local opts=() changes=()
	while [ $# -gt 0 ] && [ "$1" != -- ]; do opts+=("$1"); shift; done
	[ $# -gt 0 ] && shift
	for c in "$@"; do changes+=(--change "$c"); done
	if current "$image" "$key"; then
		echo "base-images.sh: $image is current ($key)"
		return
	fi
	echo "base-images.sh: making $image ($key)"
	local start=$SECONDS
	mmdebstrap --quiet --variant=minbase --mode=root --format=tar "${slim[@]}" "${opts[@]}" \
		--customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
		"$SUITE" "$tmp/rootfs.tar" "${sources[@]}"
	"$PODMAN" import --quiet "${changes[@]}" --change "LABEL obvpn.base-key=$key" \
		--change 'CMD ["bash"]' "$tmp/rootfs.tar" "$image" >/dev/null
	rm -f "$tmp/rootfs.tar"
	echo "base-images.sh: $image made in $((SECONDS - start)) s"
}

make_image "$DEBIAN_IMAGE" "$(key_of debian)" --
make_image "$GO_IMAGE" "$(key_of go "$gover")" \
	--include=ca-certificates,gcc,libc6-dev,git \
	--customize-hook="tar -C '$(dirname "$goroot")' --exclude='$(basename "$goroot")/test' -c '$(basename "$goroot")' | tar -C \"\$1/usr/local\" -x" \
	--customize-hook="[ '$(basename "$goroot")' = go ] || mv \"\$1/usr/local/$(basename "$goroot")\" \"\$1/usr/local/go\"" \
	-- \
	'ENV PATH=/go/bin:/usr/local/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
	'ENV GOPATH=/go' 'ENV GOTOOLCHAIN=local' 'WORKDIR /go'
