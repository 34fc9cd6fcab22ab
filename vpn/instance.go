package vpn

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/obvpn/obvpn/nss"
	"github.com/obvpn/obvpn/openvpnmgmt"
	"github.com/obvpn/obvpn/subnet"
	"github.com/obvpn/obvpn/vpn/internal/proc"
)

// EventHandler receives an instance's management events, in order, from
// one goroutine per management session. It may send commands on c (such
// as client-auth-nt for a CONNECT); it must not block for long, since the
// next events wait for it.
type EventHandler func(ctx context.Context, c *openvpnmgmt.Client, ev openvpnmgmt.Event)

// Instance runs one OpenVPN server process of the plan and its management
// session, and restarts them when they fail. [Instance.Run] writes the
// instance's configuration and the certificates (mode 0600) into the run
// directory, isolates the devices of its future tun device (an ip rule,
// Config.OpenVPN.Isolation, deleted when Run returns), stops an orphan
// named by the pid file, starts openvpn, waits
// for its management port, connects, enables byte counts, releases the
// hold and hands every event to Handler; when openvpn exits it is started
// again after a backoff, and when only the management connection drops it
// is reconnected.
//
// An openvpn that an earlier process of this server left running (one
// that was upgraded in place, or killed) is adopted rather than stopped,
// when it is this instance's: the pid file names a live process whose
// command line is this instance's, and the configuration and certificate
// files on disk are the ones this Instance would write. Its devices stay
// connected; Resync gets its clients. One with another configuration (the
// environment changed) is stopped and replaced, and the log says why.
// openvpn runs in a process group of its own, its output in
// server-<id>.log of the run directory, so that it outlives this process
// and a terminal's ^C reaches only the server.
type Instance struct {
	// Config is the server's configuration; ID the instance (1-indexed).
	Config *Config
	ID     int

	// Hooks name the script-mode executables (Config.Auth.Mode ==
	// AuthScript).
	Hooks ScriptHooks

	// Handler receives the management events. Nil drops them (OpenVPN's
	// own log lines are still logged).
	Handler EventHandler

	// OnReady, if set, is called each time the instance's hold is
	// released and it takes clients; OnDown each time its openvpn process
	// has exited. The server uses them for HAProxy.
	OnReady, OnDown func(id int)

	// Command makes the openvpn command, and the "ip rule" commands that
	// isolate the devices (Config.OpenVPN.Isolation). Nil means
	// exec.CommandContext; tests wrap it to run in a network namespace.
	Command func(ctx context.Context, name string, args ...string) *exec.Cmd

	// Dial connects to the management port. Nil means a net.Dialer.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)

	// Resync, if set, is given the clients of an openvpn that took clients
	// while no management session watched it, each time a session starts
	// on it: an adopted process (see [Instance.Run]), or one whose
	// management connection dropped and came back. Their events of the
	// time between are lost; the list (status 3) is the truth.
	Resync func(ctx context.Context, id int, clients []nss.Client)

	// Logger receives the instance's life and OpenVPN's log lines at their
	// level (its debug lines at slog.LevelDebug, so that a logger whose
	// level changes at run time shows them or not). Nil means discard.
	Logger *slog.Logger

	mu     sync.Mutex
	client *openvpnmgmt.Client // the current management session
	leave  atomic.Bool         // set by Leave
}

// Leave makes Run, once its context ends, let go of openvpn instead of
// stopping it: the process, its clients and the isolation of its devices
// stay, for a later process of this server to adopt. The server calls it
// for [Server.Handover].
func (i *Instance) Leave() { i.leave.Store(true) }

// Orphan-killing and start-up times of SPEC §2.
const (
	orphanTermWait  = 5 * time.Second
	orphanKillWait  = 10 * time.Second
	managementWait  = 5 * time.Second
	minRestartDelay = time.Second
	maxRestartDelay = 30 * time.Second
	stableRun       = time.Minute
)

// Management returns the current management session, or nil between
// sessions.
func (i *Instance) Management() *openvpnmgmt.Client {
	i.mu.Lock()
	defer i.mu.Unlock()
	return i.client
}

func (i *Instance) log() *slog.Logger {
	l := i.Logger
	if l == nil {
		l = slog.New(slog.DiscardHandler)
	}
	return l.With("instance", i.ID)
}

