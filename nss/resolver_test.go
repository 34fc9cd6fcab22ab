package nss

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/matryer/is"
)

const (
	devA = "0123456789abcdef0123456789abcdef"
	devB = "fedcba9876543210fedcba9876543210"
)

// statusV2 writes a version 2 status file with the given routes:
// common name → virtual address, all with Last Ref lastRef.
func statusV2(lastRef int64, routes ...string) string {
	var b strings.Builder
	b.WriteString("TITLE,OpenVPN 2.6.14\nTIME,2026-11-25 04:26:21,1795580781\n")
	b.WriteString("HEADER,CLIENT_LIST,Common Name,Real Address,Virtual Address,Virtual IPv6 Address,Bytes Received,Bytes Sent,Connected Since,Connected Since (time_t),Username,Client ID,Peer ID,Data Channel Cipher\n")
	for i := 0; i+1 < len(routes); i += 2 {
		fmt.Fprintf(&b, "CLIENT_LIST,%s,192.0.2.1:%d,%s,,1,2,2026-11-25 04:26:18,1795580778,%s,%d,%d,AES-256-GCM\n", routes[i], 1000+i, routes[i+1], routes[i], i, i)
	}
	b.WriteString("HEADER,ROUTING_TABLE,Virtual Address,Common Name,Real Address,Last Ref,Last Ref (time_t)\n")
	for i := 0; i+1 < len(routes); i += 2 {
		fmt.Fprintf(&b, "ROUTING_TABLE,%s,%s,192.0.2.1:%d,x,%d\n", routes[i+1], routes[i], 1000+i, lastRef)
	}
	b.WriteString("GLOBAL_STATS,dco_enabled,0\nEND\n")
	return b.String()
}

func write(t *testing.T, path, content string) {
	t.Helper()
	// In place, as OpenVPN does: same inode, new content, new size.
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString(content); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestResolver(t *testing.T) {
	is := is.New(t)
	dir := t.TempDir()
	s1, s2 := filepath.Join(dir, "server-1.status"), filepath.Join(dir, "server-2.status")
	write(t, s1, statusV2(100, devA, "10.240.0.3"))
	write(t, s2, statusV2(100, strings.ToUpper(devB), "10.240.16.3"))
	r := &Resolver{Globs: []string{filepath.Join(dir, "server-*.status")}, Interval: -1}

	for _, name := range []string{devA, devA + ".vpn", strings.ToUpper(devA) + ".VPN", strings.ToUpper(devA[:5]) + devA[5:]} {
		a, err := r.Lookup(name)
		is.NoErr(err)
		is.Equal(a, netip.MustParseAddr("10.240.0.3"))
	}
	a, err := r.Lookup(devB + ".vpn") // the file has it in upper case
	is.NoErr(err)
	is.Equal(a.String(), "10.240.16.3")
	for _, name := range []string{"", ".vpn", "vpn", "ffff", devA + ".vpn.vpn", devA + "x", strings.Repeat("A", 200)} {
		_, err := r.Lookup(name)
		is.True(errors.Is(err, ErrNotFound))
	}

	// Rewritten in place: the new address.
	write(t, s1, statusV2(100, devA, "10.240.0.9"))
	a, _ = r.Lookup(devA)
	is.Equal(a.String(), "10.240.0.9")

	// Torn: the last good entries stay.
	full := statusV2(100, devA, "10.240.0.77")
	write(t, s1, full[:len(full)-10])
	a, err = r.Lookup(devA)
	is.NoErr(err)
	is.Equal(a.String(), "10.240.0.9")
	is.True(errors.Is(r.Refresh(), ErrIncomplete))

	// The same device in two files: the later Last Ref wins, and the other
	// file's entry comes back when the winner's goes.
	write(t, s1, statusV2(100, devA, "10.240.0.9"))
	write(t, s2, statusV2(200, devA, "10.240.16.9", devB, "10.240.16.3"))
	a, _ = r.Lookup(devA)
	is.Equal(a.String(), "10.240.16.9")
	write(t, s2, statusV2(300, devB, "10.240.16.3"))
	a, _ = r.Lookup(devA)
	is.Equal(a.String(), "10.240.0.9")

	// Clients, by file, with the instance from the file name.
	cl, err := r.Clients()
	is.NoErr(err)
	is.Equal(len(cl), 2)
	is.Equal(cl[0].Instance, 1)
	is.Equal(cl[0].CommonName, devA)
	is.Equal(cl[1].Instance, 2)

	// A file that goes away drops its entries.
	is.NoErr(os.Remove(s2))
	_, err = r.Lookup(devB)
	is.True(errors.Is(err, ErrNotFound))

	addrs, err := r.LookupHost(context.Background(), devA+".vpn")
	is.NoErr(err)
	is.Equal(addrs, []string{"10.240.0.9"})
	_, err = r.LookupHost(context.Background(), devB+".vpn")
	var dnsErr *net.DNSError
	is.True(errors.As(err, &dnsErr) && dnsErr.IsNotFound)
}

func TestResolverRealFiles(t *testing.T) {
	is := is.New(t)
	r := &Resolver{Globs: []string{"testdata/openvpn-2.6-v*.status"}}
	// The three files route the same two devices; all Last Refs are equal,
	// so any of their addresses is right, but one must come.
	a, err := r.Lookup(devA + ".vpn")
	is.NoErr(err)
	is.True(strings.HasPrefix(a.String(), "10.240."))
	cl, err := r.Clients()
	is.NoErr(err)
	is.Equal(len(cl), 6)
	for _, c := range cl {
		is.True(c.VirtualAddress.Is4()) // version 1's too, from its routing table
	}
}

func TestResolverInterval(t *testing.T) {
	is := is.New(t)
	dir := t.TempDir()
	s1 := filepath.Join(dir, "server-1.status")
	write(t, s1, statusV2(100, devA, "10.240.0.3"))
	r := &Resolver{Globs: []string{filepath.Join(dir, "*.status")}, Interval: 1 << 62}
	a, _ := r.Lookup(devA)
	is.Equal(a.String(), "10.240.0.3")
	write(t, s1, statusV2(100, devA, "10.240.0.4"))
	a, _ = r.Lookup(devA)
	is.Equal(a.String(), "10.240.0.3") // not yet: the interval has not passed
	is.NoErr(r.Refresh())
	a, _ = r.Lookup(devA)
	is.Equal(a.String(), "10.240.0.4")
}

func TestResolverLookupAllocs(t *testing.T) {
	dir := t.TempDir()
	write(t, filepath.Join(dir, "server-1.status"), statusV2(100, devA, "10.240.0.3"))
	r := &Resolver{Globs: []string{filepath.Join(dir, "*.status")}, Interval: 1 << 62}
	upper := strings.ToUpper(devA) + ".VPN"
	if _, err := r.Lookup(upper); err != nil {
		t.Fatal(err)
	}
	if n := testing.AllocsPerRun(1000, func() { r.lookup(devA + ".vpn"); r.lookup(upper) }); n != 0 {
		t.Errorf("lookup allocates %v times", n)
	}
}

func TestResolverConcurrent(t *testing.T) {
	dir := t.TempDir()
	s1 := filepath.Join(dir, "server-1.status")
	write(t, s1, statusV2(100, devA, "10.240.0.3"))
	r := &Resolver{Globs: []string{filepath.Join(dir, "*.status")}, Interval: -1}
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for range 200 {
				if a, err := r.Lookup(devA); err == nil && !a.Is4() {
					t.Error("bad address")
				}
			}
		})
	}
	for i := range 50 {
		write(t, s1, statusV2(100, devA, fmt.Sprintf("10.240.0.%d", 3+i)))
	}
	wg.Wait()
}

