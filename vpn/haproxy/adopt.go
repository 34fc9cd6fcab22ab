package haproxy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/obvpn/obvpn/vpn/internal/proc"
)

// findRunning returns the haproxy that an earlier process left running on
// file, pinned, and the pid of the worker that answered its admin socket;
// nil when there is none to adopt. An haproxy of ours that does not answer
// is stopped.
func (p *Process) findRunning(ctx context.Context, file, socket string) (*proc.Process, int, error) {
	pidFile := p.pidFile(file)
	b, err := os.ReadFile(pidFile)
	if err != nil {
		return nil, 0, nil
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		p.log().Debug("HAProxy's pid file holds no pid", "pid_file", pidFile)
		return nil, 0, nil
	}
	pr, err := proc.Open(pid)
	if err != nil {
		if !errors.Is(err, os.ErrProcessDone) {
			p.log().Warn("HAProxy's pid file: the process cannot be watched, not adopted", "pid", pid, "err", err)
		}
		return nil, 0, nil
	}
	if args, _ := proc.Cmdline(pid); !runs(args, file) {
		pr.Release()
		if len(args) == 0 { // a zombie: exited, not yet reaped
			p.log().Debug("HAProxy's pid file names a process that has exited", "pid", pid)
		} else {
			p.log().Info("HAProxy's pid file names another program, not adopted", "pid_file", pidFile, "pid", pid, "command", strings.Join(args, " "))
		}
		return nil, 0, nil
	}
	// The socket that the running configuration names, if it changed.
	if old, err := os.ReadFile(file); err == nil && socketOf(old) != "" {
		socket = socketOf(old)
	}
	worker, err := p.waitAnswer(ctx, pr, answer{socket: socket, ours: true})
	if err == nil {
		err = p.waitMaster(ctx, pr, orDefault(p.StartTimeout, 10*time.Second))
	}
	switch {
	case err == nil:
		return pr, worker, nil
	case ctx.Err() != nil:
		pr.Release()
		return nil, 0, fmt.Errorf("haproxy: %w", ctx.Err())
	}
	select {
	case <-pr.Done():
		p.log().Info("the earlier HAProxy exited, starting a new one", "pid", pid, "err", pr.Err())
		return nil, 0, nil
	default:
	}
	p.log().Warn("the earlier HAProxy does not answer on its admin socket: stopping it, to start a new one", "pid", pid, "err", err)
	if err := p.terminate(ctx, pr); err != nil {
		p.log().Warn("stopping the earlier HAProxy", "pid", pid, "err", err)
	}
	return nil, 0, nil
}

// runs says whether the command line args is haproxy's with the
// configuration file.
func runs(args []string, file string) bool {
	if len(args) == 0 || filepath.Base(args[0]) != "haproxy" {
		return false
	}
	for i := 1; i+1 < len(args); i++ {
		if args[i] == "-f" && args[i+1] == file {
			return true
		}
	}
	return false
}

// socketOf returns the admin socket that the configuration conf names, or
// "".
func socketOf(conf []byte) string {
	sc := bufio.NewScanner(bytes.NewReader(conf))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) >= 3 && f[0] == "stats" && f[1] == "socket" {
			return f[2]
		}
	}
	return ""
}

// adopt takes over pr, whose worker answered: as it is when it runs conf
// already, else after a reload.
func (p *Process) adopt(ctx context.Context, pr *proc.Process, worker int, file string, conf []byte) error {
	old, err := os.ReadFile(file)
	if err == nil && bytes.Equal(old, conf) {
		p.set(pr, true)
		p.log().Info("HAProxy adopted", "pid", pr.Pid, "worker", worker)
		return nil
	}
	reason := "configuration changed"
	if err != nil {
		reason = "configuration unreadable: " + err.Error()
		old = nil
	}
	p.log().Info("HAProxy adopted, reloading it in place", "pid", pr.Pid, "reason", reason)
	next, err := p.reload(ctx, pr, worker, file, old, conf)
	if err != nil {
		pr.Release()
		return err
	}
	p.set(pr, true)
	p.log().Info("HAProxy reloaded", "pid", pr.Pid, "worker", next, "old_worker", worker)
	return nil
}

