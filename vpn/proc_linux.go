package vpn

import (
	"errors"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// watch watches process pid until it exits or the watch ends: a pidfd
// becomes readable when the process exits, whoever its parent is, and a
// child of this process is reaped then (its exit status is the error).
func watch(pid int) (*process, error) {
	p := &process{pid: pid, exited: make(chan struct{})}
	fd, err := unix.PidfdOpen(pid, 0)
	if errors.Is(err, unix.ESRCH) {
		p.err = p.reap()
		close(p.exited)
		p.unwatch = func() {}
		return p, nil
	}
	if err != nil {
		return nil, err
	}
	var wake [2]int
	if err := unix.Pipe2(wake[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		unix.Close(fd)
		return nil, err
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer unix.Close(fd)
		defer unix.Close(wake[0])
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}, {Fd: int32(wake[0]), Events: unix.POLLIN}}
		for {
			_, err := unix.Poll(fds, -1)
			if errors.Is(err, unix.EINTR) {
				continue
			}
			if fds[1].Revents != 0 {
				return // unwatched
			}
			if err != nil || fds[0].Revents != 0 {
				break
			}
		}
		p.err = p.reap()
		close(p.exited)
	}()
	var once sync.Once
	p.unwatch = func() {
		once.Do(func() {
			_, _ = unix.Write(wake[1], []byte{0})
			<-done
			unix.Close(wake[1])
		})
	}
	return p, nil
}

// reap collects the exit status of the process if it is a child of this
// one; another's child has exited as far as the watch can tell.
func (p *process) reap() error {
	var ws syscall.WaitStatus
	for {
		got, err := syscall.Wait4(p.pid, &ws, syscall.WNOHANG, nil)
		switch {
		case errors.Is(err, unix.EINTR):
			continue
		case err != nil || got != p.pid:
			return errAdoptedExit
		}
		return exitError(ws)
	}
}
