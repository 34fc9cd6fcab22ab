package nss

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/matryer/is"
)

// TestIndexRoundTrip: every name the resolver answers, the index file
// answers alike, and names it does not hold are not found.
func TestIndexRoundTrip(t *testing.T) {
	is := is.New(t)
	dir := t.TempDir()
	s1, s2 := filepath.Join(dir, "server-1.status"), filepath.Join(dir, "server-2.status")
	write(t, s1, statusV2(100, devA, "10.240.0.3", "Odd-Name", "10.240.0.5"))
	write(t, s2, statusV2(200, strings.ToUpper(devB), "10.240.16.3", devA, "10.240.16.9"))
	r := &Resolver{Globs: []string{filepath.Join(dir, "server-*.status")}, Interval: 1 << 62}
	path := filepath.Join(dir, "nss.index")
	is.NoErr(r.WriteIndex(path))
	ix, err := ReadIndex(path)
	is.NoErr(err)
	is.Equal(len(ix.Sources()), 2)
	is.True(!ix.Stale(r.Globs))
	for _, name := range []string{devA, devB + ".vpn", strings.ToUpper(devB) + ".VPN", "odd-name", "ODD-NAME.vpn"} {
		want, err := r.Lookup(name)
		is.NoErr(err)
		got, err := ix.Lookup(name)
		is.NoErr(err)
		is.Equal(got, want)
	}
	a, _ := ix.Lookup(devA)
	is.Equal(a.String(), "10.240.16.9") // the later Last Ref
	for _, name := range []string{"", ".vpn", "x", "ffffffffffffffffffffffffffffffff", "odd"} {
		_, err := ix.Lookup(name)
		is.True(errors.Is(err, ErrNotFound))
	}

	// Rewritten: stale. A new file: stale. Rewritten again and indexed:
	// fresh.
	write(t, s1, statusV2(100, devA, "10.240.0.4"))
	is.True(ix.Stale(r.Globs))
	is.NoErr(r.Refresh())
	is.NoErr(r.WriteIndex(path))
	ix, err = ReadIndex(path)
	is.NoErr(err)
	is.True(!ix.Stale(r.Globs))
	write(t, filepath.Join(dir, "server-3.status"), statusV2(1, "c", "10.0.0.1"))
	is.True(ix.Stale(r.Globs))
	is.NoErr(os.Remove(filepath.Join(dir, "server-3.status")))
	is.NoErr(os.Remove(s2))
	is.True(ix.Stale(r.Globs)) // a source is gone
}

// TestIndexCorrupt: an index cut anywhere, or with any byte changed, is
// refused or answers only what was written (a changed record is caught by
// its check); nothing panics.
func TestIndexCorrupt(t *testing.T) {
	dir := t.TempDir()
	write(t, filepath.Join(dir, "server-1.status"), statusV2(100, devA, "10.240.0.3", devB, "10.240.0.4"))
	r := &Resolver{Globs: []string{filepath.Join(dir, "server-*.status")}}
	path := filepath.Join(dir, "nss.index")
	if err := r.WriteIndex(path); err != nil {
		t.Fatal(err)
	}
	good, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for n := range len(good) {
		if _, err := ParseIndex(good[:n]); !errors.Is(err, ErrIndexFormat) {
			t.Fatalf("cut at %d of %d: %v", n, len(good), err)
		}
	}
	for i := range good {
		for _, x := range []byte{0x01, 0x80, 0xff} {
			b := append([]byte(nil), good...)
			b[i] ^= x
			ix, err := ParseIndex(b)
			if err != nil {
				if !errors.Is(err, ErrIndexFormat) {
					t.Fatalf("byte %d: %v", i, err)
				}
				continue
			}
			for _, name := range []string{devA, devB} {
				a, err := ix.Lookup(name)
				if err == nil && a.String() != map[string]string{devA: "10.240.0.3", devB: "10.240.0.4"}[name] {
					t.Fatalf("byte %d ^ %#x: %s answers %s", i, x, name, a)
				}
			}
		}
	}
}

func FuzzParseIndex(f *testing.F) {
	dir := f.TempDir()
	st := filepath.Join(dir, "server-1.status")
	if err := os.WriteFile(st, []byte(statusV2(100, devA, "10.240.0.3", "x", "10.0.0.1")), 0o644); err != nil {
		f.Fatal(err)
	}
	r := &Resolver{Globs: []string{st}}
	path := filepath.Join(dir, "nss.index")
	if err := r.WriteIndex(path); err != nil {
		f.Fatal(err)
	}
	good, _ := os.ReadFile(path)
	f.Add(good, devA)
	f.Add(good[:100], "x")
	f.Add([]byte(indexMagic), "")
	f.Fuzz(func(t *testing.T, b []byte, name string) {
		ix, err := ParseIndex(b)
		if err != nil {
			if !errors.Is(err, ErrIndexFormat) {
				t.Fatal(err)
			}
			return
		}
		a, err := ix.Lookup(name)
		if err == nil && !a.Is4() {
			t.Fatalf("%q: %s", name, a)
		}
		if err != nil && !errors.Is(err, ErrNotFound) && !errors.Is(err, ErrIndexFormat) {
			t.Fatal(err)
		}
		ix.Stale([]string{filepath.Join(t.TempDir(), "*")})
	})
}

// TestIndexGenerated: a resolver over many generated names (random case,
// lengths from 1 byte to 300, odd bytes) and the index agree on each, and
// on as many names that are absent.
func TestIndexGenerated(t *testing.T) {
	dir := t.TempDir()
	rng := rand.New(rand.NewPCG(1, 2))
	const alphabet = "abcdefABCDEF0123456789-_.xyzXYZ é\x01"
	var routes []string
	names := map[string]bool{}
	for i := 0; len(names) < 3000; i++ {
		n := make([]byte, 1+rng.IntN(40))
		if i%10 == 0 {
			n = make([]byte, 1+rng.IntN(300))
		}
		if i%3 == 0 {
			n = []byte(fmt.Sprintf("%032x", rng.Uint64()))
		}
		for j := range n {
			if i%3 != 0 {
				n[j] = alphabet[rng.IntN(len(alphabet))]
			}
		}
		if names[asciiLower(string(n))] || string(n) == "UNDEF" {
			continue
		}
		names[asciiLower(string(n))] = true
		routes = append(routes, string(n), fmt.Sprintf("10.%d.%d.%d", i>>16, i>>8&255, i&255))
	}
	write(t, filepath.Join(dir, "server-1.status"), statusV2(100, routes[:len(routes)/2]...))
	write(t, filepath.Join(dir, "server-2.status"), statusV2(100, routes[len(routes)/2:]...))
	r := &Resolver{Globs: []string{filepath.Join(dir, "server-*.status")}, Interval: 1 << 62}
	path := filepath.Join(dir, "nss.index")
	if err := r.WriteIndex(path); err != nil {
		t.Fatal(err)
	}
	ix, err := ReadIndex(path)
	if err != nil {
		t.Fatal(err)
	}
	check := func(name string) {
		want, werr := r.Lookup(name)
		got, gerr := ix.Lookup(name)
		if got != want || (werr == nil) != (gerr == nil) {
			t.Fatalf("%q: resolver %v %v, index %v %v", name, want, werr, got, gerr)
		}
	}
	for i := 0; i < len(routes); i += 2 {
		check(routes[i])
		check(strings.ToUpper(routes[i]) + ".vpn")
		check(routes[i] + "z")
	}
}
