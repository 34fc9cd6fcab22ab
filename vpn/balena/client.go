// Package balena is a client of the balena API endpoints that an openBalena
// VPN server calls: device authentication, device state reports, service
// instance registration and heartbeats, and the three queries of the CONNECT
// proxy (may this caller tunnel to that device and port, is the device
// online, which VPN server holds it). The paths, query strings, bodies and
// bearer keys are the reference system's, so that the client works against
// a real balena API; package balenatest serves the same endpoints from
// memory for tests and demos.
//
// A [Client] implements the small interfaces that package vpn (AuthAPI,
// StateAPI, ServiceAPI) and package connectproxy (Authorizer,
// OnlineChecker, Locator) declare. It is not a general client of the balena
// API: it knows these endpoints only.
//
// Every call takes a context. Device UUIDs are checked to be hexadecimal
// before they are put in a URL ([ErrInvalidUUID]), and keys are never
// logged. Reads and idempotent calls (the proxy's queries, the heartbeat
// PATCH) are retried on connection errors, 429 and 5xx answers, at most
// RetryMax times: a Retry-After of at most [MaxRetryAfter] is waited out,
// a longer one makes the answer final (the caller's own loop comes back
// later), and a call takes at most [MaxRetryTime] in all, never longer
// than its context allows. Device authentication is sent once: its 503
// means "busy, try later" ([ErrBusy]), and the device, denied, reconnects
// on its own. State reports and service registration are POSTs that are
// sent once, and their callers retry them in their own loops. An answer
// with an unexpected status is an [*APIError].
//
// Every request, each retry included, goes through OpenTelemetry's HTTP
// instrumentation (otelhttp): it is a client span of the context's trace,
// and it carries that trace's W3C traceparent header, as the reference
// system's calls do. The Client's TracerProvider and Propagator fields
// choose the provider and the propagator; nil means OpenTelemetry's global
// ones, which send nothing until a command installs the SDK.
package balena

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-retryablehttp"

	"github.com/obvpn/obvpn/vpn/balena/uuid"
	"go.opentelemetry.io/contrib/instrumentation/net/http/otelhttp"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
)

// Client calls the balena API. Set BaseURL and ServiceKey; the other fields
// are optional. A Client is safe for concurrent use; its fields must not
// change after the first call.
type Client struct {
	// BaseURL is the API's root, such as "https://api.balena-cloud.com" or
	// "http://api.internal" (no trailing slash needed).
	BaseURL string

	// ServiceKey is the VPN service's own API key (VPN_SERVICE_API_KEY),
	// sent on state reports, service registration, heartbeats and the
	// device online query.
	ServiceKey string

	// GuestKey (VPN_GUEST_API_KEY) is sent instead of the caller's key on
	// the proxy's queries (CanAccess, LocateDevice) when the caller has
	// none. Empty means that such queries carry no Authorization header.
	GuestKey string

	// HTTPClient sends the requests. Nil means a client with a 30 s
	// timeout and a connection pool sized for the VPN's concurrency. The
	// Client sends through a copy of it whose Transport is wrapped with
	// otelhttp; the HTTPClient itself is not changed.
	HTTPClient *http.Client

	// RootCAs are the roots trusted for the API's TLS certificate when
	// HTTPClient is nil (the reference container's ROOT_CA). Nil means
	// the system's roots.
	RootCAs *x509.CertPool

	// TracerProvider makes the client span of each request. Nil means
	// otel.GetTracerProvider().
	TracerProvider trace.TracerProvider

	// Propagator writes the trace context (W3C traceparent) into each
	// request's headers. Nil means otel.GetTextMapPropagator().
	Propagator propagation.TextMapPropagator

	// RetryMax is how many times a read or idempotent call is retried
	// after a connection error, a 429 or a 5xx answer, within
	// MaxRetryTime and the call's context. Zero means 2; negative means
	// never.
	RetryMax int

	// Logger receives the retries, at debug level. Nil means discard. Keys
	// are never logged.
	Logger *slog.Logger

	once sync.Once
	hc   *http.Client
	rc   *retryablehttp.Client
}

// ErrInvalidUUID reports a device UUID that is empty or not made of
// hexadecimal digits only. Such a UUID is never sent.
var ErrInvalidUUID = errors.New("balena: invalid device UUID")

// checkUUID returns uuid in lower case, the one spelling of a device's
// UUID that the API is sent, or an error wrapping [ErrInvalidUUID].
func checkUUID(s string) (string, error) {
	n, ok := uuid.Normalize(s)
	if !ok {
		return "", fmt.Errorf("%w: %q", ErrInvalidUUID, s)
	}
	return n, nil
}

// ErrBusy is the API's 503 Service Unavailable: "busy, try later". It is
// an answer, not a fault: a device whose authentication gets it is
// denied, the answer is not cached, and it is not retried. An
// [*APIError] with status 503 matches it with errors.Is.
var ErrBusy = errors.New("balena: the API is busy (503 Service Unavailable)")

