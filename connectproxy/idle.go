package connectproxy

import (
	"math"
	"time"
)

// The handler's idle sweep closes tunnels in which no byte moved for
// IdleTimeout. One goroutine and one ticker serve all the tunnels, while
// any is open: a tunnel holds no timer of its own, only the time at which
// it could next have been idle that long. Each tick asks the kernel
// (TCP_INFO) how long ago the tunnels that are due last moved a byte,
// and closes those idle for IdleTimeout; the others are due again when
// they could be. So a tunnel is closed between IdleTimeout and
// IdleTimeout plus one tick after its last byte.

// sweepTick returns the sweep's period for an idle limit: an eighth of
// it, at least 10 ms and at most a second.
func sweepTick(limit time.Duration) time.Duration {
	return min(max(limit/8, 10*time.Millisecond), time.Second)
}

// watchIdle makes the sweep look after t, starting the sweep if it is not
// running. The caller holds h.mu.
func (h *Handler) watchIdle(t *tunnel) {
	t.idleDue.Store(t.begin.Add(h.IdleTimeout).UnixNano())
	if h.sweepStop != nil {
		return
	}
	stop := make(chan struct{})
	h.sweepStop = stop
	h.sweeps.Go(func() { h.sweep(stop) })
}

// unwatchIdle stops the sweep when the last tunnel is gone. The caller
// holds h.mu.
func (h *Handler) unwatchIdle() {
	if len(h.tunnels) == 0 && h.sweepStop != nil {
		close(h.sweepStop)
		h.sweepStop = nil
	}
}

// sweep checks the tunnels that are due, every tick, until stop is
// closed.
func (h *Handler) sweep(stop <-chan struct{}) {
	tick := time.NewTicker(sweepTick(h.IdleTimeout))
	defer tick.Stop()
	var due []*tunnel
	for {
		select {
		case <-stop:
			return
		case now := <-tick.C:
			due = due[:0]
			h.mu.Lock()
			for t := range h.tunnels {
				if t.idleDue.Load() <= now.UnixNano() {
					due = append(due, t)
				}
			}
			h.mu.Unlock()
			for _, t := range due {
				t.checkIdle(now)
			}
			clear(due) // keep no ended tunnel alive
		}
	}
}

// checkIdle closes the tunnel if no byte moved for IdleTimeout, and
// otherwise makes it due when it could be idle that long. A tunnel whose
// idle time cannot be measured is never due again.
func (t *tunnel) checkIdle(now time.Time) {
	limit := t.h.IdleTimeout
	idle, ok := idleTime(t.client)
	if d, ok2 := idleTime(t.device); ok2 && (!ok || d < idle) {
		idle, ok = d, true
	}
	if !ok {
		t.idleDue.Store(math.MaxInt64) // not measurable: not enforced
		return
	}
	if idle >= limit {
		t.idleFor.Store(int64(idle))
		t.close()
		return
	}
	t.idleDue.Store(now.Add(limit - idle).UnixNano())
}
