package vpntest

import (
	"context"
	"fmt"
	"net"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// inNetns runs f on an OS thread that has entered the namespace, then
// returns the thread to the process's namespace. Sockets f creates stay in
// the namespace for their whole life. If the thread cannot be returned, it
// is left locked, and Go ends it with its goroutine.
func (n *Netns) inNetns(f func()) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		self, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer self.Close()
		target, err := os.Open("/var/run/netns/" + n.Name)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer target.Close()
		if err := setns(target.Fd()); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("vpntest: entering %s: %w", n.Name, err)
			return
		}
		f()
		if err := setns(self.Fd()); err != nil {
			errc <- nil // the thread stays locked and dies with this goroutine
			return
		}
		runtime.UnlockOSThread()
		errc <- nil
	}()
	return <-errc
}

func setns(fd uintptr) error {
	return unix.Setns(int(fd), unix.CLONE_NEWNET)
}

// Listen listens on addr inside the namespace, such as a device's service.
func (n *Netns) Listen(network, addr string) (net.Listener, error) {
	var l net.Listener
	var err error
	if nerr := n.inNetns(func() { l, err = net.Listen(network, addr) }); nerr != nil {
		return nil, nerr
	}
	return l, err
}

// Dial connects to addr from inside the namespace.
func (n *Netns) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	// The socket is made in the namespace; connecting may block, so it is
	// done there too, bounded by ctx.
	var c net.Conn
	var err error
	if nerr := n.inNetns(func() {
		var d net.Dialer
		c, err = d.DialContext(ctx, network, addr)
	}); nerr != nil {
		return nil, nerr
	}
	return c, err
}
