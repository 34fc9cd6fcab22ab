package haproxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/obvpn/obvpn/vpn/internal/proc"
)

// Process is a managed haproxy, run in master-worker mode, that outlives
// the process that starts it: Start writes its configuration and starts
// haproxy, or adopts the one that an earlier process left running, and
// haproxy then runs until [Process.Stop], whatever becomes of the Go
// process. It runs in a process group of its own (a terminal's ^C does not
// reach it), writes its output to <File>.log and its master's pid to a pid
// file (Site.PIDFile, or <File>.pid), so that a successor finds it.
//
// When the Go process is killed (SIGKILL, a crash) or lets go of haproxy
// with [Process.Release] and exits, haproxy keeps running and keeps every
// device's connection; the next Process with the same File adopts it in
// Start. Only Stop ends it.
type Process struct {
	// Config and Site are what is rendered (see [Config.Render]). With
	// Site.PIDFile empty, haproxy writes its pid file to <File>.pid.
	Config Config
	Site   Site
	// File is where the configuration is written, readable by its owner
	// only (it may hold the monitoring token). It names the haproxy that
	// Start adopts, and haproxy's output goes to <File>.log, truncated at
	// each start of a new haproxy.
	File string
	// Command makes the haproxy command; nil means exec.CommandContext.
	// Tests and callers in a network namespace replace it. Its context
	// never ends (haproxy outlives Start), and Start adds Setpgid to the
	// command's SysProcAttr, keeping the rest; a Pdeathsig set there would
	// take haproxy down with the Go process.
	Command func(ctx context.Context, name string, args ...string) *exec.Cmd
	// StartTimeout bounds how long Start waits for the admin socket to
	// answer, after a start or a reload. Zero means 10 s.
	StartTimeout time.Duration
	// StopTimeout is how long haproxy has to exit after SIGTERM before it
	// is killed. Zero means 5 s.
	StopTimeout time.Duration
	// Logger receives the start, the adoption or the reload; nil means
	// discard. haproxy's own output is in <File>.log.
	Logger *slog.Logger

	mu       sync.Mutex
	proc     *proc.Process
	adopted  bool
	released bool
}

// errReleased is what Stop returns after Release.
var errReleased = errors.New("haproxy: released, not stopped")

func (p *Process) log() *slog.Logger {
	if p.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return p.Logger
}

