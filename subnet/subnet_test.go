package subnet

import (
	"errors"
	"net/netip"
	"testing"
)

func TestSplit(t *testing.T) {
	tests := []struct {
		name  string
		base  string
		bits  int
		count int
		want  []string // the first subnets, in order
		last  string
	}{
		{name: "seed", base: "10.240.0.0/12", bits: 20, count: 256,
			want: []string{"10.240.0.0/20", "10.240.16.0/20", "10.240.32.0/20"}, last: "10.255.240.0/20"},
		{name: "cgnat", base: "100.64.0.0/10", bits: 20, count: 1024,
			want: []string{"100.64.0.0/20", "100.64.16.0/20"}, last: "100.127.240.0/20"},
		{name: "halves", base: "100.64.0.0/10", bits: 11, count: 2,
			want: []string{"100.64.0.0/11", "100.96.0.0/11"}, last: "100.96.0.0/11"},
		{name: "itself", base: "100.64.0.0/10", bits: 10, count: 1,
			want: []string{"100.64.0.0/10"}, last: "100.64.0.0/10"},
		{name: "smallest", base: "192.0.2.0/24", bits: 29, count: 32,
			want: []string{"192.0.2.0/29", "192.0.2.8/29"}, last: "192.0.2.248/29"},
		{name: "top of the space", base: "255.255.255.0/24", bits: 25, count: 2,
			want: []string{"255.255.255.0/25", "255.255.255.128/25"}, last: "255.255.255.128/25"},
		{name: "whole space", base: "0.0.0.0/0", bits: 2, count: 4,
			want: []string{"0.0.0.0/2", "64.0.0.0/2"}, last: "192.0.0.0/2"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			base := netip.MustParsePrefix(tt.base)
			got, err := Split(base, tt.bits)
			if err != nil {
				t.Fatalf("Split(%s, %d): %v", base, tt.bits, err)
			}
			if len(got) != tt.count {
				t.Fatalf("Split(%s, %d) gave %d subnets, want %d", base, tt.bits, len(got), tt.count)
			}
			if n, _ := Count(base, tt.bits); n != tt.count {
				t.Errorf("Count = %d, want %d", n, tt.count)
			}
			for i, w := range tt.want {
				if got[i].String() != w {
					t.Errorf("subnet %d = %s, want %s", i+1, got[i], w)
				}
				nth, err := Nth(base, tt.bits, i+1)
				if err != nil || nth != got[i] {
					t.Errorf("Nth(%d) = %v, %v; want %s", i+1, nth, err, got[i])
				}
			}
			if got[len(got)-1].String() != tt.last {
				t.Errorf("last subnet = %s, want %s", got[len(got)-1], tt.last)
			}
		})
	}
}

