// Package internalapi is the VPN server's internal HTTP API: the loopback
// endpoints that OpenVPN's script-mode hooks (cmd/vpn-auth,
// cmd/vpn-client-event, through the client of package vpn/hook) call to
// authenticate devices, at once or deferred through OpenVPN's
// auth_control_file, and to report clients that connect and disconnect.
//
// A [Server] answers the requests and leaves the decisions to what it is
// given: an [Authenticator] for the devices, [Clients] for the sessions.
// Package vpn gives it its Authenticator and its session accounting.
package internalapi

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.opentelemetry.io/contrib/instrumentation/net/http/otelhttp"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"

	devuuid "github.com/obvpn/obvpn/vpn/balena/uuid"
	"github.com/obvpn/obvpn/vpn/hook"
)

// Authenticator decides whether a device may connect; vpn.Authenticator
// implements it.
type Authenticator interface {
	Authenticate(ctx context.Context, uuid, apiKey string) (bool, error)
}

// Clients learns the sessions that the client-connect and
// client-disconnect hooks report; vpn.ScriptClients implements it with
// the server's session accounting. The common name is a valid UUID.
type Clients interface {
	// Connected records a new session of ev.CommonName on instance.
	Connected(instance int, ev hook.ClientEvent)
	// Disconnected ends a session of ev.CommonName on instance and
	// returns the device's count of sessions before it: 1 when the device
	// went offline, more when it stays online with others, 0 or less for
	// a disconnect without its connect.
	Disconnected(instance int, ev hook.ClientEvent) (before int)
}

// Server is the HTTP API that OpenVPN's scripts (cmd/vpn-auth,
// cmd/vpn-client-event) and operators call on the VPN host:
//
//	GET    /ping                          200 "OK", from anywhere
//	POST   /api/v1/auth/                  {"username","password"}: 200 allowed, 400 missing, 401 denied
//	                                      {"username","password","auth_control_file"}: 202, decided later
//	POST   /api/v2/<instance>/clients/    {"common_name"}: the device connected
//	DELETE /api/v2/<instance>/clients/    {"common_name","bytes_received","bytes_sent","time_duration"}
//
// Each path is also answered without its final slash, as upstream's client
// hooks call them.
//
// Every endpoint but /ping answers 401 to callers whose connection does
// not come from loopback (127.0.0.0/8, ::1, or IPv4-mapped loopback); no
// header changes that, X-Forwarded-For included. The server listens on
// loopback only, so that remote callers get no answer at all. Denials are
// answered after DelayOnAuthFail, which holds up only the denied caller.
//
// An auth request that names the auth_control_file of OpenVPN's deferred
// authentication (cmd/vpn-auth in script mode) is answered 202 at once,
// while the OpenVPN that waits for it goes on with its other clients; the
// decision, taken by the same Auth, is written to that file: "1", or "0"
// after DelayOnAuthFail. The file must be one that OpenVPN made in
// ControlDir (else 400); without a ControlDir the request is answered as
// the synchronous form, as a server without deferral does. [Server.Close]
// ends the decisions in flight.
type Server struct {
	// Auth decides the /api/v1/auth/ requests. Nil denies every device.
	Auth Authenticator

	// Clients learns the sessions of the clients endpoints. Nil answers
	// every connect 200 and every disconnect 400, as for a device that
	// was not online.
	Clients Clients

	// Denied, if set, is called for every device that is denied (the
	// server counts vpn_auth_failures_total).
	Denied func()

	// Instances is the number of OpenVPN instances; a clients request for
	// an instance outside 1…Instances is answered 404. Zero accepts any
	// positive instance id.
	Instances int

	// DelayOnAuthFail delays the answer to a denied device.
	DelayOnAuthFail time.Duration

	// TrustProxy says whose X-Forwarded-For is believed when a log line
	// names the client. It never decides who is on loopback: a header
	// cannot make a remote caller local. The zero value believes nobody.
	TrustProxy TrustProxy

	// ControlDir is the directory in which OpenVPN makes the auth control
	// files of deferred authentications: its tmp-dir (see
	// [PrepareControlDir]). Empty answers deferred requests
	// synchronously.
	ControlDir string

	// Logger receives authentication failures and out-of-order
	// disconnects. Nil means discard. Keys are never logged.
	Logger *slog.Logger

	// TracerProvider makes a server span of every request but /ping,
	// named by its method and route ("POST /api/v1/auth/"); the
	// authentication it asks for is a child span. Nil means
	// otel.GetTracerProvider().
	TracerProvider trace.TracerProvider

	// Propagator reads the trace context (W3C traceparent) that a request
	// carries, so that its span continues the caller's trace. Nil means
	// otel.GetTextMapPropagator().
	Propagator propagation.TextMapPropagator

	traceOnce sync.Once
	traced    http.Handler

	deferMu   sync.Mutex
	deferCtx  context.Context // the deferred decisions'; ended by Close
	deferStop context.CancelFunc
	deferred  sync.WaitGroup
}

