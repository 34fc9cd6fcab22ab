package haproxy

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/matryer/is"
	"github.com/obvpn/obvpn/vpn/internal/proc"
)

// logBuffer collects what a Process logs.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// managed is a test's managed haproxy setup: its configuration, socket
// and files in a directory of the test's.
type managed struct {
	dir  string
	cfg  Config
	site Site
}

// newManaged returns a configuration on free loopback ports. Whatever
// haproxy its pid file names when the test ends is stopped then.
func newManaged(t *testing.T) *managed {
	t.Helper()
	requireCommand(t, "haproxy")
	dir := t.TempDir()
	m := &managed{dir: dir,
		cfg:  Config{Port: freePort(t), Socket: filepath.Join(dir, "admin.sock"), MonitorAddr: "127.0.0.1:" + strconv.Itoa(freePort(t)), CPUMap: "none", Threads: 1},
		site: Site{Instances: 2, Port: 10000},
	}
	t.Cleanup(func() { m.stopLeftover(t) })
	return m
}

func (m *managed) file() string { return filepath.Join(m.dir, "haproxy.cfg") }

// process returns a Process of m's configuration, logging into log.
func (m *managed) process(log *logBuffer) *Process {
	return &Process{Config: m.cfg, Site: m.site, File: m.file(),
		Logger: slog.New(slog.NewTextHandler(log, &slog.HandlerOptions{Level: slog.LevelDebug}))}
}

// start starts a Process of m's configuration.
func (m *managed) start(t *testing.T) (*Process, *logBuffer) {
	t.Helper()
	log := &logBuffer{}
	p := m.process(log)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	begin := time.Now()
	if err := p.Start(ctx); err != nil {
		t.Fatalf("Start: %v\nlog:\n%s", err, log)
	}
	t.Logf("Start took %v, adopted %v", time.Since(begin).Round(time.Millisecond), p.Adopted())
	return p, log
}

// stopLeftover stops every haproxy master that runs the test's
// configuration file (a test that failed half-way, or released): the
// file is in the test's own directory, so they are the test's.
func (m *managed) stopLeftover(t *testing.T) {
	dirs, _ := os.ReadDir("/proc")
	for _, d := range dirs {
		pid, err := strconv.Atoi(d.Name())
		if err != nil {
			continue
		}
		if args, _ := proc.Cmdline(pid); !runs(args, m.file()) {
			continue
		}
		if ppid, _ := proc.ParentPid(pid); ppid != 0 {
			if args, _ := proc.Cmdline(ppid); runs(args, m.file()) {
				continue // a worker: its master stops it
			}
		}
		pr, err := proc.Open(pid)
		if err != nil {
			continue
		}
		p := &Process{StopTimeout: 5 * time.Second}
		if err := p.terminate(context.Background(), pr); err != nil {
			t.Errorf("stopping the haproxy left running: %v", err)
		}
	}
}

func (m *managed) runtime() *Runtime { return &Runtime{Socket: m.cfg.Socket} }

// workerPid is the pid that answers "show info" on the admin socket.
func (m *managed) workerPid(t *testing.T) int {
	t.Helper()
	out, err := m.runtime().Command(context.Background(), "show info")
	if err != nil {
		t.Fatal(err)
	}
	return infoPid(out)
}

// register points vpn1 at addr, ready.
func (m *managed) register(t *testing.T, addr netip.AddrPort) {
	t.Helper()
	ctx := context.Background()
	if err := m.runtime().SetServerAddr(ctx, ServerName(1), addr); err != nil {
		t.Fatal(err)
	}
	if err := m.runtime().SetServerState(ctx, ServerName(1), Ready); err != nil {
		t.Fatal(err)
	}
}

// dial opens a connection through haproxy's VPN frontend.
func (m *managed) dial(t *testing.T) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(m.cfg.Port), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// echoServer is a TCP echo server on loopback until the test ends.
func echoServer(t *testing.T) netip.AddrPort {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Go(func() { _, _ = io.Copy(c, c) })
		}
	})
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return l.Addr().(*net.TCPAddr).AddrPort()
}

