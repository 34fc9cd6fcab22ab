package openvpnmgmt_test

import (
	"context"
	"fmt"

	"github.com/obvpn/obvpn/openvpnmgmt"
	"github.com/obvpn/obvpn/openvpnmgmt/mgmttest"
)

// Answer every device that connects, from the event loop: the typical use
// with --management-client-auth. (mgmttest stands in for OpenVPN here.)
func Example() {
	server, err := mgmttest.Start()
	if err != nil {
		fmt.Println(err)
		return
	}
	defer server.Close()

	ctx := context.Background()
	c, err := openvpnmgmt.Dial(ctx, "tcp", server.Addr(), openvpnmgmt.Options{})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer c.Close()
	if err := c.HoldRelease(ctx); err != nil {
		fmt.Println(err)
		return
	}

	server.Send(">CLIENT:CONNECT,0,1", ">CLIENT:ENV,username=0123456789abcdef0123456789abcdef",
		">CLIENT:ENV,password=device-key", ">CLIENT:ENV,END")

	for ev := range c.Events() {
		if ce, ok := ev.(*openvpnmgmt.ClientEvent); ok && ce.Kind == openvpnmgmt.ClientConnect {
			fmt.Println("connect from", ce.Env.Value("username"))
			if err := c.ClientAuthNT(ctx, ce.CID, ce.KID); err != nil {
				fmt.Println(err)
			}
			break
		}
	}
	fmt.Println(server.Commands())
	// Output:
	// connect from 0123456789abcdef0123456789abcdef
	// [hold release client-auth-nt 0 1]
}
