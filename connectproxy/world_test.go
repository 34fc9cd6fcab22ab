package connectproxy

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/obvpn/obvpn/vpn/balena/balenatest"
)

// Keys in tests contain "SECRET", so that a log that holds one is caught.
const (
	devUUID  = "0123456789abcdef0123456789abcdef"
	dev2UUID = "fedcba9876543210fedcba9876543210"
	opKey    = "operator-SECRET"
)

// logBuffer collects log lines for a test and fails it if a key shows.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func testLogger(t testing.TB) (*slog.Logger, *logBuffer) {
	t.Helper()
	lb := &logBuffer{}
	t.Cleanup(func() {
		s := lb.String()
		if strings.Contains(s, "SECRET") {
			t.Errorf("a key was logged:\n%s", s)
		}
		if t.Failed() {
			t.Logf("proxy log:\n%s", s)
		}
	})
	return slog.New(slog.NewTextHandler(lb, &slog.HandlerOptions{Level: slog.LevelDebug})), lb
}

// service is a device service on a loopback port.
type service struct {
	l    net.Listener
	port uint16
	wg   sync.WaitGroup
}

// startService serves handle on 127.0.0.1:0 until the test ends; handle
// owns the connection.
func startService(t testing.TB, handle func(net.Conn)) *service {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &service{l: l, port: uint16(l.Addr().(*net.TCPAddr).Port)}
	var mu sync.Mutex
	conns := map[net.Conn]bool{}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns[c] = true
			mu.Unlock()
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				handle(c)
				mu.Lock()
				delete(conns, c)
				mu.Unlock()
			}()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		s.wg.Wait()
	})
	return s
}

// echo copies what it reads back, then half-closes.
func echo(c net.Conn) {
	defer c.Close()
	io.Copy(c, c)
	c.(*net.TCPConn).CloseWrite()
}

// closedPort returns a loopback port that nothing listens on.
func closedPort(t testing.TB) uint16 {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := uint16(l.Addr().(*net.TCPAddr).Port)
	l.Close()
	return p
}

// resolver is a fake Resolver of device names to loopback addresses.
type resolver struct {
	mu    sync.Mutex
	names map[string]netip.Addr
	calls int
}

func newResolver(uuids ...string) *resolver {
	r := &resolver{names: map[string]netip.Addr{}}
	for _, u := range uuids {
		r.add(u)
	}
	return r
}

func (r *resolver) add(uuid string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.names[strings.ToLower(uuid)+".vpn"] = netip.MustParseAddr("127.0.0.1")
}

func (r *resolver) Lookup(name string) (netip.Addr, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls++
	if a, ok := r.names[name]; ok { // strict: the handler asks in lower case
		return a, nil
	}
	return netip.Addr{}, errors.New("not connected here")
}

// world is one VPN server's proxy in front of a balenatest API.
type world struct {
	api  *balenatest.Server
	si   balenatest.ServiceInstance
	h    *Handler
	srv  *Server
	addr string // the proxy's listen address
	log  *logBuffer
	res  *resolver
	// closed gets every tunnel that ends (Handler.OnTunnelClosed).
	closed chan TunnelInfo
}

// newWorld makes an API, a service instance for this server and a handler
// that finds devices with res; setup may change the handler before it
// serves.
func newWorld(t testing.TB, setup func(w *world)) *world {
	t.Helper()
	w := &world{api: balenatest.NewServer(t), res: newResolver(), closed: make(chan TunnelInfo, 1000)}
	w.si = w.api.AddServiceInstance(netip.MustParseAddr("127.0.0.1"))
	c := w.api.Client()
	var log *slog.Logger
	log, w.log = testLogger(t)
	w.h = &Handler{
		Authorizer: c, Online: c, Locator: c, Resolver: w.res,
		ServiceID: w.si.ID, RetryDelay: 20 * time.Millisecond, Logger: log,
		OnTunnelClosed: func(ti TunnelInfo) { w.closed <- ti },
	}
	if setup != nil {
		setup(w)
	}
	w.srv = &Server{Handler: w.h, Logger: log}
	w.addr = serve(t, w.srv, "127.0.0.1:0")
	return w
}

