// Command mgmt-events shows how to attach to OpenVPN's management interface
// with package openvpnmgmt and print its typed real-time events, one line each
// (log and state, byte counts with -bytecount, CLIENT blocks without their
// password), until Ctrl-C or until OpenVPN closes the connection.
//
//	mgmt-events                                  # 127.0.0.1:7505
//	mgmt-events -addr /run/openvpn/server-1.sock -release-hold
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"

	"github.com/obvpn/obvpn/openvpnmgmt"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("mgmt-events", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("addr", "127.0.0.1:7505", "the management interface: host:port, or a unix socket path starting with /")
	password := fs.String("password", "", "the management password, if OpenVPN asks for one")
	release := fs.Bool("release-hold", false, "release OpenVPN from --management-hold once attached")
	bytecount := fs.Int("bytecount", 0, "ask for byte counts every this many seconds; 0 means none")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "mgmt-events: unexpected arguments %q\n", fs.Args())
		return 2
	}
	network := "tcp"
	if strings.HasPrefix(*addr, "/") {
		network = "unix"
	}
	c, err := openvpnmgmt.Dial(ctx, network, *addr, openvpnmgmt.Options{Password: *password})
	if err != nil {
		fmt.Fprintf(stderr, "mgmt-events: %v\n", err)
		return 1
	}
	defer c.Close()
	err = errors.Join(c.Log(ctx, true), c.State(ctx, true), c.ByteCount(ctx, *bytecount))
	if err == nil && *release {
		err = c.HoldRelease(ctx)
	}
	if err != nil && ctx.Err() == nil {
		fmt.Fprintf(stderr, "mgmt-events: %v\n", err)
		return 1
	}
	for {
		select {
		case <-ctx.Done():
			return 0
		case ev, ok := <-c.Events():
			if !ok {
				if err := c.Err(); !errors.Is(err, io.EOF) {
					fmt.Fprintf(stderr, "mgmt-events: %v\n", err)
					return 1
				}
				fmt.Fprintln(stdout, "connection closed")
				return 0
			}
			fmt.Fprintln(stdout, describe(ev))
		}
	}
}

// describe returns one line about ev: its kind and its key fields.
func describe(ev openvpnmgmt.Event) string {
	switch e := ev.(type) {
	case *openvpnmgmt.ClientEvent:
		// The ENV block holds the device's password: name the device only.
		return fmt.Sprintf("CLIENT %s cid=%d kid=%d common_name=%q username=%q",
			e.Kind, e.CID, e.KID, e.Env.Value("common_name"), e.Env.Value("username"))
	case *openvpnmgmt.ByteCountClientEvent:
		return fmt.Sprintf("BYTECOUNT_CLI cid=%d received=%d sent=%d", e.CID, e.Received, e.Sent)
	case *openvpnmgmt.LogEvent:
		return fmt.Sprintf("LOG level=%s %s", e.Level, e.Message)
	case *openvpnmgmt.StateEvent:
		return fmt.Sprintf("STATE %s %s", e.State, e.Description)
	case *openvpnmgmt.UnknownEvent:
		return "UNKNOWN " + e.Raw()
	default: // the other kinds as received, such as "HOLD:Waiting for hold release"
		return ev.Raw()
	}
}
