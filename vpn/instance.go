package vpn

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/obvpn/obvpn/openvpnmgmt"
	"github.com/obvpn/obvpn/subnet"
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

	// Logger receives the instance's life and OpenVPN's log lines at their
	// level (its debug lines at slog.LevelDebug, so that a logger whose
	// level changes at run time shows them or not). Nil means discard.
	Logger *slog.Logger

	mu     sync.Mutex
	client *openvpnmgmt.Client // the current management session
}

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
	if err := i.writeFiles(in); err != nil {
		return err
	}
	// The devices are isolated before openvpn exists, so no packet of
	// theirs ever passes; the rule goes when the instance stops.
	undo, err := i.isolate(ctx)
	if err != nil {
		return err
	}
	defer undo()
	delay := minRestartDelay
	for {
		started := time.Now()
		err := i.runOnce(ctx, in)
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

// writeFiles writes the configuration and the certificate files.
func (i *Instance) writeFiles(in subnet.Instance) error {
	paths := i.Config.Paths(i.ID)
	if err := os.MkdirAll(filepath.Dir(paths.Config), 0o755); err != nil {
		return fmt.Errorf("vpn: %w", err)
	}
	conf, err := i.Config.OpenVPNServerConfig(in, i.Hooks)
	if err != nil {
		return err
	}
	files := map[string][]byte{paths.Config: []byte(conf), paths.CA: i.Config.OpenVPN.CACert,
		paths.Cert: i.Config.OpenVPN.ServerCert, paths.Key: i.Config.OpenVPN.ServerKey}
	if paths.DH != "" {
		files[paths.DH] = i.Config.OpenVPN.DH
	}
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

// runOnce runs openvpn once, with its management sessions, until it exits
// or ctx ends.
func (i *Instance) runOnce(ctx context.Context, in subnet.Instance) error {
	paths := i.Config.Paths(i.ID)
	if err := killOrphan(paths.PID, i.log()); err != nil {
		return err
	}
	runCtx, cancel := context.WithCancel(ctx)
	cmd := i.command(runCtx, "openvpn", "--config", paths.Config)
	cmd.Cancel = func() error {
		err := cmd.Process.Signal(syscall.SIGTERM)
		if err != nil && !errors.Is(err, os.ErrProcessDone) {
			// openvpn runs as OpenVPN.User once it has started: without
			// CAP_KILL (a container that drops it) root may not signal it.
			i.log().Error("cannot stop openvpn; the server needs CAP_KILL to signal it once it runs as its own user",
				"pid", cmd.Process.Pid, "err", err)
		}
		return err
	}
	cmd.WaitDelay = orphanTermWait // then SIGKILL
	out, err := cmd.StdoutPipe()
	if err != nil {
		cancel()
		return err
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		cancel()
		return fmt.Errorf("vpn: starting openvpn: %w", err)
	}
	i.log().Info("openvpn started", "pid", cmd.Process.Pid, "port", in.Port, "subnet", in.Subnet)
	exited := make(chan error, 1)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		var last lastLines
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			// OpenVPN's stdout: its whole log, the management session's
			// "log on" notwithstanding. The last lines say why it exited.
			i.log().Debug("openvpn", "line", sc.Text())
			last.add(sc.Text())
		}
		err := cmd.Wait()
		if err != nil && len(last.lines) > 0 {
			err = fmt.Errorf("%w; its last words: %s", err, strings.Join(last.lines, " | "))
		}
		exited <- err
	}()
	// On the way out the process is stopped (SIGTERM, SIGKILL after 5 s)
	// and waited for.
	defer func() {
		cancel()
		wg.Wait()
	}()
	down := func(err error) error {
		if i.OnDown != nil {
			i.OnDown(i.ID)
		}
		return fmt.Errorf("openvpn exited: %v", err)
	}

	mgmtAddr := net.JoinHostPort("127.0.0.1", strconv.Itoa(in.ManagementPort))
	for first := true; ; first = false {
		sessionErr := i.session(runCtx, mgmtAddr, first, exited)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		select {
		case err := <-exited:
			return down(err)
		default:
		}
		if errors.Is(sessionErr, errNoManagement) {
			return sessionErr // it never came up: restart the process
		}
		i.log().Warn("management connection lost; reconnecting", "err", sessionErr)
		select {
		case err := <-exited:
			return down(err)
		case <-time.After(minRestartDelay):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// lastLines keeps the last few lines of openvpn's output, for the error
// that reports its exit: a fatal configuration error ("dh key too small",
// "Cannot load certificate") is otherwise only in the debug log.
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
// the port on the first), set up, release the hold, handle events until
// the connection or the process ends.
func (i *Instance) session(ctx context.Context, addr string, first bool, exited chan error) error {
	dial := i.Dial
	if dial == nil {
		var d net.Dialer
		dial = d.DialContext
	}
	var conn net.Conn
	deadline := time.Now().Add(managementWait)
	for {
		c, err := dial(ctx, "tcp", addr)
		if err == nil {
			conn = c
			break
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if first && time.Now().After(deadline) {
			return fmt.Errorf("%w within %v at %s: %v", errNoManagement, managementWait, addr, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case err := <-exited:
			exited <- err // for the caller
			return fmt.Errorf("openvpn exited before its management port opened: %v", err)
		case <-time.After(50 * time.Millisecond):
		}
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
	setup := func() error {
		if err := c.Log(ctx, true); err != nil {
			return err
		}
		if err := c.ByteCount(ctx, int(i.Config.OpenVPN.BytecountInterval/time.Second)); err != nil {
			return err
		}
		// "hold release" is harmless when OpenVPN is not holding (a
		// reconnected session).
		return c.HoldRelease(ctx)
	}
	if err := setup(); err != nil {
		return fmt.Errorf("management set-up: %w", err)
	}
	if i.OnReady != nil {
		i.OnReady(i.ID)
	}
	for {
		select {
		case ev, ok := <-c.Events():
			if !ok {
				return c.Err()
			}
			if lev, ok := ev.(*openvpnmgmt.LogEvent); ok {
				i.logOpenVPN(lev)
				continue
			}
			if _, ok := ev.(*openvpnmgmt.HoldEvent); ok {
				// --management-hold holds every restart within the
				// process too (SIGUSR1, SIGHUP): let it go on. Its tun
				// device, and so its isolation, persists (persist-tun).
				i.log().Info("openvpn restarted within its process; releasing its hold")
				if err := c.HoldRelease(ctx); err != nil {
					return fmt.Errorf("hold release after a restart: %w", err)
				}
				continue
			}
			if i.Handler != nil {
				i.Handler(ctx, c, ev)
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
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
// killed before it could clean up), then adds one. It returns the undo.
func (i *Instance) isolate(ctx context.Context) (undo func(), err error) {
	if i.Config.OpenVPN.Isolation == IsolationOff {
		return func() {}, nil
	}
	i.unisolate(ctx)
	if out, err := i.command(ctx, "ip", isolationRule("add", i.ID)...).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("vpn: instance %d: isolating its devices (VPN_DEVICE_ISOLATION): ip %s: %w: %s",
			i.ID, strings.Join(isolationRule("add", i.ID), " "), err, bytes.TrimSpace(out))
	}
	i.log().Debug("devices isolated", "dev", "tun"+strconv.Itoa(i.ID))
	return func() { i.unisolate(context.WithoutCancel(ctx)) }, nil
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

// killOrphan stops a process named by the pid file, if it is alive: SIGTERM,
// then SIGKILL after 5 s, giving up after 10 s in all.
func killOrphan(pidFile string, log *slog.Logger) error {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	b, err := os.ReadFile(pidFile)
	if err != nil {
		return nil // no pid file: no orphan
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 1 {
		return nil
	}
	alive := func() bool { return syscall.Kill(pid, 0) == nil && !isZombie(pid) }
	if !alive() {
		return nil
	}
	log.Warn("stopping an orphaned openvpn", "pid", pid)
	_ = syscall.Kill(pid, syscall.SIGTERM)
	start := time.Now()
	killed := false
	for alive() {
		switch elapsed := time.Since(start); {
		case elapsed > orphanKillWait:
			return fmt.Errorf("vpn: orphaned openvpn %d did not go away", pid)
		case elapsed > orphanTermWait && !killed:
			_ = syscall.Kill(pid, syscall.SIGKILL)
			killed = true
		}
		time.Sleep(50 * time.Millisecond)
	}
	return nil
}

// isZombie reports whether pid has exited but not been reaped, which
// counts as gone.
func isZombie(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	// "pid (comm) S ..."
	if i := strings.LastIndexByte(string(b), ')'); i >= 0 && i+2 < len(b) {
		return b[i+2] == 'Z'
	}
	return false
}
