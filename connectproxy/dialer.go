package connectproxy

import (
	"bufio"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/textproto"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/net/http/httpguts"
	"golang.org/x/net/proxy"
)

// Dialer is the client of a CONNECT proxy such as [Handler]: its
// DialContext asks the proxy at ProxyAddr for a tunnel to
// "<uuid>.balena:<port>" and returns the tunnel as a net.Conn. It
// implements proxy.ContextDialer of golang.org/x/net/proxy, so that it
// can be an http.Transport's DialContext, and [RegisterDialerType]
// makes proxy.FromURL return one for "http://" proxy URLs.
//
// The request is "CONNECT <addr> HTTP/1.0" with a Host header, the
// credentials, the Header fields and the Forwarded header. Bytes that the
// proxy sends after its 200 (a device service that speaks first, as SSH
// does, can race the answer) are kept: the connection's first reads return
// them. An answer other than 200 is a [*ConnectError] with its status
// code. The proxy must answer within ctx and within 30 s.
//
// Its fields must not change while it dials; a Dialer is safe for
// concurrent use otherwise. The zero Dialer has no proxy to dial.
type Dialer struct {
	// ProxyAddr is the proxy's address, "host:port".
	ProxyAddr string

	// Key is the balena API key that the proxy authorises the tunnel
	// with, sent as "Proxy-Authorization: Basic base64(balena:<Key>)".
	// Empty sends no credentials: the proxy applies its guest key, which
	// reaches a device's public ports only.
	Key string

	// ProxyAuthorization, if not empty, is the Proxy-Authorization
	// header's value, sent as is instead of Key's.
	ProxyAuthorization string

	// Forwarded holds the elements of a Forwarded header (RFC 7239),
	// sent as one header with the elements joined by ", ". A proxy that
	// passes a request on to a peer sends the elements it received and
	// its own, which lets the peer see a loop. Nil sends none.
	Forwarded []string

	// Header holds more header fields of the request, such as a
	// traceparent. Host, Proxy-Authorization and Forwarded in it are
	// ignored: the fields above set them.
	Header http.Header

	// DialProxy dials the proxy. Nil means a net.Dialer with a 30 s
	// timeout.
	DialProxy func(ctx context.Context, network, addr string) (net.Conn, error)
}

var _ proxy.ContextDialer = (*Dialer)(nil)

// ConnectError is a CONNECT request that the proxy answered with a status
// other than 200. A [Handler] answers 407 to a key that may not reach the
// port, 403 to a target that is not a device port, 503 when the device is
// offline, and 500 when it cannot reach it.
type ConnectError struct {
	// StatusCode is the answer's status code.
	StatusCode int
	// Status is the answer's status line, such as
	// "HTTP/1.0 407 Proxy Authorization Required", cut to 100 bytes.
	Status string
}

func (e *ConnectError) Error() string {
	return "the proxy answered " + strconv.Quote(e.Status)
}

// ErrBadAnswer reports an answer to a CONNECT request that is not an HTTP
// response, or one that ended before its head did.
var ErrBadAnswer = errors.New("connectproxy: not an HTTP answer")

// DialContext asks the proxy for a tunnel to addr, "<uuid>.balena:<port>",
// and returns the tunnel. network must be "tcp", "tcp4" or "tcp6" (the
// proxy, not the caller, picks the device's address). ctx bounds the dial
// and the proxy's answer, not the tunnel's life.
func (d *Dialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	switch network {
	case "tcp", "tcp4", "tcp6":
	default:
		return nil, fmt.Errorf("connectproxy: dialling %s through a CONNECT proxy: network %q is not TCP", addr, network)
	}
	req, err := d.request(addr)
	if err != nil {
		return nil, err
	}
	if d.ProxyAddr == "" {
		return nil, fmt.Errorf("connectproxy: dialling %s: no proxy address", addr)
	}
	conn, err := d.dialProxy(ctx)
	if err != nil {
		return nil, fmt.Errorf("connectproxy: dialling the proxy at %s: %w", d.ProxyAddr, err)
	}
	early, err := exchange(ctx, conn, req)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("connectproxy: CONNECT %s at %s: %w", addr, d.ProxyAddr, err)
	}
	if len(early) == 0 {
		return conn, nil // as it is: a *net.TCPConn, whose tunnels park when idle and can splice
	}
	return &earlyConn{Conn: conn, early: early}, nil
}

