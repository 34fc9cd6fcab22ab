package nss

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/matryer/is"
)

// TestLearnForget: a learned entry answers at once and overrides its own
// file until the file is rewritten after it; a forgotten name stops
// resolving at once unless another file routes it.
func TestLearnForget(t *testing.T) {
	is := is.New(t)
	dir := t.TempDir()
	s1, s2 := filepath.Join(dir, "server-1.status"), filepath.Join(dir, "server-2.status")
	write(t, s1, statusV2(100, devA, "10.240.0.3"))
	r := &Resolver{Globs: []string{filepath.Join(dir, "server-*.status")}, Interval: 1 << 62}
	lookup := func(name string) string {
		a, err := r.Lookup(name)
		if err != nil {
			return "-"
		}
		return a.String()
	}
	is.Equal(lookup(devA), "10.240.0.3")

	// Learned: at once, in any case, over what the file says.
	r.Learn(s1, strings.ToUpper(devB), netip.MustParseAddr("10.240.0.7"))
	is.Equal(lookup(devB+".vpn"), "10.240.0.7")
	r.Learn(s1, devA, netip.MustParseAddr("10.240.0.8"))
	is.Equal(lookup(devA), "10.240.0.8")
	// A refresh of an unchanged file keeps it.
	is.NoErr(r.Refresh())
	is.Equal(lookup(devB), "10.240.0.7")

	// Forgotten: gone at once; another file's route comes back.
	write(t, s2, statusV2(50, devA, "10.240.16.3"))
	is.NoErr(r.Refresh())
	r.Forget(s1, devA)
	is.Equal(lookup(devA), "10.240.16.3")
	r.Forget(s2, devA)
	is.Equal(lookup(devA), "-")
	r.Forget(s1, "nobody") // no harm

	// s1 rewritten after the events: the file is the truth again, devB
	// (never written by OpenVPN) is gone and devA is back from both files.
	future := time.Now().Add(time.Second)
	write(t, s1, statusV2(100, devA, "10.240.0.3"))
	is.NoErr(os.Chtimes(s1, future, future))
	is.NoErr(r.Refresh())
	is.Equal(lookup(devB), "-")
	is.Equal(lookup(devA), "10.240.0.3") // s2's entry is still forgotten
	write(t, s2, statusV2(50, devA, "10.240.16.3"))
	is.NoErr(os.Chtimes(s2, future, future))
	is.NoErr(r.Refresh())
	is.Equal(lookup(devA), "10.240.0.3") // Last Ref 100 > 50

	// A file rewritten before the event (mtime earlier) does not expire it.
	r.Learn(s1, devA, netip.MustParseAddr("10.240.0.9"))
	past := time.Now().Add(-time.Minute)
	write(t, s1, statusV2(100, devA, "10.240.0.3", "x", "10.0.0.1"))
	is.NoErr(os.Chtimes(s1, past, past))
	is.NoErr(r.Refresh())
	is.Equal(lookup(devA), "10.240.0.9")
	is.Equal(lookup("x"), "10.0.0.1")

	// Not IPv4: the name is gone, as with Forget.
	r.Learn(s1, devA, netip.MustParseAddr("2001:db8::1"))
	is.Equal(lookup(devA), "10.240.16.3")
	// Learn before the first refresh: the first lookup still reads the
	// files.
	r2 := &Resolver{Globs: r.Globs, Interval: 1 << 62}
	r2.Learn(s1, devB, netip.MustParseAddr("10.1.1.1"))
	a, err := r2.Lookup("x")
	is.NoErr(err)
	is.Equal(a.String(), "10.0.0.1")
	a, _ = r2.Lookup(devB)
	is.Equal(a.String(), "10.1.1.1")
}

// TestLearnConcurrent: Learn and Forget race with lookups and refreshes
// (run with -race).
func TestLearnConcurrent(t *testing.T) {
	dir := t.TempDir()
	s1 := filepath.Join(dir, "server-1.status")
	write(t, s1, statusV2(100, devA, "10.240.0.3"))
	r := &Resolver{Globs: []string{filepath.Join(dir, "*.status")}, Interval: -1}
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for range 3 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				if a, err := r.Lookup(devB); err == nil && !a.Is4() {
					t.Error("bad address")
				}
				r.Lookup(devA)
			}
		})
	}
	for i := range 300 {
		r.Learn(s1, devB, netip.AddrFrom4([4]byte{10, 240, 1, byte(i)}))
		if a, err := r.Lookup(devB); err != nil || a.As4()[3] != byte(i) {
			t.Fatalf("after Learn %d: %v %v", i, a, err)
		}
		r.Forget(s1, devB)
		if _, err := r.Lookup(devB); err == nil {
			t.Fatalf("after Forget %d: still resolves", i)
		}
	}
	close(stop)
	wg.Wait()
}
