package connectproxy

import (
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
	"time"

	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
)

// Authorizer decides whether a caller may open a tunnel to a port on a
// device: the balena API's canAccess. *balena.Client implements it.
//
// CanAccess returns the device's id and true when the caller with key may
// reach port on the device uuid, false when it may not. An error means
// that the question could not be answered (the request is then answered
// 500, and nothing is cached). key is the caller's key, or "" for a caller
// that sent none.
type Authorizer interface {
	CanAccess(ctx context.Context, uuid string, port uint16, key string) (deviceID int64, ok bool, err error)
}

// AuthorizerFunc is a function that is an [Authorizer].
type AuthorizerFunc func(ctx context.Context, uuid string, port uint16, key string) (deviceID int64, ok bool, err error)

// CanAccess returns f(ctx, uuid, port, key).
func (f AuthorizerFunc) CanAccess(ctx context.Context, uuid string, port uint16, key string) (int64, bool, error) {
	return f(ctx, uuid, port, key)
}

// AllowAll is an [Authorizer] that lets every caller through, with device
// id 0. Use it only where the proxy's listener is reachable by trusted
// callers alone.
var AllowAll Authorizer = AuthorizerFunc(func(context.Context, string, uint16, string) (int64, bool, error) {
	return 0, true, nil
})

// OnlineChecker says whether a device is connected to the VPN, as the
// balena API knows it. *balena.Client implements it.
type OnlineChecker interface {
	DeviceOnline(ctx context.Context, deviceID int64) (bool, error)
}

// Locator finds the VPN server that holds a device, for devices that are
// not connected to this one. *balena.Client implements it.
//
// LocateDevice returns the id and address of the VPN service instance that
// holds the device uuid, asking with the caller's key ("" for none). A zero
// serviceID with known true means that no instance holds it; known false
// means that the API cannot tell (it refused the key). An instance without
// an address has the zero addr.
type Locator interface {
	LocateDevice(ctx context.Context, uuid, key string) (serviceID int64, addr netip.Addr, known bool, err error)
}

// Resolver finds the devices connected to this VPN server: Lookup returns
// the VPN address of the device named name, "<uuid>.vpn", or an error when
// the device is not connected here. *nss.Resolver implements it.
type Resolver interface {
	Lookup(name string) (netip.Addr, error)
}

// ResolverFunc is a function that is a [Resolver].
type ResolverFunc func(name string) (netip.Addr, error)

// Lookup returns f(name).
func (f ResolverFunc) Lookup(name string) (netip.Addr, error) { return f(name) }

