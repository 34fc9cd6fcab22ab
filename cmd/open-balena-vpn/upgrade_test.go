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

// handoverKeepsDevices says whether vpn.Server.Handover leaves the
// OpenVPN instances running for the successor to adopt (issue 21, the
// lead's part in package vpn). Until it does, Handover stops them like
// Close and the device reconnects; once it does, set it to true and
// TestUpgrade also checks that the device stays connected to the same
// openvpn process and that the API hears of no disconnect and no new
// auth.
const handoverKeepsDevices = false

// handoverAnswersEveryRequest says whether a request that the old process
// accepted is always answered. Not yet: Handover shuts the metrics and
// internal API servers down with http.Server.Shutdown, which closes a
// connection whose request it reads after the shutdown began without an
// answer (net/http's conn.serve), so a GET /ping that the old process
// accepted a moment before can see EOF. Nothing is refused (the sockets
// stay open in the successor), which the test always checks; once the
// old process stops accepting before it shuts its servers down, set this
// to true and the test also wants every request answered.
const handoverAnswersEveryRequest = false

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
	goBin := vpntest.Require(t, "openvpn", "ip", "go")[2]
	dir := t.TempDir()
	good := filepath.Join(dir, "open-balena-vpn.good")
	if out, err := exec.Command(goBin, "build", "-o", good, ".").CombinedOutput(); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	bin := filepath.Join(dir, "bin", "open-balena-vpn")
	broken := filepath.Join(dir, "open-balena-vpn.broken")
	if err := os.Mkdir(filepath.Dir(bin), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(broken, []byte("#!/bin/sh\necho 'open-balena-vpn: a broken build' >&2\nexit 1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	install(t, good, bin)

	world := vpntest.NewNetns(t, "world")
	pki := vpntest.NewPKI(t)
	api := balenatest.New()
	dev := api.AddDevice(balenatest.Device{UUID: "0123456789abcdef0123456789abcdef", Key: "device-key"})
	l, err := world.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: api}
	go hs.Serve(l)
	t.Cleanup(func() { hs.Close() })
	notify := sdnotifytest.NewSocket(t)
	pidFile := filepath.Join(dir, "open-balena-vpn.pid")
	runDir := t.TempDir()

	b64 := base64.StdEncoding.EncodeToString
	cmd := exec.Command("ip", "netns", "exec", world.Name, bin, "-pid-file", pidFile)
	cmd.Env = []string{
		"PATH=/usr/sbin:/usr/bin:/sbin:/bin",
		"VPN_BASE_SUBNET=10.240.0.0/16", "VPN_INSTANCE_SUBNET_BITMASK=24", "VPN_INSTANCE_COUNT=1",
		"VPN_RUN_DIR=" + runDir,
		"BALENA_API_INTERNAL_HOST=" + l.Addr().String(), "VPN_SERVICE_API_KEY=" + api.ServiceKey,
		"VPN_OPENVPN_CA_CRT=" + b64(pki.CACert), "VPN_OPENVPN_SERVER_CRT=" + b64(pki.ServerCert),
		"VPN_OPENVPN_SERVER_KEY=" + b64(pki.ServerKey),
		"VPN_API_BASE_PORT=30000", "VPN_METRICS_ADDR=127.0.0.1:8080", "VPN_CONNECT_PROXY_PORT=3128",
		"DELAY_ON_AUTH_FAIL=0", "DEFAULT_SIGTERM_TIMEOUT=5", "VPN_HAPROXY=off",
		"NOTIFY_SOCKET=" + notify.Addr, "VPN_UPGRADE_TIMEOUT=20s",
	}
	srv := startGroup(t, cmd)
	oldPid := cmd.Process.Pid

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	next := func() sdnotifytest.Message {
		t.Helper()
		m, err := notify.Next(ctx)
		if err != nil {
			t.Fatalf("waiting for a notification: %v", err)
		}
		return m
	}
	expect := func(m sdnotifytest.Message, pid int, states ...string) {
		t.Helper()
		for _, s := range states {
			if !m.Has(s) {
				t.Errorf("notification %q lacks %s", m, s)
			}
		}
		if pid != 0 && m.Value("MAINPID") != strconv.Itoa(pid) {
			t.Errorf("notification %q: want MAINPID=%d", m, pid)
		}
		if m.Has("RELOADING=1") && m.Value("MONOTONIC_USEC") == "" {
			t.Errorf("notification %q: RELOADING=1 without MONOTONIC_USEC", m)
		}
	}
	expect(next(), oldPid, "READY=1")
	if got := readPid(t, pidFile); got != oldPid {
		t.Fatalf("pid file names %d, want %d", got, oldPid)
	}

	// The device, in a namespace of its own with a tunnel, runs a sink
	// that the stream reaches through the CONNECT proxy.
	device := vpntest.NewDevice(t, world)
	sinkL, err := device.Listen("tcp", "0.0.0.0:9000")
	if err != nil {
		t.Fatal(err)
	}
	go serveSink(sinkL)
	t.Cleanup(func() { sinkL.Close() })
	client := vpntest.StartClient(t, vpntest.ClientOptions{Netns: device.Netns, Remote: device.WorldAddr.String() + ":10001",
		CA: pki.CAFile, Username: dev.UUID, Password: dev.Key, Tunnel: true})
	if _, err := client.WaitFor(ctx, "Initialization Sequence Completed"); err != nil {
		t.Fatal(err)
	}
	srv.waitDevice(ctx, t, api, dev.UUID, true)
	openvpnPid := readPid(t, filepath.Join(runDir, "server-1.pid"))
	authCalls := countRequests(api, balenatest.DeviceAuth)

	// A broken build: the old process keeps serving, and says so.
	install(t, broken, bin)
	if err := syscall.Kill(oldPid, syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	expect(next(), 0, "RELOADING=1")
	expect(next(), oldPid, "READY=1")
	if _, err := srv.waitLog(ctx, "upgrade failed: this process keeps serving"); err != nil {
		t.Fatal(err)
	}
	if _, err := srv.waitLog(ctx, "a broken build"); err != nil {
		t.Fatal(err)
	}
	hc := &http.Client{Transport: &http.Transport{DialContext: world.Dial, DisableKeepAlives: true}, Timeout: 5 * time.Second}
	if err := ping(hc); err != nil {
		t.Errorf("after the failed upgrade: %v", err)
	}
	if got := readPid(t, pidFile); got != oldPid {
		t.Errorf("after the failed upgrade the pid file names %d, want %d", got, oldPid)
	}

	// The real build, under load, with a stream through the proxy and the
	// tunnel that runs across the upgrade.
	install(t, good, bin)
	st, err := startStream(ctx, world, dev.UUID, api.ServiceKey)
	if err != nil {
		t.Fatalf("the stream: %v", err)
	}
	load := startLoad(world, dev.UUID)
	if err := syscall.Kill(oldPid, syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	expect(next(), 0, "RELOADING=1")
	ready := next()
	expect(ready, 0, "READY=1")
	newPid, _ := strconv.Atoi(ready.Value("MAINPID"))
	if newPid == oldPid || newPid == 0 {
		t.Fatalf("the successor's READY=1 names MAINPID %q, want a new pid", ready.Value("MAINPID"))
	}
	st.finish() // the rest of the stream, once the successor serves
	// The successor is the old process's child: forked by it, it is in
	// the process group that the test made for the old one.
	if pgid, err := syscall.Getpgid(newPid); err != nil || pgid != oldPid {
		t.Errorf("pid %d: process group %d (%v), want the old process's %d", newPid, pgid, err, oldPid)
	}
	if exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", newPid)); err != nil || exe != bin {
		t.Errorf("pid %d runs %q (%v), want %s", newPid, exe, err, bin)
	}
	readyAt := time.Now()
	select {
	case err := <-srv.exited:
		t.Logf("the old process exited %v after its successor's READY=1", time.Since(readyAt).Round(time.Millisecond))
		if err != nil {
			t.Errorf("the old process after the upgrade: %v, want exit status 0", err)
		}
	case <-ctx.Done():
		t.Fatal("the old process did not exit after the upgrade")
	}
	if got := readPid(t, pidFile); got != newPid {
		t.Errorf("after the upgrade the pid file names %d, want the successor %d", got, newPid)
	}
	if _, err := srv.waitLog(ctx, "handed over to its successor"); err != nil {
		t.Error(err)
	}
	stats := load.stop(ctx, t)
	t.Logf("during the upgrade: %s", stats)
	if stats.refused > 0 {
		t.Errorf("during the upgrade: %s; want none refused", stats)
	}
	if stats.failed > 0 && handoverAnswersEveryRequest {
		t.Errorf("during the upgrade: %s; want every request answered", stats)
	}
	if stats.pings == 0 || stats.connects == 0 || stats.afterExit == 0 {
		t.Errorf("during the upgrade: %s; want requests served by both processes", stats)
	}

	sent, got, streamErr := st.result(ctx)
	switch {
	case handoverKeepsDevices && streamErr != nil:
		t.Errorf("the stream across the upgrade: %v", streamErr)
	case handoverKeepsDevices && got != sent:
		t.Errorf("the stream across the upgrade: the device got %s, want %s", got, sent)
	default:
		t.Logf("the stream across the upgrade: sent %s, the device got %s (err %v)", sent, got, streamErr)
	}

	if handoverKeepsDevices {
		if n := strings.Count(strings.Join(client.Lines(), "\n"), "Initialization Sequence Completed"); n != 1 {
			t.Errorf("the device connected %d times, want once", n)
		}
		if got := readPid(t, filepath.Join(runDir, "server-1.pid")); got != openvpnPid {
			t.Errorf("openvpn pid %d after the upgrade, want %d", got, openvpnPid)
		}
		if n := countRequests(api, balenatest.DeviceAuth); n != authCalls {
			t.Errorf("%d auth calls after the upgrade, want %d", n, authCalls)
		}
		if d, _ := api.Device(dev.UUID); !d.ConnectedToVPN {
			t.Error("the device was reported offline")
		}
	} else {
		t.Logf("device checks off until Handover keeps the instances: openvpn %d, %d auth calls", openvpnPid, authCalls)
	}

	// systemd's stop: STOPPING=1 from the successor, and then every
	// process of the server is gone (the stderr pipe closes).
	if err := syscall.Kill(newPid, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	expect(next(), 0, "STOPPING=1")
	select {
	case <-srv.closed:
		srv.stopped = true
	case <-ctx.Done():
		t.Fatal("the successor did not stop after SIGTERM")
	}
	if _, err := srv.waitLog(ctx, "open-balena-vpn stopped"); err != nil {
		t.Error(err)
	}
	if m, err := notify.Next(expired()); err == nil {
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
