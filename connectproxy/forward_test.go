package connectproxy

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/matryer/is"

	"github.com/obvpn/obvpn/vpn/balena/balenatest"
)

// pair is two VPN servers' proxies in front of one API: A on 127.0.0.2
// and B on 127.0.0.3, both on the same port, as two servers of one
// deployment listen on the same VPN_CONNECT_PROXY_PORT.
type pair struct {
	api        *balenatest.Server
	a, b       *Handler
	siA, siB   balenatest.ServiceInstance
	addrA      string
	addrB      string
	resA, resB *resolver
	logA, logB *logBuffer
	mu         sync.Mutex
	headersB   []http.Header // request heads that reached B
}

// listenPair listens on 127.0.0.2 and 127.0.0.3 on one port.
func listenPair(t *testing.T) (net.Listener, net.Listener) {
	t.Helper()
	for range 20 {
		la, err := net.Listen("tcp", "127.0.0.2:0")
		if err != nil {
			t.Skipf("cannot listen on 127.0.0.2: %v", err)
		}
		port := la.Addr().(*net.TCPAddr).Port
		lb, err := net.Listen("tcp", net.JoinHostPort("127.0.0.3", strconv.Itoa(port)))
		if err == nil {
			return la, lb
		}
		la.Close()
	}
	t.Fatal("no port free on both 127.0.0.2 and 127.0.0.3")
	return nil, nil
}

func newPair(t *testing.T, setup func(p *pair)) *pair {
	t.Helper()
	p := &pair{api: balenatest.NewServer(t), resA: newResolver(), resB: newResolver()}
	la, lb := listenPair(t)
	port := la.Addr().(*net.TCPAddr).Port
	p.addrA, p.addrB = la.Addr().String(), lb.Addr().String()
	p.siA = p.api.AddServiceInstance(netip.MustParseAddr("127.0.0.2"))
	p.siB = p.api.AddServiceInstance(netip.MustParseAddr("127.0.0.3"))
	var logA, logB *slog.Logger
	logA, p.logA = testLogger(t)
	logB, p.logB = testLogger(t)
	c := p.api.Client()
	p.a = &Handler{Authorizer: c, Online: c, Locator: c, Resolver: p.resA, ServiceID: p.siA.ID,
		ForwardPort: port, RetryDelay: 10 * time.Millisecond, Logger: logA}
	p.b = &Handler{Authorizer: c, Online: c, Locator: c, Resolver: p.resB, ServiceID: p.siB.ID,
		ForwardPort: port, RetryDelay: 10 * time.Millisecond, Logger: logB}
	if setup != nil {
		setup(p)
	}
	// A is a Server; B is the handler embedded in a plain http.Server
	// behind a recording wrapper.
	sa := &Server{Handler: p.a}
	doneA := make(chan error, 1)
	go func() { doneA <- sa.Serve(la) }()
	sb := &http.Server{ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.mu.Lock()
		p.headersB = append(p.headersB, r.Header.Clone())
		p.mu.Unlock()
		p.b.ServeHTTP(w, r)
	})}
	doneB := make(chan error, 1)
	go func() { doneB <- sb.Serve(lb) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := sa.Shutdown(ctx); err != nil {
			t.Errorf("A: %v", err)
		}
		if err := sb.Shutdown(ctx); err != nil {
			t.Errorf("B: %v", err)
		}
		if err := p.b.Shutdown(ctx); err != nil {
			t.Errorf("B's handler: %v", err)
		}
		<-doneA
		<-doneB
	})
	return p
}

// onB puts a device on server B with a service on port that the operator
// key may reach.
func (p *pair) onB(uuid string, port uint16) {
	p.api.AddDevice(balenatest.Device{UUID: uuid, Key: "device-SECRET"})
	p.api.Grant(opKey, uuid, port)
	p.api.SetOnline(uuid, p.siB.ID)
	p.resB.add(uuid)
}

func (p *pair) headers() []http.Header {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.headersB
}

// TestForward reaches a device on server B through server A: the caller's
// credentials and A's Forwarded signature reach B, and B's device answers.
func TestForward(t *testing.T) {
	is := is.New(t)
	svc := startService(t, echo)
	p := newPair(t, nil)
	p.onB(devUUID, svc.port)

	a := connect(t, p.addrA, target(devUUID, svc.port), "Proxy-Authorization: "+basic("me", opKey), "Forwarded: for=192.0.2.7")
	is.Equal(a.line, "HTTP/1.0 200 Connection Established")
	a.roundTrip(t, "through two proxies")

	// B saw the caller's key, as Basic base64("balena:"+key), and the
	// extended Forwarded header.
	hs := p.headers()
	is.Equal(len(hs), 1)
	is.Equal(hs[0].Get("Proxy-Authorization"), basic("balena", opKey))
	is.Equal(hs[0].Get("Forwarded"), "for=192.0.2.7, By=open-balena-vpn("+strconv.FormatInt(p.siA.ID, 10)+")")
	// Both asked the API with the caller's key.
	checks := p.api.AccessChecks()
	is.Equal(len(checks), 2)
	for _, c := range checks {
		is.Equal(c.Key, opKey)
		is.True(c.Allowed)
	}
	is.True(strings.Contains(p.logA.String(), "forwarding"))
	is.Equal(p.a.Tunnels(), 1)
	is.Equal(p.b.Tunnels(), 1)
}