// waitClosed waits for the next tunnel of w to end, and returns what it
// carried.
func (w *world) waitClosed(t testing.TB) TunnelInfo {
	t.Helper()
	select {
	case ti := <-w.closed:
		return ti
	case <-time.After(10 * time.Second):
		t.Fatal("no tunnel ended within 10 s")
		return TunnelInfo{}
	}
}

// serve runs srv on addr until the test ends, and checks that it stops
// cleanly.
func serve(t testing.TB, srv *Server, addr string) string {
	t.Helper()
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		if err := <-done; !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("Serve: %v", err)
		}
	})
	return l.Addr().String()
}

// addDevice adds an online device on this world's server with a service
// on port that the operator key may reach, and public ports.
func (w *world) addDevice(uuid string, port uint16, public ...uint16) {
	w.api.AddDevice(balenatest.Device{UUID: uuid, Key: "device-SECRET", PublicPorts: public})
	w.api.Grant(opKey, uuid, port)
	w.api.SetOnline(uuid, w.si.ID)
	w.res.add(uuid)
}

// basic returns a Proxy-Authorization header value with key as password.
func basic(user, key string) string {
	return "Basic " + base64.StdEncoding.EncodeToString([]byte(user+":"+key))
}

// answer is a proxy's answer to a CONNECT.
type answer struct {
	status int
	line   string
	conn   net.Conn
	r      *bufio.Reader // reads the tunnel; may hold bytes already
}

// Read reads from the tunnel.
func (a *answer) Read(p []byte) (int, error) { return a.r.Read(p) }

// connect sends "CONNECT target" to the proxy at addr with the extra
// header lines and returns its answer. The connection is closed when the
// test ends.
func connect(t testing.TB, addr, target string, header ...string) *answer {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	req := "CONNECT " + target + " HTTP/1.1\r\nHost: " + target + "\r\n"
	for _, h := range header {
		req += h + "\r\n"
	}
	if _, err := io.WriteString(c, req+"\r\n"); err != nil {
		t.Fatal(err)
	}
	return readAnswer(t, c)
}

func readAnswer(t testing.TB, c net.Conn) *answer {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	defer c.SetReadDeadline(time.Time{})
	br := bufio.NewReader(c)
	line, err := br.ReadString('\n')
	if err != nil {
		t.Fatalf("reading the answer: %v", err)
	}
	line = strings.TrimRight(line, "\r\n")
	for {
		l, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("reading the answer's header: %v", err)
		}
		if l == "\r\n" {
			break
		}
	}
	var proto string
	var status int
	fmt.Sscanf(line, "%s %d", &proto, &status)
	return &answer{status: status, line: line, conn: c, r: br}
}

// roundTrip sends msg through the tunnel to an echo service and checks
// that it comes back.
func (a *answer) roundTrip(t testing.TB, msg string) {
	t.Helper()
	if _, err := io.WriteString(a.conn, msg); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(msg))
	a.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	defer a.conn.SetReadDeadline(time.Time{})
	if _, err := io.ReadFull(a.r, got); err != nil {
		t.Fatalf("reading the echo: %v", err)
	}
	if string(got) != msg {
		t.Fatalf("echo: got %q, want %q", got, msg)
	}
}

// waitEOF waits for the tunnel to end on the proxy's side.
func (a *answer) waitEOF(t testing.TB, within time.Duration) {
	t.Helper()
	a.conn.SetReadDeadline(time.Now().Add(within))
	defer a.conn.SetReadDeadline(time.Time{})
	_, err := io.Copy(io.Discard, a.r)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("the tunnel is still open after %v", within)
	}
}
