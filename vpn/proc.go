package vpn

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"syscall"
	"time"
)

// process is an openvpn process that an instance watches: one it started,
// or one that an earlier process of this server left running and this one
// adopted. Either way it is watched by its pid (a pidfd on Linux), not by
// exec.Cmd.Wait, so that it can be let go of ([process.release]) and
// outlive this process, for the next one to adopt.
type process struct {
	pid     int
	exited  chan struct{} // closed once it has exited
	err     error         // how it exited, once exited is closed
	unwatch func()        // ends the watch; it returns once the watcher has
}

// exitErr returns how the process exited, once exited is closed.
func (p *process) exitErr() error {
	<-p.exited
	return p.err
}

// release lets go of the process: it runs on, unwatched.
func (p *process) release() { p.unwatch() }

// stop ends the process: SIGTERM, then SIGKILL after orphanTermWait, and
// waits for it, up to orphanKillWait in all.
func (p *process) stop(log *slog.Logger) error {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	defer p.unwatch()
	if err := syscall.Kill(p.pid, syscall.SIGTERM); err != nil && !errors.Is(err, syscall.ESRCH) {
		// openvpn runs as OpenVPN.User once it has started: without
		// CAP_KILL (a container that drops it) root may not signal it.
		log.Error("cannot stop openvpn; the server needs CAP_KILL to signal it once it runs as its own user",
			"pid", p.pid, "err", err)
	}
	term := time.NewTimer(orphanTermWait)
	defer term.Stop()
	select {
	case <-p.exited:
		return nil
	case <-term.C:
	}
	log.Warn("openvpn did not stop on SIGTERM; killing it", "pid", p.pid, "waited", orphanTermWait)
	_ = syscall.Kill(p.pid, syscall.SIGKILL)
	kill := time.NewTimer(orphanKillWait - orphanTermWait)
	defer kill.Stop()
	select {
	case <-p.exited:
		return nil
	case <-kill.C:
		return fmt.Errorf("vpn: openvpn %d did not go away", p.pid)
	}
}

// exitError describes a wait status the way os/exec does.
func exitError(ws syscall.WaitStatus) error {
	switch {
	case ws.Exited() && ws.ExitStatus() == 0:
		return nil
	case ws.Exited():
		return fmt.Errorf("exit status %d", ws.ExitStatus())
	case ws.Signaled():
		return fmt.Errorf("signal: %v", ws.Signal())
	}
	return fmt.Errorf("wait status %#x", uint32(ws))
}

// errAdoptedExit is how an adopted process, whose exit status belongs to
// another parent, exited.
var errAdoptedExit = errors.New("exited (it was adopted: its exit status went to its parent)")

// cmdline returns the arguments of process pid, as /proc has them.
func cmdline(pid int) ([]string, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return nil, err
	}
	b = bytes.TrimSuffix(b, []byte{0})
	if len(b) == 0 {
		return nil, nil // a zombie, or a kernel thread
	}
	var args []string
	for _, a := range bytes.Split(b, []byte{0}) {
		args = append(args, string(a))
	}
	return args, nil
}

// readPID returns the pid that a pid file names, or 0.
func readPID(name string) int {
	b, err := os.ReadFile(name)
	if err != nil {
		return 0
	}
	pid, err := strconv.Atoi(string(bytes.TrimSpace(b)))
	if err != nil || pid <= 1 {
		return 0
	}
	return pid
}
