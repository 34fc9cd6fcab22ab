package bandwidth_test

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/obvpn/obvpn/vpn/bandwidth"
)

func ExampleParseRate() {
	r, err := bandwidth.ParseRate("1500kbit")
	if err != nil {
		panic(err)
	}
	fmt.Println(uint64(r), r)
	_, err = bandwidth.ParseRate("10 MB/s")
	fmt.Println(err)
	// Output:
	// 1500000 1500kbit
	// rate "10 MB/s": want <n>kbit, <n>mbit or <n>gbit with n a positive integer
}

// A Limiter on tun1 for the devices of 100.64.0.0/16, with a runner that
// prints the commands instead of running them (a real one is
// [bandwidth.ExecRunner], as root).
func ExampleLimiter() {
	rate, _ := bandwidth.ParseRate("10mbit")
	l := &bandwidth.Limiter{Dev: "tun1", IFB: "obvpnifb1", Subnet: netip.MustParsePrefix("100.64.0.0/16"), Down: rate, Up: rate,
		Run: func(_ context.Context, name string, args ...string) ([]byte, error) {
			if slices.Contains(args, "replace") { // Add's commands; Setup's are left out

				fmt.Println(name, strings.Join(args, " "))
			}
			return nil, nil
		}}
	ctx := context.Background()
	if err := l.Setup(ctx); err != nil {
		panic(err)
	}
	if err := l.Add(ctx, netip.MustParseAddr("100.64.0.7")); err != nil {
		panic(err)
	}
	fmt.Println(l.Limited())
	// Output:
	// tc class replace dev tun1 parent 1: classid 1:7 htb rate 10mbit
	// tc filter replace dev tun1 parent 1: prio 1 protocol ip handle 1:7:1 u32 ht 1:7: match ip dst 100.64.0.7/32 flowid 1:7
	// tc class replace dev obvpnifb1 parent 1: classid 1:7 htb rate 10mbit
	// tc filter replace dev obvpnifb1 parent 1: prio 1 protocol ip handle 1:7:1 u32 ht 1:7: match ip src 100.64.0.7/32 flowid 1:7
	// [100.64.0.7]
}
