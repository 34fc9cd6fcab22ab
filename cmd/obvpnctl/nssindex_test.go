package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/matryer/is"

	"github.com/obvpn/obvpn/nss"
)

const statusOne = "TITLE,OpenVPN 2.6.14\nTIME,2026-11-25 04:26:21,1795580781\n" +
	"HEADER,ROUTING_TABLE,Virtual Address,Common Name,Real Address,Last Ref,Last Ref (time_t)\n" +
	"ROUTING_TABLE,10.240.0.3,0123456789abcdef0123456789abcdef,192.0.2.1:1194,x,1795580778\nEND\n"

func TestNSSIndex(t *testing.T) {
	is := is.New(t)
	t.Setenv("NSS_OPENVPN_INDEX", "")
	dir := t.TempDir()
	is.NoErr(os.WriteFile(filepath.Join(dir, "server-1.status"), []byte(statusOne), 0o644))
	glob := filepath.Join(dir, "server-*.status")
	code, out, errOut := runCmd("nss-index", "--glob", glob)
	is.Equal(errOut, "")
	is.Equal(code, 0)
	path := filepath.Join(dir, "nss.index") // the default: next to the status files
	is.Equal(out, path+": 1 names from 1 status files\n")
	ix, err := nss.ReadIndex(path)
	is.NoErr(err)
	a, err := ix.Lookup("0123456789ABCDEF0123456789abcdef.vpn")
	is.NoErr(err)
	is.Equal(a.String(), "10.240.0.3")

	// lookup answers from the index while it is fresh: here it says
	// something the status file does not, to tell which answered.
	r := &nss.Resolver{Globs: []string{glob}}
	r.Learn(filepath.Join(dir, "server-1.status"), "learned", a)
	is.NoErr(r.WriteIndex(path))
	code, out, _ = runCmd("lookup", "--glob", glob, "learned.vpn")
	is.Equal(code, 0)
	is.Equal(out, "10.240.0.3\n")
	// Stale (the file rewritten): the status files answer.
	is.NoErr(os.WriteFile(filepath.Join(dir, "server-1.status"), []byte(statusOne+"\n"), 0o644))
	code, _, _ = runCmd("lookup", "--glob", glob, "learned.vpn")
	is.Equal(code, 1)

	// --index and NSS_OPENVPN_INDEX name another file; a directory that
	// does not exist is an error.
	other := filepath.Join(dir, "other.index")
	code, _, _ = runCmd("nss-index", "--glob", glob, "--index", other)
	is.Equal(code, 0)
	_, err = nss.ReadIndex(other)
	is.NoErr(err)
	t.Setenv("NSS_OPENVPN_INDEX", filepath.Join(dir, "env.index"))
	code, out, _ = runCmd("nss-index", "--glob", glob)
	is.Equal(code, 0)
	is.True(strings.HasPrefix(out, filepath.Join(dir, "env.index")))
	code, _, errOut = runCmd("nss-index", "--glob", glob, "--index", filepath.Join(dir, "no", "such", "nss.index"))
	is.Equal(code, 1)
	is.True(strings.Contains(errOut, "no such file"))
	code, _, _ = runCmd("nss-index", "extra")
	is.Equal(code, 2)
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

// TestNSSIndexWatch: --watch keeps the index current as the status file
// changes, and removes it when it stops.
func TestNSSIndexWatch(t *testing.T) {
	is := is.New(t)
	t.Setenv("NSS_OPENVPN_INDEX", "")
	dir := t.TempDir()
	status := filepath.Join(dir, "server-1.status")
	is.NoErr(os.WriteFile(status, []byte(statusOne), 0o644))
	glob := filepath.Join(dir, "server-*.status")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan int, 1)
	var stderr syncBuffer
	go func() {
		done <- nssIndex(ctx, []string{"--glob", glob, "--watch", "--poll", "10ms"}, &bytes.Buffer{}, &stderr)
	}()
	path := filepath.Join(dir, "nss.index")
	// The writer's renames have no hook outside its process: poll the
	// file, with a deadline.
	waitFor := func(want string) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
			if ix, err := nss.ReadIndex(path); err == nil && !ix.Stale([]string{glob}) {
				if a, err := ix.Lookup("0123456789abcdef0123456789abcdef"); err == nil && a.String() == want {
					return
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("the index never said %s", want)
			}
		}
	}
	waitFor("10.240.0.3")
	is.NoErr(os.WriteFile(status, []byte(strings.Replace(statusOne, "10.240.0.3", "10.240.0.44", 1)), 0o644))
	waitFor("10.240.0.44")
	cancel()
	is.Equal(<-done, 0)
	_, err := os.Stat(path)
	is.True(os.IsNotExist(err))
}
