package mgmttest_test

import (
	"context"
	"fmt"
	"time"

	"github.com/obvpn/obvpn/openvpnmgmt"
	"github.com/obvpn/obvpn/openvpnmgmt/mgmttest"
)

// A test of code that answers devices on the management interface: the
// fake pushes a CONNECT block, the code under test answers it, and the
// test reads what reached the "OpenVPN" side.
func Example() {
	srv, err := mgmttest.Start() // in a test: mgmttest.NewServer(t)
	if err != nil {
		panic(err)
	}
	defer srv.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := openvpnmgmt.Dial(ctx, "tcp", srv.Addr(), openvpnmgmt.Options{})
	if err != nil {
		panic(err)
	}
	defer c.Close()

	// The code under test: allow every CONNECT whose password is "good".
	go func() {
		for ev := range c.Events() {
			if ce, ok := ev.(*openvpnmgmt.ClientEvent); ok && ce.Kind == openvpnmgmt.ClientConnect {
				if ce.Env.Value("password") == "good" {
					c.ClientAuthNT(ctx, ce.CID, ce.KID)
				} else {
					c.ClientDeny(ctx, ce.CID, ce.KID, "bad key", "")
				}
			}
		}
	}()
	srv.Send(">CLIENT:CONNECT,4,0", ">CLIENT:ENV,username=0123456789abcdef", ">CLIENT:ENV,password=good", ">CLIENT:ENV,END")
	srv.Send(">CLIENT:CONNECT,5,0", ">CLIENT:ENV,username=fedcba9876543210", ">CLIENT:ENV,password=stolen", ">CLIENT:ENV,END")

	if err := srv.WaitCommand(ctx, "client-deny 5 0"); err != nil { // the second answer
		panic(err)
	}
	for _, cmd := range srv.Commands() {
		fmt.Println(cmd)
	}
	// Output:
	// client-auth-nt 4 0
	// client-deny 5 0 "bad key"
}