// APIError is an answer of the API with a status that the call does not
// expect. Callers branch on it with errors.As, and on a 503 with
// errors.Is(err, [ErrBusy]).
type APIError struct {
	// Method and Path are the request's method and its path with the
	// query, as sent.
	Method, Path string
	// StatusCode is the answer's HTTP status code.
	StatusCode int
	// Body is the start of the answer's body (at most 1 KiB).
	Body string
}

func (e *APIError) Error() string {
	msg := fmt.Sprintf("balena: %s %s: %d %s", e.Method, e.Path, e.StatusCode, http.StatusText(e.StatusCode))
	if b := strings.TrimSpace(e.Body); b != "" {
		msg += ": " + b
	}
	return msg
}

// Is reports whether e is a 503, for errors.Is(err, ErrBusy).
func (e *APIError) Is(target error) bool {
	return target == ErrBusy && e.StatusCode == http.StatusServiceUnavailable
}

// The bounds of the retries of a read or idempotent call.
const (
	// MaxRetryAfter is the longest Retry-After that a retried call
	// waits out. An answer that asks for a longer wait is final: the
	// call returns it at once.
	MaxRetryAfter = 5 * time.Second

	// MaxRetryTime bounds a retried call, its retries and the waits
	// between them included.
	MaxRetryTime = 30 * time.Second
)

const (
	maxErrorBody  = 1 << 10
	maxAnswerBody = 1 << 20
	retryWaitMin  = 100 * time.Millisecond
	retryWaitMax  = 2 * time.Second
	defaultRetry  = 2
	clientTimeout = 30 * time.Second
)

func (c *Client) init() {
	c.once.Do(func() {
		c.hc = c.HTTPClient
		if c.hc == nil {
			t := http.DefaultTransport.(*http.Transport).Clone()
			t.MaxIdleConnsPerHost = 64
			if c.RootCAs != nil {
				t.TLSClientConfig = &tls.Config{RootCAs: c.RootCAs, MinVersion: tls.VersionTLS12}
			}
			c.hc = &http.Client{Transport: t, Timeout: clientTimeout}
		}
		c.hc = c.traced(c.hc)
		n := c.RetryMax
		switch {
		case n == 0:
			n = defaultRetry
		case n < 0:
			n = 0
		}
		c.rc = &retryablehttp.Client{
			HTTPClient:   c.hc,
			RetryWaitMin: retryWaitMin,
			RetryWaitMax: retryWaitMax,
			RetryMax:     n,
			CheckRetry:   checkRetry,
			Backoff:      backoff,
			ErrorHandler: retryablehttp.PassthroughErrorHandler,
		}
		if c.Logger != nil {
			c.rc.Logger = retryLogger{c.Logger}
		}
	})
}

// traced returns a copy of hc whose transport makes a span of every
// request and writes its trace context into the request's headers.
func (c *Client) traced(hc *http.Client) *http.Client {
	tp, prop := c.TracerProvider, c.Propagator
	if tp == nil {
		tp = otel.GetTracerProvider()
	}
	if prop == nil {
		prop = otel.GetTextMapPropagator()
	}
	traced := *hc
	traced.Transport = otelhttp.NewTransport(hc.Transport,
		otelhttp.WithTracerProvider(tp),
		otelhttp.WithPropagators(prop),
		otelhttp.WithSpanNameFormatter(spanName))
	return &traced
}

// spanName names a request's span by its method and its route, with the
// device UUID and the service instance id taken out of the path, so that
// names stay few: "GET /services/vpn/auth/{uuid}",
// "PATCH /v7/service_instance({id})", "POST /services/vpn/client-connect".
func spanName(_ string, r *http.Request) string {
	p := r.URL.Path
	switch {
	case strings.HasPrefix(p, "/services/vpn/auth/"):
		p = "/services/vpn/auth/{uuid}"
	case strings.HasPrefix(p, "/v7/service_instance("):
		p = "/v7/service_instance({id})"
	}
	return r.Method + " " + p
}

// request is one call of the API.
type request struct {
	method string
	path   string // path and query, escaped as sent
	key    string // bearer; empty sends no Authorization header
	body   any    // JSON body; nil sends none
	retry  bool   // safe to send more than once
}