// Handler is an http.Handler that serves CONNECT requests for ports on
// devices, "CONNECT <uuid>.balena:<port>", as openBalena's connect proxy
// does:
//
//  1. The target must be "<uuid>.balena", ".resin" (deprecated, logged)
//     or ".vpn", with an optional port (80 by default): 400 without a
//     target, 403 for another one.
//  2. The caller's key is the password of a Basic Proxy-Authorization
//     header (the user name is ignored), or the whole credentials when
//     they hold no colon, as a reference peer forwards them; without a
//     header, the key is "".
//  3. The Authorizer must allow (uuid, port, key), else 407. Its answers
//     are cached for 5 s per (uuid, port, key); errors are never cached
//     and are answered 500.
//  4. If the Resolver finds the device here, the proxy dials its VPN
//     address and port, answers 200 and relays bytes both ways. A device
//     connected here is online: the OnlineChecker is not asked.
//  5. Otherwise the OnlineChecker must say that the device is online,
//     else 503.
//  6. Then the Locator names the VPN server that holds it, and the
//     request is forwarded to that server's proxy (ForwardPort) with the
//     caller's credentials and a Forwarded header that carries this
//     server's signature; a request that already carries it is a loop
//     (500). When the API cannot tell, or names this server, the proxy
//     waits RetryDelay (the status files may be behind) and looks here
//     once more. A device found nowhere, a peer that refuses, a device
//     that cannot be dialled and an API failure are answered 500.
//
// Answers are HTTP/1.0 status lines without a body, after which the
// connection is closed; a request with another method goes to Next, or is
// answered 405. Bytes that the caller sent after its request head, and
// bytes that a peer sent after its 200, are relayed first; half-closes are
// passed on (CloseWrite); nothing else is added to the byte stream.
//
// ServeHTTP returns once a tunnel is established: the tunnel runs on
// goroutines that the Handler owns, one per direction while bytes move,
// each copying through a buffer of the Handler's pool (or, with Splice,
// with splice(2)). Between TCP connections, a direction in which no byte
// moved for 10 ms gives up its goroutine and buffer and waits in an
// epoll instance of the Handler's (Linux), so that an idle tunnel costs
// its two connections and little more. [Handler.Shutdown] ends them.
// Serve the Handler with a [Server], or with an http.Server whose
// listener yields *net.TCPConn (wrapped connections keep their
// goroutines and buffers while idle, and never splice) and whose
// ReadHeaderTimeout and MaxHeaderBytes are set.
//
// The zero Handler answers every CONNECT 407: set an Authorizer. Its
// fields must not change once it serves.
type Handler struct {
	// Authorizer decides who may reach what. Nil denies every request
	// (407); see [AllowAll].
	Authorizer Authorizer

	// Online says whether a device is connected to the VPN, for devices
	// that the Resolver does not find here (see step 5 above). Nil skips
	// the check.
	Online OnlineChecker

	// Locator finds the VPN server that holds a device. Nil means that
	// devices are only looked for here (a single-server deployment).
	Locator Locator

	// Resolver finds the devices connected to this server. Nil means the
	// system resolver, asked for "<uuid>.vpn" (it reaches the openvpn NSS
	// module only in cgo builds); nss.Resolver reads the status files
	// itself.
	Resolver Resolver

	// DialContext dials devices and peer VPN servers. Nil means a
	// net.Dialer with a 30 s timeout.
	DialContext func(ctx context.Context, network, addr string) (net.Conn, error)

	// ServiceID is this VPN server's service instance id: a device that
	// the API says this instance holds is looked for here once more rather
	// than forwarded, and the Forwarded signature is
	// "By=open-balena-vpn(<ServiceID>)". Zero means unknown; servers that
	// forward to each other need distinct ids.
	ServiceID int64

	// ForwardPort is the port of the peer servers' proxies. Zero means the
	// port the request arrived on.
	ForwardPort int

	// RetryDelay is how long to wait before looking for a device here once
	// more (VPN_STATUS_FILE_WRITE_INTERVAL_SECONDS). Zero means 10 s;
	// negative means no wait.
	RetryDelay time.Duration

	// OnTunnelClosed, if set, is called once for each tunnel that
	// ends, after its connections are closed and it no longer counts in
	// Tunnels, with what it carried. It runs on the tunnel's goroutine:
	// it must not block.
	OnTunnelClosed func(TunnelInfo)

	// IdleTimeout closes a tunnel in which no byte moved either way for
	// that long. It is measured by the kernel (TCP_INFO, Linux only), so
	// it costs nothing on the byte path; elsewhere, or on connections that
	// are not TCP, it is not enforced. One goroutine of the Handler's
	// checks the tunnels that could be idle that long, every eighth of
	// the limit (at least 10 ms, at most 1 s): a tunnel holds no timer of
	// its own, and closes within that tick after the limit. Zero means no
	// limit.
	IdleTimeout time.Duration

	// Splice relays between TCP connections with splice(2) (io.Copy's
	// path on Linux), so that bytes cross the proxy without being copied
	// into it. Off, the default, a direction reads its source with
	// read(2) into a 256 KiB buffer of the Handler's pool, taken only
	// while the source has bytes, and writes them on. Splice costs the
	// proxy less CPU, but on software paths (loopback, veth, tun: the
	// container networks and the OpenVPN tunnels that the proxy sits
	// between) the process that reads the spliced bytes pays more than
	// the proxy saves: in the black-box benchmark (make bench-proxy), 16
	// streams moved 1.16× HAProxy's bytes with it and 1.38× without. Turn
	// it on where both sides are hardware network interfaces.
	Splice bool

	// MaxTunnels bounds the tunnels open at once, those being set up
	// included: a request takes its place before it asks the Authorizer
	// or the OnlineChecker, so that a flood of requests cannot fan out to
	// the API without bound. More are answered 503. Zero means no bound.
	MaxTunnels int

	// Metrics, if not nil, counts the tunnels.
	Metrics *Metrics

	// ErrorHandler, if not nil, answers refused and failed requests
	// instead of the default HTTP/1.0 status line. err is a
	// [*StatusError] with the status code the default would send.
	ErrorHandler func(w http.ResponseWriter, r *http.Request, err error)

	// Logger receives one line per refused request, and one per tunnel
	// that fails or is closed when idle; tunnels that open and close are
	// logged at debug level. Nil means discard. Keys are never logged.
	Logger *slog.Logger

	// Next serves requests that are not CONNECT. Nil answers them 405.
	Next http.Handler

	// TracerProvider makes a span of every CONNECT (connectproxy.connect)
	// and of its steps: the access check, the online check, the lookups,
	// the forward to a peer and the dials. Nil means
	// otel.GetTracerProvider().
	TracerProvider trace.TracerProvider

	// Propagator reads the trace context (W3C traceparent) of an incoming
	// CONNECT, so that its span continues the caller's trace, and writes
	// it into the CONNECT forwarded to a peer. Nil means
	// otel.GetTextMapPropagator().
	Propagator propagation.TextMapPropagator

	now       func() time.Time // nil: time.Now; tests set it
	idleAfter time.Duration    // 0: parkAfter; tests set it
	parked    func()           // called when a tunnel direction parks; tests set it
	access    accessCache
	bufs      sync.Pool // *[]byte of relayBuffer bytes, for the copies

	mu        sync.Mutex
	n         int // tunnels open or being set up
	tunnels   map[*tunnel]struct{}
	closed    bool            // no new tunnels
	killed    bool            // close tunnels as they register
	kill      context.Context // ends when killed
	killFn    context.CancelFunc
	drained   chan struct{}  // closed when n drops to 0 after closed
	poll      poller         // the tunnels' idle directions
	sweeps    sync.WaitGroup // the idle sweep's goroutine
	sweepStop chan struct{}  // ends the idle sweep; nil while it is not running
}

