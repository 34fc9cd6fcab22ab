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

	"github.com/obvpn/obvpn/vpn/internal/proc"
)

// stopProcess ends an openvpn that an instance watches (one it started,
// or one it adopted): SIGTERM, then SIGKILL after orphanTermWait, and
// waits for it, up to orphanKillWait in all. The watch ends with it.
func stopProcess(p *proc.Process, log *slog.Logger) error {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	defer p.Release()
	if err := p.Signal(syscall.SIGTERM); err != nil && !errors.Is(err, os.ErrProcessDone) {
		// openvpn runs as OpenVPN.User once it has started: without
		// CAP_KILL (a container that drops it) root may not signal it.
		log.Error("cannot stop openvpn; the server needs CAP_KILL to signal it once it runs as its own user",
			"pid", p.Pid, "err", err)
	}
	term := time.NewTimer(orphanTermWait)
	defer term.Stop()
	select {
	case <-p.Done():
		return nil
	case <-term.C:
	}
	log.Warn("openvpn did not stop on SIGTERM; killing it", "pid", p.Pid, "waited", orphanTermWait)
	_ = p.Signal(syscall.SIGKILL)
	kill := time.NewTimer(orphanKillWait - orphanTermWait)
	defer kill.Stop()
	select {
	case <-p.Done():
		return nil
	case <-kill.C:
		return fmt.Errorf("vpn: openvpn %d did not go away", p.Pid)
	}
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
