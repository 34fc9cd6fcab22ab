package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/obvpn/obvpn/cmd/internal/sdnotify/sdnotifytest"
	"github.com/obvpn/obvpn/vpn/balena/balenatest"
	"github.com/obvpn/obvpn/vpn/vpntest"
)

// TestUpgrade runs the built command in a world namespace under a
// notification socket of the test's own, with a device connected, and
// upgrades it twice with SIGHUP: first to an executable that exits 1 at
// once (the old process keeps serving and says so), then to the real one
// (the successor, a child of the old process, names itself in the pid
// file and to "systemd", the old one exits 0). All along, GET /ping on the
// metrics listener and CONNECT requests to the proxy's are never refused,
// and a stream through the proxy and the device's tunnel, opened in the
// old process before the upgrade and ended after the successor is ready,
// is counted and hashed at the device.
func TestUpgrade(t *testing.T) {
	w := newUpgradeWorld(t)
	w.failedUpgrade()
	newPid := w.upgrade()
	w.checkDevices()
	w.stop(newPid)
}

// upgradeWorld is TestUpgrade's: the built executables, the world with its
// balena API and notification socket, the server and its device.
type upgradeWorld struct {
	t                     *testing.T
	ctx                   context.Context
	bin, good, broken     string // the path the server runs, and what goes there
	pidFile, runDir       string
	world                 *vpntest.Netns
	api                   *balenatest.API
	dev                   balenatest.Device
	notify                *sdnotifytest.Socket
	srv                   *groupProc
	oldPid                int
	client                *vpntest.Process
	openvpnPid, authCalls int
}