const (
	accessTTL        = 5 * time.Second
	defaultRetry     = 10 * time.Second
	dialTimeout      = 30 * time.Second
	handshakeTimeout = 30 * time.Second
	maxPeerHead      = 64 << 10
	lingerTimeout    = time.Second
)

var discard = slog.New(slog.DiscardHandler)

func (h *Handler) logger() *slog.Logger {
	if h.Logger != nil {
		return h.Logger
	}
	return discard
}

func (h *Handler) clock() time.Time {
	if h.now != nil {
		return h.now()
	}
	return time.Now()
}

// ServeHTTP serves a CONNECT request, or passes another to Next.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodConnect {
		if h.Next != nil {
			h.Next.ServeHTTP(w, r)
			return
		}
		w.Header().Set("Allow", http.MethodConnect)
		http.Error(w, "this is a CONNECT proxy", http.StatusMethodNotAllowed)
		return
	}
	r, span := h.startConnect(r)
	defer span.End()
	raw := r.RequestURI
	if raw == "" {
		raw = r.Host
	}
	if raw == "" {
		h.fail(w, r, reqLog{}, http.StatusBadRequest, ErrNoTarget)
		return
	}
	t, err := ParseTarget(raw)
	if err != nil {
		h.fail(w, r, reqLog{}, http.StatusForbidden, err)
		return
	}
	log := h.reqLog(t)
	span.SetAttributes(attrUUID.String(t.UUID), attrPort.Int(int(t.Port)))
	if t.TLD == "resin" {
		log.Warn("connectproxy: the .resin TLD is deprecated, use .balena", "target", raw)
	}
	key := proxyKey(r.Header)

	// The tunnel's place first, before the API is asked anything, so that
	// a flood of requests makes at most MaxTunnels calls at once and the
	// rest are answered 503 without one. From here on, a Shutdown that
	// runs out of time cancels the set-up, and every refusal gives the
	// place back after its answer (a Shutdown waits for it).
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	stop, ok := h.reserve(cancel)
	if !ok {
		h.fail(w, r, log, http.StatusServiceUnavailable, ErrUnavailable)
		return
	}
	defer stop()
	// Until the tunnel takes it, the place is this request's: it is given
	// back after the answer and after the request's span has ended, so
	// that a Shutdown that waits for it also finds the span ended (and a
	// flush after it exports the span).
	held := true
	defer func() {
		if held {
			span.End()
			h.release()
		}
	}()

	deviceID, ok, err := h.checkAccess(ctx, t, key)
	if err != nil {
		h.fail(w, r, log, http.StatusInternalServerError, mark(ctx, FingerprintTunnel, fmt.Errorf("asking the API for access: %w", err)))
		return
	}
	if !ok {
		h.fail(w, r, log, http.StatusProxyAuthRequired, ErrDenied)
		return
	}
	// A device in this server's own list is connected here: the API's
	// view of it (is_connected_to_vpn) comes from this server's own
	// reports, later, so asking it would only add a round trip. A device
	// that is not here is forwarded only if the API says it is online.
	addr, here := h.lookup(ctx, t.UUID, log)
	if !here && h.Online != nil {
		online, err := h.online(ctx, deviceID)
		if err != nil {
			h.fail(w, r, log, http.StatusInternalServerError, mark(ctx, FingerprintDeviceLookup, fmt.Errorf("asking the API whether the device is online: %w", err)))
			return
		}
		if !online {
			h.fail(w, r, log, http.StatusServiceUnavailable, ErrOffline)
			return
		}
	}

	dev, early, via, err := h.reach(ctx, r, t, key, addr, log)
	if err != nil {
		h.countError()
		var se *StatusError
		if !errors.As(err, &se) {
			se = &StatusError{Code: http.StatusInternalServerError, Err: err}
		}
		h.fail(w, r, log, se.Code, se.Err)
		return
	}
	held = !h.establish(w, r, span, t, dev, early, via, log)
}

