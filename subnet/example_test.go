package subnet_test

import (
	"fmt"
	"net/netip"

	"github.com/obvpn/obvpn/subnet"
)

// The seed's deployment: 10.240.0.0/12 cut into /20s, one per instance.
func ExamplePlan() {
	plan := subnet.Plan{
		Base:      netip.MustParsePrefix("10.240.0.0/12"),
		Bits:      20,
		Ports:     subnet.Ports{VPN: 10000, Management: 20000, API: 30000},
		Instances: 2,
	}
	if err := plan.Validate(); err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(plan)
	instances, _ := plan.All()
	for _, in := range instances {
		fmt.Printf("instance %d: %s gateway %s peer %s pool %s-%s port %d\n",
			in.ID, in.Subnet, in.Gateway, in.Peer, in.PoolFirst, in.PoolLast, in.Port)
	}
	last, _ := plan.Instance(256)
	fmt.Println("last subnet of the base:", last.Subnet)
	// Output:
	// 10.240.0.0/12 at /20: 2 of 256 instances, 4092 clients each
	// instance 1: 10.240.0.0/20 gateway 10.240.0.1 peer 10.240.0.2 pool 10.240.0.3-10.240.15.254 port 10001
	// instance 2: 10.240.16.0/20 gateway 10.240.16.1 peer 10.240.16.2 pool 10.240.16.3-10.240.31.254 port 10002
	// last subnet of the base: 10.255.240.0/20
}

func ExampleSplit() {
	halves, _ := subnet.Split(netip.MustParsePrefix("100.64.0.0/10"), 11)
	fmt.Println(halves)
	_, err := subnet.Split(netip.MustParsePrefix("100.64.0.0/10"), 9)
	fmt.Println(err)
	_, err = subnet.Split(netip.MustParsePrefix("100.64.0.0/10"), 30)
	fmt.Println(err)
	// Output:
	// [100.64.0.0/11 100.96.0.0/11]
	// Cannot split /10 into /9!
	// Mask /30 is too small, 3 usable addresses are required.
}

// Without a configured prefix length, the instance count decides it.
func ExampleDefaultBits() {
	base := netip.MustParsePrefix("100.64.0.0/10")
	fmt.Println(subnet.DefaultBits(base, 4), subnet.DefaultBits(base, 1024))
	// Output: 16 20
}