// TestResolverReadsOnlyWhatChanged: a file whose identity (device, inode,
// size, modification time) is the same is not read again, even when its
// bytes differ; a new inode alone is read; an unreadable file keeps its
// last good entries until it reads again.
func TestResolverReadsOnlyWhatChanged(t *testing.T) {
	is := is.New(t)
	dir := t.TempDir()
	s1 := filepath.Join(dir, "server-1.status")
	write(t, s1, statusV2(100, devA, "10.240.0.3"))
	fi, err := os.Stat(s1)
	is.NoErr(err)
	r := &Resolver{Globs: []string{filepath.Join(dir, "server-*.status")}, Interval: -1}
	lookup := func() string {
		a, err := r.Lookup(devA)
		if err != nil {
			return err.Error()
		}
		return a.String()
	}
	is.Equal(lookup(), "10.240.0.3")

	// Same size, same mtime, same inode, other bytes: not read.
	write(t, s1, statusV2(100, devA, "10.240.0.4"))
	is.NoErr(os.Chtimes(s1, fi.ModTime(), fi.ModTime()))
	is.Equal(lookup(), "10.240.0.3")

	// The same bytes under a new inode (renamed into place), size and
	// mtime kept: read.
	tmp := filepath.Join(dir, "new.tmp")
	write(t, tmp, statusV2(100, devA, "10.240.0.5"))
	is.NoErr(os.Chtimes(tmp, fi.ModTime(), fi.ModTime()))
	is.NoErr(os.Rename(tmp, s1))
	is.Equal(lookup(), "10.240.0.5")

	// Unreadable (a directory where the file was): the last good entries
	// stay, and the error is reported.
	is.NoErr(os.Remove(s1))
	is.NoErr(os.Mkdir(s1, 0o755))
	is.True(r.Refresh() != nil)
	is.Equal(lookup(), "10.240.0.5")

	// Readable again: read.
	is.NoErr(os.Remove(s1))
	write(t, s1, statusV2(100, devA, "10.240.0.6"))
	is.Equal(lookup(), "10.240.0.6")
}