// reload writes conf and has the master of pr reload it (SIGUSR2), then
// waits for a new worker to answer and gives its servers the addresses
// and states that worker's had. On failure it writes old back (haproxy
// still runs it).
func (p *Process) reload(ctx context.Context, pr *proc.Process, worker int, file string, old, conf []byte) (int, error) {
	socket := p.Config.WithDefaults().Socket
	oldSocket := socket
	if s := socketOf(old); s != "" {
		oldSocket = s
	}
	state, err := (&Runtime{Socket: oldSocket}).ServersState(ctx, Backend)
	if err != nil {
		p.log().Debug("HAProxy's servers before the reload", "err", err)
	}
	logName := file + ".log"
	off := logSize(logName)
	fail := func(err error) (int, error) {
		if old != nil {
			if werr := writePrivate(file, old); werr != nil {
				err = errors.Join(err, werr)
			}
		}
		return 0, fmt.Errorf("haproxy: reloading pid %d: %w; the end of %s:\n%s", pr.Pid, err, logName, logTail(logName, off))
	}
	if err := writePrivate(file, conf); err != nil {
		return fail(err)
	}
	if err := pr.Signal(syscall.SIGUSR2); err != nil {
		return fail(err)
	}
	failed := func() error {
		if strings.Contains(logTail(logName, off), "Loading failure") {
			return errors.New("haproxy could not load the new configuration")
		}
		return nil
	}
	next, err := p.waitAnswer(ctx, pr, answer{socket: socket, notPid: worker, ours: true, failed: failed})
	if err == nil {
		err = p.waitMaster(ctx, pr, orDefault(p.StartTimeout, 10*time.Second))
	}
	if err != nil {
		return fail(err)
	}
	p.carryOver(ctx, socket, next, state)
	return next, nil
}

// serversPerLine is how many servers' commands go in one line to the
// admin socket, well within HAProxy's buffer (16 kB).
const serversPerLine = 40

// carryOver gives the servers of worker the addresses and states of
// state, through the admin socket, so that a reload does not wait for the
// [Registrar] to register the instances again. Each line of commands
// starts with "show info" and is sent again until worker is the one that
// answers it (an old worker may still accept on the socket for a moment).
// A failure is logged: the Registrar mends what is left.
func (p *Process) carryOver(ctx context.Context, socket string, worker int, state []ServerStatus) {
	for chunk := range slices.Chunk(state, serversPerLine) {
		cmds := []string{"show info"}
		for _, s := range chunk {
			name := s.Backend + "/" + s.Name
			st := Ready
			if s.Maint {
				st = Maint
			} else if s.Draining {
				st = Drain
			}
			cmds = append(cmds, fmt.Sprintf("set server %s addr %s port %d", name, s.Addr.Addr(), s.Addr.Port()),
				fmt.Sprintf("set server %s state %s", name, st))
		}
		if err := p.sendTo(ctx, socket, worker, strings.Join(cmds, ";")); err != nil {
			p.log().Warn("HAProxy's servers after the reload: not all carried over (the registrar mends them)", "err", err)
			return
		}
	}
}

// sendTo sends line to the admin socket until worker answers it, a few
// times within a second.
func (p *Process) sendTo(ctx context.Context, socket string, worker int, line string) error {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	for {
		out, err := commandLine(ctx, socket, line)
		if err == nil && infoPid(out) == worker {
			return nil
		}
		if err == nil {
			err = fmt.Errorf("answered by pid %d, not %d", infoPid(out), worker)
		}
		t := time.NewTimer(20 * time.Millisecond)
		select {
		case <-ctx.Done():
			t.Stop()
			return err
		case <-t.C:
		}
	}
}

// commandLine sends a line of commands separated by semicolons to the
// admin socket, over one connection (so one worker runs them all), and
// returns the answers.
func commandLine(ctx context.Context, socket, line string) (string, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	if _, err := io.WriteString(conn, line+"\n"); err != nil {
		return "", err
	}
	b, err := io.ReadAll(io.LimitReader(conn, 1<<20))
	return string(b), err
}