// newUpgradeWorld builds the command, starts it in a world namespace with
// the pid file and the notification socket, and connects the device, in a
// namespace of its own with a tunnel and a sink for the stream.
func newUpgradeWorld(t *testing.T) *upgradeWorld {
	goBin := vpntest.Require(t, "openvpn", "ip", "go")[2]
	dir := t.TempDir()
	w := &upgradeWorld{t: t, good: filepath.Join(dir, "open-balena-vpn.good"), bin: filepath.Join(dir, "bin", "open-balena-vpn"),
		broken: filepath.Join(dir, "open-balena-vpn.broken"), pidFile: filepath.Join(dir, "open-balena-vpn.pid"), runDir: t.TempDir()}
	if out, err := exec.Command(goBin, "build", "-o", w.good, ".").CombinedOutput(); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if err := os.Mkdir(filepath.Dir(w.bin), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(w.broken, []byte("#!/bin/sh\necho 'open-balena-vpn: a broken build' >&2\nexit 1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	install(t, w.good, w.bin)
	t.Cleanup(func() { killDataPlane(w.runDir) }) // left running by a failed test
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	w.ctx = ctx

	w.world = vpntest.NewNetns(t, "world")
	pki := vpntest.NewPKI(t)
	w.api = balenatest.New()
	w.dev = w.api.AddDevice(balenatest.Device{UUID: "0123456789abcdef0123456789abcdef", Key: "device-key"})
	l, err := w.world.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: w.api}
	go hs.Serve(l)
	t.Cleanup(func() { hs.Close() })
	w.notify = sdnotifytest.NewSocket(t)

	b64 := base64.StdEncoding.EncodeToString
	cmd := exec.Command("ip", "netns", "exec", w.world.Name, w.bin, "-pid-file", w.pidFile)
	cmd.Env = []string{
		"PATH=/usr/sbin:/usr/bin:/sbin:/bin",
		"VPN_BASE_SUBNET=10.240.0.0/16", "VPN_INSTANCE_SUBNET_BITMASK=24", "VPN_INSTANCE_COUNT=1",
		"VPN_RUN_DIR=" + w.runDir,
		"BALENA_API_INTERNAL_HOST=" + l.Addr().String(), "VPN_SERVICE_API_KEY=" + w.api.ServiceKey,
		"VPN_OPENVPN_CA_CRT=" + b64(pki.CACert), "VPN_OPENVPN_SERVER_CRT=" + b64(pki.ServerCert),
		"VPN_OPENVPN_SERVER_KEY=" + b64(pki.ServerKey),
		"VPN_API_BASE_PORT=30000", "VPN_METRICS_ADDR=127.0.0.1:8080", "VPN_CONNECT_PROXY_PORT=3128",
		"DELAY_ON_AUTH_FAIL=0", "DEFAULT_SIGTERM_TIMEOUT=5", "VPN_HAPROXY=off",
		"NOTIFY_SOCKET=" + w.notify.Addr, "VPN_UPGRADE_TIMEOUT=20",
	}
	w.srv = startGroup(t, cmd)
	w.oldPid = cmd.Process.Pid
	w.expect(w.next(), w.oldPid, "READY=1")
	if got := readPid(t, w.pidFile); got != w.oldPid {
		t.Fatalf("pid file names %d, want %d", got, w.oldPid)
	}

	device := vpntest.NewDevice(t, w.world)
	sinkL, err := device.Listen("tcp", "0.0.0.0:9000")
	if err != nil {
		t.Fatal(err)
	}
	go serveSink(sinkL)
	t.Cleanup(func() { sinkL.Close() })
	w.client = vpntest.StartClient(t, vpntest.ClientOptions{Netns: device.Netns, Remote: device.WorldAddr.String() + ":10001",
		CA: pki.CAFile, Username: w.dev.UUID, Password: w.dev.Key, Tunnel: true})
	if _, err := w.client.WaitFor(ctx, "Initialization Sequence Completed"); err != nil {
		t.Fatal(err)
	}
	w.srv.waitDevice(ctx, t, w.api, w.dev.UUID, true)
	w.openvpnPid = readPid(t, filepath.Join(w.runDir, "server-1.pid"))
	w.authCalls = countRequests(w.api, balenatest.DeviceAuth)
	return w
}

// next returns the next notification.
func (w *upgradeWorld) next() sdnotifytest.Message {
	w.t.Helper()
	m, err := w.notify.Next(w.ctx)
	if err != nil {
		w.t.Fatalf("waiting for a notification: %v", err)
	}
	return m
}

// expect checks that m has states and, unless pid is 0, MAINPID=pid.
func (w *upgradeWorld) expect(m sdnotifytest.Message, pid int, states ...string) {
	w.t.Helper()
	for _, s := range states {
		if !m.Has(s) {
			w.t.Errorf("notification %q lacks %s", m, s)
		}
	}
	if pid != 0 && m.Value("MAINPID") != strconv.Itoa(pid) {
		w.t.Errorf("notification %q: want MAINPID=%d", m, pid)
	}
	if m.Has("RELOADING=1") && m.Value("MONOTONIC_USEC") == "" {
		w.t.Errorf("notification %q: RELOADING=1 without MONOTONIC_USEC", m)
	}
}

// failedUpgrade upgrades to a broken build: the old process keeps
// serving, and says so.
func (w *upgradeWorld) failedUpgrade() {
	t := w.t
	install(t, w.broken, w.bin)
	if err := syscall.Kill(w.oldPid, syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	w.expect(w.next(), 0, "RELOADING=1")
	w.expect(w.next(), w.oldPid, "READY=1")
	for _, line := range []string{"upgrade failed: this process keeps serving", "a broken build"} {
		if _, err := w.srv.waitLog(w.ctx, line); err != nil {
			t.Fatal(err)
		}
	}
	hc := &http.Client{Transport: &http.Transport{DialContext: w.world.Dial, DisableKeepAlives: true}, Timeout: 5 * time.Second}
	if err := ping(hc); err != nil {
		t.Errorf("after the failed upgrade: %v", err)
	}
	if got := readPid(t, w.pidFile); got != w.oldPid {
		t.Errorf("after the failed upgrade the pid file names %d, want %d", got, w.oldPid)
	}
}

// upgrade upgrades to the real build, under load, with a stream through
// the proxy and the tunnel that runs across it, and returns the
// successor's pid.
func (w *upgradeWorld) upgrade() int {
	t := w.t
	install(t, w.good, w.bin)
	st, err := startStream(w.ctx, w.world, w.dev.UUID, w.api.ServiceKey)
	if err != nil {
		t.Fatalf("the stream: %v", err)
	}
	load := startLoad(w.world, w.dev.UUID)
	if err := syscall.Kill(w.oldPid, syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	w.expect(w.next(), 0, "RELOADING=1")
	ready := w.next()
	w.expect(ready, 0, "READY=1")
	newPid, _ := strconv.Atoi(ready.Value("MAINPID"))
	if newPid == w.oldPid || newPid == 0 {
		t.Fatalf("the successor's READY=1 names MAINPID %q, want a new pid", ready.Value("MAINPID"))
	}
	st.finish() // the rest of the stream, once the successor serves
	// The successor is the old process's child: forked by it, it is in
	// the process group that the test made for the old one.
	if pgid, err := syscall.Getpgid(newPid); err != nil || pgid != w.oldPid {
		t.Errorf("pid %d: process group %d (%v), want the old process's %d", newPid, pgid, err, w.oldPid)
	}
	if exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", newPid)); err != nil || exe != w.bin {
		t.Errorf("pid %d runs %q (%v), want %s", newPid, exe, err, w.bin)
	}
	readyAt := time.Now()
	select {
	case err := <-w.srv.exited:
		t.Logf("the old process exited %v after its successor's READY=1", time.Since(readyAt).Round(time.Millisecond))
		if err != nil {
			t.Errorf("the old process after the upgrade: %v, want exit status 0", err)
		}
	case <-w.ctx.Done():
		t.Fatal("the old process did not exit after the upgrade")
	}
	if got := readPid(t, w.pidFile); got != newPid {
		t.Errorf("after the upgrade the pid file names %d, want the successor %d", got, newPid)
	}
	if _, err := w.srv.waitLog(w.ctx, "handed over to its successor"); err != nil {
		t.Error(err)
	}
	stats := load.stop(w.ctx, t)
	t.Logf("during the upgrade: %s", stats)
	if stats.refused > 0 {
		t.Errorf("during the upgrade: %s; want none refused", stats)
	}
	if stats.failed > 0 {
		t.Errorf("during the upgrade: %s; want every request answered", stats)
	}
	if stats.pings == 0 || stats.connects == 0 || stats.afterExit == 0 {
		t.Errorf("during the upgrade: %s; want requests served by both processes", stats)
	}
	sent, got, streamErr := st.result(w.ctx)
	switch {
	case streamErr != nil:
		t.Errorf("the stream across the upgrade: %v", streamErr)
	case got != sent:
		t.Errorf("the stream across the upgrade: the device got %s, want %s", got, sent)
	default:
		t.Logf("the stream across the upgrade: sent %s, the device got %s", sent, got)
	}
	return newPid
}

// checkDevices checks that the device stayed connected to the same
// openvpn and the API heard nothing of it.
func (w *upgradeWorld) checkDevices() {
	t := w.t
	if n := strings.Count(strings.Join(w.client.Lines(), "\n"), "Initialization Sequence Completed"); n != 1 {
		t.Errorf("the device connected %d times, want once", n)
	}
	if got := readPid(t, filepath.Join(w.runDir, "server-1.pid")); got != w.openvpnPid {
		t.Errorf("openvpn pid %d after the upgrade, want %d", got, w.openvpnPid)
	}
	if n := countRequests(w.api, balenatest.DeviceAuth); n != w.authCalls {
		t.Errorf("%d auth calls after the upgrade, want %d", n, w.authCalls)
	}
	if d, _ := w.api.Device(w.dev.UUID); !d.ConnectedToVPN {
		t.Error("the device was reported offline")
	}
}

// stop is systemd's stop: STOPPING=1 from the successor, and then every
// process of the server is gone (the stderr pipe closes), with no other
// notification.
func (w *upgradeWorld) stop(newPid int) {
	t := w.t
	if err := syscall.Kill(newPid, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	w.expect(w.next(), 0, "STOPPING=1")
	select {
	case <-w.srv.closed:
		w.srv.stopped = true
	case <-w.ctx.Done():
		t.Fatal("the successor did not stop after SIGTERM")
	}
	if _, err := w.srv.waitLog(w.ctx, "open-balena-vpn stopped"); err != nil {
		t.Error(err)
	}
	if m, err := w.notify.Next(expired()); err == nil {
		t.Errorf("unexpected notification %q", m)
	}
}

// serveSink answers each connection, once its sender has closed its side,
// with the count and SHA-256 of what arrived, until l is closed.
func serveSink(l net.Listener) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			h := sha256.New()
			n, _ := io.Copy(h, c)
			fmt.Fprintf(c, "%d %x\n", n, h.Sum(nil))
		}()
	}
}

// stream sends pseudo-random bytes through a CONNECT tunnel to the sink
// until finish, then streamTail more, closes its side and reads the sink's
// count and hash. It is bounded by streamMax bytes and by ctx.
type stream struct {
	conn   net.Conn
	br     *bufio.Reader
	finish func()
	done   chan struct{}
	sent   string // count and hash, when done
	err    error
}

const (
	streamChunk = 32 << 10
	streamTail  = 1 << 20  // bytes after finish
	streamMax   = 64 << 20 // bytes at most
)

func startStream(ctx context.Context, world *vpntest.Netns, uuid, key string) (*stream, error) {
	c, err := world.Dial(ctx, "tcp", "127.0.0.1:3128")
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(40 * time.Second))
	target := uuid + ".balena:9000"
	auth := base64.StdEncoding.EncodeToString([]byte("x:" + key))
	fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\nProxy-Authorization: Basic %s\r\n\r\n", target, target, auth)
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, &http.Request{Method: "CONNECT"})
	if err != nil {
		c.Close()
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		c.Close()
		return nil, fmt.Errorf("CONNECT: %s", resp.Status)
	}
	finish := make(chan struct{})
	var once sync.Once
	st := &stream{conn: c, br: br, finish: func() { once.Do(func() { close(finish) }) }, done: make(chan struct{})}
	go st.send(finish)
	return st, nil
}

