package subnet

import (
	"net/netip"
	"testing"
)

// FuzzPlan feeds arbitrary bases, lengths and ids through the plan and
// checks the invariants: no panic, and every instance that is returned lies
// inside the base, is the id-th block, and has its addresses in order.
func FuzzPlan(f *testing.F) {
	f.Add("10.240.0.0/12", 20, 1, 10000)
	f.Add("10.240.0.0/12", 20, 256, 10000)
	f.Add("100.64.0.0/10", 11, 2, 0)
	f.Add("10.240.1.0/12", 20, 1, 1)
	f.Add("fd00::/8", 20, 1, 1)
	f.Add("0.0.0.0/0", 29, 1<<29, 1)
	f.Add("255.255.255.248/29", 29, 1, 65534)
	f.Fuzz(func(t *testing.T, base string, bits, id, port int) {
		pfx, err := netip.ParsePrefix(base)
		if err != nil {
			return
		}
		p := Plan{Base: pfx, Bits: bits, Ports: Ports{VPN: port, Management: port, API: port}}
		n, cerr := p.Count()
		in, err := p.Instance(id)
		if err != nil {
			return
		}
		if cerr != nil || id < 1 || id > n {
			t.Fatalf("Instance(%d) succeeded though Count = %d, %v", id, n, cerr)
		}
		if !pfx.Addr().Is4() || pfx.Masked() != pfx || bits < pfx.Bits() || bits > MaxBits {
			t.Fatalf("Instance succeeded for base %s at /%d", pfx, bits)
		}
		if in.Subnet.Bits() != bits || !pfx.Contains(in.Subnet.Addr()) || in.Subnet.Masked() != in.Subnet {
			t.Fatalf("subnet %s is not a /%d block of %s", in.Subnet, bits, pfx)
		}
		if off := Uint32(in.Subnet.Addr()) - Uint32(pfx.Addr()); int(off>>(32-bits)) != id-1 {
			t.Fatalf("subnet %s is block %d of %s, want %d", in.Subnet, off>>(32-bits)+1, pfx, id)
		}
		for _, a := range []netip.Addr{in.Gateway, in.Peer, in.PoolFirst, in.PoolLast} {
			if !in.Subnet.Contains(a) {
				t.Fatalf("%s outside %s", a, in.Subnet)
			}
		}
		if !(in.Gateway.Less(in.Peer) && in.Peer.Less(in.PoolFirst) && in.PoolFirst.Less(in.PoolLast)) {
			t.Fatalf("addresses out of order: %+v", in)
		}
		if in.MaxClients < 4 || in.Port < 1 || in.Port > MaxPort {
			t.Fatalf("bad numbers: %+v", in)
		}
	})
}
