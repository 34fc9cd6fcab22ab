package subnet

import (
	"math/rand/v2"
	"net/netip"
	"testing"
)

// slowSplit is the obvious implementation the fast code is checked
// against: like the reference system, it starts at the base address and
// keeps stepping to the next block of the instance length, address by
// address, until the block leaves the base.
func slowSplit(base netip.Prefix, bits int) []netip.Prefix {
	var out []netip.Prefix
	a := base.Addr()
	for {
		p := netip.PrefixFrom(a, bits)
		if !base.Contains(a) {
			return out
		}
		out = append(out, p)
		for i := 0; i < 1<<(32-bits); i++ {
			a = a.Next()
			if !a.IsValid() || !a.Is4() { // stepped past 255.255.255.255
				return out
			}
		}
	}
}

// slowInstance walks the subnet's addresses one by one.
func slowInstance(sub netip.Prefix) (gw, peer, first, last netip.Addr, pool int) {
	net := sub.Addr()
	gw, peer, first = net.Next(), net.Next().Next(), net.Next().Next().Next()
	for a := first; sub.Contains(a.Next()); a = a.Next() {
		last = a
		pool++
	}
	return
}

func TestSlowAgreement(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for range 200 {
		baseBits := 16 + r.IntN(14) // /16…/29
		bits := baseBits + r.IntN(30-baseBits)
		a := AddrFromUint32(r.Uint32())
		base := netip.PrefixFrom(a, baseBits).Masked()
		fast, err := Split(base, bits)
		if err != nil {
			t.Fatalf("Split(%s, %d): %v", base, bits, err)
		}
		slow := slowSplit(base, bits)
		if len(fast) != len(slow) {
			t.Fatalf("Split(%s, %d): %d subnets, slow gives %d", base, bits, len(fast), len(slow))
		}
		for i := range fast {
			if fast[i] != slow[i] {
				t.Fatalf("Split(%s, %d)[%d] = %s, slow gives %s", base, bits, i, fast[i], slow[i])
			}
		}
		id := 1 + r.IntN(len(fast))
		in, err := Plan{Base: base, Bits: bits, Ports: seedPorts}.Instance(id)
		if err != nil {
			t.Fatal(err)
		}
		gw, peer, first, last, pool := slowInstance(slow[id-1])
		if in.Subnet != slow[id-1] || in.Gateway != gw || in.Peer != peer || in.PoolFirst != first ||
			in.PoolLast != last || in.MaxClients != pool {
			t.Fatalf("Instance(%d) of %s at /%d = %+v; slow: %s %s %s %s %d", id, base, bits, in, gw, peer, first, last, pool)
		}
	}
}
