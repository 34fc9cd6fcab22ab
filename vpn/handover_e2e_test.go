package vpn_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/obvpn/obvpn/connectproxy"
	"github.com/obvpn/obvpn/vpn"
	"github.com/obvpn/obvpn/vpn/balena/balenatest"
	"github.com/obvpn/obvpn/vpn/haproxy"
	"github.com/obvpn/obvpn/vpn/vpntest"
)

// sharedListeners hands every listener that it opened once to whoever
// asks for the same address again, as a duplicate of the same socket: what
// an upgrade in place does with the listeners it passes to the next process
// (tableflip), in one test process. Closing a duplicate leaves the socket
// open for the others; the test's end closes it.
type sharedListeners struct {
	t      *testing.T
	listen func(network, addr string) (net.Listener, error)
	mu     sync.Mutex
	socks  map[string]*net.TCPListener
}

func (s *sharedListeners) Listen(network, addr string) (net.Listener, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	l, ok := s.socks[network+" "+addr]
	if !ok {
		nl, err := s.listen(network, addr)
		if err != nil {
			return nil, err
		}
		l = nl.(*net.TCPListener)
		if s.socks == nil {
			s.socks = map[string]*net.TCPListener{}
		}
		s.socks[network+" "+addr] = l
		s.t.Cleanup(func() { l.Close() })
	}
	f, err := l.File()
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return net.FileListener(f)
}

// nextServer starts another Server on ws's configuration, world and API,
// as the next process of the same server would (listening through
// listen), without waiting for it; ws then stands for it.
func (ws *worldServer) nextServer(t *testing.T, listen func(network, addr string) (net.Listener, error)) {
	t.Helper()
	logs := &syncBuffer{}
	n := fmt.Sprint(time.Now().UnixMilli() % 100000)
	ws.srv = &vpn.Server{Config: ws.cfg, API: ws.api.Client(), Command: ws.world.CommandContext, Dial: ws.world.Dial, Listen: listen,
		Logger: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})).With("process", n)}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("process %s:\n%s", n, logs)
		}
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	var runErr error
	srv := ws.srv
	go func() { runErr = srv.Run(ctx); close(done) }()
	ws.cancel = cancel
	ws.wait = func() error { <-done; return runErr }
	t.Cleanup(func() { cancel(); <-done })
}

// ready waits until ws's server is ready.
func (ws *worldServer) ready(t *testing.T, within time.Duration) {
	t.Helper()
	select {
	case <-ws.srv.Ready():
	case <-time.After(within):
		t.Fatalf("not ready within %v", within)
	}
}

// openvpnPids returns the pids in the instances' pid files, and the
// managed HAProxy's.
func openvpnPids(t *testing.T, ws *worldServer) []int {
	t.Helper()
	var pids []int
	files := []string{ws.cfg.Paths(1).PID, ws.cfg.Paths(2).PID}
	if ws.cfg.HAProxy.Mode == haproxy.Managed {
		files = append(files, filepath.Join(ws.run, "haproxy.pid"))
	}
	for _, name := range files {
		b, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil {
			t.Fatal(err)
		}
		pids = append(pids, pid)
	}
	return pids
}

// TestServerHandover hands a running server over to the next process of
// the same server, twice, with three real devices connected (one
// instance each at least), as an upgrade in place does: the next process
// is started first, on the same sockets, and waits for the handover.
//
//   - No device notices: no client logs a second "Initialization
//     Sequence Completed", the OpenVPN processes keep their pids, and the
//     API gets no auth call and no state report for them; the next
//     process resumes the service instance.
//   - A stream through the first process's CONNECT tunnel runs across
//     the handover and arrives whole; CONNECTs made all along are
//     answered, by one process or the other, none refused.
//   - A device that leaves between two processes is reported offline
//     once by the next, and the others are left alone.
func TestServerHandover(t *testing.T) {
	t.Run("managed HAProxy", func(t *testing.T) {
		vpntest.Require(t, "openvpn", "haproxy", "ip")
		testServerHandover(t, "managed")
	})
	t.Run("no HAProxy", func(t *testing.T) {
		vpntest.Require(t, "openvpn", "ip")
		testServerHandover(t, "off")
	})
}

