package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"text/tabwriter"
	"time"

	"github.com/obvpn/obvpn/nss"
)

// clientJSON is one client in "clients --json".
type clientJSON struct {
	Instance       int        `json:"instance"`
	File           string     `json:"file"`
	CommonName     string     `json:"common_name"`
	VirtualAddress netip.Addr `json:"virtual_address"`
	VirtualIPv6    netip.Addr `json:"virtual_ipv6,omitzero"`
	RealAddress    string     `json:"real_address"`
	BytesReceived  uint64     `json:"bytes_received"`
	BytesSent      uint64     `json:"bytes_sent"`
	ConnectedSince time.Time  `json:"connected_since,omitzero"`
}

func runClients(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("clients", flag.ContinueOnError)
	fs.SetOutput(stderr)
	asJSON := fs.Bool("json", false, "print a JSON array")
	resolver, _ := resolverFlags(fs)
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: obvpnctl clients [--json] [--glob PATTERN]")
		fmt.Fprintln(stderr, "\nLists every client connected to the OpenVPN instances, from their status files.")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() != 0 {
		fs.Usage()
		return 2
	}
	r, err := resolver()
	if err != nil {
		fmt.Fprintf(stderr, "obvpnctl clients: %v\n", err)
		return 2
	}
	clients, err := r.Clients()
	if err != nil && !errors.Is(err, nss.ErrIncomplete) {
		fmt.Fprintf(stderr, "obvpnctl clients: %v\n", err)
		return 1
	}
	w := bufio.NewWriter(stdout)
	if *asJSON {
		out := make([]clientJSON, len(clients))
		for i, c := range clients {
			out[i] = clientJSON{c.Instance, c.File, c.CommonName, c.VirtualAddress, c.VirtualIPv6,
				c.RealAddress.String(), c.BytesReceived, c.BytesSent, c.ConnectedSince.UTC()}
			if !c.RealAddress.IsValid() {
				out[i].RealAddress = ""
			}
			if c.ConnectedSince.IsZero() {
				out[i].ConnectedSince = time.Time{}
			}
		}
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		err = enc.Encode(out)
	} else {
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "INSTANCE\tCOMMON NAME\tVIRTUAL ADDRESS\tREAL ADDRESS\tRX BYTES\tTX BYTES\tCONNECTED SINCE")
		for _, c := range clients {
			since := "-"
			if !c.ConnectedSince.IsZero() {
				since = c.ConnectedSince.UTC().Format(time.DateTime)
			}
			vaddr := "-"
			if c.VirtualAddress.IsValid() {
				vaddr = c.VirtualAddress.String()
			}
			fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%d\t%d\t%s\n", c.Instance, c.CommonName, vaddr, c.RealAddress, c.BytesReceived, c.BytesSent, since)
		}
		err = tw.Flush()
		fmt.Fprintf(w, "%d clients\n", len(clients))
	}
	if err == nil {
		err = w.Flush()
	}
	if err != nil {
		fmt.Fprintf(stderr, "obvpnctl clients: %v\n", err)
		return 1
	}
	return 0
}
