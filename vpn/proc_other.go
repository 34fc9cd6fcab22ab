//go:build !linux

package vpn

import (
	"sync"
	"syscall"
	"time"
)

// watch watches process pid until it exits or the watch ends, by asking
// every 100 ms whether it is still there (Linux has pidfds for this).
func watch(pid int) (*process, error) {
	p := &process{pid: pid, exited: make(chan struct{})}
	stop, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for syscall.Kill(pid, 0) == nil {
			select {
			case <-stop:
				return
			case <-t.C:
			}
		}
		p.err = errAdoptedExit
		close(p.exited)
	}()
	var once sync.Once
	p.unwatch = func() { once.Do(func() { close(stop); <-done }) }
	return p, nil
}