// proxyKey returns the caller's key from a Basic Proxy-Authorization
// header: the password of "user:password", or, when the decoded
// credentials hold no colon, all of them. The second form is what a
// reference server sends when it forwards a CONNECT to a peer
// (base64(<key>), SPEC §6c), so that keyed requests keep their key during a
// rolling migration. Without a header, or with a malformed one, the key is
// "".
func proxyKey(hdr http.Header) string {
	v := hdr.Get("Proxy-Authorization")
	const prefix = "Basic "
	if len(v) < len(prefix) || !strings.EqualFold(v[:len(prefix)], prefix) {
		return ""
	}
	b, err := base64.StdEncoding.DecodeString(strings.TrimSpace(v[len(prefix):]))
	if err != nil {
		return ""
	}
	if _, pass, ok := strings.Cut(string(b), ":"); ok {
		return pass
	}
	return string(b)
}

// reach connects to the device: here at addr, when it is valid, or
// through the peer VPN server that holds it. early holds bytes that the
// peer sent after its 200.
func (h *Handler) reach(ctx context.Context, r *http.Request, t Target, key string, addr netip.Addr, log reqLog) (dev net.Conn, early []byte, via string, err error) {
	if addr.IsValid() {
		dev, err = h.dialDevice(ctx, addr, t.Port)
		return dev, nil, "local", err
	}
	again := h.Locator == nil
	if !again {
		sid, addr, known, err := h.locate(ctx, t.UUID, key)
		switch {
		case err != nil:
			return nil, nil, "", mark(ctx, FingerprintVPNHostLookup, fmt.Errorf("asking the API which VPN server holds the device: %w", err))
		case !known:
			again = true
		case sid == 0:
			return nil, nil, "", ErrNotFound
		case sid == h.ServiceID:
			again = true
		case !addr.IsValid():
			return nil, nil, "", fmt.Errorf("%w: service instance %d has no address", ErrNotFound, sid)
		default:
			dev, early, err = h.forward(ctx, r, t, key, sid, addr, log)
			return dev, early, fmt.Sprintf("service instance %d", sid), err
		}
	}
	if again {
		if err := h.wait(ctx); err != nil {
			return nil, nil, "", err
		}
		if addr, ok := h.lookup(ctx, t.UUID, log); ok {
			dev, err = h.dialDevice(ctx, addr, t.Port)
			return dev, nil, "local", err
		}
	}
	return nil, nil, "", ErrNotFound
}