// testServerHandover is TestServerHandover with VPN_HAPROXY=mode; with a
// managed HAProxy, its master keeps its pid too.
func testServerHandover(t *testing.T, mode string) {
	ws := startWorldServer(t, map[string]string{"VPN_HAPROXY": mode, "VPN_CONNECT_PROXY_PORT": "3128",
		"VPN_STATUS_FILE_WRITE_INTERVAL_SECONDS": "1", "DEFAULT_SIGTERM_TIMEOUT": "30"})
	// ws's first server listened on its own; the processes after it share
	// sockets. The first one's are handed over as the listeners of the
	// next are opened: a shared set from the start, for the test.
	shared := &sharedListeners{t: t, listen: ws.world.Listen}
	ws.cancel()
	if err := ws.wait(); err != nil {
		t.Fatal(err)
	}
	ws.nextServer(t, shared.Listen)
	ws.ready(t, 30*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()

	devs := startHandoverDevices(t, ctx, ws, 3, mode == "managed")
	var uuids []string
	for _, d := range devs {
		uuids = append(uuids, d.api.UUID)
	}
	waitOnline(t, ctx, ws.api, uuids...)
	first := ws.srv.ServiceID()
	pids := openvpnPids(t, ws)
	auths, reports := len(ws.api.AuthChecks()), len(ws.api.StateReports())
	inits := initCounts(devs)

	// A stream through the first process, and CONNECTs all along.
	stream := streamThrough(ctx, ws, devs[0], 16<<20)
	refused := connectLoop(ctx, ws, devs[1])

	old := ws.wait
	oldSrv := ws.srv
	ws.nextServer(t, shared.Listen)
	select {
	case <-ws.srv.Started():
	case <-time.After(30 * time.Second):
		t.Fatal("the next process did not start")
	}
	select {
	case err := <-stream:
		t.Fatalf("the stream ended before the handover (%v): make it longer", err)
	default:
	}
	t.Logf("handover at %s", time.Now().Format("15:04:05.000"))
	oldSrv.Handover()
	if err := old(); err != nil {
		t.Fatalf("the handing-over Run: %v", err)
	}
	ws.ready(t, 30*time.Second)
	t.Logf("ready at %s", time.Now().Format("15:04:05.000"))
	if err := <-stream; err != nil {
		t.Errorf("the stream across the handover: %v", err)
	}
	if n, err := refused(); err != nil || n == 0 {
		t.Errorf("CONNECTs during the handover: %d answered, %v", n, err)
	}
	if got := ws.srv.ServiceID(); got != first {
		t.Errorf("service instance %d after the handover, want %d resumed", got, first)
	}
	for _, d := range devs {
		if body, err := viaConnect(ctx, ws.world, "127.0.0.1:3128", d.api.UUID+".balena", d.api.Key); err != nil || !strings.Contains(string(body), "hello from") {
			t.Errorf("device %s through the next process: %q, %v", d.name, body, err)
		}
	}
	checkUnnoticed(t, ws, devs, pids, inits, auths, reports)

	// A device leaves while no process watches.
	ws.srv.Handover()
	if err := ws.wait(); err != nil {
		t.Fatal(err)
	}
	gone := devs[2]
	gone.client.Stop()
	waitGoneFromStatus(t, ctx, ws, gone.api.UUID)
	ws.nextServer(t, shared.Listen)
	ws.ready(t, 30*time.Second)
	waitAPI(t, ctx, ws.api, func(a *balenatest.API) bool {
		d, _ := a.Device(gone.api.UUID)
		return !d.ConnectedToVPN
	})
	var offline []string
	for _, r := range ws.api.StateReports()[reports:] {
		if r.Connected {
			t.Errorf("a device reported online again after the handovers: %v", r.UUIDs)
		} else {
			offline = append(offline, r.UUIDs...)
		}
	}
	if len(offline) != 1 || offline[0] != gone.api.UUID {
		t.Errorf("offline reports after the handovers: %v, want only %s", offline, gone.api.UUID)
	}
	checkUnnoticed(t, ws, devs[:2], pids, inits, auths, len(ws.api.StateReports()))
}

// handoverDevice is a device of TestServerHandover: a web service on
// port 80 and an echo service on port 7.
type handoverDevice struct {
	fleetDevice
}

// startHandoverDevices starts n devices: through HAProxy on port 1194, or
// the first on instance 1 and the others on instance 2 and 1 in turn.
func startHandoverDevices(t *testing.T, ctx context.Context, ws *worldServer, n int, viaHAProxy bool) []*handoverDevice {
	t.Helper()
	var devs []*handoverDevice
	for i := range n {
		port := 10001 + i%2
		if viaHAProxy {
			port = 1194
		}
		devs = append(devs, startHandoverDevice(t, ws, i, port))
	}
	for _, d := range devs {
		if _, err := d.client.WaitFor(ctx, "Initialization Sequence Completed"); err != nil {
			t.Fatalf("device %s: %v", d.name, err)
		}
	}
	return devs
}

// startHandoverDevice starts the i-th device, which dials port, and does
// not wait for it to connect.
func startHandoverDevice(t *testing.T, ws *worldServer, i, port int) *handoverDevice {
	t.Helper()
	d := &handoverDevice{fleetDevice{name: fmt.Sprintf("dev%d", i), dev: vpntest.NewDevice(t, ws.world)}}
	d.api = ws.api.AddDevice(balenatest.Device{UUID: fmt.Sprintf("%032x", 0xab0+i), Key: fmt.Sprintf("key-%d", i)})
	ws.api.Grant(d.api.Key, d.api.UUID, 80, 7)
	serveDevice(t, d, "hello from "+d.name)
	d.opts = vpntest.ClientOptions{Netns: d.dev.Netns, Remote: fmt.Sprintf("%s:%d", d.dev.WorldAddr, port),
		CA: ws.pki.CAFile, Username: d.api.UUID, Password: d.api.Key, Tunnel: true}
	d.client = vpntest.StartClient(t, d.opts)
	return d
}

// TestHandoverAnswersAuthInFlight hands over while the balena API holds a
// connecting device's authentication: the process that asked answers it
// before it lets go of OpenVPN, so the device connects once, on the one
// auth call, seconds later; unanswered, OpenVPN would hold it until its
// TLS hand-window (60 s) ran out and it dialled again.
func TestHandoverAnswersAuthInFlight(t *testing.T) {
	vpntest.Require(t, "openvpn", "ip")
	ws := startWorldServer(t, map[string]string{"VPN_HAPROXY": "off", "VPN_STATUS_FILE_WRITE_INTERVAL_SECONDS": "1"})
	shared := &sharedListeners{t: t, listen: ws.world.Listen}
	ws.cancel()
	if err := ws.wait(); err != nil {
		t.Fatal(err)
	}
	ws.nextServer(t, shared.Listen)
	ws.ready(t, 30*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	const hold = 3 * time.Second
	before := ws.api.Calls(balenatest.DeviceAuth)
	ws.api.DelayNext(balenatest.DeviceAuth, 1, hold)
	d := startHandoverDevice(t, ws, 0, 10001)
	if err := ws.api.WaitFor(ctx, func(a *balenatest.API) bool { return a.Calls(balenatest.DeviceAuth) > before }); err != nil {
		t.Fatalf("the device's auth call did not come: %v", err)
	}
	old, oldSrv := ws.wait, ws.srv
	ws.nextServer(t, shared.Listen)
	select {
	case <-ws.srv.Started():
	case <-ctx.Done():
		t.Fatal("the next process did not start")
	}
	t0 := time.Now()
	oldSrv.Handover()
	if err := old(); err != nil {
		t.Fatalf("the handing-over Run: %v", err)
	}
	handover := time.Since(t0)
	wctx, wcancel := context.WithTimeout(ctx, 20*time.Second) // well under the 60 s hand-window
	defer wcancel()
	if _, err := d.client.WaitFor(wctx, "Initialization Sequence Completed"); err != nil {
		t.Fatalf("the device did not connect within 20 s of the handover: %v\n%s", err, strings.Join(d.client.Lines(), "\n"))
	}
	t.Logf("handover took %s (the API held the auth %s); the device connected %s after it began", handover.Round(time.Millisecond), hold, time.Since(t0).Round(time.Millisecond))
	if handover < hold/2 {
		t.Errorf("the handover took %s: it did not wait for the auth in flight", handover)
	}
	if n := ws.api.Calls(balenatest.DeviceAuth) - before; n != 1 {
		t.Errorf("%d auth calls for the device, want 1 (answered by the process that asked)", n)
	}
	waitOnline(t, ctx, ws.api, d.api.UUID)
}

// serveDevice serves a web page on port 80 and an echo on port 7 of d.
func serveDevice(t *testing.T, d *handoverDevice, page string) {
	t.Helper()
	l, err := d.dev.Listen("tcp", "0.0.0.0:80")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, page) })}
	go hs.Serve(l)
	t.Cleanup(func() { hs.Close() })
	el, err := d.dev.Listen("tcp", "0.0.0.0:7")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := el.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() { defer wg.Done(); io.Copy(c, c); c.Close() }()
		}
	}()
	t.Cleanup(func() { el.Close(); wg.Wait() })
}