// Dial is DialContext with context.Background(), for proxy.Dialer.
func (d *Dialer) Dial(network, addr string) (net.Conn, error) {
	return d.DialContext(context.Background(), network, addr)
}

func (d *Dialer) dialProxy(ctx context.Context) (net.Conn, error) {
	if d.DialProxy != nil {
		return d.DialProxy(ctx, "tcp", d.ProxyAddr)
	}
	nd := net.Dialer{Timeout: dialTimeout}
	return nd.DialContext(ctx, "tcp", d.ProxyAddr)
}

// request returns the head of the CONNECT request for addr.
func (d *Dialer) request(addr string) (string, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil || host == "" || port == "" || !httpguts.ValidHostHeader(addr) {
		return "", fmt.Errorf("connectproxy: CONNECT target %q: want <uuid>.balena:<port>", addr)
	}
	var b strings.Builder
	b.WriteString("CONNECT " + addr + " HTTP/1.0\r\nHost: " + addr + "\r\n")
	field := func(name, value string) error {
		if !httpguts.ValidHeaderFieldName(name) || !httpguts.ValidHeaderFieldValue(value) {
			return fmt.Errorf("connectproxy: CONNECT %s: an invalid %q header field", addr, name)
		}
		b.WriteString(name + ": " + value + "\r\n")
		return nil
	}
	switch auth := d.ProxyAuthorization; {
	case auth != "":
		if err := field("Proxy-Authorization", auth); err != nil {
			return "", err
		}
	case d.Key != "":
		if err := field("Proxy-Authorization", basicAuth("balena", d.Key)); err != nil {
			return "", err
		}
	}
	for _, name := range slices.Sorted(maps.Keys(d.Header)) {
		switch textproto.CanonicalMIMEHeaderKey(name) {
		case "Host", "Proxy-Authorization", "Forwarded":
			continue
		}
		for _, v := range d.Header[name] {
			if err := field(name, v); err != nil {
				return "", err
			}
		}
	}
	if len(d.Forwarded) > 0 {
		if err := field("Forwarded", strings.Join(d.Forwarded, ", ")); err != nil {
			return "", err
		}
	}
	b.WriteString("\r\n")
	return b.String(), nil
}

// basicAuth returns the value of a Basic authorization header.
func basicAuth(user, password string) string {
	return "Basic " + base64.StdEncoding.EncodeToString([]byte(user+":"+password))
}