func (st *stream) send(finish <-chan struct{}) {
	defer close(st.done)
	h := sha256.New()
	buf := make([]byte, streamChunk)
	var n, tail int64
	for n < streamMax && tail < streamTail {
		select {
		case <-finish:
			tail += streamChunk
		default:
		}
		for i := range buf {
			buf[i] = byte(n + int64(i)*7)
		}
		if _, err := st.conn.Write(buf); err != nil {
			st.err = fmt.Errorf("after %d bytes: %w", n, err)
			st.sent = fmt.Sprintf("%d bytes and more", n)
			return
		}
		h.Write(buf)
		n += streamChunk
	}
	st.sent = fmt.Sprintf("%d %x", n, h.Sum(nil))
	st.conn.(interface{ CloseWrite() error }).CloseWrite()
}

// result waits for the stream and returns what was sent and what the sink
// says arrived.
func (st *stream) result(ctx context.Context) (sent, got string, err error) {
	defer st.conn.Close()
	st.finish()
	select {
	case <-st.done:
	case <-ctx.Done():
		st.conn.Close()
		<-st.done
	}
	if st.err != nil {
		return st.sent, "", st.err
	}
	line, err := st.br.ReadString('\n')
	return st.sent, strings.TrimSpace(line), err
}

// install puts a copy of src at dst the way an upgrade does: a new file
// renamed over the old one, which may be running.
func install(t *testing.T, src, dst string) {
	t.Helper()
	data, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	tmp := dst + ".new"
	if err := os.WriteFile(tmp, data, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, dst); err != nil {
		t.Fatal(err)
	}
}