func (h *Handler) wait(ctx context.Context) error {
	d := h.RetryDelay
	if d == 0 {
		d = defaultRetry
	}
	if d < 0 {
		return nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// lookup finds the device's VPN address on this server.
func (h *Handler) lookup(ctx context.Context, uuid string, log reqLog) (netip.Addr, bool) {
	ctx, span := h.tracer().Start(ctx, "connectproxy.lookup")
	defer span.End()
	name := uuid + ".vpn"
	var addr netip.Addr
	var err error
	if h.Resolver != nil {
		addr, err = h.Resolver.Lookup(name)
	} else {
		var addrs []netip.Addr
		addrs, err = net.DefaultResolver.LookupNetIP(ctx, "ip4", name)
		if err == nil && len(addrs) > 0 {
			addr = addrs[0]
		}
	}
	if err != nil || !addr.IsValid() {
		if err != nil {
			log.Debug("connectproxy: device not connected here", "err", err)
		}
		span.SetAttributes(attrFound.Bool(false))
		return netip.Addr{}, false
	}
	span.SetAttributes(attrFound.Bool(true))
	return addr.Unmap(), true
}

func (h *Handler) dialConn(ctx context.Context, addr string) (net.Conn, error) {
	if h.DialContext != nil {
		return h.DialContext(ctx, "tcp", addr)
	}
	d := net.Dialer{Timeout: dialTimeout}
	return d.DialContext(ctx, "tcp", addr)
}

func (h *Handler) dialDevice(ctx context.Context, addr netip.Addr, port uint16) (net.Conn, error) {
	ap := netip.AddrPortFrom(addr, port).String()
	c, err := h.dial(ctx, ap)
	if err != nil {
		return nil, fmt.Errorf("dialling the device at %s: %w", ap, err)
	}
	return c, nil
}

// establish hijacks the caller's connection, answers 200, ends the
// request's span and starts the tunnel. It reports whether the tunnel
// started: then the tunnel holds the request's place, else the caller
// gives it back.
func (h *Handler) establish(w http.ResponseWriter, r *http.Request, span trace.Span, t Target, dev net.Conn, early []byte, via string, log reqLog) bool {
	client, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		dev.Close()
		h.countError()
		h.fail(w, r, log, http.StatusInternalServerError, mark(r.Context(), FingerprintConnect, fmt.Errorf("hijacking the connection: %w", err)))
		return false
	}
	// The server may have set deadlines for the request head: a tunnel
	// has none.
	_ = client.SetDeadline(time.Time{})
	if m := h.Metrics; m != nil {
		m.TotalTunnels.Inc()
		m.ActiveTunnels.Inc()
	}
	answer := append([]byte(answer200), early...)
	_, err = client.Write(answer)
	if err == nil {
		if n := brw.Reader.Buffered(); n > 0 {
			b, _ := brw.Reader.Peek(n)
			_, err = dev.Write(b)
		}
	}
	if err != nil {
		client.Close()
		dev.Close()
		if m := h.Metrics; m != nil {
			m.ActiveTunnels.Dec()
			m.TunnelErrors.Inc()
		}
		log.Info("connectproxy: tunnel failed at its start", "err", err)
		return false
	}
	span.SetAttributes(attrStatus.Int(http.StatusOK), attrVia.String(via))
	span.End() // the span is the request's: it ends as the tunnel starts
	h.start(client, dev, t, via, log)
	return true
}

// fail answers a refused or failed request. A failure that err marks
// with a fingerprint is logged at error level with its FingerprintKey
// attribute.
func (h *Handler) fail(w http.ResponseWriter, r *http.Request, log reqLog, code int, err error) {
	if log.l == nil {
		log.l = h.logger()
	}
	fp, err := unmark(err)
	level := slog.LevelInfo
	if code >= 500 && code != http.StatusServiceUnavailable || fp.Key != "" {
		level = slog.LevelError
	}
	refused(r, code, err)
	log.Log(r.Context(), level, "connectproxy: request refused", "status", code, "err", err, "target", r.RequestURI, "remote", r.RemoteAddr, fp)
	se := &StatusError{Code: code, Err: err}
	if h.ErrorHandler != nil {
		h.ErrorHandler(w, r, se)
		return
	}
	refuse(w, code)
}

// refuse answers with an HTTP/1.0 status line and closes the connection,
// after the caller's bytes in flight (so that the answer is not lost to a
// reset).
func refuse(w http.ResponseWriter, code int) {
	conn, _, err := http.NewResponseController(w).Hijack()
	if err != nil {
		if code == http.StatusProxyAuthRequired {
			w.Header().Set("Proxy-Authenticate", `Basic realm="balena"`)
		}
		w.Header().Set("Connection", "close")
		w.WriteHeader(code)
		return
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(lingerTimeout))
	if _, err := io.WriteString(conn, statusLine(code)); err != nil {
		return
	}
	if cw, ok := conn.(interface{ CloseWrite() error }); ok && cw.CloseWrite() == nil {
		_, _ = io.Copy(io.Discard, io.LimitReader(conn, maxPeerHead))
	}
}