// ServeHTTP serves a request of the API, as a span of OpenTelemetry's
// HTTP instrumentation.
func (a *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	a.traceOnce.Do(func() {
		a.traced = otelhttp.NewHandler(http.HandlerFunc(a.serve), "vpn.api",
			otelhttp.WithTracerProvider(tracerProvider(a.TracerProvider)),
			otelhttp.WithPropagators(propagator(a.Propagator)),
			otelhttp.WithFilter(func(r *http.Request) bool { return r.URL.Path != "/ping" }),
			otelhttp.WithSpanNameFormatter(apiSpanName))
	})
	a.traced.ServeHTTP(w, r)
}

// apiSpanName names a request's span by method and route, the instance id
// taken out.
func apiSpanName(_ string, r *http.Request) string {
	p := strings.TrimSuffix(r.URL.Path, "/")
	switch {
	case strings.HasPrefix(p, "/api/v2/") && strings.HasSuffix(p, "/clients"):
		p = "/api/v2/{instance}/clients/"
	case p == "/api/v1/auth":
		p = "/api/v1/auth/"
	default:
		p = "(other)" // a 404: names stay few
	}
	return r.Method + " " + p
}

// maxAPIBody bounds a request body: the largest legitimate one is a few
// hundred bytes.
const maxAPIBody = 64 << 10

func (a *Server) serve(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/ping" {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "Method Not Allowed", http.StatusMethodNotAllowed)
			return
		}
		io.WriteString(w, "OK")
		return
	}
	if !peerAddr(r).IsLoopback() {
		http.Error(w, "Unauthorized", http.StatusUnauthorized)
		return
	}
	// Each path is answered with and without its trailing slash: the
	// reference's hooks send it, upstream's client hooks do not.
	p := strings.TrimSuffix(r.URL.Path, "/")
	switch {
	case p == "/api/v1/auth":
		a.serveAuth(w, r)
	case strings.HasPrefix(p, "/api/v2/") && strings.HasSuffix(p, "/clients"):
		id, err := strconv.Atoi(strings.TrimSuffix(strings.TrimPrefix(p, "/api/v2/"), "/clients"))
		if err != nil || id < 1 || (a.Instances > 0 && id > a.Instances) {
			http.NotFound(w, r)
			return
		}
		a.serveClients(w, r, id)
	default:
		http.NotFound(w, r)
	}
}

func (a *Server) serveAuth(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", "POST")
		http.Error(w, "Method Not Allowed", http.StatusMethodNotAllowed)
		return
	}
	var body struct {
		Username    *string `json:"username"`
		Password    *string `json:"password"`
		ControlFile string  `json:"auth_control_file"`
	}
	if !decodeBody(w, r, &body) {
		return
	}
	if body.Username == nil || body.Password == nil || *body.Username == "" || *body.Password == "" {
		a.logger().Info("auth: username or password missing", "client", clientAddr(r, a.TrustProxy))
		http.Error(w, "Bad Request", http.StatusBadRequest)
		return
	}
	if body.ControlFile != "" && a.ControlDir != "" {
		a.serveDeferred(w, r, *body.Username, *body.Password, body.ControlFile)
		return
	}
	var ok bool
	var err error
	if a.Auth != nil {
		ok, err = a.Auth.Authenticate(r.Context(), *body.Username, *body.Password)
	}
	if ok {
		io.WriteString(w, "OK")
		return
	}
	a.logger().Info("auth: device denied", "uuid", devuuid.ForLog(*body.Username), "client", clientAddr(r, a.TrustProxy), "err", err)
	if a.Denied != nil {
		a.Denied()
	}
	if a.DelayOnAuthFail > 0 {
		t := time.NewTimer(a.DelayOnAuthFail)
		defer t.Stop()
		select {
		case <-t.C:
		case <-r.Context().Done():
			return
		}
	}
	http.Error(w, "Unauthorized", http.StatusUnauthorized)
}

// clientEvent is the body of the clients endpoints. The counters are
// numbers, or strings of digits as OpenVPN's environment gives them.
type clientEvent struct {
	CommonName    string   `json:"common_name"`
	BytesReceived flexUint `json:"bytes_received"`
	BytesSent     flexUint `json:"bytes_sent"`
	TimeDuration  flexUint `json:"time_duration"`
}