// expired returns a context that has ended, for reading what is already
// there.
func expired() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}

func readPid(t *testing.T, path string) int {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return pid
}

func countRequests(api *balenatest.API, e balenatest.Endpoint) int {
	n := 0
	for _, r := range api.Requests() {
		if r.Endpoint == e {
			n++
		}
	}
	return n
}

func ping(hc *http.Client) error {
	resp, err := hc.Get("http://127.0.0.1:8080/ping")
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET /ping: %s", resp.Status)
	}
	return nil
}

// connect sends a CONNECT to the proxy and reads the status line: any
// answer means the connection was taken.
func connect(ctx context.Context, world *vpntest.Netns, uuid string) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	c, err := world.Dial(ctx, "tcp", "127.0.0.1:3128")
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprintf(c, "CONNECT %s.balena:80 HTTP/1.1\r\nHost: %s.balena:80\r\n\r\n", uuid, uuid); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return fmt.Errorf("CONNECT: no answer: %w", err)
	}
	if !strings.HasPrefix(line, "HTTP/1.") { // the 407 of a CONNECT without credentials will do
		return fmt.Errorf("CONNECT: answer %q", line)
	}
	return nil
}

// load is loadWorkers loops of GET /ping and CONNECT requests, bounded
// in count and time, that count the refused ones.
type load struct {
	world  *vpntest.Netns
	uuid   string
	exited atomic.Bool // the old process has exited
	after  atomic.Int64
	done   sync.WaitGroup
	stopC  chan struct{}
	mu     sync.Mutex
	res    loadStats
}

type loadStats struct {
	pings, connects, refused, failed, afterExit int
	errs                                        []string
}

func (s loadStats) String() string {
	return fmt.Sprintf("%d GET /ping, %d CONNECT, %d refused, %d failed otherwise, %d after the old process exited; first errors %q",
		s.pings, s.connects, s.refused, s.failed, s.afterExit, s.errs)
}

const (
	loadWorkers  = 4
	loadMax      = 2000                 // requests of each worker at most
	loadPace     = 5 * time.Millisecond // between the requests of a worker, at least
	loadDuration = 30 * time.Second     // at most
	loadAfter    = 40                   // requests once the old process has exited
)

