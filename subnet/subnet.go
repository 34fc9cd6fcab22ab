// Package subnet is the address and port plan of an obvpn deployment.
//
// A deployment runs several OpenVPN server instances. Each instance gets a
// subnet of its own, cut from one base prefix (VPN_BASE_SUBNET) at one
// instance prefix length (VPN_INSTANCE_SUBNET_BITMASK), and ports of its
// own, counted up from base ports by the instance's 1-indexed id. Given the
// base 10.240.0.0/12 and /20, instance 1 serves 10.240.0.0/20, instance 2
// 10.240.16.0/20, and instance 256 10.255.240.0/20.
//
// Inside an instance subnet the first usable address (network+1) is the
// gateway, the server end of OpenVPN's point-to-point link, unless a gateway
// is configured; the second usable address is the peer of that link; the
// third to the last usable address (broadcast-1) form the pool handed to
// devices. A /20 therefore serves 4092 devices.
//
// The package is pure: functions and comparable value types over
// [net/netip], no I/O and no state. It is IPv4 only, like OpenVPN's
// --ifconfig-pool. It does not decide how many instances to run; see
// [DefaultBits] for how that count picks a prefix length.
//
// Errors are never wrap-arounds: an instance id or a port that falls outside
// the base prefix or the port range is an error. A base prefix with host bits
// set (10.240.1.0/12) is an error rather than silently masked, because such a
// value is usually a typo that, masked, would hand out addresses the operator
// did not mean to give away.
package subnet

import (
	"errors"
	"fmt"
	"math/bits"
	"net/netip"
)

const (
	// MaxBits is the longest instance prefix length: a /29 holds the six
	// usable addresses that are needed for the gateway, the peer and a pool
	// of at least one address (in fact four).
	MaxBits = 29

	// MinBits is the shortest instance prefix length that OpenVPN accepts
	// for an address pool; shorter lengths are clamped to it by [ClampBits]
	// and [DefaultBits].
	MinBits = 16

	// reserved is the number of addresses of an instance subnet that are not
	// in its pool: network, gateway, peer and broadcast.
	reserved = 4
)

var (
	// ErrNotIPv4 reports a base prefix or gateway that is not IPv4.
	ErrNotIPv4 = errors.New("not an IPv4 address")

	// ErrHostBits reports a base prefix whose address has bits set beyond
	// its prefix length, such as 10.240.1.0/12.
	ErrHostBits = errors.New("host bits set")

	// ErrOutOfRange reports an instance id that names no instance subnet of
	// the base prefix, or a port that does not fit in 1…65535.
	ErrOutOfRange = errors.New("out of range")

	// ErrInvalid reports the zero or otherwise invalid netip.Prefix.
	ErrInvalid = errors.New("invalid prefix")
)

// MaskTooSmallError reports an instance prefix length longer than [MaxBits].
// Its message is the reference system's, word for word.
type MaskTooSmallError struct {
	Bits int // the requested instance prefix length
}

func (e *MaskTooSmallError) Error() string {
	return fmt.Sprintf("Mask /%d is too small, 3 usable addresses are required.", e.Bits)
}

// SplitError reports an instance prefix length shorter than the base
// prefix's. Its message is the reference system's, word for word.
type SplitError struct {
	Base int // the base prefix length
	Bits int // the requested instance prefix length
}

func (e *SplitError) Error() string {
	return fmt.Sprintf("Cannot split /%d into /%d!", e.Base, e.Bits)
}

// CheckBase reports whether base can be split into instance subnets: it must
// be a valid IPv4 prefix without host bits. The error wraps [ErrInvalid],
// [ErrNotIPv4] or [ErrHostBits].
func CheckBase(base netip.Prefix) error {
	switch {
	case !base.IsValid():
		return fmt.Errorf("base prefix %q: %w", base.String(), ErrInvalid)
	case !base.Addr().Is4():
		return fmt.Errorf("base prefix %s: %w", base, ErrNotIPv4)
	case base.Masked() != base:
		return fmt.Errorf("base prefix %s: %w (did you mean %s?)", base, ErrHostBits, base.Masked())
	}
	return nil
}

