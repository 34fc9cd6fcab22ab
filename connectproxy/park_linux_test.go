package connectproxy

import (
	"io"
	"runtime"
	"strings"
	"testing"
	"time"
)

// parkWorld is a world whose tunnels park after 20 ms without a byte;
// parked receives a value each time a direction parks.
func parkWorld(t *testing.T) (*world, chan struct{}) {
	t.Helper()
	parked := make(chan struct{}, 16)
	w := newWorld(t, func(w *world) {
		w.h.idleAfter = 20 * time.Millisecond
		w.h.parked = func() { parked <- struct{}{} }
	})
	return w, parked
}

func waitParked(t *testing.T, parked chan struct{}, n int) {
	t.Helper()
	for range n {
		select {
		case <-parked:
		case <-time.After(10 * time.Second):
			t.Fatal("the tunnel's directions did not park")
		}
	}
}

// copiers returns the number of goroutines that copy a tunnel direction.
func copiers() int {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	return strings.Count(string(buf), "connectproxy.(*tunnel).copy(")
}

// TestParkedTunnel: an idle tunnel parks both directions and keeps no
// goroutine; bytes wake it, either way, and a half-close passes through a
// parked direction.
func TestParkedTunnel(t *testing.T) {
	svc := startService(t, echo)
	w, parked := parkWorld(t)
	w.addDevice(devUUID, svc.port)
	a := connect(t, w.addr, target(devUUID, svc.port), "Proxy-Authorization: "+basic("u", opKey))
	if a.status != 200 {
		t.Fatalf("got %q, want 200", a.line)
	}
	a.roundTrip(t, "first")
	waitParked(t, parked, 2)
	if n := copiers(); n != 0 {
		t.Fatalf("%d copiers while the tunnel is idle, want 0", n)
	}
	for _, msg := range []string{"woken", strings.Repeat("x", 1<<20)} {
		a.roundTrip(t, msg)
		waitParked(t, parked, 2)
	}
	if err := a.conn.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	a.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	if rest, err := io.ReadAll(a.r); err != nil || len(rest) != 0 {
		t.Fatalf("after the half-close: %q, %v; want the echo's end of stream", rest, err)
	}
	if ti := w.waitClosed(t); ti.BytesToDevice < 1<<20 || ti.BytesFromDevice != ti.BytesToDevice {
		t.Errorf("the tunnel carried %d bytes up and %d down, want the same, over 1 MiB", ti.BytesToDevice, ti.BytesFromDevice)
	}
}

// TestParkedTunnelsClose: Close ends parked tunnels, and the poller's
// goroutine with them.
func TestParkedTunnelsClose(t *testing.T) {
	svc := startService(t, echo)
	w, parked := parkWorld(t)
	w.addDevice(devUUID, svc.port)
	var as []*answer
	for range 3 {
		a := connect(t, w.addr, target(devUUID, svc.port), "Proxy-Authorization: "+basic("u", opKey))
		a.roundTrip(t, "x")
		as = append(as, a)
	}
	waitParked(t, parked, 6)
	if err := w.h.Close(); err != nil {
		t.Fatal(err)
	}
	if n := w.h.Tunnels(); n != 0 {
		t.Fatalf("%d tunnels after Close", n)
	}
	for _, a := range as {
		a.waitEOF(t, 5*time.Second)
	}
	buf := make([]byte, 1<<20)
	if s := string(buf[:runtime.Stack(buf, true)]); strings.Contains(s, "(*poller).wait") {
		t.Fatal("the poller's goroutine outlived the tunnels")
	}
}

// sweepers returns the number of goroutines of idle sweeps.
func sweepers() int {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	return strings.Count(string(buf), "connectproxy.(*Handler).sweep(")
}

// TestIdleSweep: with IdleTimeout, idle tunnels keep no timer and no
// goroutine of their own: one sweep serves them all, it closes the one
// that goes silent while the others carry bytes, and it ends with the
// last tunnel.
func TestIdleSweep(t *testing.T) {
	const n = 8
	svc := startService(t, echo)
	parked := make(chan struct{}, 2*n)
	w := newWorld(t, func(w *world) {
		w.h.IdleTimeout = 400 * time.Millisecond
		w.h.parked = func() {
			select {
			case parked <- struct{}{}:
			default: // the busy tunnels park and wake again: not counted
			}
		}
	})
	w.addDevice(devUUID, svc.port, svc.port)
	var tunnels []*answer
	for range n {
		a := connect(t, w.addr, target(devUUID, svc.port))
		if a.status != 200 {
			t.Fatal(a.line)
		}
		a.roundTrip(t, "x")
		tunnels = append(tunnels, a)
	}
	waitParked(t, parked, 2*n)
	// A direction that parked returns from its copy right after.
	waitFor(t, func() bool { return copiers() == 0 })
	if s := sweepers(); s != 1 {
		t.Fatalf("%d idle tunnels: %d sweeps, want 1", n, s)
	}
	// All but the first stay busy past the limit; the first closes.
	silent := tunnels[0]
	for deadline := time.Now().Add(800 * time.Millisecond); time.Now().Before(deadline); {
		for _, a := range tunnels[1:] {
			a.roundTrip(t, "tick")
		}
		time.Sleep(50 * time.Millisecond)
	}
	silent.waitEOF(t, 5*time.Second)
	if ti := w.waitClosed(t); ti.Err != nil || ti.BytesToDevice != 1 {
		t.Fatalf("closed: %+v, want the silent tunnel with 1 byte and no error", ti)
	}
	if got := w.h.Tunnels(); got != n-1 {
		t.Fatalf("%d tunnels open, want the %d busy ones", got, n-1)
	}
	for _, a := range tunnels[1:] {
		a.conn.Close()
	}
	waitFor(t, func() bool { return w.h.Tunnels() == 0 && sweepers() == 0 })
}