// Run runs the instance until ctx ends, restarting openvpn when it exits,
// and returns ctx's error, or an error that restarting cannot mend (a
// configuration that does not render, a run directory that cannot be
// written).
func (i *Instance) Run(ctx context.Context) error {
	in, err := i.Config.Plan.Instance(i.ID)
	if err != nil {
		return fmt.Errorf("vpn: instance %d: %w", i.ID, err)
	}
	files, err := i.files(in)
	if err != nil {
		return err
	}
	adopt := i.adoptable(files)
	if adopt == 0 {
		if err := writeFiles(files); err != nil {
			return err
		}
	}
	// The devices are isolated before openvpn exists, so no packet of
	// theirs ever passes; the rule goes when the instance stops (and
	// stays when it is left running).
	undo, err := i.isolate(ctx, adopt > 0)
	if err != nil {
		return err
	}
	defer func() {
		if !i.leave.Load() {
			undo()
		}
	}()
	delay := minRestartDelay
	for {
		started := time.Now()
		err := i.runOnce(ctx, in, adopt)
		adopt = 0
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if time.Since(started) > stableRun {
			delay = minRestartDelay
		}
		i.log().Error("openvpn instance failed; restarting", "err", err, "restart_in", delay)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(delay):
		}
		delay = min(2*delay, maxRestartDelay)
	}
}

// files returns the files that the instance runs on, by name: its
// configuration and the certificates.
func (i *Instance) files(in subnet.Instance) (map[string][]byte, error) {
	paths := i.Config.Paths(i.ID)
	if err := os.MkdirAll(filepath.Dir(paths.Config), 0o755); err != nil {
		return nil, fmt.Errorf("vpn: %w", err)
	}
	conf, err := i.Config.OpenVPNServerConfig(in, i.Hooks)
	if err != nil {
		return nil, err
	}
	files := map[string][]byte{paths.Config: []byte(conf), paths.CA: i.Config.OpenVPN.CACert,
		paths.Cert: i.Config.OpenVPN.ServerCert, paths.Key: i.Config.OpenVPN.ServerKey}
	if paths.DH != "" {
		files[paths.DH] = i.Config.OpenVPN.DH
	}
	return files, nil
}

// adoptable returns the pid of the openvpn that an earlier process of
// this server left running for this instance, if it runs on files as they
// are; else 0. One that runs on other files is stopped later, as an
// orphan; the log says why.
func (i *Instance) adoptable(files map[string][]byte) int {
	paths := i.Config.Paths(i.ID)
	pid := ownOpenVPN(paths)
	if pid == 0 {
		return 0
	}
	for _, name := range slices.Sorted(maps.Keys(files)) {
		if b, err := os.ReadFile(name); err != nil || !bytes.Equal(b, files[name]) {
			i.log().Warn("openvpn left running by an earlier process runs on another configuration; replacing it (its devices reconnect)",
				"pid", pid, "file", name)
			return 0
		}
	}
	return pid
}

// ownOpenVPN returns the pid of the live openvpn that paths' pid file
// names, if it runs this instance's configuration file; else 0.
func ownOpenVPN(paths InstancePaths) int {
	pid := readPID(paths.PID)
	if pid == 0 || proc.IsZombie(pid) {
		return 0
	}
	args, err := proc.Cmdline(pid)
	if err != nil || len(args) != 3 || filepath.Base(args[0]) != "openvpn" || args[1] != "--config" || args[2] != paths.Config {
		return 0
	}
	return pid
}

// writeFiles writes files, by name, mode 0600.
func writeFiles(files map[string][]byte) error {
	for name, data := range files {
		if err := writeFile0600(name, data); err != nil {
			return fmt.Errorf("vpn: %w", err)
		}
	}
	return nil
}

// writeFile0600 replaces name atomically with a file of mode 0600. The
// instances of a server write the shared certificate files at the same
// time: each through a temporary file of its own.
func writeFile0600(name string, data []byte) error {
	f, err := os.CreateTemp(filepath.Dir(name), "."+filepath.Base(name)+".*")
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), name) // CreateTemp makes it 0600
	}
	if err != nil {
		os.Remove(f.Name())
	}
	return err
}