func startLoad(world *vpntest.Netns, uuid string) *load {
	l := &load{world: world, uuid: uuid, stopC: make(chan struct{})}
	deadline := time.Now().Add(loadDuration)
	for w := range loadWorkers {
		l.done.Go(func() { l.run(w, deadline) })
	}
	return l
}

func (l *load) run(w int, deadline time.Time) {
	hc := &http.Client{Transport: &http.Transport{DialContext: l.world.Dial, DisableKeepAlives: true}, Timeout: 5 * time.Second}
	pace := time.NewTicker(loadPace)
	defer pace.Stop()
	for i := 0; i < loadMax && time.Now().Before(deadline); i++ {
		<-pace.C // a rate, not a wait for an event
		select {
		case <-l.stopC:
			if l.after.Load() >= loadAfter {
				return
			}
		default:
		}
		exited := l.exited.Load()
		isPing := (w+i)%2 == 0
		var err error
		if isPing {
			err = ping(hc)
		} else {
			err = connect(context.Background(), l.world, l.uuid)
		}
		l.mu.Lock()
		if isPing {
			l.res.pings++
		} else {
			l.res.connects++
		}
		switch {
		case err != nil && strings.Contains(err.Error(), "connection refused"):
			l.res.refused++
		case err != nil:
			l.res.failed++
		}
		if err != nil && len(l.res.errs) < 5 {
			l.res.errs = append(l.res.errs, err.Error())
		}
		if exited {
			l.res.afterExit++
			l.after.Add(1)
		}
		l.mu.Unlock()
	}
}

// stop marks the old process's exit, lets the loops make loadAfter more
// requests (to the successor alone), and returns the counts.
func (l *load) stop(ctx context.Context, t *testing.T) loadStats {
	t.Helper()
	l.exited.Store(true)
	close(l.stopC)
	done := make(chan struct{})
	go func() { l.done.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		t.Fatal("the load loops did not end")
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.res
}

// groupProc is a server started in a process group of its own whose
// processes outlive one another: an upgrade's successor keeps the stderr
// pipe of its predecessor, so exited is the first process's exit and
// closed the end of the pipe (every process of the group has let go).
type groupProc struct {
	exited  chan error    // the first process's Wait
	closed  chan struct{} // stderr's EOF
	stopped bool          // the test saw the group end; else the clean-up kills it

	mu      sync.Mutex
	lines   []string
	changed chan struct{} // closed and replaced at each line
}

// startGroup starts cmd in a process group of its own with stderr on a
// pipe of the test's, and kills the group when the test ends unless it
// saw every process go (stopped). A failed test gets the log.
func startGroup(t *testing.T, cmd *exec.Cmd) *groupProc {
	t.Helper()
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = w
	if err := cmd.Start(); err != nil {
		r.Close()
		w.Close()
		t.Fatal(err)
	}
	w.Close()
	p := &groupProc{exited: make(chan error, 1), closed: make(chan struct{}), changed: make(chan struct{})}
	go func() { p.exited <- cmd.Wait() }()
	go func() {
		defer close(p.closed)
		defer r.Close()
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			p.mu.Lock()
			p.lines = append(p.lines, sc.Text())
			close(p.changed)
			p.changed = make(chan struct{})
			p.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		if !p.stopped {
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-p.closed
		}
		if t.Failed() {
			p.mu.Lock()
			t.Logf("server log:\n%s", strings.Join(p.lines, "\n"))
			p.mu.Unlock()
		}
	})
	return p
}

// waitLog waits for a log line that holds substr.
func (p *groupProc) waitLog(ctx context.Context, substr string) (string, error) {
	for i := 0; ; {
		p.mu.Lock()
		for ; i < len(p.lines); i++ {
			if line := p.lines[i]; strings.Contains(line, substr) {
				p.mu.Unlock()
				return line, nil
			}
		}
		changed := p.changed
		p.mu.Unlock()
		select {
		case <-changed:
		case <-p.closed:
			return "", fmt.Errorf("no log line with %q: the server's stderr closed", substr)
		case <-ctx.Done():
			return "", fmt.Errorf("no log line with %q: %w", substr, ctx.Err())
		}
	}
}

// waitDevice waits until the API has the device online (or offline).
func (p *groupProc) waitDevice(ctx context.Context, t *testing.T, api *balenatest.API, uuid string, online bool) {
	t.Helper()
	for {
		if d, _ := api.Device(uuid); d.ConnectedToVPN == online && (!online || d.ServiceInstance != 0) {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("the device was not reported online=%v", online)
		case err := <-p.exited:
			t.Fatalf("the server exited: %v", err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}
