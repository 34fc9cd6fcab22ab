package connectproxy

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// tunnel relays bytes between a caller and a device (or a peer VPN
// server) on two goroutines, one per direction.
type tunnel struct {
	h              *Handler
	client, device net.Conn
	log            *slog.Logger
	begin          time.Time

	pending   atomic.Int32 // copiers still running
	closing   atomic.Bool  // the proxy closes the tunnel: errors after that are its own
	closeOnce sync.Once
	err       error        // first error of a copier, unless closing; read after both end
	up, down  int64        // bytes copied to the device and to the client
	idleFor   atomic.Int64 // how long it was idle when that closed it

	mu   sync.Mutex
	idle *time.Timer // checks whether the tunnel is idle; nil after finish
}

// reserve takes a place for a tunnel, unless the handler is closed or
// full. Until stop is called, a kill (a Shutdown out of time) calls
// cancel.
func (h *Handler) reserve(cancel func()) (stop func() bool, ok bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed || h.MaxTunnels > 0 && h.n >= h.MaxTunnels {
		return nil, false
	}
	h.n++
	return context.AfterFunc(h.killContext(), cancel), true
}

// killContext returns the context that a kill ends. The caller holds h.mu.
func (h *Handler) killContext() context.Context {
	if h.kill == nil {
		h.kill, h.killFn = context.WithCancel(context.Background())
	}
	return h.kill
}

// release gives back a place taken by reserve.
func (h *Handler) release() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.releaseLocked()
}

func (h *Handler) releaseLocked() {
	h.n--
	if h.n == 0 && h.drained != nil {
		close(h.drained)
		h.drained = nil
	}
}

// start runs the tunnel on its reserved place.
func (h *Handler) start(client, dev net.Conn, t Target, via string, log *slog.Logger) {
	tn := &tunnel{h: h, client: client, device: dev, log: log.With("via", via), begin: time.Now()}
	tn.pending.Store(2)
	h.mu.Lock()
	if h.tunnels == nil {
		h.tunnels = map[*tunnel]struct{}{}
	}
	h.tunnels[tn] = struct{}{}
	killed := h.killed
	h.mu.Unlock()
	tn.log.Info("connectproxy: tunnel open", "remote", client.RemoteAddr().String())
	if killed {
		tn.close()
	}
	if h.IdleTimeout > 0 {
		tn.mu.Lock()
		tn.idle = time.AfterFunc(h.IdleTimeout, tn.checkIdle)
		tn.mu.Unlock()
	}
	go tn.copyToDevice()
	go tn.copyFromDevice()
}

// copyToDevice relays the caller's bytes to the device and passes the
// caller's end of stream on.
func (t *tunnel) copyToDevice() {
	n, err := io.Copy(t.device, t.client)
	t.up = n
	t.done(err, t.device)
}

// copyFromDevice relays the device's bytes to the caller and passes the
// device's end of stream on.
func (t *tunnel) copyFromDevice() {
	n, err := io.Copy(t.client, t.device)
	t.down = n
	t.done(err, t.client)
}

// done ends one direction: on end of stream it half-closes dst, on error
// it closes the tunnel. The last direction to end releases the tunnel.
func (t *tunnel) done(err error, dst net.Conn) {
	if err == nil {
		if cw, ok := dst.(interface{ CloseWrite() error }); ok {
			if cw.CloseWrite() != nil {
				t.shut(nil) // the other end is gone
			}
		} else {
			t.shut(nil) // cannot half-close: end the tunnel
		}
	} else {
		t.shut(err)
	}
	if t.pending.Add(-1) == 0 {
		t.finish()
	}
}

// shut closes both connections once. err is the failure that caused it,
// if any; failures that follow a close by the proxy are not failures.
func (t *tunnel) shut(err error) {
	t.closeOnce.Do(func() {
		if err != nil && !t.closing.Load() {
			t.err = err
		}
		t.closing.Store(true)
		t.client.Close()
		t.device.Close()
	})
}

// close ends the tunnel on the proxy's behalf (idle, shutdown).
func (t *tunnel) close() {
	t.closing.Store(true)
	t.shut(nil)
}

func (t *tunnel) finish() {
	t.mu.Lock()
	if t.idle != nil {
		t.idle.Stop()
		t.idle = nil
	}
	t.mu.Unlock()
	t.shut(nil)
	h := t.h
	if m := h.Metrics; m != nil {
		m.ActiveTunnels.Dec()
		if t.err != nil {
			m.TunnelErrors.Inc()
		}
	}
	attrs := []any{"duration", time.Since(t.begin).Round(time.Millisecond), "bytes_up", t.up, "bytes_down", t.down}
	switch {
	case t.err != nil:
		t.log.Info("connectproxy: tunnel failed", append(attrs, "err", t.err)...)
	case t.idleFor.Load() > 0:
		t.log.Info("connectproxy: tunnel closed when idle", append(attrs, "idle", time.Duration(t.idleFor.Load()))...)
	default:
		t.log.Debug("connectproxy: tunnel closed", attrs...)
	}
	h.mu.Lock()
	delete(h.tunnels, t)
	h.releaseLocked()
	h.mu.Unlock()
}

// checkIdle closes the tunnel if no byte moved for IdleTimeout, and
// checks again when it could be idle that long.
func (t *tunnel) checkIdle() {
	limit := t.h.IdleTimeout
	idle, ok := idleTime(t.client)
	if d, ok2 := idleTime(t.device); ok2 && (!ok || d < idle) {
		idle, ok = d, true
	}
	if !ok {
		return // not measurable: not enforced
	}
	if idle >= limit {
		t.idleFor.Store(int64(idle))
		t.close()
		return
	}
	t.mu.Lock()
	if t.idle != nil {
		t.idle.Reset(limit - idle + time.Millisecond)
	}
	t.mu.Unlock()
}

// Shutdown stops the handler from opening tunnels (CONNECT requests are
// answered 503 from then on) and waits for the open ones to end. When ctx
// ends first, it closes them, waits for their goroutines, and returns
// ctx's error. It does not close the listener: the server that serves the
// handler does that ([Server.Shutdown] calls this).
func (h *Handler) Shutdown(ctx context.Context) error {
	h.mu.Lock()
	h.closed = true
	if h.n == 0 {
		h.mu.Unlock()
		return nil
	}
	if h.drained == nil {
		h.drained = make(chan struct{})
	}
	drained := h.drained
	h.mu.Unlock()

	select {
	case <-drained:
		return nil
	case <-ctx.Done():
	}
	h.mu.Lock()
	h.killed = true
	h.killContext()
	h.killFn()
	open := make([]*tunnel, 0, len(h.tunnels))
	for t := range h.tunnels {
		open = append(open, t)
	}
	h.mu.Unlock()
	for _, t := range open {
		t.close()
	}
	<-drained
	return ctx.Err()
}

// Close closes every tunnel at once and stops the handler from opening
// more; it returns when their goroutines have ended.
func (h *Handler) Close() error {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := h.Shutdown(ctx); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}

// Tunnels returns the number of tunnels open now.
func (h *Handler) Tunnels() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.tunnels)
}
