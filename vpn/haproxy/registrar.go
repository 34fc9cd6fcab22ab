package haproxy

import (
	"context"
	"log/slog"
	"net/netip"
	"sync"
	"time"
)

// Registrar keeps the instances' servers in HAProxy's backend as the
// server wants them: registered at their port and ready, in maintenance,
// or draining. It applies a change at once and checks every interval, so
// that a command that failed (HAProxy not up yet, or busy) is retried and
// an HAProxy that restarted and forgot its runtime state (an external one)
// gets the instances back.
type Registrar struct {
	// Runtime is HAProxy's runtime API.
	Runtime *Runtime
	// Interval is how often the servers are checked and mended. Zero means
	// 10 s.
	Interval time.Duration
	// Logger receives the commands that failed; nil means discard.
	Logger *slog.Logger

	applyMu sync.Mutex // one apply at a time
	mu      sync.Mutex
	want    map[int]wanted // by instance id
	wake    chan struct{}  // buffered, 1
}

type wanted struct {
	addr  netip.AddrPort
	state ServerState
}

func (r *Registrar) init() {
	r.mu.Lock()
	if r.want == nil {
		r.want = map[int]wanted{}
		r.wake = make(chan struct{}, 1)
	}
	r.mu.Unlock()
}

func (r *Registrar) log() *slog.Logger {
	if r.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return r.Logger
}

// Set records what instance id's server should be, at addr in state, and
// applies it soon.
func (r *Registrar) Set(id int, addr netip.AddrPort, state ServerState) {
	r.init()
	r.mu.Lock()
	r.want[id] = wanted{addr, state}
	r.mu.Unlock()
	r.poke()
}

// SetNow is Set, then one attempt to apply it at once, so that HAProxy
// has the instance when SetNow returns unless it refused (Run then
// retries).
func (r *Registrar) SetNow(ctx context.Context, id int, addr netip.AddrPort, state ServerState) {
	r.Set(id, addr, state)
	r.Apply(ctx)
}

// SetAll sets every instance's state, keeping its address.
func (r *Registrar) SetAll(state ServerState) {
	r.init()
	r.mu.Lock()
	for id, w := range r.want {
		r.want[id] = wanted{w.addr, state}
	}
	r.mu.Unlock()
	r.poke()
}

// poke wakes the run loop, which applies what is wanted.
func (r *Registrar) poke() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// Run applies the wanted states until ctx ends: at once after each Set
// or SetAll, every Interval otherwise, and after a second while HAProxy
// refuses.
func (r *Registrar) Run(ctx context.Context) {
	r.init()
	interval := r.Interval
	if interval <= 0 {
		interval = 10 * time.Second
	}
	for {
		wait := interval
		if !r.Apply(ctx) {
			wait = time.Second // retry soon
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-r.wake:
		case <-t.C:
		}
		t.Stop()
	}
}

// Apply makes HAProxy's servers what is wanted, once, now; it reports
// whether they are. Run calls it; a caller that must know the servers are
// set before it goes on (a drain) calls it too.
func (r *Registrar) Apply(ctx context.Context) bool {
	r.applyMu.Lock()
	defer r.applyMu.Unlock()
	r.mu.Lock()
	want := make(map[int]wanted, len(r.want))
	for id, w := range r.want {
		want[id] = w
	}
	r.mu.Unlock()
	if len(want) == 0 {
		return true
	}
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	have := map[string]ServerStatus{}
	st, err := r.Runtime.ServersState(cctx, Backend)
	if err != nil {
		if ctx.Err() == nil {
			r.log().Warn("HAProxy: cannot read the servers' state; will retry", "err", err)
		}
		return false
	}
	for _, s := range st {
		have[s.Name] = s
	}
	ok := true
	for id, w := range want {
		name := ServerName(id)
		h := have[name[len(Backend)+1:]]
		if w.state != Maint && h.Addr != w.addr {
			if err := r.Runtime.SetServerAddr(cctx, name, w.addr); err != nil {
				r.log().Warn("HAProxy: cannot register the instance; will retry", "instance", id, "err", err)
				ok = false
				continue
			}
		}
		if matches(h, w.state) {
			continue
		}
		if err := r.Runtime.SetServerState(cctx, name, w.state); err != nil {
			r.log().Warn("HAProxy: cannot set the instance's state; will retry", "instance", id, "state", w.state, "err", err)
			ok = false
		}
	}
	return ok
}

// matches says whether HAProxy's server is in the administrative state.
func matches(h ServerStatus, state ServerState) bool {
	switch state {
	case Maint:
		return h.Maint
	case Drain:
		return h.Draining && !h.Maint
	default:
		return !h.Draining && !h.Maint
	}
}