// TestForwardGuest forwards a caller without a key: no key is sent on, and
// B applies its own guest key.
func TestForwardGuest(t *testing.T) {
	is := is.New(t)
	svc := startService(t, echo)
	p := newPair(t, nil)
	p.onB(devUUID, svc.port)
	p.api.AddDevice(balenatest.Device{UUID: devUUID, Key: "device-SECRET", PublicPorts: []uint16{svc.port}})
	p.api.SetOnline(devUUID, p.siB.ID)
	a := connect(t, p.addrA, target(devUUID, svc.port))
	// The guest key cannot tell which server holds the device (401): A
	// looks here once more and gives up.
	is.Equal(a.status, 500)
	is.Equal(len(p.headers()), 0)

	// With a locator that can tell, the request goes through B without a
	// key, and B applies its guest key.
	p.a.Locator = locatorFunc(func(ctx context.Context, uuid, key string) (int64, netip.Addr, bool, error) {
		return p.siB.ID, netip.MustParseAddr("127.0.0.3"), true, nil
	})
	b := connect(t, p.addrA, target(devUUID, svc.port))
	is.Equal(b.status, 200)
	b.roundTrip(t, "public")
	is.Equal(p.headers()[0].Get("Proxy-Authorization"), "")
}

type locatorFunc func(ctx context.Context, uuid, key string) (int64, netip.Addr, bool, error)

func (f locatorFunc) LocateDevice(ctx context.Context, uuid, key string) (int64, netip.Addr, bool, error) {
	return f(ctx, uuid, key)
}

// TestForwardSpeaksFirst checks that a device service that speaks first,
// as SSH does, keeps its first bytes across the hop.
func TestForwardSpeaksFirst(t *testing.T) {
	is := is.New(t)
	const banner = "SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"
	svc := startService(t, func(c net.Conn) {
		defer c.Close()
		io.WriteString(c, banner)
		io.Copy(c, c)
	})
	p := newPair(t, nil)
	p.onB(devUUID, svc.port)
	for range 20 { // the banner and B's 200 race; try it often
		a := connect(t, p.addrA, target(devUUID, svc.port), "Proxy-Authorization: "+basic("", opKey))
		is.Equal(a.status, 200)
		got := make([]byte, len(banner))
		a.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err := io.ReadFull(a.r, got)
		is.NoErr(err)
		is.Equal(string(got), banner)
		a.roundTrip(t, "client hello")
		a.conn.Close()
	}
}

// TestForwardHalfClose passes ends of stream across the hop.
func TestForwardHalfClose(t *testing.T) {
	is := is.New(t)
	svc := startService(t, func(c net.Conn) {
		defer c.Close()
		b, _ := io.ReadAll(c)
		io.WriteString(c, "got "+string(b))
	})
	p := newPair(t, nil)
	p.onB(devUUID, svc.port)
	a := connect(t, p.addrA, target(devUUID, svc.port), "Proxy-Authorization: "+basic("", opKey))
	is.Equal(a.status, 200)
	io.WriteString(a.conn, "all of it")
	a.conn.(*net.TCPConn).CloseWrite()
	b, err := io.ReadAll(a.r)
	is.NoErr(err)
	is.Equal(string(b), "got all of it")
}

// TestForwardLoop sends a request around A → B → A: the API says a third
// server holds the device, and the network routes that server's address
// to the other proxy. A sees its own signature and refuses.
func TestForwardLoop(t *testing.T) {
	is := is.New(t)
	svc := startService(t, echo)
	p := newPair(t, func(p *pair) {
		route := func(to *string) func(ctx context.Context, network, addr string) (net.Conn, error) {
			return func(ctx context.Context, network, addr string) (net.Conn, error) {
				if strings.HasPrefix(addr, "192.0.2.1:") {
					addr = *to
				}
				var d net.Dialer
				return d.DialContext(ctx, network, addr)
			}
		}
		p.a.DialContext = route(&p.addrB)
		p.b.DialContext = route(&p.addrA)
	})
	x := p.api.AddServiceInstance(netip.MustParseAddr("192.0.2.1"))
	p.api.AddDevice(balenatest.Device{UUID: devUUID, Key: "device-SECRET"})
	p.api.Grant(opKey, devUUID, svc.port)
	p.api.SetOnline(devUUID, x.ID)

	a := connect(t, p.addrA, target(devUUID, svc.port), "Proxy-Authorization: "+basic("", opKey))
	is.Equal(a.line, "HTTP/1.0 500 Internal Server Error")
	is.True(strings.Contains(p.logA.String(), "forwarding loop"))
	hs := p.headers()
	is.Equal(len(hs), 1) // B got it once, from A
	is.Equal(hs[0].Get("Forwarded"), "By=open-balena-vpn("+strconv.FormatInt(p.siA.ID, 10)+")")
	is.True(strings.Contains(p.logB.String(), ErrPeer.Error())) // A refused B
	is.Equal(p.a.Tunnels(), 0)
	is.Equal(p.b.Tunnels(), 0)
}

// TestForwardPeerRefuses answers 500 when the peer refuses.
func TestForwardPeerRefuses(t *testing.T) {
	is := is.New(t)
	svc := startService(t, echo)
	p := newPair(t, nil)
	p.onB(devUUID, svc.port)
	p.resB.mu.Lock()
	clear(p.resB.names) // B lost the device: it answers 500
	p.resB.mu.Unlock()
	a := connect(t, p.addrA, target(devUUID, svc.port), "Proxy-Authorization: "+basic("", opKey))
	is.Equal(a.status, 500)
	is.True(strings.Contains(p.logA.String(), "500 Internal Server Error"))
}
