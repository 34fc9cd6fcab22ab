package connectproxy

import (
	"os"
	"runtime"
	"strings"
	"testing"
	"time"
)

func openPipes(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("cannot list descriptors: %v", err)
	}
	n := 0
	for _, e := range ents {
		if l, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && strings.HasPrefix(l, "pipe:") {
			n++
		}
	}
	return n
}

// TestSplice checks that a tunnel of a Handler with Splice copies on the
// kernel's splice path: each direction's io.Copy holds a pipe (two
// descriptors) while it waits, which only splice(2) does. A copy through
// user-space buffers holds none.
func TestSplice(t *testing.T) {
	svc := startService(t, echo)
	w := newWorld(t, func(w *world) { w.h.Splice = true })
	w.addDevice(devUUID, svc.port, svc.port)
	// Pipes pooled by earlier splices are closed by the collector.
	before := openPipes(t)
	for range 50 {
		runtime.GC()
		time.Sleep(time.Millisecond) // finalizers run on their own goroutine
		before = min(before, openPipes(t))
	}
	a := connect(t, w.addr, target(devUUID, svc.port))
	if a.status != 200 {
		t.Fatal(a.line)
	}
	a.roundTrip(t, "spliced")
	waitFor(t, func() bool { return openPipes(t) >= before+4 })
}

// TestCopyHoldsNoPipe checks that a tunnel of a Handler without Splice,
// the default, copies through its buffers: no pipe is opened while bytes
// flow, and every byte arrives.
func TestCopyHoldsNoPipe(t *testing.T) {
	svc := startService(t, echo)
	w := newWorld(t, nil)
	w.addDevice(devUUID, svc.port, svc.port)
	a := connect(t, w.addr, target(devUUID, svc.port))
	if a.status != 200 {
		t.Fatal(a.line)
	}
	before := openPipes(t)
	payload := strings.Repeat("0123456789abcdef", 1<<15) // 512 KiB, two buffers
	for range 4 {
		a.roundTrip(t, payload)
		if n := openPipes(t); n > before {
			t.Fatalf("%d pipes open while the tunnel copies, %d before", n, before)
		}
	}
}
