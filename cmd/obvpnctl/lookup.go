package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/obvpn/obvpn/nss"
	"github.com/obvpn/obvpn/vpn"
)

// statusGlobs returns the status files to read (colon-separated
// patterns, as the NSS module takes them): the --glob flag, else
// NSS_OPENVPN_STATUS_GLOB, else $VPN_RUN_DIR/server-*.status, else (when
// neither variable is set) nil, the resolver's defaults: both spellings of
// /run/openvpn/server-*.status.
func statusGlobs(flagGlob string) ([]string, error) {
	if flagGlob != "" {
		return strings.Split(flagGlob, ":"), nil
	}
	if os.Getenv("NSS_OPENVPN_STATUS_GLOB") == "" && os.Getenv("VPN_RUN_DIR") == "" {
		return nil, nil
	}
	g, err := (vpn.Loader{}).StatusGlob()
	if err != nil {
		return nil, err
	}
	return strings.Split(g, ":"), nil // several, as the NSS module takes them
}

// resolverFlags adds --glob to fs and returns a function that makes the
// resolver over the status files that statusGlobs names, with its index
// built.
func resolverFlags(fs *flag.FlagSet) (func() (*nss.Resolver, error), *string) {
	glob := fs.String("glob", "", "status files to read (default: NSS_OPENVPN_STATUS_GLOB, else $VPN_RUN_DIR/server-*.status, else /run/openvpn/server-*.status)")
	return func() (*nss.Resolver, error) {
		globs, err := statusGlobs(*glob)
		if err != nil {
			return nil, err
		}
		r := &nss.Resolver{Globs: globs}
		// Missing files are no error: no instance runs. A file caught
		// while OpenVPN rewrites it is read again a few times, as this
		// index has no last good entries to keep.
		for try := 0; ; try++ {
			err = r.Refresh()
			if err == nil || !errors.Is(err, nss.ErrIncomplete) {
				break
			}
			if try == 4 {
				return r, nil // answer from the files that did read whole
			}
			time.Sleep(5 * time.Millisecond)
		}
		if err != nil {
			return nil, err
		}
		return r, nil
	}, glob
}

func runLookup(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("lookup", flag.ContinueOnError)
	fs.SetOutput(stderr)
	resolver, glob := resolverFlags(fs)
	index := fs.String("index", "", "the NSS index to answer from while it is fresh (default: as nss-index)")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: obvpnctl lookup [--glob PATTERN] [--index PATH] <uuid>[.vpn]")
		fmt.Fprintln(stderr, "\nPrints the VPN address of a connected device, from the NSS index while it is fresh, else from the OpenVPN status files.")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() != 1 {
		fs.Usage()
		return 2
	}
	globs, err := statusGlobs(*glob)
	if err != nil {
		fmt.Fprintf(stderr, "obvpnctl lookup: %v\n", err)
		return 2
	}
	// The index that the NSS module reads answers first, when it is as
	// new as every status file: no file is parsed then.
	if ix, err := nss.ReadIndex(indexPath(*index, globs)); err == nil && !ix.Stale(globs) {
		a, err := ix.Lookup(fs.Arg(0))
		if err == nil || errors.Is(err, nss.ErrNotFound) {
			return printLookup(a, err, stdout, stderr)
		}
	}
	r, err := resolver()
	if err != nil {
		fmt.Fprintf(stderr, "obvpnctl lookup: %v\n", err)
		return 2
	}
	a, err := r.Lookup(fs.Arg(0))
	return printLookup(a, err, stdout, stderr)
}

func printLookup(a netip.Addr, err error, stdout, stderr io.Writer) int {
	if err != nil {
		fmt.Fprintf(stderr, "obvpnctl lookup: %v\n", err)
		return 1
	}
	fmt.Fprintln(stdout, a)
	return 0
}