// runOnce runs openvpn once (or the one it adopts, when adopt is its
// pid), with its management sessions, until it exits or ctx ends. Then
// the process is stopped, or let go of (Leave).
func (i *Instance) runOnce(ctx context.Context, in subnet.Instance, adopt int) error {
	paths := i.Config.Paths(i.ID)
	var p *proc.Process
	var err error
	if adopt > 0 {
		if p, err = proc.Open(adopt); err != nil {
			return fmt.Errorf("vpn: watching openvpn %d: %w", adopt, err)
		}
		i.log().Info("openvpn adopted: it runs on from an earlier process of this server", "pid", adopt, "port", in.Port)
	} else {
		if err := killOrphan(paths, i.log()); err != nil {
			return err
		}
		if p, err = i.start(ctx, paths); err != nil {
			return err
		}
		i.log().Info("openvpn started", "pid", p.Pid, "port", in.Port, "subnet", in.Subnet)
	}
	runCtx, cancel := context.WithCancel(ctx)
	defer func() {
		cancel()
		if i.leave.Load() && ctx.Err() != nil {
			p.Release()
			i.log().Info("openvpn left running for the next process of this server", "pid", p.Pid)
			return
		}
		if err := stopProcess(p, i.log()); err != nil {
			i.log().Error("openvpn did not stop", "pid", p.Pid, "err", err)
		}
	}()
	down := func() error {
		if i.OnDown != nil {
			i.OnDown(i.ID)
		}
		<-p.Done()
		return fmt.Errorf("openvpn exited: %w%s", p.Err(), lastWords(paths.Log))
	}

	mgmtAddr := net.JoinHostPort("127.0.0.1", strconv.Itoa(in.ManagementPort))
	for first := true; ; first = false {
		sessionErr := i.session(runCtx, mgmtAddr, first, adopt > 0 || !first, p)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		select {
		case <-p.Done():
			return down()
		default:
		}
		if errors.Is(sessionErr, errNoManagement) {
			return sessionErr // it never came up: restart the process
		}
		i.log().Warn("management connection lost; reconnecting", "err", sessionErr)
		select {
		case <-p.Done():
			return down()
		case <-time.After(minRestartDelay):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// start starts openvpn: in a process group of its own, its output
// appended to the log file, watched by pid, so that it can outlive this
// process.
func (i *Instance) start(ctx context.Context, paths InstancePaths) (*proc.Process, error) {
	out, err := os.OpenFile(paths.Log, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("vpn: openvpn's log: %w", err)
	}
	defer out.Close() // openvpn has its own descriptor
	// Not ctx's: the process is stopped, or left running, on purpose.
	cmd := i.command(context.WithoutCancel(ctx), "openvpn", "--config", paths.Config)
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setpgid = true
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("vpn: starting openvpn: %w", err)
	}
	pid := cmd.Process.Pid
	_ = cmd.Process.Release() // watched, and reaped, by pid
	p, err := proc.Open(pid)
	if err != nil {
		_ = syscall.Kill(pid, syscall.SIGKILL)
		return nil, fmt.Errorf("vpn: watching openvpn %d: %w", pid, err)
	}
	return p, nil
}

// lastWords returns the last lines of openvpn's log file, for the error
// that reports its exit: a fatal configuration error ("dh key too small",
// "Cannot load certificate") is otherwise only in the debug log.
func lastWords(log string) string {
	f, err := os.Open(log)
	if err != nil {
		return ""
	}
	defer f.Close()
	const tail = 16 << 10
	if fi, err := f.Stat(); err == nil && fi.Size() > tail {
		_, _ = f.Seek(-tail, io.SeekEnd)
	}
	var last lastLines
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		last.add(sc.Text())
	}
	if len(last.lines) == 0 {
		return ""
	}
	return "; its last words: " + strings.Join(last.lines, " | ")
}

// maxLogSize is the size at which openvpn's log file is emptied: the
// management session carries the same lines to the server's log, and the
// file only has to say why a process that never got one exited.
const maxLogSize = 16 << 20

// trimLog empties openvpn's log file when it has grown past maxLogSize;
// openvpn appends (O_APPEND), so it goes on writing at the new end.
func trimLog(name string) {
	if fi, err := os.Stat(name); err == nil && fi.Size() > maxLogSize {
		_ = os.Truncate(name, 0)
	}
}

// lastLines keeps the last few lines of openvpn's output.
type lastLines struct{ lines []string }

// maxLastLines is how many lines lastLines keeps: OpenSSL's error, the
// call that failed and "Exiting due to fatal error".
const maxLastLines = 3

func (l *lastLines) add(line string) {
	line = strings.TrimPrefix(line, "MANAGEMENT: ")
	if line == "" || strings.HasPrefix(line, "Client disconnected") {
		return // the management session's end, not the cause
	}
	if len(l.lines) == maxLastLines {
		l.lines = slices.Delete(l.lines, 0, 1)
	}
	l.lines = append(l.lines, line)
}

// errNoManagement reports a management port that did not open in time.
var errNoManagement = errors.New("management port did not open")

// session runs one management session: connect (waiting up to 5 s for
// the port on the first), set up, release the hold, resync (when the
// process took clients unwatched), handle events until the connection or
// the process ends.
func (i *Instance) session(ctx context.Context, addr string, first, resync bool, p *proc.Process) error {
	conn, err := i.dialManagement(ctx, addr, first, p)
	if err != nil {
		return err
	}
	c, err := openvpnmgmt.NewClient(ctx, conn, openvpnmgmt.Options{Logger: i.Logger})
	if err != nil {
		conn.Close()
		return err
	}
	defer c.Close()
	i.mu.Lock()
	i.client = c
	i.mu.Unlock()
	defer func() {
		i.mu.Lock()
		i.client = nil
		i.mu.Unlock()
	}()
	if err := i.setup(ctx, c, resync); err != nil {
		return err
	}
	if i.OnReady != nil {
		i.OnReady(i.ID)
	}
	trim := time.NewTicker(time.Minute)
	defer trim.Stop()
	for {
		select {
		case ev, ok := <-c.Events():
			if !ok {
				return c.Err()
			}
			if err := i.event(ctx, c, ev); err != nil {
				return err
			}
		case <-trim.C:
			trimLog(i.Config.Paths(i.ID).Log)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// dialManagement connects to the management port, waiting up to 5 s for
// it on the first session of a process.
func (i *Instance) dialManagement(ctx context.Context, addr string, first bool, p *proc.Process) (net.Conn, error) {
	dial := i.Dial
	if dial == nil {
		var d net.Dialer
		dial = d.DialContext
	}
	deadline := time.Now().Add(managementWait)
	for {
		c, err := dial(ctx, "tcp", addr)
		if err == nil {
			return c, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if first && time.Now().After(deadline) {
			return nil, fmt.Errorf("%w within %v at %s: %v", errNoManagement, managementWait, addr, err)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-p.Done():
			return nil, fmt.Errorf("openvpn exited before its management port opened: %v", p.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// setup turns the session's log and byte counts on and releases the
// hold; with resync, it gives the clients that openvpn has to Resync.
func (i *Instance) setup(ctx context.Context, c *openvpnmgmt.Client, resync bool) error {
	if err := c.Log(ctx, true); err != nil {
		return fmt.Errorf("management set-up: %w", err)
	}
	if err := c.ByteCount(ctx, int(i.Config.OpenVPN.BytecountInterval/time.Second)); err != nil {
		return fmt.Errorf("management set-up: %w", err)
	}
	// "hold release" is harmless when OpenVPN is not holding (a
	// reconnected session, an adopted process).
	if err := c.HoldRelease(ctx); err != nil {
		return fmt.Errorf("management set-up: %w", err)
	}
	if !resync || i.Resync == nil {
		return nil
	}
	st, err := c.Status(ctx, 3)
	if err != nil {
		return fmt.Errorf("management set-up: the clients of a running openvpn: %w", err)
	}
	i.log().Info("clients of the running openvpn taken over", "clients", len(st.Clients))
	i.Resync(ctx, i.ID, st.Clients)
	return nil
}

// event handles one management event.
func (i *Instance) event(ctx context.Context, c *openvpnmgmt.Client, ev openvpnmgmt.Event) error {
	if lev, ok := ev.(*openvpnmgmt.LogEvent); ok {
		i.logOpenVPN(lev)
		return nil
	}
	if _, ok := ev.(*openvpnmgmt.HoldEvent); ok {
		// --management-hold holds every restart within the process too
		// (SIGUSR1, SIGHUP): let it go on. Its tun device, and so its
		// isolation, persists (persist-tun).
		i.log().Info("openvpn restarted within its process; releasing its hold")
		if err := c.HoldRelease(ctx); err != nil {
			return fmt.Errorf("hold release after a restart: %w", err)
		}
		return nil
	}
	if i.Handler != nil {
		i.Handler(ctx, c, ev)
	}
	return nil
}

// isolationPriority is the priority of the policy-routing rule that
// isolates an instance's devices: after the local table's (0), so that
// the host's own addresses are still delivered, and before every other
// table, the main one (32766) included.
const isolationPriority = "10"

// isolationRule returns the arguments of "ip" that add (verb "add") or
// delete ("del") the rule that isolates the devices of instance id: every
// packet that arrives on tun<id> and is not for this host is refused
// ("prohibit": an ICMP administratively-prohibited answer, at once). The
// rule names the device, so it holds before OpenVPN creates the device
// and across its restarts; unlike net.ipv4.conf.<dev>.forwarding, which
// any later write of net.ipv4.ip_forward (a container engine starting,
// say) turns back on, nothing else on the host resets it.
func isolationRule(verb string, id int) []string {
	return []string{"-4", "rule", verb, "priority", isolationPriority, "iif", "tun" + strconv.Itoa(id), "prohibit"}
}

// isolate applies [IsolationOn] to instance id's future tun device, before
// openvpn starts: it deletes any rule left by an earlier process (one
// killed before it could clean up), then adds one. For an adopted openvpn
// (keep), a rule already there is kept as it is, so that the devices are
// never without one. It returns the undo.
func (i *Instance) isolate(ctx context.Context, keep bool) (undo func(), err error) {
	if i.Config.OpenVPN.Isolation == IsolationOff {
		return func() {}, nil
	}
	undo = func() { i.unisolate(context.WithoutCancel(ctx)) }
	if keep && i.isolated(ctx) {
		i.log().Debug("devices still isolated", "dev", "tun"+strconv.Itoa(i.ID))
		return undo, nil
	}
	i.unisolate(ctx)
	if out, err := i.command(ctx, "ip", isolationRule("add", i.ID)...).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("vpn: instance %d: isolating its devices (VPN_DEVICE_ISOLATION): ip %s: %w: %s",
			i.ID, strings.Join(isolationRule("add", i.ID), " "), err, bytes.TrimSpace(out))
	}
	i.log().Debug("devices isolated", "dev", "tun"+strconv.Itoa(i.ID))
	return undo, nil
}

// isolated reports whether the rule that isolates the instance's devices
// is in place.
func (i *Instance) isolated(ctx context.Context) bool {
	out, err := i.command(ctx, "ip", "-4", "rule", "show", "priority", isolationPriority).Output()
	if err != nil {
		return false
	}
	want := "iif tun" + strconv.Itoa(i.ID) + " prohibit"
	for line := range strings.Lines(string(out)) {
		if strings.Contains(line, want) {
			return true
		}
	}
	return false
}

// unisolate deletes every isolation rule of the instance.
func (i *Instance) unisolate(ctx context.Context) {
	for range 16 { // "ip rule del" deletes one match at a time
		if err := i.command(ctx, "ip", isolationRule("del", i.ID)...).Run(); err != nil {
			return
		}
	}
}

// command makes a command with Command, or exec.CommandContext.
func (i *Instance) command(ctx context.Context, name string, args ...string) *exec.Cmd {
	if i.Command != nil {
		return i.Command(ctx, name, args...)
	}
	return exec.CommandContext(ctx, name, args...)
}

// logOpenVPN logs one of OpenVPN's log lines at its level.
func (i *Instance) logOpenVPN(ev *openvpnmgmt.LogEvent) {
	level := slog.LevelInfo
	switch ev.Level {
	case openvpnmgmt.LogFatal, openvpnmgmt.LogError:
		level = slog.LevelError
	case openvpnmgmt.LogWarning:
		level = slog.LevelWarn
	case openvpnmgmt.LogDebug:
		// The logger's level, not Config.Verbose: SIGUSR2 toggles it.
		level = slog.LevelDebug
	}
	i.log().Log(context.Background(), level, ev.Message, "source", "openvpn")
}

// killOrphan stops the openvpn of this instance that the pid file names,
// if it is alive (one that an earlier process left and that is not
// adopted): SIGTERM, then SIGKILL after 5 s, giving up after 10 s in all. A
// pid that now names another program is left alone.
func killOrphan(paths InstancePaths, log *slog.Logger) error {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	pid := ownOpenVPN(paths)
	if pid == 0 {
		return nil
	}
	p, err := proc.Open(pid)
	if errors.Is(err, os.ErrProcessDone) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("vpn: orphaned openvpn %d: %w", pid, err)
	}
	log.Warn("stopping an orphaned openvpn", "pid", pid)
	return stopProcess(p, log)
}
