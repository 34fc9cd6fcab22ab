package connectproxy

import (
	"errors"
	"net"
	"os"
	"testing"
	"time"
)

// TestCloseWhileDeviceStalls: a tunnel whose device reads nothing, while
// the caller writes until its writes block, is closed by Close at once:
// the copy that waits to write to the device holds nothing that the
// close of the caller's connection waits for.
func TestCloseWhileDeviceStalls(t *testing.T) {
	stall := make(chan struct{})
	svc := startService(t, func(net.Conn) { <-stall })
	t.Cleanup(func() { close(stall) }) // before the service's cleanup
	w := newWorld(t, nil)
	w.addDevice(devUUID, svc.port, svc.port)
	a := connect(t, w.addr, target(devUUID, svc.port))
	if a.status != 200 {
		t.Fatal(a.line)
	}
	chunk := make([]byte, 64<<10)
	for sent := 0; ; sent += len(chunk) {
		a.conn.SetWriteDeadline(time.Now().Add(200 * time.Millisecond))
		if _, err := a.conn.Write(chunk); err != nil {
			if !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatal(err)
			}
			t.Logf("the caller's writes block after %d KiB", sent>>10)
			break
		}
		if sent > 1<<30 {
			t.Fatal("1 GiB written to a device that reads nothing")
		}
	}
	closed := make(chan error, 1)
	go func() { closed <- w.h.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close does not return while the device stalls")
	}
	if n := w.h.Tunnels(); n != 0 {
		t.Fatalf("%d tunnels open after Close", n)
	}
}