// exchange sends a CONNECT request head on conn and reads the answer's
// head, within ctx and handshakeTimeout. It returns the bytes that came
// after the head.
func exchange(ctx context.Context, conn net.Conn, req string) ([]byte, error) {
	deadline := time.Now().Add(handshakeTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	_ = conn.SetDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer func() {
		stop()
		_ = conn.SetDeadline(time.Time{})
	}()

	if _, err := io.WriteString(conn, req); err != nil {
		return nil, ctxErr(ctx, err)
	}
	early, err := readConnectAnswer(conn)
	if err != nil {
		var ce *ConnectError
		if !errors.As(err, &ce) && !errors.Is(err, ErrBadAnswer) {
			err = fmt.Errorf("reading the answer: %w", ctxErr(ctx, err))
		}
		return nil, err
	}
	return early, nil
}

// readConnectAnswer reads the head of the answer to a CONNECT request, at most
// maxPeerHead bytes, and returns the bytes read after it. An answer that
// is not 200 is a *ConnectError, one that is not HTTP is ErrBadAnswer;
// other errors are r's.
func readConnectAnswer(r io.Reader) ([]byte, error) {
	br := bufio.NewReaderSize(&io.LimitedReader{R: r, N: maxPeerHead}, 4096)
	tp := textproto.NewReader(br)
	line, err := tp.ReadLine()
	if err != nil {
		return nil, err
	}
	proto, rest, _ := strings.Cut(line, " ")
	code, _, _ := strings.Cut(rest, " ")
	if !strings.HasPrefix(proto, "HTTP/1.") || len(code) != 3 || code[0] < '1' || code[0] > '9' ||
		strings.Trim(code, "0123456789") != "" {
		return nil, fmt.Errorf("%w: %q", ErrBadAnswer, truncate(line, 100))
	}
	if code != "200" {
		n, _ := strconv.Atoi(code)
		return nil, &ConnectError{StatusCode: n, Status: truncate(line, 100)}
	}
	if _, err := tp.ReadMIMEHeader(); err != nil {
		if err == io.EOF || errors.Is(err, io.ErrUnexpectedEOF) {
			err = fmt.Errorf("%w: the head ends early: %w", ErrBadAnswer, err)
		}
		return nil, err
	}
	if n := br.Buffered(); n > 0 {
		b, _ := br.Peek(n)
		return append([]byte(nil), b...), nil
	}
	return nil, nil
}

// earlyConn is a tunnel whose first reads return the bytes that came with
// the proxy's 200.
type earlyConn struct {
	net.Conn
	early []byte
}

func (c *earlyConn) Read(b []byte) (int, error) {
	if len(c.early) > 0 {
		n := copy(b, c.early)
		c.early = c.early[n:]
		return n, nil
	}
	return c.Conn.Read(b)
}

// WriteTo writes the early bytes to w, then copies the connection to it
// (with the connection's own WriteTo or w's ReadFrom, so that Linux
// splices between TCP sockets).
func (c *earlyConn) WriteTo(w io.Writer) (int64, error) {
	var n int64
	if len(c.early) > 0 {
		m, err := w.Write(c.early)
		n += int64(m)
		c.early = c.early[m:]
		if err != nil {
			return n, err
		}
	}
	m, err := io.Copy(w, c.Conn)
	return n + m, err
}

// ReadFrom copies r to the connection, with its ReadFrom where it has one.
func (c *earlyConn) ReadFrom(r io.Reader) (int64, error) {
	if rf, ok := c.Conn.(io.ReaderFrom); ok {
		return rf.ReadFrom(r)
	}
	return io.Copy(struct{ io.Writer }{c.Conn}, r)
}

// CloseWrite half-closes the connection, if it can be.
func (c *earlyConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return fmt.Errorf("connectproxy: a %T cannot be half-closed", c.Conn)
}

// RegisterDialerType registers the [Dialer] with golang.org/x/net/proxy
// for "http" proxy URLs, so that proxy.FromURL(u, forward) returns a
// *Dialer for "http://[<user>:<password>@]<host>[:<port>]": ProxyAddr is
// the host and port (80 when the URL names none), the URL's user and
// password are sent as Basic credentials as they are
// ("http://balena:<key>@…" is Key's form), and forward dials the proxy.
//
// Call it once, from main, before the first proxy.FromURL. It is not
// called from an init function: the registry of golang.org/x/net/proxy is
// one package variable for the whole program, unguarded, so registering
// changes what every user of that package in the program gets for
// "http://" URLs. That is a choice for the program to make, not a side
// effect of importing this package.
func RegisterDialerType() {
	proxy.RegisterDialerType("http", fromURL)
}

// fromURL is the Dialer for an "http://" proxy URL; forward dials the
// proxy.
func fromURL(u *url.URL, forward proxy.Dialer) (proxy.Dialer, error) {
	if u.Hostname() == "" {
		return nil, fmt.Errorf("connectproxy: proxy URL %q: no host", u.Redacted())
	}
	port := u.Port()
	if port == "" {
		port = "80"
	}
	d := &Dialer{ProxyAddr: net.JoinHostPort(u.Hostname(), port)}
	if u.User != nil {
		password, _ := u.User.Password()
		d.ProxyAuthorization = basicAuth(u.User.Username(), password)
	}
	switch f := forward.(type) {
	case nil:
	case proxy.ContextDialer:
		d.DialProxy = f.DialContext
	default:
		d.DialProxy = func(ctx context.Context, network, addr string) (net.Conn, error) {
			return dialWithContext(ctx, f, network, addr)
		}
	}
	return d, nil
}

// dialWithContext dials with a proxy.Dialer that does not take a context:
// it returns when ctx ends, and closes the connection that comes after.
func dialWithContext(ctx context.Context, d proxy.Dialer, network, addr string) (net.Conn, error) {
	type result struct {
		conn net.Conn
		err  error
	}
	done := make(chan result, 1)
	go func() {
		c, err := d.Dial(network, addr)
		done <- result{c, err}
	}()
	select {
	case r := <-done:
		return r.conn, r.err
	case <-ctx.Done():
		go func() {
			if r := <-done; r.conn != nil {
				r.conn.Close()
			}
		}()
		return nil, ctx.Err()
	}
}