// Start makes haproxy run the configuration and returns once its admin
// socket (Config.Socket) answers. ctx bounds Start only: haproxy runs
// until Stop.
//
// If the pid file names a live haproxy that runs File (as its command
// line says) and answers on the admin socket, Start adopts it: when the
// configuration on disk is the one it would write, it starts nothing and
// leaves the socket alone ("HAProxy adopted"); otherwise it writes the new
// configuration and has haproxy's master reload it in place (SIGUSR2):
// new workers take the new connections, the connections already open stay
// on the old worker until they end, and the servers of the backend keep
// the addresses and states the old worker had. A reload that fails leaves
// haproxy running the old configuration, which Start writes back, and
// Start returns the error. An haproxy of ours that does not answer within
// StartTimeout is stopped, and a new one started; a pid file that names
// another program's process is ignored (that process is left alone).
//
// Otherwise Start removes a stale admin socket, writes the configuration
// and starts haproxy. When haproxy exits before its socket answers, the
// error holds the last lines of its output.
//
// Start may be called once.
func (p *Process) Start(ctx context.Context) error {
	p.mu.Lock()
	started := p.proc != nil
	p.mu.Unlock()
	if started {
		return errors.New("haproxy: Start called twice")
	}
	file, err := filepath.Abs(p.File)
	if err != nil {
		return fmt.Errorf("haproxy: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(file), 0o755); err != nil {
		return fmt.Errorf("haproxy: %w", err)
	}
	conf := []byte(p.Config.Render(p.Site))
	if n, from := p.Config.MaxConnFor(FileLimit()); from > 0 {
		p.log().Warn("HAProxy's maxconn lowered to what the file descriptor limit allows", "maxconn", n, "wanted", from, "file_limit", FileLimit())
	}
	socket := p.Config.WithDefaults().Socket
	pr, worker, err := p.findRunning(ctx, file, socket)
	if err != nil {
		return err
	}
	if pr != nil {
		return p.adopt(ctx, pr, worker, file, conf)
	}
	return p.startNew(ctx, file, conf)
}

// pidFile is where haproxy writes its master's pid.
func (p *Process) pidFile(file string) string {
	if p.Site.PIDFile != "" {
		return p.Site.PIDFile
	}
	return file + ".pid"
}

// startNew writes the configuration and starts a new haproxy.
func (p *Process) startNew(ctx context.Context, file string, conf []byte) error {
	c := p.Config.WithDefaults()
	_ = os.Remove(c.Socket) // a stale socket from an earlier run
	if err := writePrivate(file, conf); err != nil {
		return fmt.Errorf("haproxy: %w", err)
	}
	logName := file + ".log"
	out, err := openLog(logName)
	if err != nil {
		return fmt.Errorf("haproxy: %w", err)
	}
	defer out.Close() // haproxy has its own copy
	args := []string{"-W", "-db", "-f", file}
	if p.Site.PIDFile == "" { // else the configuration names it
		args = append(args, "-p", p.pidFile(file))
	}
	cmdf := p.Command
	if cmdf == nil {
		cmdf = exec.CommandContext
	}
	// A context that never ends: haproxy outlives ctx, and exec starts no
	// goroutine to watch it.
	cmd := cmdf(context.WithoutCancel(ctx), "haproxy", args...)
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setpgid = true
	cmd.Stdin, cmd.Stdout, cmd.Stderr = nil, out, out
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("haproxy: starting: %w", err)
	}
	pr, err := proc.Open(cmd.Process.Pid)
	if err != nil {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		return fmt.Errorf("haproxy: %w", err)
	}
	_ = cmd.Process.Release() // pr reaps it
	_, err = p.waitAnswer(ctx, pr, answer{socket: c.Socket})
	if err == nil {
		err = p.waitMaster(ctx, pr, orDefault(p.StartTimeout, 10*time.Second))
	}
	if err != nil {
		select {
		case <-pr.Done():
			return fmt.Errorf("haproxy: exited at start (%v); the end of %s:\n%s", pr.Err(), logName, logTail(logName, 0))
		default:
		}
		_ = pr.Signal(syscall.SIGKILL)
		<-pr.Done()
		if ctx.Err() != nil {
			return fmt.Errorf("haproxy: starting: %w", ctx.Err())
		}
		return fmt.Errorf("haproxy: %w; the end of %s:\n%s", err, logName, logTail(logName, 0))
	}
	p.set(pr, false)
	p.log().Info("HAProxy running", "pid", pr.Pid, "port", c.Port, "monitor", c.MonitorAddr)
	return nil
}

func (p *Process) set(pr *proc.Process, adopted bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.proc, p.adopted = pr, adopted
}

// errExited says that haproxy exited while Start or Stop waited for it.
var errExited = errors.New("haproxy exited")

// errNoAnswer says that the admin socket did not answer in time.
var errNoAnswer = errors.New("the admin socket did not answer")

// answer is what waitAnswer waits for.
type answer struct {
	socket string
	notPid int  // an answer from this pid (an old worker) does not count
	ours   bool // the answer must come from the master or one of its workers
	// failed, when not nil, is asked after each attempt: an error gives
	// up.
	failed func() error
}

