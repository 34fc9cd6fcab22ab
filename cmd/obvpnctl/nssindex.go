package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/obvpn/obvpn/nss"
)

// indexPath returns the index file to use: the --index flag, else
// NSS_OPENVPN_INDEX, else nss.IndexPathFor(globs), the rule the NSS
// module follows too.
func indexPath(flagPath string, globs []string) string {
	if flagPath != "" {
		return flagPath
	}
	if p := os.Getenv("NSS_OPENVPN_INDEX"); p != "" {
		return p
	}
	return nss.IndexPathFor(globs)
}

func runNSSIndex(args []string, stdout, stderr io.Writer) int {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	return nssIndex(ctx, args, stdout, stderr)
}

// nssIndex is nss-index until ctx ends (with --watch).
func nssIndex(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("nss-index", flag.ContinueOnError)
	fs.SetOutput(stderr)
	resolver, _ := resolverFlags(fs)
	path := fs.String("index", "", "the index file (default: NSS_OPENVPN_INDEX, else nss.index next to the status files, /run/openvpn/nss.index for the default ones)")
	watch := fs.Bool("watch", false, "keep the index current until SIGINT or SIGTERM, then remove it")
	poll := fs.Duration("poll", 100*time.Millisecond, "with --watch: how often the status files are checked")
	verbose := fs.Bool("v", false, "with --watch: log every write")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: obvpnctl nss-index [--glob PATTERN] [--index PATH] [--watch [--poll D] [-v]]")
		fmt.Fprintln(stderr, "\nWrites the index of the OpenVPN status files that the NSS module libnss_openvpn.so.2 reads,")
		fmt.Fprintln(stderr, "for hosts where something other than obvpn runs OpenVPN; --watch keeps it current.")
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
		fmt.Fprintf(stderr, "obvpnctl nss-index: %v\n", err)
		return 2
	}
	p := indexPath(*path, r.Globs)
	if !*watch {
		if err := r.WriteIndex(p); err != nil {
			fmt.Fprintf(stderr, "obvpnctl nss-index: %v\n", err)
			return 1
		}
		ix, err := nss.ReadIndex(p)
		if err != nil {
			fmt.Fprintf(stderr, "obvpnctl nss-index: %v\n", err)
			return 1
		}
		fmt.Fprintf(stdout, "%s: %d names from %d status files\n", p, ix.Len(), len(ix.Sources()))
		return 0
	}
	level := slog.LevelInfo
	if *verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	w := &nss.IndexWriter{Resolver: r, Path: p, Poll: *poll, Logger: log}
	log.Info("keeping the NSS index current", "index", p, "globs", r.Globs)
	if err := w.Run(ctx); err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintf(stderr, "obvpnctl nss-index: %v\n", err)
		return 1
	}
	return 0
}
