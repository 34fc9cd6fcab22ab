// Command lookup shows how to resolve the "<uuid>.vpn" names of connected
// devices in process with nss.Resolver, from the status files that the
// OpenVPN server instances write, without the NSS module: it prints
// "name address" for each name, and with -clients every connected client.
// A name that no status file holds is reported on stderr, and the exit
// status is then 1.
//
//	lookup 0123456789abcdef0123456789abcdef.vpn
//	lookup -glob '/tmp/run/server-*.status' -clients
package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"

	"github.com/obvpn/obvpn/nss"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("lookup", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var globs []string
	fs.Func("glob", "a `pattern` of status files (repeatable); default "+strings.Join(nss.DefaultGlobs, " and "), func(s string) error {
		globs = append(globs, s)
		return nil
	})
	clients := fs.Bool("clients", false, "list every client of every status file")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: lookup [-glob pattern]... [-clients] [name.vpn ...]")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() == 0 && !*clients {
		fs.Usage()
		return 2
	}
	r := &nss.Resolver{Globs: globs} // nil Globs: nss.DefaultGlobs
	status := 0
	if *clients {
		if err := writeClients(stdout, r); err != nil {
			fmt.Fprintf(stderr, "lookup: %v\n", err)
			status = 1
		}
	}
	for _, name := range fs.Args() {
		addr, err := r.Lookup(name)
		if err != nil {
			fmt.Fprintf(stderr, "lookup: %s: %v\n", name, err)
			status = 1
			continue
		}
		fmt.Fprintln(stdout, name, addr)
	}
	return status
}

// writeClients prints a table of the clients of every status file. Files
// that cannot be read are reported after the clients of the others.
func writeClients(w io.Writer, r *nss.Resolver) error {
	clients, err := r.Clients()
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "INSTANCE\tCOMMON NAME\tVIRTUAL ADDRESS\tREAL ADDRESS\tCONNECTED SINCE")
	for _, c := range clients {
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\n", c.Instance, c.CommonName, c.VirtualAddress,
			c.RealAddress, c.ConnectedSince.Format("2006-01-02 15:04:05"))
	}
	if ferr := tw.Flush(); err == nil {
		err = ferr
	}
	return err
}