// waitAnswer waits up to StartTimeout for the admin socket to answer
// "show info" as want says, while pr runs, and returns the pid that
// answered.
func (p *Process) waitAnswer(ctx context.Context, pr *proc.Process, want answer) (int, error) {
	rt := &Runtime{Socket: want.socket}
	timeout := orDefault(p.StartTimeout, 10*time.Second)
	deadline := time.Now().Add(timeout)
	var last error
	for {
		qctx, cancel := context.WithTimeout(ctx, time.Second)
		out, err := rt.Command(qctx, "show info")
		cancel()
		if err == nil {
			pid := infoPid(out)
			if pid != want.notPid && (!want.ours || isWorkerOf(pid, pr.Pid)) {
				return pid, nil
			}
			err = fmt.Errorf("answered by pid %d", pid)
		}
		last = err
		if want.failed != nil {
			if err := want.failed(); err != nil {
				return 0, err
			}
		}
		t := time.NewTimer(50 * time.Millisecond)
		select {
		case <-pr.Done():
			t.Stop()
			return 0, fmt.Errorf("%w: %v", errExited, pr.Err())
		case <-ctx.Done():
			t.Stop()
			return 0, ctx.Err()
		case <-t.C:
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("%w within %v (%s): %v", errNoAnswer, timeout, want.socket, last)
		}
	}
}

// masterSignals are the signals that the master is sent: reload, stop.
var masterSignals = []syscall.Signal{syscall.SIGUSR2, syscall.SIGTERM}

// waitMaster waits up to timeout until the master of pr handles the
// signals it is sent. Right after a start or a reload it executes itself
// again (to wait for its workers), and until it is back those signals
// would kill it, and its workers with it.
func (p *Process) waitMaster(ctx context.Context, pr *proc.Process, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		ok, err := proc.Catches(pr.Pid, masterSignals...)
		if ok {
			return nil
		}
		t := time.NewTimer(10 * time.Millisecond)
		select {
		case <-pr.Done():
			t.Stop()
			return fmt.Errorf("%w: %v", errExited, pr.Err())
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
		if time.Now().After(deadline) {
			if err == nil {
				err = errors.New("it does not handle SIGUSR2 and SIGTERM")
			}
			return fmt.Errorf("haproxy's master (pid %d) is not ready within %v: %w", pr.Pid, timeout, err)
		}
	}
}

// infoPid is the Pid line of "show info", or 0.
func infoPid(info string) int {
	for line := range strings.SplitSeq(info, "\n") {
		if v, ok := strings.CutPrefix(line, "Pid: "); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(v))
			return n
		}
	}
	return 0
}

// isWorkerOf says whether pid is master or one of its children.
func isWorkerOf(pid, master int) bool {
	if pid == master {
		return true
	}
	ppid, err := proc.ParentPid(pid)
	return err == nil && ppid == master
}

// Stop stops haproxy: SIGTERM to its master, which stops the workers
// (also old ones that still hold connections) and exits; SIGKILL when it
// has not exited within StopTimeout or when ctx ends first. It returns
// once haproxy has exited (an adopted one too), nil if it did so after
// SIGTERM or had already. Stop before Start does nothing; after Release,
// it leaves haproxy running and returns an error.
func (p *Process) Stop(ctx context.Context) error {
	p.mu.Lock()
	pr, released := p.proc, p.released
	p.mu.Unlock()
	if pr == nil {
		return nil
	}
	if released {
		return errReleased
	}
	return p.terminate(ctx, pr)
}

// terminate is Stop for pr.
func (p *Process) terminate(ctx context.Context, pr *proc.Process) error {
	select {
	case <-pr.Done():
		return nil
	default:
	}
	timeout := orDefault(p.StopTimeout, 5*time.Second)
	t := time.NewTimer(timeout)
	defer t.Stop()
	// A master that is executing itself again would die of SIGTERM
	// without stopping its workers: give it the time to be back.
	err := p.waitMaster(ctx, pr, timeout)
	if err == nil {
		err = pr.Signal(syscall.SIGTERM)
	}
	if errors.Is(err, errExited) {
		return nil
	}
	if err != nil && !errors.Is(err, os.ErrProcessDone) {
		_ = pr.Signal(syscall.SIGKILL)
		<-pr.Ended()
		return fmt.Errorf("haproxy: stopping pid %d, killed: %w", pr.Pid, err)
	}
	select {
	case <-pr.Ended(): // exited, or released meanwhile
		return p.endErr(pr)
	case <-t.C:
		err = fmt.Errorf("haproxy: pid %d did not exit within %v of SIGTERM, killed", pr.Pid, timeout)
	case <-ctx.Done():
		err = fmt.Errorf("haproxy: stopping pid %d, killed: %w", pr.Pid, ctx.Err())
	}
	_ = pr.Signal(syscall.SIGKILL)
	<-pr.Ended()
	if e := p.endErr(pr); e != nil {
		return e
	}
	return err
}

