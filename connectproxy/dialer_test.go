package connectproxy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/matryer/is"
	"golang.org/x/net/proxy"
)

// TestDialer reaches a device's service through a Handler, and reads the
// Handler's refusals as ConnectErrors with their status codes.
func TestDialer(t *testing.T) {
	is := is.New(t)
	svc := startService(t, echo)
	w := newWorld(t, nil)
	w.addDevice(devUUID, svc.port)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	d := &Dialer{ProxyAddr: w.addr, Key: opKey}
	conn, err := d.DialContext(ctx, "tcp", target(devUUID, svc.port))
	is.NoErr(err)
	defer conn.Close()
	_, ok := conn.(*net.TCPConn) // nothing came with the 200: the connection as it is
	is.True(ok)
	_, err = io.WriteString(conn, "through the dialer")
	is.NoErr(err)
	is.NoErr(conn.(*net.TCPConn).CloseWrite())
	got, err := io.ReadAll(conn)
	is.NoErr(err)
	is.Equal(string(got), "through the dialer")

	for _, tt := range []struct {
		name   string
		d      *Dialer
		target string
		code   int
	}{
		{"no key", &Dialer{ProxyAddr: w.addr}, target(devUUID, svc.port), http.StatusProxyAuthRequired},
		{"another key", &Dialer{ProxyAddr: w.addr, Key: "stolen-SECRET"}, target(devUUID, svc.port), http.StatusProxyAuthRequired},
		{"not a device", &Dialer{ProxyAddr: w.addr, Key: opKey}, "example.com:443", http.StatusForbidden},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := tt.d.DialContext(ctx, "tcp", tt.target)
			var ce *ConnectError
			if !errors.As(err, &ce) {
				t.Fatalf("got %v, want a *ConnectError", err)
			}
			if ce.StatusCode != tt.code {
				t.Fatalf("got %d (%v), want %d", ce.StatusCode, err, tt.code)
			}
		})
	}

	_, err = d.DialContext(ctx, "udp", target(devUUID, svc.port))
	is.True(err != nil)
	_, err = (&Dialer{}).DialContext(ctx, "tcp", target(devUUID, svc.port))
	is.True(err != nil)
}

// fakeProxy accepts a connection, reads a request head, hands it to the
// test and writes answer; then it echoes, or, with closes, closes the
// connection. It returns its address and the channel of the head.
func fakeProxy(t *testing.T, answer string, closes bool) (string, <-chan *http.Request) {
	t.Helper()
	heads := make(chan *http.Request, 1)
	svc := startService(t, func(c net.Conn) {
		defer c.Close()
		br := bufio.NewReader(c)
		r, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		heads <- r
		if _, err := io.WriteString(c, answer); err != nil || closes {
			return
		}
		io.Copy(c, br)
		c.(*net.TCPConn).CloseWrite()
	})
	return svc.l.Addr().String(), heads
}

