package sdnotify_test

import (
	"context"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/obvpn/obvpn/cmd/internal/sdnotify"
	"github.com/obvpn/obvpn/cmd/internal/sdnotify/sdnotifytest"
)

func TestNotify(t *testing.T) {
	for _, tc := range []struct {
		name   string
		socket func(testing.TB) *sdnotifytest.Socket
	}{
		{"path", sdnotifytest.NewSocket},
		{"abstract", sdnotifytest.NewAbstractSocket},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sock := tc.socket(t)
			if tc.name == "abstract" && !strings.HasPrefix(sock.Addr, "@") {
				t.Fatalf("address %q, want one that starts with @", sock.Addr)
			}
			n := &sdnotify.Notifier{Socket: sock.Addr}
			mono, err := sdnotify.MonotonicUsec()
			if err != nil {
				t.Fatal(err)
			}
			sent := [][]string{
				{sdnotify.Ready, sdnotify.MainPID(42)},
				{sdnotify.Reloading, mono},
				{sdnotify.Stopping, sdnotify.Status("two\nlines")},
			}
			for _, states := range sent {
				if err := n.Notify(states...); err != nil {
					t.Fatal(err)
				}
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			for _, want := range sent {
				got, err := sock.Next(ctx)
				if err != nil {
					t.Fatal(err)
				}
				if !slices.Equal(got, want) {
					t.Errorf("got %q, want %q", got, want)
				}
			}
		})
	}
}

// TestMonotonicUsec: the value is CLOCK_MONOTONIC's, which the Go runtime's
// monotonic clock follows, so two readings frame a sleep.
func TestMonotonicUsec(t *testing.T) {
	read := func() int64 {
		s, err := sdnotify.MonotonicUsec()
		if err != nil {
			t.Fatal(err)
		}
		v, ok := strings.CutPrefix(s, "MONOTONIC_USEC=")
		if !ok {
			t.Fatalf("got %q, want MONOTONIC_USEC=…", s)
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n <= 0 {
			t.Fatalf("got %q: not a positive number", s)
		}
		return n
	}
	a := read()
	start := time.Now()
	time.Sleep(20 * time.Millisecond) // a duration to measure, not a wait for an event
	b := read()
	elapsed := time.Since(start)
	if d := time.Duration(b-a) * time.Microsecond; d < 20*time.Millisecond || d > elapsed+time.Millisecond {
		t.Errorf("readings %d µs apart across %v", b-a, elapsed)
	}
}

func TestDisabled(t *testing.T) {
	var nilN *sdnotify.Notifier
	for _, n := range []*sdnotify.Notifier{nilN, {}} {
		if n.Enabled() {
			t.Error("enabled without a socket")
		}
		if err := n.Notify(sdnotify.Ready); err != nil {
			t.Errorf("without a socket: %v", err)
		}
	}
	n := &sdnotify.Notifier{Socket: "relative.sock"}
	if err := n.Notify(sdnotify.Ready); err == nil {
		t.Error("a relative socket name was taken")
	}
	n = &sdnotify.Notifier{Socket: "/nonexistent/notify.sock"}
	if err := n.Notify(sdnotify.Ready); err == nil {
		t.Error("no error for a socket that is not there")
	}
}

// TestFromEnv: the socket moves from NOTIFY_SOCKET to OBVPN_NOTIFY_SOCKET,
// where a successor finds it and the processes started meanwhile do not
// see NOTIFY_SOCKET.
func TestFromEnv(t *testing.T) {
	t.Setenv(sdnotify.EnvSocket, "/run/systemd/notify")
	t.Setenv(sdnotify.EnvKept, "")
	n := sdnotify.FromEnv()
	if n.Socket != "/run/systemd/notify" {
		t.Errorf("socket %q", n.Socket)
	}
	if _, ok := os.LookupEnv(sdnotify.EnvSocket); ok {
		t.Errorf("%s still set", sdnotify.EnvSocket)
	}
	if got := os.Getenv(sdnotify.EnvKept); got != "/run/systemd/notify" {
		t.Errorf("%s=%q", sdnotify.EnvKept, got)
	}
	// The successor.
	if n := sdnotify.FromEnv(); n.Socket != "/run/systemd/notify" {
		t.Errorf("successor's socket %q", n.Socket)
	}
	os.Unsetenv(sdnotify.EnvKept)
	if n := sdnotify.FromEnv(); n.Enabled() {
		t.Errorf("enabled with neither variable: %q", n.Socket)
	}
}