// endErr is nil once pr has exited, or errReleased.
func (p *Process) endErr(pr *proc.Process) error {
	select {
	case <-pr.Done():
		return nil
	default:
		return errReleased
	}
}

// Release lets go of haproxy without stopping it, for a successor process
// to adopt: Done never closes after it, and the Process has no goroutine
// left. A child that exits after Release stays a zombie until this process
// exits or a successor in it (an exec) adopts it. Release before Start,
// or a second time, does nothing.
func (p *Process) Release() {
	p.mu.Lock()
	pr, released := p.proc, p.released
	p.released = true
	p.mu.Unlock()
	if pr != nil && !released {
		pr.Release()
	}
}

// Done is closed once haproxy has exited, whether Start started it or
// adopted it; nil before Start.
func (p *Process) Done() <-chan struct{} {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.proc == nil {
		return nil
	}
	return p.proc.Done()
}

// Err returns how haproxy exited, once Done is closed: nil for exit
// status 0, else its status; for an adopted haproxy that is not a child
// of this process, an error that says its status is unknown.
func (p *Process) Err() error {
	p.mu.Lock()
	pr := p.proc
	p.mu.Unlock()
	if pr != nil {
		select {
		case <-pr.Done():
			return pr.Err()
		default:
		}
	}
	return errors.New("haproxy: still running")
}

// Adopted says whether Start adopted a running haproxy instead of
// starting one.
func (p *Process) Adopted() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.adopted
}

// Pid returns the pid of haproxy's master, or 0 before Start.
func (p *Process) Pid() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.proc == nil {
		return 0
	}
	return p.proc.Pid
}

func orDefault(d, def time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return def
}

// writePrivate replaces name with data, mode 0600, through a temporary
// file in its directory, so that haproxy never reads half a file.
func writePrivate(name string, data []byte) error {
	tmp := name + ".new"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return err
	}
	if err := os.Chmod(tmp, 0o600); err != nil { // an older file's mode
		os.Remove(tmp)
		return err
	}
	return os.Rename(tmp, name)
}

// openLog truncates haproxy's log, mode 0600, for appending: haproxy's
// writes always land at the end, also when someone truncates the file.
func openLog(name string) (*os.File, error) {
	f, err := os.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	if err := f.Chmod(0o600); err != nil { // an older file's mode
		f.Close()
		return nil, err
	}
	return f, nil
}

// logTail returns the last lines of the log name from offset on.
func logTail(name string, offset int64) string {
	const maxTail, maxLines = 4 << 10, 20
	f, err := os.Open(name)
	if err != nil {
		return err.Error()
	}
	defer f.Close()
	if fi, err := f.Stat(); err == nil && fi.Size()-offset > maxTail {
		offset = fi.Size() - maxTail
	}
	b, _ := io.ReadAll(io.NewSectionReader(f, offset, maxTail))
	lines := strings.Split(strings.TrimRight(string(bytes.ToValidUTF8(b, nil)), "\n"), "\n")
	if len(lines) > maxLines {
		lines = lines[len(lines)-maxLines:]
	}
	return strings.Join(lines, "\n")
}

// logSize is the size of the log name, or 0.
func logSize(name string) int64 {
	fi, err := os.Stat(name)
	if err != nil {
		return 0
	}
	return fi.Size()
}
