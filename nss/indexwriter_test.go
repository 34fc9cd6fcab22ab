package nss

import (
	"context"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/matryer/is"
)

// TestIndexWriter: the writer writes at once, rewrites after a Learn and
// after a status file changed, and removes its file when it stops.
func TestIndexWriter(t *testing.T) {
	is := is.New(t)
	dir := t.TempDir()
	s1 := filepath.Join(dir, "server-1.status")
	write(t, s1, statusV2(100, devA, "10.240.0.3"))
	r := &Resolver{Globs: []string{filepath.Join(dir, "server-*.status")}}
	writes := make(chan int, 100)
	w := &IndexWriter{Resolver: r, Poll: 10 * time.Millisecond, MinInterval: 10 * time.Millisecond,
		Written: func(n int) { writes <- n }}
	path := filepath.Join(dir, "nss.index")
	is.Equal(w.path(), path) // the default, next to the status files
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	defer func() {
		cancel()
		is.NoErr(<-done)
		_, err := os.Stat(path)
		is.True(os.IsNotExist(err)) // removed
	}()

	// waitFor waits for writes until the file meets cond.
	waitFor := func(what string, cond func(*Index) bool) {
		t.Helper()
		deadline := time.After(10 * time.Second)
		for {
			select {
			case <-writes:
			case <-deadline:
				t.Fatalf("index never %s", what)
			}
			if ix, err := ReadIndex(path); err == nil && cond(ix) {
				return
			}
		}
	}
	answers := func(name, want string) func(*Index) bool {
		return func(ix *Index) bool {
			a, err := ix.Lookup(name)
			return err == nil && a.String() == want && !ix.Stale(r.Globs)
		}
	}
	waitFor("written", answers(devA, "10.240.0.3"))
	r.Learn(s1, devB, netip.MustParseAddr("10.240.0.4"))
	waitFor("learned", answers(devB, "10.240.0.4"))
	write(t, s1, statusV2(100, devA, "10.240.0.5"))
	waitFor("refreshed", answers(devA, "10.240.0.5"))
	// Only the identity changes (same routes, other counters): the index
	// is renewed, so it is not stale.
	write(t, s1, strings.Replace(statusV2(100, devA, "10.240.0.5"), ",1,2,", ",11,22,", 1))
	waitFor("renewed", answers(devA, "10.240.0.5"))
}
