package upgrade

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/obvpn/obvpn/cmd/internal/sdnotify"
	"github.com/obvpn/obvpn/cmd/internal/sdnotify/sdnotifytest"
)

// The successor that the test's upgrades start is this test binary
// again: TestMain runs it as childMain, as envChild says.
const (
	envChild   = "UPGRADE_TEST_CHILD"   // "exit": exit 1 at once; "serve": serve until /quit
	envPIDFile = "UPGRADE_TEST_PIDFILE" // the pid file, for the child's Upgrader
	listenAddr = "127.0.0.1:0"          // the key under which the listener passes
)

func TestMain(m *testing.M) {
	switch os.Getenv(envChild) {
	case "":
		os.Exit(m.Run())
	case "exit":
		fmt.Fprintln(os.Stderr, "upgrade test: a successor that fails")
		os.Exit(1)
	default:
		os.Exit(childMain())
	}
}

// childMain is the successor: it takes the listener over, says it is
// ready, answers with its pid until GET /quit, and says it stops.
func childMain() int {
	u, err := New(Options{PIDFile: os.Getenv(envPIDFile), Notifier: sdnotify.FromEnv()})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer u.Stop()
	if !u.HasParent() {
		fmt.Fprintln(os.Stderr, "upgrade test: the successor has no parent")
		return 1
	}
	l, err := u.Listen("tcp", listenAddr)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	quit := make(chan struct{})
	srv := &http.Server{Handler: pidHandler(quit), ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(l)
	if err := u.Ready(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	select {
	case <-quit:
	case <-time.After(30 * time.Second): // the test is gone
	}
	u.Stopping()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	srv.Shutdown(ctx) // the answer to /quit goes out first
	return 0
}

// pidHandler answers with the process's pid; /quit closes quit.
func pidHandler(quit chan struct{}) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, os.Getpid())
		if r.URL.Path == "/quit" && quit != nil {
			close(quit)
		}
	})
}

// once is whether TestUpgrade has run in this process.
var once atomic.Bool

// TestUpgrade upgrades this process twice, to a successor that exits 1
// (the upgrade fails, this process keeps its listener and the pid file,
// and systemd is told READY=1 again) and to one that serves (it answers
// on the same socket, names itself in the pid file and as MAINPID; a
// later upgrade here is refused). The notifications arrive in order.
func TestUpgrade(t *testing.T) {
	if !once.CompareAndSwap(false, true) {
		t.Skip("tableflip allows one Upgrader a process: TestUpgrade runs once a test binary (-count)")
	}
	notify := sdnotifytest.NewSocket(t)
	t.Setenv(sdnotify.EnvSocket, notify.Addr)
	t.Setenv(sdnotify.EnvKept, "")
	pidFile := filepath.Join(t.TempDir(), "test.pid")
	t.Setenv(envPIDFile, pidFile)
	logs := new(logBuffer)
	u, err := New(Options{PIDFile: pidFile, Timeout: 20 * time.Second, Notifier: sdnotify.FromEnv(),
		Logger: slog.New(slog.NewTextHandler(logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer u.Stop()
	l, err := u.Listen("tcp", listenAddr)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: pidHandler(nil), ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(l)
	defer srv.Close()
	if err := u.Ready(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	expect := func(states ...string) sdnotifytest.Message {
		t.Helper()
		m, err := notify.Next(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range states {
			if !m.Has(s) {
				t.Errorf("notification %q lacks %s", m, s)
			}
		}
		return m
	}
	self := os.Getpid()
	expect(sdnotify.Ready, sdnotify.MainPID(self))
	addr := l.Addr().String()
	if got := get(t, addr, "/"); got != self {
		t.Errorf("served by %d, want %d", got, self)
	}

	t.Setenv(envChild, "exit")
	err = u.Upgrade()
	if err == nil || !strings.Contains(err.Error(), "exit status 1") {
		t.Errorf("upgrade to a failing successor: %v, want its exit status 1", err)
	}
	if m := expect(sdnotify.Reloading); m.Value("MONOTONIC_USEC") == "" {
		t.Errorf("notification %q: no MONOTONIC_USEC", m)
	}
	if m := expect(sdnotify.Ready, sdnotify.MainPID(self)); !strings.Contains(m.Value("STATUS"), "upgrade failed") {
		t.Errorf("notification %q: want a STATUS that says the upgrade failed", m)
	}
	if u.HandedOver() {
		t.Error("handed over after a failed upgrade")
	}
	if got := readPID(t, pidFile); got != self {
		t.Errorf("pid file %d after the failed upgrade, want %d", got, self)
	}
	if got := get(t, addr, "/"); got != self {
		t.Errorf("after the failed upgrade served by %d, want %d", got, self)
	}
	if !strings.Contains(logs.String(), "upgrade failed: this process keeps serving") {
		t.Errorf("log %q: want the failure", logs.String())
	}

	t.Setenv(envChild, "serve")
	if err := u.Upgrade(); err != nil {
		t.Fatalf("upgrade: %v", err)
	}
	expect(sdnotify.Reloading)
	ready := expect(sdnotify.Ready)
	child, _ := strconv.Atoi(ready.Value("MAINPID"))
	if child == 0 || child == self {
		t.Fatalf("the successor's notification %q: want its own MAINPID", ready)
	}
	if got := readPID(t, pidFile); got != child {
		t.Errorf("pid file %d after the upgrade, want the successor %d", got, child)
	}
	if !u.HandedOver() {
		t.Error("not handed over after the upgrade")
	}
	if err := u.Upgrade(); err == nil {
		t.Error("a second upgrade after handing over was not refused")
	}
	// The old process lets go of its listener; the successor answers on
	// the same socket, which never closed.
	srv.Close()
	if got := get(t, addr, "/"); got != child {
		t.Errorf("served by %d after the hand-over, want the successor %d", got, child)
	}
	if got := get(t, addr, "/quit"); got != child {
		t.Errorf("/quit served by %d, want the successor %d", got, child)
	}
	expect(sdnotify.Stopping)
	u.Stopping() // handed over: nothing to tell systemd
	if m, err := notify.Next(expired()); err == nil {
		t.Errorf("unexpected notification %q", m)
	}
}

// get asks addr for path and returns the pid that answered.
func get(t *testing.T, addr, path string) int {
	t.Helper()
	c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + addr + path)
	if err != nil {
		if errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("GET %s refused", path)
		}
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	pid, err := strconv.Atoi(string(body))
	if err != nil {
		t.Fatalf("GET %s: %q", path, body)
	}
	return pid
}

func readPID(t *testing.T, path string) int {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return pid
}

func expired() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}

// logBuffer is a log that the test reads while the Upgrader writes it.
type logBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