// check validates base and the instance prefix length bits together.
func check(base netip.Prefix, bits int) error {
	if err := CheckBase(base); err != nil {
		return err
	}
	if bits < base.Bits() {
		return &SplitError{Base: base.Bits(), Bits: bits}
	}
	if bits > MaxBits {
		return &MaskTooSmallError{Bits: bits}
	}
	return nil
}

// Count returns the number of instance subnets of length bits in base:
// 2^(bits-base.Bits()). Splitting 10.240.0.0/12 at /20 gives 256.
func Count(base netip.Prefix, bits int) (int, error) {
	if err := check(base, bits); err != nil {
		return 0, err
	}
	return 1 << (bits - base.Bits()), nil
}

// Nth returns the id-th instance subnet (1-indexed) of length bits in base.
// An id outside 1…Count(base, bits) is an error wrapping [ErrOutOfRange].
func Nth(base netip.Prefix, bits, id int) (netip.Prefix, error) {
	n, err := Count(base, bits)
	if err != nil {
		return netip.Prefix{}, err
	}
	if id < 1 || id > n {
		return netip.Prefix{}, fmt.Errorf("instance %d: %w: %s at /%d has instances 1…%d", id, ErrOutOfRange, base, bits, n)
	}
	first := Uint32(base.Addr()) + uint32(id-1)<<(32-bits)
	return netip.PrefixFrom(AddrFromUint32(first), bits), nil
}

// Split returns every instance subnet of length bits in base, in order.
// Splitting 100.64.0.0/10 at /11 gives 100.64.0.0/11 and 100.96.0.0/11;
// splitting at the base's own length gives the base itself. It allocates a
// slice of Count(base, bits) prefixes; use [Nth] to look at one.
func Split(base netip.Prefix, bits int) ([]netip.Prefix, error) {
	n, err := Count(base, bits)
	if err != nil {
		return nil, err
	}
	out := make([]netip.Prefix, n)
	start, step := Uint32(base.Addr()), uint32(1)<<(32-bits)
	for i := range out {
		out[i] = netip.PrefixFrom(AddrFromUint32(start+uint32(i)*step), bits)
	}
	return out, nil
}

// ClampBits returns bits, or [MinBits] when bits is shorter, because OpenVPN
// refuses address pools larger than a /16. The reference system applies this
// clamp to the configured instance prefix length as well as the default.
func ClampBits(bits int) int {
	return max(bits, MinBits)
}

// DefaultBits returns the instance prefix length used when none is
// configured: base.Bits() + ceil(log2(instances)), so that every instance
// gets as much of the base as possible, clamped by [ClampBits]. An instance
// count below 1 counts as 1.
func DefaultBits(base netip.Prefix, instances int) int {
	extra := 0
	if instances > 1 {
		extra = bits.Len(uint(instances - 1)) // ceil(log2(instances))
	}
	return ClampBits(base.Bits() + extra)
}

// Uint32 returns the IPv4 address a as a number, the first byte the most
// significant. It panics if a is not IPv4 (as netip.Addr.As4 does).
func Uint32(a netip.Addr) uint32 {
	b := a.As4()
	return uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
}

// AddrFromUint32 is the IPv4 address whose number is u: the inverse of
// [Uint32].
func AddrFromUint32(u uint32) netip.Addr {
	return netip.AddrFrom4([4]byte{byte(u >> 24), byte(u >> 16), byte(u >> 8), byte(u)})
}

// Netmask returns the mask of the IPv4 prefix p in dotted-quad form, as
// OpenVPN's --route and --ifconfig want it: 255.255.240.0 for a /20.
func Netmask(p netip.Prefix) netip.Addr {
	if p.Bits() <= 0 {
		return AddrFromUint32(0)
	}
	return AddrFromUint32(^uint32(0) << (32 - p.Bits()))
}
