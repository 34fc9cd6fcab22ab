package vpn

import (
	"context"
	"errors"
	"log/slog"
	"sort"
	"sync"
	"time"

	"go.opentelemetry.io/otel/trace"
)

// StateAPI is the part of the balena API that learns which devices are
// online: POST /services/vpn/client-connect and /client-disconnect with
// {"serviceId","uuids","connected"}. The vpn/balena client implements it.
type StateAPI interface {
	ReportState(ctx context.Context, serviceID int64, uuids []string, connected bool) error
}

// Connections counts the open VPN sessions of each device. A device is
// online while it has at least one: a device connected twice and
// disconnected once stays online. A disconnect that arrives before its
// connect takes the count below zero, and the late connect brings it back to
// zero without the device going online. The zero value is ready to use and
// safe for concurrent use.
type Connections struct {
	mu     sync.Mutex
	counts map[string]int
}

// Connect counts a new session of uuid and returns the count before it. The
// device goes online when that was 0.
func (c *Connections) Connect(uuid string) (before int) {
	return c.add(uuid, +1)
}

// Disconnect counts a session of uuid as gone and returns the count before
// it. The device goes offline when that was 1.
func (c *Connections) Disconnect(uuid string) (before int) {
	return c.add(uuid, -1)
}

// Count returns the open sessions of uuid.
func (c *Connections) Count(uuid string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.counts[uuid]
}

// Online returns the devices with at least one session, sorted.
func (c *Connections) Online() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []string
	for u, n := range c.counts {
		if n > 0 {
			out = append(out, u)
		}
	}
	sort.Strings(out)
	return out
}

func (c *Connections) add(uuid string, d int) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.counts == nil {
		c.counts = make(map[string]int)
	}
	before := c.counts[uuid]
	if before+d == 0 {
		delete(c.counts, uuid) // keep the map as small as the fleet that is online
	} else {
		c.counts[uuid] = before + d
	}
	return before
}

// Reporter tells the balena API which devices are online. Callers set each
// device's target state with [Reporter.Set]; [Reporter.Run] sends, one pass
// at a time, the devices whose target differs from what the API last
// acknowledged, connects and disconnects in separate requests of at most
// BatchSize devices. A failed request leaves its devices pending for the
// next pass, so nothing is lost while the API is down, and once it is back
// the state it holds equals the last target of every device.
//
// The zero Reporter is not usable: API and ServiceID must be set before Run.
type Reporter struct {
	// API receives the reports.
	API StateAPI

	// ServiceID returns this VPN service's instance id, as registered with
	// the API. It is called once a pass; a pass is skipped while it
	// returns 0 (not registered yet).
	ServiceID func() int64

	// BatchSize bounds the devices in one request. Zero means 8000.
	BatchSize int

	// Interval is the least time between two passes. Zero means 1 s.
	Interval time.Duration

	// MaxBackoff bounds the wait after a failed pass, which doubles from
	// Interval with every failure in a row. Zero means 30 s.
	MaxBackoff time.Duration

	// Logger receives failures and progress. Nil means discard.
	Logger *slog.Logger

	// TracerProvider makes a span, vpn.state.report, of every batch sent,
	// with its number of UUIDs and whether they connected. Nil means
	// otel.GetTracerProvider().
	TracerProvider trace.TracerProvider

	once     sync.Once
	mu       sync.Mutex
	target   map[string]bool     // the state to report, by UUID
	acked    map[string]bool     // the state the API acknowledged, by UUID
	inflight map[string]struct{} // the UUIDs of the pass under way
	wake     chan struct{}       // a signal that target changed; buffered, 1
	passMu   sync.Mutex          // one pass at a time
}

func (r *Reporter) init() {
	r.once.Do(func() {
		r.target = make(map[string]bool)
		r.acked = make(map[string]bool)
		r.inflight = make(map[string]struct{})
		r.wake = make(chan struct{}, 1)
	})
}

// Set records that uuid should be reported connected (or disconnected) and
// wakes the reporter. It never blocks on the API.
func (r *Reporter) Set(uuid string, connected bool) {
	r.init()
	r.mu.Lock()
	_, sending := r.inflight[uuid]
	if a, ok := r.acked[uuid]; ok && a == connected && !sending {
		// Back to what the API holds: nothing to send. (While a pass
		// sends the opposite, the API will hold that: keep the target.)
		delete(r.target, uuid)
	} else {
		r.target[uuid] = connected
	}
	r.mu.Unlock()
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// Pending returns how many devices wait to be reported.
func (r *Reporter) Pending() int {
	r.init()
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.target)
}

