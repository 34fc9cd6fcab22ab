package haproxy

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// proc is a process watched through a pidfd, so that signals reach the
// process that was opened and never one that reused its pid. A goroutine
// polls the pidfd until the process exits, reaps it when it is a child of
// this process, and closes done; or until release, after which done never
// closes. The goroutine owns the descriptors and closes them on its way
// out.
type proc struct {
	pid   int
	done  chan struct{} // closed once the process has exited
	ended chan struct{} // closed once the goroutine has returned
	err   error         // how it exited, once done is closed

	mu    sync.Mutex
	pidfd int // -1 once closed
	wake  int // eventfd that release writes; -1 once closed
}

// openProc pins pid with a pidfd and watches it. It fails with
// os.ErrProcessDone when there is no such process.
func openProc(pid int) (*proc, error) {
	if pid <= 0 {
		return nil, fmt.Errorf("pid %d: %w", pid, os.ErrProcessDone)
	}
	pidfd, err := unix.PidfdOpen(pid, 0)
	if errors.Is(err, unix.ESRCH) {
		return nil, fmt.Errorf("pid %d: %w", pid, os.ErrProcessDone)
	}
	if err != nil {
		return nil, fmt.Errorf("pidfd_open %d: %w", pid, err)
	}
	wake, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		unix.Close(pidfd)
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	p := &proc{pid: pid, pidfd: pidfd, wake: wake, done: make(chan struct{}), ended: make(chan struct{})}
	go p.watch(pidfd, wake)
	return p, nil
}

// watch waits for the process to exit or for release.
func (p *proc) watch(pidfd, wake int) {
	defer close(p.ended)
	defer p.closeFDs()
	fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}, {Fd: int32(wake), Events: unix.POLLIN}}
	for {
		_, err := unix.Poll(fds, -1)
		if err == unix.EINTR || err == unix.EAGAIN || err == unix.ENOMEM {
			continue
		}
		if fds[1].Revents != 0 {
			return // released
		}
		if err != nil {
			p.err = fmt.Errorf("haproxy: watching pid %d: %w", p.pid, err)
			break
		}
		if fds[0].Revents != 0 {
			p.err = reap(p.pid)
			break
		}
	}
	close(p.done)
}

// reap collects the exit status of pid when it is a child of this process.
func reap(pid int) error {
	var ws unix.WaitStatus
	for {
		wpid, err := unix.Wait4(pid, &ws, unix.WNOHANG, nil)
		switch {
		case err == unix.EINTR:
			continue
		case errors.Is(err, unix.ECHILD) || err == nil && wpid == 0:
			return fmt.Errorf("haproxy (pid %d) exited; its status is unknown, as it is not a child of this process", pid)
		case err != nil:
			return fmt.Errorf("haproxy (pid %d) exited: wait4: %w", pid, err)
		}
		break
	}
	switch {
	case ws.Exited() && ws.ExitStatus() == 0:
		return nil
	case ws.Exited():
		return fmt.Errorf("haproxy (pid %d): exit status %d", pid, ws.ExitStatus())
	case ws.Signaled():
		return fmt.Errorf("haproxy (pid %d): killed by signal %v", pid, ws.Signal())
	}
	return fmt.Errorf("haproxy (pid %d) exited: status %#x", pid, uint32(ws))
}

func (p *proc) closeFDs() {
	p.mu.Lock()
	defer p.mu.Unlock()
	unix.Close(p.pidfd)
	unix.Close(p.wake)
	p.pidfd, p.wake = -1, -1
}

// signal sends sig to the process; os.ErrProcessDone once it has exited
// (or been released).
func (p *proc) signal(sig syscall.Signal) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.pidfd < 0 {
		return os.ErrProcessDone
	}
	err := unix.PidfdSendSignal(p.pidfd, sig, nil, 0)
	if errors.Is(err, unix.ESRCH) {
		return os.ErrProcessDone
	}
	return err
}

// release stops watching, leaving the process as it is, and returns once
// the goroutine has ended. done then never closes (unless it had).
func (p *proc) release() {
	p.mu.Lock()
	if p.wake >= 0 {
		one := []byte{1, 0, 0, 0, 0, 0, 0, 0} // an eventfd takes 8 bytes
		_, _ = unix.Write(p.wake, one)
	}
	p.mu.Unlock()
	<-p.ended
}

// cmdline returns the arguments pid was started with.
func cmdline(pid int) ([]string, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return nil, err
	}
	b = bytes.TrimSuffix(b, []byte{0})
	if len(b) == 0 {
		return nil, nil // a zombie or a kernel thread
	}
	return strings.Split(string(b), "\x00"), nil
}

// parentPid returns the parent of pid, from /proc/<pid>/stat.
func parentPid(pid int) (int, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	// pid (comm) state ppid …, where comm may hold spaces and parentheses.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: %q: no command", pid, b)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 2 {
		return 0, fmt.Errorf("/proc/%d/stat: %q: no parent", pid, b)
	}
	return strconv.Atoi(f[1])
}

// catches says whether pid has handlers for every one of sigs, as the
// SigCgt line of /proc/<pid>/status says.
func catches(pid int, sigs ...syscall.Signal) (bool, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return false, err
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "SigCgt:"); ok {
			mask, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			if err != nil {
				return false, fmt.Errorf("/proc/%d/status: %q: %w", pid, line, err)
			}
			for _, s := range sigs {
				if mask&(1<<(uint(s)-1)) == 0 {
					return false, nil
				}
			}
			return true, nil
		}
	}
	return false, fmt.Errorf("/proc/%d/status: no SigCgt", pid)
}