// do sends req and returns the answer's status and body. Transport errors
// are returned as they are, wrapped with the method and path.
func (c *Client) do(ctx context.Context, req request) (int, []byte, error) {
	c.init()
	if c.BaseURL == "" {
		return 0, nil, errors.New("balena: Client.BaseURL is not set")
	}
	var body []byte
	if req.body != nil {
		var err error
		if body, err = json.Marshal(req.body); err != nil {
			return 0, nil, err
		}
	}
	url := strings.TrimSuffix(c.BaseURL, "/") + req.path
	var resp *http.Response
	var err error
	if req.retry {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, MaxRetryTime)
		defer cancel()
		var rr *retryablehttp.Request
		var raw any
		if body != nil {
			raw = body
		}
		rr, err = retryablehttp.NewRequestWithContext(ctx, req.method, url, raw)
		if err != nil {
			return 0, nil, err
		}
		setHeaders(rr.Header, req.key, body != nil)
		resp, err = c.rc.Do(rr)
	} else {
		var hr *http.Request
		var r io.Reader
		if body != nil {
			r = bytes.NewReader(body)
		}
		hr, err = http.NewRequestWithContext(ctx, req.method, url, r)
		if err != nil {
			return 0, nil, err
		}
		setHeaders(hr.Header, req.key, body != nil)
		resp, err = c.hc.Do(hr)
	}
	if err != nil {
		return 0, nil, fmt.Errorf("balena: %s %s: %w", req.method, req.path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxAnswerBody))
	if err != nil {
		return 0, nil, fmt.Errorf("balena: %s %s: reading the answer: %w", req.method, req.path, err)
	}
	return resp.StatusCode, b, nil
}

// checkRetry is retryablehttp's default policy (connection errors, 429
// and 5xx but 501, never once ctx has ended), bounded: an answer whose
// Retry-After exceeds MaxRetryAfter is final, and so is one whose wait
// would outlast ctx's deadline.
func checkRetry(ctx context.Context, resp *http.Response, err error) (bool, error) {
	retry, rerr := retryablehttp.DefaultRetryPolicy(ctx, resp, err)
	if !retry || rerr != nil {
		return false, rerr
	}
	wait := retryWaitMax
	if d, ok := retryAfter(resp); ok {
		if d > MaxRetryAfter {
			return false, nil
		}
		wait = d
	}
	if deadline, ok := ctx.Deadline(); ok && time.Until(deadline) < wait {
		return false, nil
	}
	return true, nil
}

// backoff waits what a 429 or 503 asks for in its Retry-After (at most
// MaxRetryAfter, which checkRetry enforces), else doubles from lo with
// every attempt, up to hi.
func backoff(lo, hi time.Duration, attempt int, resp *http.Response) time.Duration {
	if d, ok := retryAfter(resp); ok {
		return d
	}
	d := lo
	for range attempt {
		if d >= hi {
			break
		}
		d *= 2
	}
	return min(d, hi)
}

// retryAfter returns the wait that resp, a 429 or a 503, asks for in its
// Retry-After header: seconds, or an HTTP date.
func retryAfter(resp *http.Response) (time.Duration, bool) {
	if resp == nil || resp.StatusCode != http.StatusTooManyRequests && resp.StatusCode != http.StatusServiceUnavailable {
		return 0, false
	}
	v := strings.TrimSpace(resp.Header.Get("Retry-After"))
	if v == "" {
		return 0, false
	}
	if n, err := strconv.ParseInt(v, 10, 64); err == nil {
		if n < 0 {
			return 0, false
		}
		if n > int64(time.Duration(math.MaxInt64)/time.Second) {
			n = int64(time.Duration(math.MaxInt64) / time.Second)
		}
		return time.Duration(n) * time.Second, true
	}
	t, err := http.ParseTime(v)
	if err != nil {
		return 0, false
	}
	return max(time.Until(t), 0), true
}

func setHeaders(h http.Header, key string, hasBody bool) {
	if key != "" {
		h.Set("Authorization", "Bearer "+key)
	}
	if hasBody {
		h.Set("Content-Type", "application/json")
	}
	h.Set("Accept", "application/json")
}

func apiError(req request, status int, body []byte) *APIError {
	if len(body) > maxErrorBody {
		body = body[:maxErrorBody]
	}
	return &APIError{Method: req.method, Path: req.path, StatusCode: status, Body: string(body)}
}

// decode unmarshals an answer's JSON body into v.
func decode(req request, body []byte, v any) error {
	if err := json.Unmarshal(body, v); err != nil {
		return fmt.Errorf("balena: %s %s: malformed answer: %w", req.method, req.path, err)
	}
	return nil
}

// retryLogger passes retryablehttp's messages to a slog.Logger at debug
// level. retryablehttp logs methods and redacted URLs, never headers.
type retryLogger struct{ l *slog.Logger }

func (r retryLogger) Error(msg string, kv ...any) { r.l.Debug("balena API: "+msg, kv...) }
func (r retryLogger) Info(msg string, kv ...any)  { r.l.Debug("balena API: "+msg, kv...) }
func (r retryLogger) Debug(msg string, kv ...any) { r.l.Debug("balena API: "+msg, kv...) }
func (r retryLogger) Warn(msg string, kv ...any)  { r.l.Debug("balena API: "+msg, kv...) }
