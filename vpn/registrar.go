package vpn

import (
	"context"
	"log/slog"
	"net/netip"
	"sync"
	"time"
)

// registrar keeps the instances' servers in HAProxy's backend as the
// server wants them: registered at their port and ready, in maintenance,
// or draining. It applies a change at once and checks every interval, so
// that a command that failed (HAProxy not up yet, or busy) is retried and
// an HAProxy that restarted and forgot its runtime state (an external one)
// gets the instances back.
type registrar struct {
	hap      *HAProxyRuntime
	interval time.Duration // zero means 10 s
	log      *slog.Logger

	applyMu sync.Mutex // one apply at a time
	mu      sync.Mutex
	want    map[int]wanted // by instance id
	wake    chan struct{}  // buffered, 1
}

type wanted struct {
	addr  netip.AddrPort
	state ServerState
}

func newRegistrar(hap *HAProxyRuntime, log *slog.Logger) *registrar {
	return &registrar{hap: hap, log: log, want: map[int]wanted{}, wake: make(chan struct{}, 1)}
}

// set records what instance id's server should be, and applies it soon.
func (r *registrar) set(id int, addr netip.AddrPort, state ServerState) {
	r.mu.Lock()
	r.want[id] = wanted{addr, state}
	r.mu.Unlock()
	r.poke()
}

// setNow is set, then one attempt to apply it at once, so that HAProxy
// has the instance when setNow returns unless it refused (the run loop
// then retries).
func (r *registrar) setNow(ctx context.Context, id int, addr netip.AddrPort, state ServerState) {
	r.set(id, addr, state)
	r.apply(ctx)
}

// setAll sets every instance's state, keeping its address.
func (r *registrar) setAll(state ServerState) {
	r.mu.Lock()
	for id, w := range r.want {
		r.want[id] = wanted{w.addr, state}
	}
	r.mu.Unlock()
	r.poke()
}

// poke wakes the run loop, which applies what is wanted.
func (r *registrar) poke() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// run applies the wanted states until ctx ends.
func (r *registrar) run(ctx context.Context) {
	interval := r.interval
	if interval <= 0 {
		interval = 10 * time.Second
	}
	for {
		wait := interval
		if !r.apply(ctx) {
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

// apply makes HAProxy's servers what is wanted; it reports whether they
// are.
func (r *registrar) apply(ctx context.Context) bool {
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
	st, err := r.hap.ServersState(cctx, HAProxyBackend)
	if err != nil {
		if ctx.Err() == nil {
			r.log.Warn("HAProxy: cannot read the servers' state; will retry", "err", err)
		}
		return false
	}
	for _, s := range st {
		have[s.Name] = s
	}
	ok := true
	for id, w := range want {
		name := HAProxyServer(id)
		h := have[name[len(HAProxyBackend)+1:]]
		if w.state != StateMaint && h.Addr != w.addr {
			if err := r.hap.SetServerAddr(cctx, name, w.addr); err != nil {
				r.log.Warn("HAProxy: cannot register the instance; will retry", "instance", id, "err", err)
				ok = false
				continue
			}
		}
		if matches(h, w.state) {
			continue
		}
		if err := r.hap.SetServerState(cctx, name, w.state); err != nil {
			r.log.Warn("HAProxy: cannot set the instance's state; will retry", "instance", id, "state", w.state, "err", err)
			ok = false
		}
	}
	return ok
}

// matches says whether HAProxy's server is in the administrative state.
func matches(h ServerStatus, state ServerState) bool {
	switch state {
	case StateMaint:
		return h.Maint
	case StateDrain:
		return h.Draining && !h.Maint
	default:
		return !h.Draining && !h.Maint
	}
}

// instanceAddr is where HAProxy reaches instance id: loopback and its
// OpenVPN port.
func instanceAddr(cfg *Config, id int) netip.AddrPort {
	in, _ := cfg.Plan.Instance(id)
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), uint16(in.Port))
}