// TestDialerRequest checks the request head: the target, the credentials
// in either form, the extra fields and the Forwarded header.
func TestDialerRequest(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	const tgt = devUUID + ".balena:22222"
	for _, tt := range []struct {
		name      string
		d         Dialer
		auth      string
		forwarded string
		extra     map[string]string
	}{
		{name: "guest"},
		{name: "key", d: Dialer{Key: opKey}, auth: basic("balena", opKey)},
		{name: "header as is", d: Dialer{Key: "ignored", ProxyAuthorization: "Basic b3BlcmF0b3I="}, auth: "Basic b3BlcmF0b3I="},
		{
			name: "peer",
			d: Dialer{Key: opKey, Forwarded: []string{"for=192.0.2.7", "By=open-balena-vpn(3)"},
				Header: http.Header{"Traceparent": {"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
					"Host": {"elsewhere"}, "Forwarded": {"for=evil"}}},
			auth: basic("balena", opKey), forwarded: "for=192.0.2.7, By=open-balena-vpn(3)",
			extra: map[string]string{"Traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
		},
	} {
		t.Run(tt.name, func(t *testing.T) {
			is := is.New(t)
			addr, heads := fakeProxy(t, "HTTP/1.0 200 Connection Established\r\n\r\n", false)
			d := tt.d
			d.ProxyAddr = addr
			conn, err := d.DialContext(ctx, "tcp", tgt)
			is.NoErr(err)
			defer conn.Close()
			r := <-heads
			is.Equal(r.Method, http.MethodConnect)
			is.Equal(r.RequestURI, tgt)
			is.Equal(r.Host, tgt)
			is.Equal(r.Proto, "HTTP/1.0")
			is.Equal(r.Header.Get("Proxy-Authorization"), tt.auth)
			is.Equal(r.Header.Values("Forwarded"), func() []string {
				if tt.forwarded == "" {
					return nil
				}
				return []string{tt.forwarded}
			}())
			n := 0
			for k := range r.Header {
				switch k {
				case "Proxy-Authorization", "Forwarded":
				default:
					is.Equal(r.Header.Get(k), tt.extra[k])
					n++
				}
			}
			is.Equal(n, len(tt.extra))
		})
	}

	is := is.New(t)
	for _, bad := range []Dialer{
		{ProxyAuthorization: "line\r\nX-Injected: 1"},
		{Header: http.Header{"X-Bad": {"a\nb"}}},
		{Header: http.Header{"Bad Name": {"x"}}},
		{Forwarded: []string{"for=\r\n"}},
	} {
		bad.DialProxy = func(context.Context, string, string) (net.Conn, error) {
			t.Fatal("dialled with a request that cannot be sent")
			return nil, nil
		}
		bad.ProxyAddr = "127.0.0.1:1"
		_, err := bad.DialContext(ctx, "tcp", tgt)
		is.True(err != nil)
	}
	for _, tgt := range []string{"", devUUID + ".balena", ":80", "a b:80", "x\r\n:80"} {
		_, err := (&Dialer{ProxyAddr: "127.0.0.1:1"}).DialContext(ctx, "tcp", tgt)
		is.True(err != nil)
	}
}

// TestDialerEarlyBytes: bytes that come with the 200 are the connection's
// first, whichever way it is read, and the connection still half-closes.
func TestDialerEarlyBytes(t *testing.T) {
	const banner = "SSH-2.0-OpenSSH_9.2p1\r\n"
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, tt := range []struct {
		name string
		read func(c net.Conn) ([]byte, error)
	}{
		{"Read", func(c net.Conn) ([]byte, error) { return io.ReadAll(struct{ io.Reader }{c}) }},
		{"WriteTo", func(c net.Conn) ([]byte, error) {
			var b bytes.Buffer
			_, err := io.Copy(&b, c)
			return b.Bytes(), err
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			is := is.New(t)
			addr, _ := fakeProxy(t, "HTTP/1.1 200 OK\r\nProxy-Agent: x\r\n\r\n"+banner, false)
			conn, err := (&Dialer{ProxyAddr: addr}).DialContext(ctx, "tcp", target(devUUID, 22))
			is.NoErr(err)
			defer conn.Close()
			_, err = io.Copy(conn, strings.NewReader("client hello")) // ReadFrom
			is.NoErr(err)
			is.NoErr(conn.(interface{ CloseWrite() error }).CloseWrite())
			got, err := tt.read(conn)
			is.NoErr(err)
			is.Equal(string(got), banner+"client hello")
		})
	}
}

// TestDialerAnswers reads answers that are not a tunnel.
func TestDialerAnswers(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, tt := range []struct {
		answer string
		code   int   // a ConnectError's
		err    error // or this
	}{
		{answer: "HTTP/1.0 503 Service Unavailable\r\n\r\n", code: 503},
		{answer: "HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n\r\n", code: 407},
		{answer: "HTTP/1.0 2000 what\r\n\r\n", err: ErrBadAnswer},
		{answer: "SSH-2.0-x\r\n\r\n", err: ErrBadAnswer},
		{answer: "HTTP/1.0 200 OK\r\n", err: ErrBadAnswer}, // closed before the head ends
	} {
		t.Run(tt.answer, func(t *testing.T) {
			addr, _ := fakeProxy(t, tt.answer, true)
			_, err := (&Dialer{ProxyAddr: addr}).DialContext(ctx, "tcp", target(devUUID, 80))
			var ce *ConnectError
			switch {
			case tt.code != 0 && (!errors.As(err, &ce) || ce.StatusCode != tt.code):
				t.Fatalf("got %v, want a ConnectError with %d", err, tt.code)
			case tt.err != nil && !errors.Is(err, tt.err):
				t.Fatalf("got %v, want %v", err, tt.err)
			}
		})
	}
}

// TestDialerContext: a proxy that never answers holds the dial no longer
// than its ctx.
func TestDialerContext(t *testing.T) {
	svc := startService(t, func(c net.Conn) {
		defer c.Close()
		io.Copy(io.Discard, c)
	})
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := (&Dialer{ProxyAddr: svc.l.Addr().String()}).DialContext(ctx, "tcp", target(devUUID, 80))
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %v, want %v", err, context.DeadlineExceeded)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Fatalf("returned after %v", took)
	}
}

// dialerOnly is a proxy.Dialer without DialContext.
type dialerOnly struct{ n int }

func (d *dialerOnly) Dial(network, addr string) (net.Conn, error) {
	d.n++
	return net.Dial(network, addr)
}

// TestFromURL: once registered, proxy.FromURL makes a Dialer of an
// "http://" URL, with the URL's credentials and the forward dialer.
func TestFromURL(t *testing.T) {
	is := is.New(t)
	svc := startService(t, echo)
	w := newWorld(t, nil)
	w.addDevice(devUUID, svc.port)
	RegisterDialerType()

	u, err := url.Parse("http://balena:" + opKey + "@" + w.addr)
	is.NoErr(err)
	pd, err := proxy.FromURL(u, proxy.Direct)
	is.NoErr(err)
	d, ok := pd.(*Dialer)
	is.True(ok)
	is.Equal(d.ProxyAddr, w.addr)
	is.Equal(d.ProxyAuthorization, basic("balena", opKey))
	conn, err := d.DialContext(context.Background(), "tcp", target(devUUID, svc.port))
	is.NoErr(err)
	conn.Close()

	// A forward dialer without a context, and Dial.
	fwd := &dialerOnly{}
	pd, err = proxy.FromURL(u, fwd)
	is.NoErr(err)
	conn, err = pd.Dial("tcp", target(devUUID, svc.port))
	is.NoErr(err)
	conn.Close()
	is.Equal(fwd.n, 1)

	// The port defaults to 80; without credentials, none are sent.
	u, _ = url.Parse("http://proxy.example")
	pd, err = proxy.FromURL(u, proxy.Direct)
	is.NoErr(err)
	is.Equal(pd.(*Dialer).ProxyAddr, "proxy.example:80")
	is.Equal(pd.(*Dialer).ProxyAuthorization, "")
	u, _ = url.Parse("http://:80")
	_, err = proxy.FromURL(u, proxy.Direct)
	is.True(err != nil)
}

// FuzzReadConnectAnswer: any answer is read without a panic, a tunnel
// only after a 200, and the early bytes are the answer's tail.
func FuzzReadConnectAnswer(f *testing.F) {
	for _, s := range []string{
		"HTTP/1.0 200 Connection Established\r\n\r\n",
		"HTTP/1.1 200 OK\r\nProxy-Agent: x\r\n\r\nSSH-2.0-x\r\n",
		"HTTP/1.0 407 Proxy Authorization Required\r\nProxy-Authenticate: Basic realm=\"balena\"\r\n\r\n",
		"HTTP/1.0 2000 what\r\n\r\n",
		"SSH-2.0-x\r\n",
		"HTTP/1.0 200 OK\r\n",
		"HTTP/1.0 200\n\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		early, err := readConnectAnswer(bytes.NewReader(data))
		if err != nil {
			if len(early) != 0 {
				t.Fatal("early bytes with an error")
			}
			var ce *ConnectError
			if errors.As(err, &ce) && (ce.StatusCode < 100 || ce.StatusCode > 999 || ce.StatusCode == 200) {
				t.Fatalf("status %d", ce.StatusCode)
			}
			return
		}
		if !bytes.HasPrefix(data, []byte("HTTP/1.")) || !bytes.HasSuffix(data, early) {
			t.Fatalf("a tunnel from %q with early %q", data, early)
		}
		if _, code, _ := strings.Cut(string(data), " "); !strings.HasPrefix(code, "200") {
			t.Fatalf("a tunnel from %q", data)
		}
	})
}
