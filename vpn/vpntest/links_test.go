package vpntest

import (
	"net/netip"
	"testing"
)

// TestDeviceLink: the devices' /30s are cut from 198.18.0.0/15 in order,
// the first left out, and MaxDevices of them fit.
func TestDeviceLink(t *testing.T) {
	block := netip.MustParsePrefix("198.18.0.0/15")
	for _, c := range []struct {
		n    int64
		want string
	}{{1, "198.18.0.4"}, {63, "198.18.0.252"}, {64, "198.18.1.0"}, {1000, "198.18.15.160"}, {MaxDevices, "198.19.255.252"}} {
		got := netip.AddrFrom4(deviceLink(c.n))
		if got.String() != c.want {
			t.Errorf("deviceLink(%d) = %s, want %s", c.n, got, c.want)
		}
		if !block.Contains(got) || !block.Contains(got.Next().Next().Next()) {
			t.Errorf("deviceLink(%d) = %s: its /30 is not in %s", c.n, got, block)
		}
	}
	if block.Contains(netip.AddrFrom4(deviceLink(MaxDevices + 1))) {
		t.Errorf("MaxDevices = %d leaves a /30 of %s unused", MaxDevices, block)
	}
}