// echoes says whether c carries msg there and back within 5 s.
func echoes(c net.Conn, msg string) error {
	c.SetDeadline(time.Now().Add(5 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := io.WriteString(c, msg); err != nil {
		return err
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		return err
	}
	if string(got) != msg {
		return errors.New("echoed " + string(got) + ", want " + msg)
	}
	return nil
}

// monitorStatus is the status of GET path on the monitor frontend, over a
// new connection.
func (m *managed) monitorStatus(t *testing.T, path string) int {
	t.Helper()
	hc := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 5 * time.Second}
	resp, err := hc.Get("http://" + m.cfg.MonitorAddr + path)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// TestProcessAdopt: a Process that is let go of (or whose Go process
// died) leaves haproxy running; the next Process on the same
// configuration adopts it without a restart: the same master and worker,
// and a connection through it that moves bytes all along. Stop then ends
// it, and the connection with it.
func TestProcessAdopt(t *testing.T) {
	is := is.New(t)
	m := newManaged(t)
	p1, log1 := m.start(t)
	is.True(!p1.Adopted())
	is.True(strings.Contains(log1.String(), "HAProxy running"))
	fi, err := os.Stat(m.file() + ".log")
	is.NoErr(err)
	is.Equal(fi.Mode().Perm(), os.FileMode(0o600)) // haproxy's output, private
	pgid, err := syscall.Getpgid(p1.Pid())
	is.NoErr(err)
	is.Equal(pgid, p1.Pid()) // a process group of its own: a terminal's ^C misses it
	m.register(t, echoServer(t))
	c := m.dial(t)
	is.NoErr(echoes(c, "before"))
	worker := m.workerPid(t)

	p1.Release() // the Go process "crashes": no Stop
	select {
	case <-p1.Done():
		t.Fatal("Done closed after Release")
	default:
	}
	is.Equal(p1.Stop(context.Background()), errReleased) // and leaves it running
	is.NoErr(echoes(c, "released"))

	p2, log2 := m.start(t)
	is.True(p2.Adopted())
	is.Equal(p2.Pid(), p1.Pid())          // the same master
	is.Equal(m.workerPid(t), worker)      // and worker: nothing restarted
	is.NoErr(echoes(c, "after adoption")) // the connection never noticed
	is.True(strings.Contains(log2.String(), "HAProxy adopted"))
	is.True(!strings.Contains(log2.String(), "reload"))

	// A third time, after another Release.
	p2.Release()
	p3, _ := m.start(t)
	is.True(p3.Adopted())
	is.Equal(p3.Pid(), p1.Pid())
	is.NoErr(echoes(c, "third"))

	is.NoErr(p3.Stop(context.Background()))
	select {
	case <-p3.Done():
	default:
		t.Fatal("Done not closed after Stop")
	}
	is.NoErr(p3.Err()) // a child of the test: its exit status 0 is known
	is.True(echoes(c, "stopped") != nil)
	if err := syscall.Kill(p1.Pid(), 0); err == nil {
		t.Errorf("pid %d still runs after Stop", p1.Pid())
	}
}

// TestProcessReload: a Process with another configuration adopts the
// running haproxy and reloads it in place: the master stays, a new worker
// takes new connections with the new configuration (and the servers'
// registrations), and a connection opened before keeps moving bytes on
// the old worker.
func TestProcessReload(t *testing.T) {
	is := is.New(t)
	m := newManaged(t)
	p1, _ := m.start(t)
	m.register(t, echoServer(t))
	old := m.dial(t)
	is.NoErr(echoes(old, "before"))
	worker := m.workerPid(t)
	is.Equal(m.monitorStatus(t, "/metrics/haproxy"), 503) // no such route without a token
	p1.Release()

	// A connection that moves bytes all through the reload, as a device's.
	busy := m.dial(t)
	quit, done := make(chan struct{}), make(chan struct{})
	var busyErr error
	trips := 0
	go func() {
		defer close(done)
		for ; trips < 1e6; trips++ { // bounded; quit ends it long before
			select {
			case <-quit:
				return
			default:
			}
			if busyErr = echoes(busy, "ping"); busyErr != nil {
				return
			}
		}
	}()
	m.site.MonitorToken = "s3cret"
	p2, log := m.start(t)
	close(quit)
	<-done
	is.NoErr(busyErr)
	t.Logf("%d round trips on a busy connection during the reload", trips)
	is.True(p2.Adopted())
	is.Equal(p2.Pid(), p1.Pid()) // the same master
	is.True(strings.Contains(log.String(), "configuration changed"))
	is.True(m.workerPid(t) != worker) // a new worker
	disk, err := os.ReadFile(m.file())
	is.NoErr(err)
	is.Equal(string(disk), m.cfg.Render(m.site))

	is.NoErr(echoes(old, "after the reload"))             // on the old worker, still
	is.Equal(m.monitorStatus(t, "/metrics/haproxy"), 401) // the new configuration
	is.NoErr(echoes(m.dial(t), "new connection"))         // vpn1 is still registered
	is.Equal(m.monitorStatus(t, "/ping"), http.StatusOK)  // and up
	is.NoErr(echoes(old, "old connection, once more"))    // after all that
	is.NoErr(p2.Stop(context.Background()))
	is.True(echoes(old, "stopped") != nil) // Stop ends the old worker too
}

// TestProcessReloadFailure: a configuration that haproxy refuses is not
// adopted: Start fails with haproxy's words, the running haproxy keeps
// its old configuration, on disk too, and the next Process with that
// configuration adopts it.
func TestProcessReloadFailure(t *testing.T) {
	is := is.New(t)
	m := newManaged(t)
	p1, _ := m.start(t)
	m.register(t, echoServer(t))
	c := m.dial(t)
	is.NoErr(echoes(c, "before"))
	before, err := os.ReadFile(m.file())
	is.NoErr(err)
	p1.Release()

	good := m.cfg
	m.cfg.CPUMap = "bogus"
	p2 := m.process(&logBuffer{})
	err = p2.Start(context.Background())
	is.True(err != nil)
	is.True(strings.Contains(err.Error(), "cpu-map")) // haproxy's own words
	after, _ := os.ReadFile(m.file())
	is.Equal(string(after), string(before)) // the running configuration, back
	is.NoErr(echoes(c, "after the failed reload"))

	m.cfg = good
	p3, _ := m.start(t)
	is.True(p3.Adopted())
	is.Equal(p3.Pid(), p1.Pid())
	is.NoErr(echoes(m.dial(t), "new connection"))
	is.NoErr(p3.Stop(context.Background()))
}

// TestProcessForeignPid: a pid file that names a live process of another
// program is neither adopted nor killed: Start starts a new haproxy.
func TestProcessForeignPid(t *testing.T) {
	is := is.New(t)
	m := newManaged(t)
	sleep := exec.Command("sleep", "60")
	is.NoErr(sleep.Start())
	exited := make(chan struct{})
	go func() { _ = sleep.Wait(); close(exited) }()
	t.Cleanup(func() { _ = sleep.Process.Kill(); <-exited })
	is.NoErr(os.WriteFile(m.file()+".pid", []byte(strconv.Itoa(sleep.Process.Pid)+"\n"), 0o644))

	p, log := m.start(t)
	is.True(!p.Adopted())
	is.True(p.Pid() != sleep.Process.Pid)
	is.True(strings.Contains(log.String(), "names another program"))
	is.NoErr(p.Stop(context.Background()))
	select {
	case <-exited:
		t.Fatal("the foreign process was killed")
	default:
	}
	is.NoErr(sleep.Process.Signal(syscall.Signal(0)))
}

// TestProcessDoneAdopted: Done closes when an adopted haproxy dies, and
// Err says how.
func TestProcessDoneAdopted(t *testing.T) {
	is := is.New(t)
	m := newManaged(t)
	p1, _ := m.start(t)
	p1.Release()
	p2, _ := m.start(t)
	is.True(p2.Adopted())
	is.NoErr(syscall.Kill(p2.Pid(), syscall.SIGKILL))
	select {
	case <-p2.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("Done not closed within 10 s of SIGKILL")
	}
	is.True(strings.Contains(p2.Err().Error(), "killed")) // a child of the test: reaped, its status known
	is.NoErr(p2.Stop(context.Background()))               // already gone
}

// TestProcessAdoptNotChild: an haproxy that an earlier Go process
// started, which has died since (haproxy is not a child of this one), is
// adopted, stopped, and Done and Err work for it.
func TestProcessAdoptNotChild(t *testing.T) {
	is := is.New(t)
	m := newManaged(t)
	is.NoErr(os.WriteFile(m.file(), []byte(m.cfg.Render(m.site)), 0o600))
	// The shell starts haproxy in the background and exits: haproxy's
	// parent is then the init process (or a subreaper), not the test.
	script := `haproxy -W -db -f "$1" -p "$1.pid" >"$1.log" 2>&1 </dev/null &`
	out, err := exec.Command("setsid", "sh", "-c", script, "sh", m.file()).CombinedOutput()
	is.NoErr(err)
	t.Logf("sh: %s", out)
	// Until haproxy answers: Start would not find it before.
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := m.runtime().Command(context.Background(), "show info"); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the haproxy that sh started does not answer within 10 s")
		}
		time.Sleep(20 * time.Millisecond) // a poll with a deadline: no event tells
	}
	p, log := m.start(t)
	if !p.Adopted() {
		t.Fatalf("not adopted; log:\n%s", log)
	}
	if ppid, _ := proc.ParentPid(p.Pid()); ppid == os.Getpid() {
		t.Fatal("haproxy is a child of the test")
	}
	m.register(t, echoServer(t))
	c := m.dial(t)
	is.NoErr(echoes(c, "adopted"))
	is.NoErr(p.Stop(context.Background()))
	select {
	case <-p.Done():
	default:
		t.Fatal("Done not closed after Stop")
	}
	is.True(strings.Contains(p.Err().Error(), "status is unknown"))
	is.True(echoes(c, "stopped") != nil)
}

