package connectproxy

import (
	"io"
	"os"
	"runtime"
	"runtime/debug"
	"strings"
	"sync"
	"testing"
	"time"
)

// steady returns the goroutine and descriptor counts once they stop
// changing (five equal readings in a row), after idle connections are
// closed and the garbage collector has run.
func steady(t testing.TB, idle func()) (int, int) {
	t.Helper()
	g, f, same := -1, -1, 0
	for deadline := time.Now().Add(10 * time.Second); same < 5 && time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		idle()
		runtime.GC()
		g2, f2 := runtime.NumGoroutine(), openFDs(t)
		if g2 == g && f2 == f {
			same++
		} else {
			g, f, same = g2, f2, 0
		}
	}
	return g, f
}

func openFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("cannot count descriptors: %v", err)
	}
	return len(ents)
}

// openSockets counts the sockets among the open descriptors.
func openSockets(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("cannot count descriptors: %v", err)
	}
	n := 0
	for _, e := range ents {
		if l, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && strings.HasPrefix(l, "socket:") {
			n++
		}
	}
	return n
}

// settle waits until the goroutines and descriptors are back to at most
// before (after the garbage collector has closed pooled splice pipes), for
// at most 10 s, and returns what it saw last.
func settle(t testing.TB, goroutines, fds int, idle func()) (int, int) {
	t.Helper()
	var g, f int
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		idle()
		runtime.GC()
		g, f = runtime.NumGoroutine(), openFDs(t)
		if g <= goroutines && f <= fds {
			break
		}
	}
	return g, f
}

// TestNoLeaks opens and closes 1,000 tunnels, some ending by the caller,
// some by the device, some refused, and checks that the goroutines and
// file descriptors come back to what they were.
func TestNoLeaks(t *testing.T) {
	svc := startService(t, echo)
	w := newWorld(t, nil)
	w.addDevice(devUUID, svc.port, svc.port)
	client := w.api.Client()
	idle := func() { client.HTTPClient.CloseIdleConnections() }

	run := func(n int) {
		const workers = 8
		var wg sync.WaitGroup
		jobs := make(chan int)
		for range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range jobs {
					switch i % 4 {
					case 0, 1: // a round trip, then the caller closes
						a := connect(t, w.addr, target(devUUID, svc.port))
						if a.status != 200 {
							t.Errorf("tunnel %d: %s", i, a.line)
							continue
						}
						a.roundTrip(t, "ping")
						a.conn.Close()
					case 2: // half-close: the device ends it
						a := connect(t, w.addr, target(devUUID, svc.port))
						if a.status != 200 {
							t.Errorf("tunnel %d: %s", i, a.line)
							continue
						}
						io.WriteString(a.conn, "bye")
						a.conn.(interface{ CloseWrite() error }).CloseWrite()
						io.Copy(io.Discard, a.r)
						a.conn.Close()
					case 3: // refused
						a := connect(t, w.addr, "example.com:443")
						if a.status != 403 {
							t.Errorf("request %d: %s", i, a.line)
						}
						a.conn.Close()
					}
				}
			}()
		}
		for i := range n {
			jobs <- i
		}
		close(jobs)
		wg.Wait()
		waitFor(t, func() bool { return w.h.Tunnels() == 0 })
	}

	run(16) // warm up: pools, caches
	g0, f0 := steady(t, idle)
	s0 := openSockets(t)

	// Without the garbage collector, whose finalizers would close the
	// sockets that the proxy forgot, the sockets must all be closed.
	defer debug.SetGCPercent(debug.SetGCPercent(-1))
	run(1000)
	s1 := openSockets(t)
	for deadline := time.Now().Add(5 * time.Second); s1 > s0 && time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		idle()
		s1 = openSockets(t)
	}
	if s1 > s0 {
		t.Errorf("sockets: %d before, %d after 1,000 tunnels", s0, s1)
	}
	// The collector closes the splice pipes that the runtime pools.
	debug.SetGCPercent(100)
	g1, f1 := settle(t, g0, f0, idle)
	t.Logf("goroutines %d → %d, descriptors %d → %d, sockets %d → %d", g0, g1, f0, f1, s0, s1)
	if g1 > g0 {
		buf := make([]byte, 1<<20)
		t.Errorf("goroutines: %d before, %d after 1,000 tunnels\n%s", g0, g1, buf[:runtime.Stack(buf, true)])
	}
	if f1 > f0 {
		t.Errorf("file descriptors: %d before, %d after 1,000 tunnels", f0, f1)
	}
}