func TestSplitErrors(t *testing.T) {
	tests := []struct {
		name   string
		base   netip.Prefix
		bits   int
		text   string // exact message, when the reference system fixes it
		target error
	}{
		{name: "mask too small", base: netip.MustParsePrefix("10.240.0.0/12"), bits: 30,
			text: "Mask /30 is too small, 3 usable addresses are required."},
		{name: "mask /32", base: netip.MustParsePrefix("10.240.0.0/12"), bits: 32,
			text: "Mask /32 is too small, 3 usable addresses are required."},
		{name: "shorter than base", base: netip.MustParsePrefix("100.64.0.0/10"), bits: 9,
			text: "Cannot split /10 into /9!"},
		{name: "negative", base: netip.MustParsePrefix("100.64.0.0/10"), bits: -1,
			text: "Cannot split /10 into /-1!"},
		{name: "ipv6", base: netip.MustParsePrefix("fd00::/8"), bits: 20, target: ErrNotIPv4},
		{name: "4in6", base: netip.MustParsePrefix("::ffff:10.0.0.0/104"), bits: 120, target: ErrNotIPv4},
		{name: "host bits", base: netip.MustParsePrefix("10.240.1.0/12"), bits: 20, target: ErrHostBits},
		{name: "zero prefix", base: netip.Prefix{}, bits: 20, target: ErrInvalid},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, f := range []func() error{
				func() error { _, err := Split(tt.base, tt.bits); return err },
				func() error { _, err := Count(tt.base, tt.bits); return err },
				func() error { _, err := Nth(tt.base, tt.bits, 1); return err },
				func() error { return Plan{Base: tt.base, Bits: tt.bits}.Validate() },
			} {
				err := f()
				if err == nil {
					t.Fatalf("no error for %s at /%d", tt.base, tt.bits)
				}
				if tt.text != "" && err.Error() != tt.text {
					t.Errorf("error %q, want %q", err, tt.text)
				}
				if tt.target != nil && !errors.Is(err, tt.target) {
					t.Errorf("error %q is not %v", err, tt.target)
				}
			}
		})
	}
	var mts *MaskTooSmallError
	if _, err := Count(netip.MustParsePrefix("10.0.0.0/8"), 31); !errors.As(err, &mts) || mts.Bits != 31 {
		t.Errorf("Count at /31: %v, want a *MaskTooSmallError for /31", err)
	}
	var se *SplitError
	if _, err := Count(netip.MustParsePrefix("10.0.0.0/8"), 7); !errors.As(err, &se) || se.Base != 8 || se.Bits != 7 {
		t.Errorf("Count at /7: %v, want a *SplitError for /8 into /7", err)
	}
	if err := CheckBase(netip.MustParsePrefix("10.240.1.0/12")); err == nil ||
		err.Error() != "base prefix 10.240.1.0/12: host bits set (did you mean 10.240.0.0/12?)" {
		t.Errorf("CheckBase with host bits: %v", err)
	}
}

func TestNthOutOfRange(t *testing.T) {
	base := netip.MustParsePrefix("10.240.0.0/12")
	for _, id := range []int{0, -1, 257, 1 << 40} {
		if p, err := Nth(base, 20, id); !errors.Is(err, ErrOutOfRange) {
			t.Errorf("Nth(%d) = %v, %v; want ErrOutOfRange", id, p, err)
		}
	}
}

func TestDefaultBits(t *testing.T) {
	tests := []struct {
		base      string
		instances int
		want      int
	}{
		{"10.240.0.0/12", 1, 16},  // 12, clamped
		{"10.240.0.0/12", 16, 16}, // 12+4
		{"10.240.0.0/12", 17, 17}, // 12+5
		{"10.240.0.0/12", 256, 20},
		{"100.64.0.0/10", 2, 16},    // 11, clamped
		{"100.64.0.0/10", 1024, 20}, // 10+10
		{"192.0.2.0/24", 3, 26},     // 24+2
		{"192.0.2.0/24", 0, 24},     // a count below 1 counts as 1
		{"192.0.2.0/24", -5, 24},
	}
	for _, tt := range tests {
		if got := DefaultBits(netip.MustParsePrefix(tt.base), tt.instances); got != tt.want {
			t.Errorf("DefaultBits(%s, %d) = %d, want %d", tt.base, tt.instances, got, tt.want)
		}
	}
	for in, want := range map[int]int{8: 16, 15: 16, 16: 16, 20: 20, 29: 29, 30: 30} {
		if got := ClampBits(in); got != want {
			t.Errorf("ClampBits(%d) = %d, want %d", in, got, want)
		}
	}
}

func TestAddressArithmetic(t *testing.T) {
	for _, s := range []string{"0.0.0.0", "10.240.0.1", "255.255.255.255", "192.0.2.8"} {
		a := netip.MustParseAddr(s)
		if got := AddrFromUint32(Uint32(a)); got != a {
			t.Errorf("AddrFromUint32(Uint32(%s)) = %s", a, got)
		}
	}
	if Uint32(netip.MustParseAddr("10.0.0.1")) != 10<<24|1 {
		t.Error("Uint32 byte order")
	}
	for p, want := range map[string]string{"10.240.0.0/20": "255.255.240.0", "0.0.0.0/0": "0.0.0.0", "10.0.0.0/8": "255.0.0.0", "192.0.2.8/29": "255.255.255.248", "192.0.2.1/32": "255.255.255.255"} {
		if got := Netmask(netip.MustParsePrefix(p)).String(); got != want {
			t.Errorf("Netmask(%s) = %s, want %s", p, got, want)
		}
	}
}
