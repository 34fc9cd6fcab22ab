package vpn

import (
	"context"
	"errors"
	"log/slog"
	"maps"
	"slices"
	"sort"
	"strings"
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

// Connections counts the open VPN sessions of each device, a device's UUID
// in any letter case being the same device. A device is
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

// Count returns the open sessions of uuid, in any letter case.
func (c *Connections) Count(uuid string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.counts[strings.ToLower(uuid)]
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
	uuid = strings.ToLower(uuid)
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

// connectSession counts a new session of uuid on instance: the device goes
// online in m when it had none, and st learns the session unless a
// disconnect came before its connect (the count was below zero), as the
// reference does.
func connectSession(conns *Connections, m *Metrics, st StateSetter, uuid string, instance int) {
	uuid = strings.ToLower(uuid) // one device in any case
	before := conns.Connect(uuid)
	if before == 0 && m != nil {
		m.OnlineDevices.Inc()
	}
	if before >= 0 && st != nil {
		st.Set(uuid, DeviceState{Connected: true, Instance: instance})
	}
}

// Resumer is a StateSetter that can take a session which was already
// running when this process began to watch it; *Reporter implements it.
type Resumer interface {
	StateSetter
	// Resume is Set for such a session: it may leave out a report that
	// the API already holds.
	Resume(uuid string, s DeviceState)
}

// resumeSession counts a session of uuid on instance that was running
// before this process watched it: as connectSession, but st is told
// through Resume when it is a Resumer.
func resumeSession(conns *Connections, m *Metrics, st StateSetter, uuid string, instance int) {
	r, ok := st.(Resumer)
	if !ok {
		connectSession(conns, m, st, uuid, instance)
		return
	}
	uuid = strings.ToLower(uuid)
	before := conns.Connect(uuid)
	if before == 0 && m != nil {
		m.OnlineDevices.Inc()
	}
	if before >= 0 {
		r.Resume(uuid, DeviceState{Connected: true, Instance: instance})
	}
}

// disconnectSession counts a session of uuid on instance as gone and returns
// the count before it; the device goes offline, in m and st, when that was
// its last session.
func disconnectSession(conns *Connections, m *Metrics, st StateSetter, uuid string, instance int) (before int) {
	uuid = strings.ToLower(uuid)
	before = conns.Disconnect(uuid)
	if before != 1 {
		return before
	}
	if m != nil {
		m.OnlineDevices.Dec()
	}
	if st != nil {
		st.Set(uuid, DeviceState{Connected: false, Instance: instance})
	}
	return before
}

// DeviceState is what the balena API should hold about one device: whether
// it is connected to this VPN server, and on which of the server's OpenVPN
// instances its newest session is.
type DeviceState struct {
	Connected bool
	Instance  int
}

// Reporter tells the balena API which devices are online. Callers set each
// device's target state with [Reporter.Set]; [Reporter.Run] sends, one pass
// at a time, the devices whose target differs from what the API last
// acknowledged, connects and disconnects in separate requests of at most
// BatchSize devices. A failed request leaves its devices pending for the
// next pass, so nothing is lost while the API is down, and once it is back
// the state it holds equals the last target of every device.
//
// Every new session is reported, even when the API already acknowledged the
// device as connected here: the API keeps one service instance per device,
// and a device that connected to another server in between was claimed by
// it. When the device comes back while this server still counts its old
// session (a device moving A → B → A before A has noticed it left), the
// report of the new session reclaims it, so that B's later disconnect,
// which the API ignores for a device it no longer holds for B, cannot leave
// it offline. The reference tracks the instance for the same reason, but
// reclaims only when the instance differs.
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

	// Record, if set, is given what the API may hold each time that
	// changes: before a pass sends its reports (from then on the API may
	// hold them) and after it. held are the devices that the API
	// acknowledged as connected; maybe are those whose report was sent but
	// not acknowledged, which the API may hold either way. A Server keeps
	// them in its run directory, so that the process after it knows whom
	// the API holds online even when this one was killed (see
	// [Reporter.Restore]). It is called from the pass, one call at a time,
	// and must not call the Reporter.
	Record func(held map[string]DeviceState, maybe []string)

	// TracerProvider makes a span, vpn.state.report, of every batch sent,
	// with its number of UUIDs and whether they connected. Nil means
	// otel.GetTracerProvider().
	TracerProvider trace.TracerProvider

	once     sync.Once
	mu       sync.Mutex
	seq      uint64                 // numbers the sessions, so that each new one is a new target
	target   map[string]reportState // the state to report, by UUID
	acked    map[string]reportState // the connected devices the API acknowledged, by UUID
	inflight map[string]struct{}    // the UUIDs of the pass under way
	wake     chan struct{}          // a signal that target changed; buffered, 1
	passMu   sync.Mutex             // one pass at a time
}

// reportState is a target or acknowledged state; seq tells a new session
// from an old one with the same state.
type reportState struct {
	DeviceState
	seq uint64
}

func (r *Reporter) init() {
	r.once.Do(func() {
		r.target = make(map[string]reportState)
		r.acked = make(map[string]reportState)
		r.inflight = make(map[string]struct{})
		r.wake = make(chan struct{}, 1)
	})
}

// Set records the state the API should hold for uuid and wakes the
// reporter. A connected state stands for a new session and is always
// reported (see [Reporter]); a disconnected one is reported unless the API
// already holds the device as disconnected. Set never blocks on the API.
func (r *Reporter) Set(uuid string, s DeviceState) {
	r.init()
	r.mu.Lock()
	if s.Connected {
		r.seq++
		r.target[uuid] = reportState{s, r.seq}
	} else if _, held := r.acked[uuid]; held {
		r.target[uuid] = reportState{DeviceState: s}
	} else if _, sending := r.inflight[uuid]; sending {
		// The pass under way may make the API hold it connected.
		r.target[uuid] = reportState{DeviceState: s}
	} else {
		// The API holds it disconnected: nothing to send.
		delete(r.target, uuid)
	}
	r.mu.Unlock()
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// Restore records that the API holds held as connected to this server,
// as an earlier process of it left them (see Record): a later
// disconnected state of one of them is reported, and [Reporter.Resume]
// of one of them on the same instance is not.
func (r *Reporter) Restore(held map[string]DeviceState) {
	r.init()
	r.mu.Lock()
	defer r.mu.Unlock()
	for u, st := range held {
		if st.Connected {
			r.acked[u] = reportState{DeviceState: st}
		}
	}
}

// Resume records a session that was already running when this process
// began to watch it (an adopted OpenVPN): unlike [Reporter.Set], it is
// reported only when the API does not already hold the device as
// connected on that instance, so that a device that merely stayed
// connected through a restart of the server costs the API nothing.
func (r *Reporter) Resume(uuid string, s DeviceState) {
	r.init()
	r.mu.Lock()
	a, held := r.acked[uuid]
	_, pending := r.target[uuid]
	r.mu.Unlock()
	if s.Connected && held && a.DeviceState == s && !pending {
		return
	}
	r.Set(uuid, s)
}

// record gives Record what the API may hold: the acknowledged devices,
// and maybe. r.passMu is held.
func (r *Reporter) record(maybe []string) {
	if r.Record == nil {
		return
	}
	r.mu.Lock()
	held := make(map[string]DeviceState, len(r.acked))
	for u, a := range r.acked {
		held[u] = a.DeviceState
	}
	r.mu.Unlock()
	r.Record(held, maybe)
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
			level, fp := slog.LevelWarn, slog.String(FingerprintKey, FingerprintStateUpdate)
			if errors.Is(err, errNotRegistered) {
				level, fp = slog.LevelDebug, slog.Attr{}
			}
			r.logger().Log(ctx, level, "device state report failed; will retry", "err", err, "pending", r.Pending(), "retry_in", wait, fp)
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
	sent := make(map[string]reportState, len(r.target))
	for u, t := range r.target {
		if t.Connected {
			up = append(up, u)
		} else {
			down = append(down, u)
		}
		sent[u] = t
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
	// From here until their acknowledgement the API may hold any of them
	// either way.
	unacked := make(map[string]struct{}, len(up)+len(down))
	for _, u := range append(slices.Clip(up), down...) {
		unacked[u] = struct{}{}
	}
	r.record(slices.Collect(maps.Keys(unacked)))
	defer func() { r.record(slices.Collect(maps.Keys(unacked))) }()
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
			r.ack(b, sent)
			for _, u := range b {
				delete(unacked, u)
			}
		}
	}
	return nil
}

// ack records that the API holds what sent says for uuids; a device whose
// target changed since the pass read it (a new session, or a disconnect)
// stays pending.
func (r *Reporter) ack(uuids []string, sent map[string]reportState) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, u := range uuids {
		s := sent[u]
		if s.Connected {
			r.acked[u] = s
		} else {
			delete(r.acked, u) // the API's default: keep the map as small as the fleet online
		}
		if t, ok := r.target[u]; ok && t == s {
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