// initCounts counts each device's "Initialization Sequence Completed".
func initCounts(devs []*handoverDevice) []int {
	var n []int
	for _, d := range devs {
		n = append(n, countLines(d.client, "Initialization Sequence Completed"))
	}
	return n
}

func countLines(p *vpntest.Process, substr string) int {
	n := 0
	for _, l := range p.Lines() {
		if strings.Contains(l, substr) {
			n++
		}
	}
	return n
}

// checkUnnoticed checks that the devices did not notice: the same openvpn
// processes, no new session in any client's log, no auth call, and no
// state report since reports.
func checkUnnoticed(t *testing.T, ws *worldServer, devs []*handoverDevice, pids, inits []int, auths, reports int) {
	t.Helper()
	if got := openvpnPids(t, ws); fmt.Sprint(got) != fmt.Sprint(pids) {
		t.Errorf("openvpn (and haproxy) pids %v, want %v kept", got, pids)
	}
	for _, pid := range pids {
		if err := syscall.Kill(pid, 0); err != nil {
			t.Errorf("openvpn %d: %v", pid, err)
		}
	}
	for i, d := range devs {
		if n := countLines(d.client, "Initialization Sequence Completed"); n != inits[i] {
			t.Errorf("device %s connected %d times, want %d: it noticed", d.name, n, inits[i])
		}
	}
	if n := len(ws.api.AuthChecks()); n != auths {
		t.Errorf("%d auth calls during the handover", n-auths)
	}
	if got := ws.api.StateReports(); len(got) != reports {
		t.Errorf("state reports during the handover: %+v", got[reports:])
	}
}

