// Package proc watches and signals a process by its pidfd, whoever its
// parent is: an OpenVPN or HAProxy process that this server started, or
// one that an earlier process of the server left running and this one
// adopted. A pidfd pins the process, so that a signal never reaches
// another that reused its pid, and it becomes readable when the process
// exits; a child of this process is reaped then. The package also reads
// what /proc says of a process.
package proc

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

// Process is a process being watched. A goroutine polls its pidfd until
// it exits, reaps it when it is a child of this process, and closes Done;
// or until Release, after which Done never closes. The goroutine owns the
// descriptors and closes them on its way out.
type Process struct {
	// Pid is the process's id.
	Pid int

	done  chan struct{} // closed once the process has exited
	ended chan struct{} // closed once the goroutine has returned
	err   error         // how it exited, once done is closed

	mu    sync.Mutex
	pidfd int // -1 once closed
	wake  int // eventfd that Release writes; -1 once closed
}

// Open pins pid with a pidfd and watches it. It fails with
// os.ErrProcessDone when there is no such process.
func Open(pid int) (*Process, error) {
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
	p := &Process{Pid: pid, pidfd: pidfd, wake: wake, done: make(chan struct{}), ended: make(chan struct{})}
	go p.watch(pidfd, wake)
	return p, nil
}

// Done is closed once the process has exited; never after Release.
func (p *Process) Done() <-chan struct{} { return p.done }

// Ended is closed once the watch has ended: the process exited, or
// Release.
func (p *Process) Ended() <-chan struct{} { return p.ended }

// Err returns how the process exited, once Done is closed: nil for exit
// status 0, an error for another status or a signal, and one that says
// the status is unknown for a process that is not a child of this one.
func (p *Process) Err() error {
	select {
	case <-p.done:
		return p.err
	default:
		return errors.New("proc: still running")
	}
}

// watch waits for the process to exit or for Release.
func (p *Process) watch(pidfd, wake int) {
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
			p.err = fmt.Errorf("watching pid %d: %w", p.Pid, err)
			break
		}
		if fds[0].Revents != 0 {
			p.err = reap(p.Pid)
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
			return fmt.Errorf("pid %d exited; its status is unknown, as it is not a child of this process", pid)
		case err != nil:
			return fmt.Errorf("pid %d exited: wait4: %w", pid, err)
		}
		break
	}
	switch {
	case ws.Exited() && ws.ExitStatus() == 0:
		return nil
	case ws.Exited():
		return fmt.Errorf("exit status %d", ws.ExitStatus())
	case ws.Signaled():
		return fmt.Errorf("killed by signal %v", ws.Signal())
	}
	return fmt.Errorf("pid %d exited: status %#x", pid, uint32(ws))
}

func (p *Process) closeFDs() {
	p.mu.Lock()
	defer p.mu.Unlock()
	unix.Close(p.pidfd)
	unix.Close(p.wake)
	p.pidfd, p.wake = -1, -1
}

// Signal sends sig to the process; os.ErrProcessDone once it has exited
// (or been released).
func (p *Process) Signal(sig syscall.Signal) error {
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

// Release stops watching, leaving the process as it is, and returns once
// the goroutine has ended. Done then never closes (unless it had). A
// second Release does nothing.
func (p *Process) Release() {
	p.mu.Lock()
	if p.wake >= 0 {
		one := []byte{1, 0, 0, 0, 0, 0, 0, 0} // an eventfd takes 8 bytes
		_, _ = unix.Write(p.wake, one)
	}
	p.mu.Unlock()
	<-p.ended
}

// Cmdline returns the arguments pid was started with; none for a zombie
// or a kernel thread.
func Cmdline(pid int) ([]string, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return nil, err
	}
	b = bytes.TrimSuffix(b, []byte{0})
	if len(b) == 0 {
		return nil, nil
	}
	return strings.Split(string(b), "\x00"), nil
}

// stat returns the fields of /proc/<pid>/stat after the command: the
// state first, then the parent's pid.
func stat(pid int) ([]string, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return nil, err
	}
	// pid (comm) state ppid …, where comm may hold spaces and parentheses.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return nil, fmt.Errorf("/proc/%d/stat: %q: no command", pid, b)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 2 {
		return nil, fmt.Errorf("/proc/%d/stat: %q: no parent", pid, b)
	}
	return f, nil
}

// ParentPid returns the parent of pid, from /proc/<pid>/stat.
func ParentPid(pid int) (int, error) {
	f, err := stat(pid)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(f[1])
}

// IsZombie reports whether pid has exited but not been reaped, which
// counts as gone.
func IsZombie(pid int) bool {
	f, err := stat(pid)
	return err == nil && f[0] == "Z"
}

// Catches says whether pid has handlers for every one of sigs, as the
// SigCgt line of /proc/<pid>/status says.
func Catches(pid int, sigs ...syscall.Signal) (bool, error) {
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