// TestProcessSitePIDFile: with Site.PIDFile set (as package vpn sets
// it), the configuration names the pid file, haproxy gets no -p (it would
// warn that the pid file is given twice), and adoption finds it there.
func TestProcessSitePIDFile(t *testing.T) {
	is := is.New(t)
	m := newManaged(t)
	m.site.PIDFile = filepath.Join(m.dir, "haproxy.pid")
	p1, _ := m.start(t)
	args, err := proc.Cmdline(p1.Pid())
	is.NoErr(err)
	is.True(!slices.Contains(args, "-p"))
	b, err := os.ReadFile(m.site.PIDFile)
	is.NoErr(err)
	is.Equal(strings.TrimSpace(string(b)), strconv.Itoa(p1.Pid()))
	p1.Release()
	p2, _ := m.start(t)
	is.True(p2.Adopted())
	is.Equal(p2.Pid(), p1.Pid())
	is.NoErr(p2.Stop(context.Background()))
	out, err := os.ReadFile(m.file() + ".log")
	is.NoErr(err)
	is.True(!strings.Contains(string(out), "already specified"))
}

// TestProcessStartFailure: when haproxy exits at start, Start's error
// holds the end of its output.
func TestProcessStartFailure(t *testing.T) {
	dir := t.TempDir()
	p := &Process{Config: Config{Socket: filepath.Join(dir, "admin.sock")}, File: filepath.Join(dir, "haproxy.cfg"),
		Command: func(ctx context.Context, name string, args ...string) *exec.Cmd {
			return exec.CommandContext(ctx, "sh", "-c", "echo '[ALERT] it went wrong' >&2; exit 3")
		}}
	err := p.Start(context.Background())
	if err == nil {
		t.Fatal("Start succeeded")
	}
	for _, want := range []string{"it went wrong", "exit status 3"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("Start: %v; want %q in it", err, want)
		}
	}
}
