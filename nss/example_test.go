package nss_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"github.com/obvpn/obvpn/nss"
)

// A status file of version 2, as OpenVPN 2.6 writes it with
// --status-version 2.
const statusV2 = `TITLE,OpenVPN 2.6.14 x86_64-pc-linux-gnu
TIME,2026-11-25 04:26:21,1795580781
HEADER,CLIENT_LIST,Common Name,Real Address,Virtual Address,Virtual IPv6 Address,Bytes Received,Bytes Sent,Connected Since,Connected Since (time_t),Username,Client ID,Peer ID,Data Channel Cipher
CLIENT_LIST,0123456789abcdef0123456789abcdef,192.0.2.10:37224,10.240.0.3,,991,1737,2026-11-25 04:26:18,1795580778,0123456789abcdef0123456789abcdef,0,0,AES-256-GCM
HEADER,ROUTING_TABLE,Virtual Address,Common Name,Real Address,Last Ref,Last Ref (time_t)
ROUTING_TABLE,10.240.0.3,0123456789abcdef0123456789abcdef,192.0.2.10:37224,2026-11-25 04:26:18,1795580778
ROUTING_TABLE,10.240.1.0/24,0123456789abcdef0123456789abcdef,192.0.2.10:37224,2026-11-25 04:26:18,1795580778
GLOBAL_STATS,Max bcast/mcast queue length,0
GLOBAL_STATS,dco_enabled,0
END
`

func ExampleParseStatus() {
	st, err := nss.ParseStatus(strings.NewReader(statusV2))
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("version", st.Version)
	for _, c := range st.Clients {
		fmt.Println("client", c.CommonName, c.VirtualAddress, c.RealAddress, c.BytesReceived, c.Cipher)
	}
	for _, r := range st.Routes {
		// Only a plain IPv4 row has an address: the iroute subnet has none.
		fmt.Println("route", r.Virtual, r.Addr.IsValid())
	}
	fmt.Println("dco", st.GlobalStats["dco_enabled"])

	// A file caught while OpenVPN rewrites it has no END line.
	_, err = nss.ParseStatus(strings.NewReader(statusV2[:200]))
	fmt.Println(errors.Is(err, nss.ErrIncomplete))
	// Output:
	// version 2
	// client 0123456789abcdef0123456789abcdef 10.240.0.3 192.0.2.10:37224 991 AES-256-GCM
	// route 10.240.0.3 true
	// route 10.240.1.0/24 false
	// dco 0
	// true
}

func ExampleResolver() {
	dir, err := os.MkdirTemp("", "nss-example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	if err := os.WriteFile(filepath.Join(dir, "server-1.status"), []byte(statusV2), 0o644); err != nil {
		log.Fatal(err)
	}

	// In production the zero Resolver reads /run/openvpn/server-*.status.
	r := &nss.Resolver{Globs: []string{filepath.Join(dir, "server-*.status")}}
	addr, err := r.Lookup("0123456789ABCDEF0123456789ABCDEF.vpn")
	fmt.Println(addr, err)
	_, err = r.Lookup("ffffffffffffffffffffffffffffffff.vpn")
	fmt.Println(errors.Is(err, nss.ErrNotFound))
	hosts, err := r.LookupHost(context.Background(), "0123456789abcdef0123456789abcdef.vpn")
	fmt.Println(hosts, err)

	clients, err := r.Clients()
	if err != nil {
		log.Fatal(err)
	}
	for _, c := range clients {
		fmt.Println(c.Instance, filepath.Base(c.File), c.CommonName, c.VirtualAddress)
	}
	// Output:
	// 10.240.0.3 <nil>
	// true
	// [10.240.0.3] <nil>
	// 1 server-1.status 0123456789abcdef0123456789abcdef 10.240.0.3
}

// The index file that the NSS module reads: written once here; an
// IndexWriter keeps it current in a server.
func ExampleResolver_WriteIndex() {
	dir, err := os.MkdirTemp("", "nss-example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	status := filepath.Join(dir, "server-1.status")
	if err := os.WriteFile(status, []byte(statusV2), 0o644); err != nil {
		log.Fatal(err)
	}
	r := &nss.Resolver{Globs: []string{filepath.Join(dir, "server-*.status")}}
	// A device that OpenVPN's management interface just reported, before
	// the status file says so.
	r.Learn(status, "FEDCBA9876543210FEDCBA9876543210", netip.MustParseAddr("10.240.0.4"))

	path := nss.IndexPathFor(r.Globs) // nss.index next to the status files
	if err := r.WriteIndex(path); err != nil {
		log.Fatal(err)
	}
	ix, err := nss.ReadIndex(path)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(filepath.Base(path), ix.Len(), "names from", len(ix.Sources()), "file")
	for _, name := range []string{"0123456789abcdef0123456789abcdef.vpn", "fedcba9876543210fedcba9876543210.vpn"} {
		a, err := ix.Lookup(name)
		fmt.Println(a, err)
	}
	fmt.Println("stale:", ix.Stale(r.Globs))
	// Output:
	// nss.index 2 names from 1 file
	// 10.240.0.3 <nil>
	// 10.240.0.4 <nil>
	// stale: false
}

// An IndexWriter runs beside whatever resolves and learns devices, until
// its context ends.
func ExampleIndexWriter() {
	dir, err := os.MkdirTemp("", "nss-example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	if err := os.WriteFile(filepath.Join(dir, "server-1.status"), []byte(statusV2), 0o644); err != nil {
		log.Fatal(err)
	}
	r := &nss.Resolver{Globs: []string{filepath.Join(dir, "server-*.status")}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	w := &nss.IndexWriter{Resolver: r} // Path: next to the status files
	go func() { done <- w.Run(ctx) }()
	// ... serve; the index follows the status files, Learn and Forget.
	cancel()
	fmt.Println(<-done)
	_, err = os.Stat(filepath.Join(dir, "nss.index"))
	fmt.Println(os.IsNotExist(err)) // removed when the writer stops
	// Output:
	// <nil>
	// true
}
