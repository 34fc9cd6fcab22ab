package vpn

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"go.opentelemetry.io/otel/trace"

	"github.com/obvpn/obvpn/vpn/balena"
	devuuid "github.com/obvpn/obvpn/vpn/balena/uuid"
)

// AuthAPI is the part of the balena API that says whether a device may
// connect: GET /services/vpn/auth/<uuid> with the device's API key as
// bearer. The vpn/balena client implements it.
//
// DeviceAuth returns true for an allowed device (200) and false for a
// denied one (401, 403): answers that may be cached. Anything else is an
// error: the device is denied, and the answer is not cached. A 503 is an
// error that matches [ErrAPIBusy]: "busy, try later", an answer rather
// than a fault, which is logged at info level and, like every denial,
// answered after the DelayOnAuthFail of the caller.
type AuthAPI interface {
	DeviceAuth(ctx context.Context, uuid, apiKey string) (bool, error)
}

// ErrAPIBusy is the balena API's 503 to a device authentication
// ([balena.ErrBusy]); an AuthAPI of another kind returns it, wrapped or
// not, for the same answer.
var ErrAPIBusy = balena.ErrBusy

// ErrBadCredentials reports a username that is not a device UUID (hex
// digits only) or an empty username or password. Such devices are denied
// without asking the API.
var ErrBadCredentials = errors.New("malformed device credentials")

// Authenticator decides whether devices may connect by asking an [AuthAPI],
// with the rules of the reference system: allow and deny answers are cached
// per device and key for CacheTimeout, errors are never cached, concurrent
// identical checks share one request, and at most MaxInFlight requests are
// in flight. It is safe for concurrent use; the zero value needs API set.
type Authenticator struct {
	// API answers the checks.
	API AuthAPI

	// CacheTimeout is how long an answer is reused. Zero turns the cache
	// off (identical checks in flight are still shared).
	CacheTimeout time.Duration

	// MaxInFlight bounds the requests to the API in flight. Zero means 20.
	MaxInFlight int

	// Timeout bounds one request to the API, from the moment it has its
	// place among MaxInFlight (the wait for a place, in a reconnect storm,
	// is bounded by OpenVPN's hand-window of 600 s). Zero means 30 s.
	Timeout time.Duration

	// Logger receives API failures. Nil means discard. Keys are never
	// logged.
	Logger *slog.Logger

	// TracerProvider makes a span, vpn.auth, of every Authenticate, with
	// whether the cache answered and the result (never the key); the
	// request to the API is its child. Nil means otel.GetTracerProvider().
	TracerProvider trace.TracerProvider

	once     sync.Once
	wg       sync.WaitGroup
	sem      chan struct{}
	mu       sync.Mutex
	cache    map[authKey]authEntry
	inflight map[authKey]*authCall
	sweepAt  int // cache size at which expired entries are swept
}

// authKey identifies a check without keeping the API key in memory.
type authKey [sha256.Size]byte

type authEntry struct {
	allowed bool
	expires time.Time
}

type authCall struct {
	done    chan struct{}
	allowed bool
	err     error
}

func (a *Authenticator) init() {
	a.once.Do(func() {
		n := a.MaxInFlight
		if n <= 0 {
			n = 20
		}
		a.sem = make(chan struct{}, n)
		a.cache = make(map[authKey]authEntry)
		a.inflight = make(map[authKey]*authCall)
		a.sweepAt = 1024
	})
}

