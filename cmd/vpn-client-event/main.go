// Command vpn-client-event tells the internal API that a client connected
// or disconnected, for OpenVPN in script mode (VPN_AUTH_MODE=script),
// replacing the reference system's curl scripts. OpenVPN runs it for both
// hooks of an instance:
//
//	client-connect    "/usr/local/bin/vpn-client-event -api http://127.0.0.1:30001 -instance 1"
//	client-disconnect "/usr/local/bin/vpn-client-event -api http://127.0.0.1:30001 -instance 1"
//
// It reads OpenVPN's script environment: script_type (client-connect or
// client-disconnect), common_name, and for a disconnect bytes_received,
// bytes_sent and time_duration. OpenVPN may append a file name (the dynamic
// configuration file of client-connect); it is left empty. It exits 0 when
// the API took the event, 1 otherwise (OpenVPN refuses a client whose
// client-connect fails), and 2 for a usage error.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"time"

	"github.com/obvpn/obvpn/vpn/hook"
)

func main() {
	os.Exit(run(os.Args[1:], os.Getenv, os.Stderr))
}

func run(args []string, getenv func(string) string, stderr io.Writer) int {
	fs := flag.NewFlagSet("vpn-client-event", flag.ContinueOnError)
	fs.SetOutput(stderr)
	api := fs.String("api", "", "the internal API's URL, e.g. http://127.0.0.1:30001 (required)")
	instance := fs.Int("instance", 0, "the OpenVPN instance's id, from 1 (required)")
	timeout := fs.Duration("timeout", 30*time.Second, "how long to wait for the API")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *api == "" || *instance < 1 || fs.NArg() > 1 {
		fmt.Fprintln(stderr, "usage: vpn-client-event -api URL -instance N [dynamic-config-file]")
		return 2
	}
	ev := hook.ClientEvent{CommonName: getenv("common_name")}
	for _, f := range []struct {
		name string
		dst  *uint64
	}{{"bytes_received", &ev.BytesReceived}, {"bytes_sent", &ev.BytesSent}, {"time_duration", &ev.TimeDuration}} {
		if v := getenv(f.name); v != "" {
			n, err := strconv.ParseUint(v, 10, 64)
			if err != nil {
				fmt.Fprintf(stderr, "vpn-client-event: %s=%q: not a number\n", f.name, v)
				return 1
			}
			*f.dst = n
		}
	}
	client := &hook.Client{BaseURL: *api}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	var err error
	switch t := getenv("script_type"); t {
	case "client-connect":
		err = client.Connected(ctx, *instance, ev)
	case "client-disconnect":
		err = client.Disconnected(ctx, *instance, ev)
	default:
		fmt.Fprintf(stderr, "vpn-client-event: script_type=%q: want client-connect or client-disconnect\n", t)
		return 2
	}
	if err != nil {
		fmt.Fprintf(stderr, "vpn-client-event: %s: %v\n", getenv("script_type"), err)
		return 1
	}
	return 0
}