func (a *Server) serveClients(w http.ResponseWriter, r *http.Request, instance int) {
	if r.Method != http.MethodPost && r.Method != http.MethodDelete {
		w.Header().Set("Allow", "POST, DELETE")
		http.Error(w, "Method Not Allowed", http.StatusMethodNotAllowed)
		return
	}
	var ev clientEvent
	if !decodeBody(w, r, &ev) {
		return
	}
	if !devuuid.Valid(ev.CommonName) {
		http.Error(w, "Bad Request", http.StatusBadRequest)
		return
	}
	hev := hook.ClientEvent{CommonName: strings.ToLower(ev.CommonName), BytesReceived: uint64(ev.BytesReceived),
		BytesSent: uint64(ev.BytesSent), TimeDuration: uint64(ev.TimeDuration)}
	if r.Method == http.MethodPost {
		io.WriteString(w, "OK")
		if a.Clients != nil {
			a.Clients.Connected(instance, hev)
		}
		return
	}
	before := 0
	if a.Clients != nil {
		before = a.Clients.Disconnected(instance, hev)
	}
	if before != 1 {
		// Still online with other sessions, or a disconnect that came
		// before its connect: nothing to report.
		a.logger().Warn("clients: disconnect does not take the device offline; dropped",
			"uuid", hev.CommonName, "instance", instance, "sessions_before", before)
		http.Error(w, "Bad Request", http.StatusBadRequest)
		return
	}
	io.WriteString(w, "OK")
}

// decodeBody decodes a JSON body of at most maxAPIBody bytes into v, or
// answers 400 and returns false.
func decodeBody(w http.ResponseWriter, r *http.Request, v any) bool {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxAPIBody))
	if err := dec.Decode(v); err != nil {
		http.Error(w, "Bad Request", http.StatusBadRequest)
		return false
	}
	return true
}

// flexUint is a JSON number or a string of decimal digits.
type flexUint uint64

func (f *flexUint) UnmarshalJSON(b []byte) error {
	s := strings.Trim(string(b), `"`)
	if s == "" || s == "null" {
		*f = 0
		return nil
	}
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return errors.New("want a non-negative integer")
	}
	*f = flexUint(n)
	return nil
}

// peerAddr returns the address that r's connection comes from, unmapped;
// the zero Addr (not loopback) when it is unknown.
func peerAddr(r *http.Request) netip.Addr {
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil {
		return netip.Addr{}
	}
	return ap.Addr().Unmap()
}

// clientAddr returns the address of the client of r, for logs: the peer's
// address, or, when the peer is a trusted proxy, the nearest untrusted address of
// X-Forwarded-For. IPv4-mapped addresses are unmapped. The zero Addr means
// unknown (and is not loopback).
func clientAddr(r *http.Request, trust TrustProxy) netip.Addr {
	peer := peerAddr(r)
	if !peer.IsValid() {
		return peer
	}
	if !trust.All && trust.Hops == 0 && len(trust.Prefixes) == 0 {
		return peer
	}
	// The chain from the client to us: X-Forwarded-For's addresses, left
	// (farthest) to right (nearest), then the peer.
	var chain []netip.Addr
	for _, h := range r.Header.Values("X-Forwarded-For") {
		for _, s := range strings.Split(h, ",") {
			a, err := netip.ParseAddr(strings.TrimSpace(s))
			if err != nil {
				return netip.Addr{} // a forged or broken header: trust nothing
			}
			chain = append(chain, a.Unmap())
		}
	}
	chain = append(chain, peer)
	switch {
	case trust.All:
		return chain[0]
	case trust.Hops > 0:
		return chain[max(0, len(chain)-1-trust.Hops)]
	}
	for i := len(chain) - 1; i > 0; i-- {
		if !trust.trusts(chain[i]) {
			return chain[i]
		}
	}
	return chain[0]
}

// tracerProvider returns tp, or the global provider when tp is nil.
func tracerProvider(tp trace.TracerProvider) trace.TracerProvider {
	if tp == nil {
		return otel.GetTracerProvider()
	}
	return tp
}

// propagator returns p, or the global propagator when p is nil.
func propagator(p propagation.TextMapPropagator) propagation.TextMapPropagator {
	if p == nil {
		return otel.GetTextMapPropagator()
	}
	return p
}

// trusts reports whether a is in one of the trusted prefixes.
func (t TrustProxy) trusts(a netip.Addr) bool {
	for _, p := range t.Prefixes {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

func (a *Server) logger() *slog.Logger {
	if a.Logger != nil {
		return a.Logger
	}
	return slog.New(slog.DiscardHandler)
}