// Authenticate reports whether the device uuid may connect with apiKey.
// An error means the API could not say (or the credentials are malformed,
// [ErrBadCredentials]); the device must then be denied. Authenticate waits
// for a place among MaxInFlight and for the answer, or until ctx ends.
func (a *Authenticator) Authenticate(ctx context.Context, uuid, apiKey string) (allowed bool, err error) {
	a.init()
	ctx, span := tracer(a.TracerProvider).Start(ctx, "vpn.auth")
	defer func() { endAuthSpan(span, allowed, err) }()
	uuid, valid := devuuid.Normalize(uuid) // one device, one cache entry, in any case
	if !valid || apiKey == "" {
		return false, ErrBadCredentials
	}
	span.SetAttributes(attrUUID.String(uuid))
	h := sha256.New()
	h.Write([]byte(uuid))
	h.Write([]byte{0})
	h.Write([]byte(apiKey))
	var k authKey
	h.Sum(k[:0])

	a.mu.Lock()
	if e, ok := a.cache[k]; ok {
		if time.Now().Before(e.expires) {
			a.mu.Unlock()
			span.SetAttributes(attrAuthCache.String("hit"))
			return e.allowed, nil
		}
		delete(a.cache, k)
	}
	c, shared := a.inflight[k]
	if !shared {
		c = &authCall{done: make(chan struct{})}
		a.inflight[k] = c
	}
	a.mu.Unlock()
	if shared {
		span.SetAttributes(attrAuthCache.String("shared"))
	} else {
		span.SetAttributes(attrAuthCache.String("miss"))
	}

	if !shared {
		// The request does not end with the caller's context, so that a
		// caller who gives up does not fail the others waiting for the
		// same answer; Timeout bounds it instead.
		timeout := a.Timeout
		if timeout <= 0 {
			timeout = 30 * time.Second
		}
		a.wg.Add(1)
		go func() {
			defer a.wg.Done()
			a.check(context.WithoutCancel(ctx), timeout, k, c, uuid, apiKey)
		}()
	}
	select {
	case <-c.done:
		return c.allowed, c.err
	case <-ctx.Done():
		return false, ctx.Err()
	}
}

// endAuthSpan ends an Authenticate's span with its result: a denial, and
// malformed credentials, are answers, not errors.
func endAuthSpan(span trace.Span, allowed bool, err error) {
	result := "deny"
	switch {
	case errors.Is(err, ErrBadCredentials):
		err = nil
	case err != nil:
		result = "error"
	case allowed:
		result = "allow"
	}
	span.SetAttributes(attrAuthResult.String(result))
	endSpan(span, err)
}

// maxQueueWait bounds the wait for a place among the requests in flight:
// the server configuration's hand-window, the time OpenVPN gives a client
// to be authenticated.
const maxQueueWait = 600 * time.Second

// Wait blocks until every request to the API that is in flight has
// ended: Authenticate returns when its caller's context ends, but the
// request it started goes on for the others that wait for the same answer.
func (a *Authenticator) Wait() { a.wg.Wait() }

// check asks the API once for every caller waiting on c.
func (a *Authenticator) check(ctx context.Context, timeout time.Duration, k authKey, c *authCall, uuid, apiKey string) {
	// A storm queues for a place: the wait is bounded by OpenVPN's
	// hand-window (after which an answer is of no use), the request by
	// timeout from the moment it has its place.
	qctx, qcancel := context.WithTimeout(ctx, maxQueueWait)
	defer qcancel()
	select {
	case a.sem <- struct{}{}:
		rctx, cancel := context.WithTimeout(ctx, timeout)
		c.allowed, c.err = a.API.DeviceAuth(rctx, uuid, apiKey)
		cancel()
		<-a.sem
	case <-qctx.Done():
		c.err = fmt.Errorf("no place among the requests in flight within %v: %w", maxQueueWait, qctx.Err())
	}
	if c.err != nil {
		c.allowed = false
		if errors.Is(c.err, ErrAPIBusy) {
			a.logger().Info("device authentication: the balena API is busy; device denied", "uuid", uuid)
		} else {
			a.logger().Warn("device authentication failed", "uuid", uuid, "err", c.err, slog.String(FingerprintKey, FingerprintAuth))
		}
	}
	a.mu.Lock()
	delete(a.inflight, k)
	if c.err == nil && a.CacheTimeout > 0 {
		a.cache[k] = authEntry{allowed: c.allowed, expires: time.Now().Add(a.CacheTimeout)}
		if len(a.cache) >= a.sweepAt {
			a.sweep()
		}
	}
	a.mu.Unlock()
	close(c.done)
}

// sweep drops expired answers; a.mu is held. The next sweep waits until the
// cache has doubled, so sweeping costs O(1) per insert over time.
func (a *Authenticator) sweep() {
	now := time.Now()
	for k, e := range a.cache {
		if !now.Before(e.expires) {
			delete(a.cache, k)
		}
	}
	a.sweepAt = max(1024, 2*len(a.cache))
}

func (a *Authenticator) logger() *slog.Logger {
	if a.Logger != nil {
		return a.Logger
	}
	return slog.New(slog.DiscardHandler)
}