// streamThrough sends size random bytes to d's echo service through a
// CONNECT tunnel of the server that ws runs now, reading them back as it
// goes, and reports on the channel whether every byte came back in order.
func streamThrough(ctx context.Context, ws *worldServer, d *handoverDevice, size int) <-chan error {
	res := make(chan error, 1)
	dialer := &connectproxy.Dialer{ProxyAddr: "127.0.0.1:3128", Key: d.api.Key, DialProxy: ws.world.Dial}
	go func() {
		c, err := dialer.DialContext(ctx, "tcp", d.api.UUID+".balena:7")
		if err != nil {
			res <- err
			return
		}
		defer c.Close()
		data := make([]byte, size)
		rand.Read(data)
		sent := make(chan error, 1)
		go func() {
			// In pieces, a little at a time, so that the stream spans the
			// handover.
			for off := 0; off < size; off += 256 << 10 {
				if _, err := c.Write(data[off:min(off+256<<10, size)]); err != nil {
					sent <- err
					return
				}
				time.Sleep(20 * time.Millisecond)
			}
			sent <- c.(interface{ CloseWrite() error }).CloseWrite()
		}()
		got, err := io.ReadAll(c)
		if serr := <-sent; serr != nil {
			res <- fmt.Errorf("sending: %w", serr)
			return
		}
		switch {
		case err != nil:
			res <- fmt.Errorf("after %d of %d bytes: %w", len(got), size, err)
		case !bytes.Equal(got, data):
			res <- fmt.Errorf("%d bytes back of %d, or out of order", len(got), size)
		default:
			res <- nil
		}
	}()
	return res
}

// connectLoop makes CONNECTs to d's web page one after the other until
// the returned function is called, which reports how many were answered
// and the first failure.
func connectLoop(ctx context.Context, ws *worldServer, d *handoverDevice) func() (int, error) {
	ctx, cancel := context.WithCancel(ctx)
	var n atomic.Int64
	var first error
	done := make(chan struct{})
	go func() {
		defer close(done)
		dialer := &connectproxy.Dialer{ProxyAddr: "127.0.0.1:3128", Key: d.api.Key, DialProxy: ws.world.Dial}
		hc := &http.Client{Transport: &http.Transport{DialContext: dialer.DialContext, DisableKeepAlives: true}}
		for i := 0; i < 100000 && ctx.Err() == nil; i++ {
			started := time.Now()
			body, err := fetchThrough(ctx, hc, d.api.UUID+".balena")
			if err != nil {
				err = fmt.Errorf("started %s: %w", started.Format("15:04:05.000"), err)
			}
			if ctx.Err() != nil {
				return
			}
			if err == nil && !strings.Contains(string(body), "hello from") {
				err = fmt.Errorf("answer %q", body)
			}
			if err != nil {
				first = fmt.Errorf("CONNECT %d at %s: %w", i, time.Now().Format("15:04:05.000"), err)
				return
			}
			n.Add(1)
		}
	}()
	return func() (int, error) { cancel(); <-done; return int(n.Load()), first }
}

// waitGoneFromStatus waits until no status file of ws lists uuid.
func waitGoneFromStatus(t *testing.T, ctx context.Context, ws *worldServer, uuid string) {
	t.Helper()
	waitUntil(t, ctx, func() bool {
		for id := 1; id <= 2; id++ {
			b, _ := os.ReadFile(filepath.Join(ws.run, fmt.Sprintf("server-%d.status", id)))
			if bytes.Contains(b, []byte(uuid)) {
				return false
			}
		}
		return true
	})
}

// fetchThrough GETs the page of host through hc, within 10 s.
func fetchThrough(ctx context.Context, hc *http.Client, host string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, "GET", "http://"+host+"/", nil)
	if err != nil {
		return nil, err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	return io.ReadAll(resp.Body)
}