// Run sends reports until ctx ends, then returns ctx's error. Sending is
// not attempted after ctx ends; use [Reporter.Flush] with a fresh context to
// send what is pending on shutdown.
func (r *Reporter) Run(ctx context.Context) error {
	r.init()
	interval := r.interval()
	wait := time.Duration(0)
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-timer.C:
		}
		// A wake-up left from changes that the last pass already sent
		// finds nothing pending: wait for the next, without a pass (and
		// the interval after it) for nothing.
		for r.Pending() == 0 {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-r.wake:
			}
		}
		if err := r.pass(ctx); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			// Back off from the interval, doubling up to MaxBackoff.
			wait = min(max(2*wait, interval), r.maxBackoff())
			level := slog.LevelWarn
			if errors.Is(err, errNotRegistered) {
				level = slog.LevelDebug
			}
			r.logger().Log(ctx, level, "device state report failed; will retry", "err", err, "pending", r.Pending(), "retry_in", wait)
		} else {
			wait = 0
		}
		timer.Reset(max(wait, interval))
	}
}

// Flush sends what is pending, pass after pass, until nothing is or ctx
// ends. It returns nil when everything was acknowledged, else the last
// error (or ctx's).
func (r *Reporter) Flush(ctx context.Context) error {
	r.init()
	for r.Pending() > 0 {
		if err := r.pass(ctx); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			// A short pause keeps a dead API from being hammered while
			// the caller's deadline runs.
			select {
			case <-ctx.Done():
				return errors.Join(err, ctx.Err())
			case <-time.After(r.interval()):
			}
		}
	}
	return nil
}

// errNotRegistered stops a pass while the service id is unknown.
var errNotRegistered = errors.New("service instance not registered yet")

// pass sends every pending device once: connects, then disconnects, in
// batches. It stops at the first failure; the devices of that batch and the
// ones after it stay pending.
func (r *Reporter) pass(ctx context.Context) error {
	r.passMu.Lock()
	defer r.passMu.Unlock()
	id := r.ServiceID()
	if id == 0 {
		return errNotRegistered
	}
	r.mu.Lock()
	var up, down []string
	for u, c := range r.target {
		if c {
			up = append(up, u)
		} else {
			down = append(down, u)
		}
		r.inflight[u] = struct{}{}
	}
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		clear(r.inflight)
		r.mu.Unlock()
	}()
	if len(up)+len(down) == 0 {
		return nil
	}
	sort.Strings(up) // stable batches make logs and tests readable
	sort.Strings(down)
	for _, group := range []struct {
		uuids     []string
		connected bool
	}{{up, true}, {down, false}} {
		for b := range batches(group.uuids, r.batchSize()) {
			bctx, span := tracer(r.TracerProvider).Start(ctx, "vpn.state.report", trace.WithAttributes(
				attrStateUUIDs.Int(len(b)), attrStateConn.Bool(group.connected), attrServiceID.Int64(id)))
			err := r.API.ReportState(bctx, id, b, group.connected)
			endSpan(span, err)
			if err != nil {
				return err
			}
			r.ack(b, group.connected)
		}
	}
	return nil
}

// ack records that the API holds connected for uuids; a device whose
// target changed since the pass read it stays pending.
func (r *Reporter) ack(uuids []string, connected bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, u := range uuids {
		r.acked[u] = connected
		if t, ok := r.target[u]; ok && t == connected {
			delete(r.target, u)
		}
	}
}

func batches(s []string, size int) func(func([]string) bool) {
	return func(yield func([]string) bool) {
		for len(s) > 0 {
			n := min(size, len(s))
			if !yield(s[:n:n]) {
				return
			}
			s = s[n:]
		}
	}
}

func (r *Reporter) batchSize() int {
	if r.BatchSize > 0 {
		return r.BatchSize
	}
	return 8000
}

func (r *Reporter) interval() time.Duration {
	if r.Interval > 0 {
		return r.Interval
	}
	return time.Second
}

func (r *Reporter) maxBackoff() time.Duration {
	if r.MaxBackoff > 0 {
		return r.MaxBackoff
	}
	return 30 * time.Second
}

func (r *Reporter) logger() *slog.Logger {
	if r.Logger != nil {
		return r.Logger
	}
	return slog.New(slog.DiscardHandler)
}
