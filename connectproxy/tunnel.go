package connectproxy

import (
	"cmp"
	"context"
	"errors"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// tunnel relays bytes between a caller and a device (or a peer VPN
// server), a direction at a time: each direction copies on a goroutine
// of its own while bytes move, and, between TCP connections, waits in the
// handler's poller with no goroutine once none moved for parkAfter.
type tunnel struct {
	h              *Handler
	client, device net.Conn
	uuid, via      string // for the log, with port
	port           uint16
	begin          time.Time

	pending   atomic.Int32 // directions not ended
	closing   atomic.Bool  // the proxy closes the tunnel: errors after that are its own
	closeOnce sync.Once
	err       error        // first error of a copier, unless closing; read after both end
	bytes     [2]int64     // copied to the device, to the client
	idleFor   atomic.Int64 // how long it was idle when that closed it
	idleDue   atomic.Int64 // when the idle sweep checks it next, in Unix ns

	mu     sync.Mutex
	parked [2]bool   // the direction waits in the poller
	pollID [2]uint64 // the direction's registration with the poller, 0 for none
	shut_  bool      // the connections are closed: no more parking
}

// The directions of a tunnel.
const (
	toDevice = iota
	fromDevice
)

// parkAfter is how long a direction copies without a byte before it
// waits in the poller instead, giving up its goroutine and its buffer
// (or splice pipe).
// It is short, so that idle tunnels hold goroutines (and their stacks)
// only briefly after their last byte; a stream that pauses longer costs
// a goroutine start when it resumes, and one that flows costs a deadline
// renewed every parkAfter.
const parkAfter = 10 * time.Millisecond

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
func (h *Handler) start(client, dev net.Conn, t Target, via string, log reqLog) {
	tn := &tunnel{h: h, client: client, device: dev, uuid: t.UUID, port: t.Port, via: via, begin: time.Now()}
	tn.pending.Store(2)
	h.mu.Lock()
	if h.tunnels == nil {
		h.tunnels = map[*tunnel]struct{}{}
	}
	h.tunnels[tn] = struct{}{}
	if h.IdleTimeout > 0 {
		h.watchIdle(tn)
	}
	killed := h.killed
	h.mu.Unlock()
	if log.Enabled(slog.LevelDebug) {
		log.Debug("connectproxy: tunnel open", "via", via, "remote", client.RemoteAddr().String())
	}
	if killed {
		tn.close()
	}
	go tn.copyToDevice()
	go tn.copyFromDevice()
}

// copyToDevice relays the caller's bytes to the device and passes the
// caller's end of stream on.
func (t *tunnel) copyToDevice() { t.copy(toDevice) }

// copyFromDevice relays the device's bytes to the caller and passes the
// device's end of stream on.
func (t *tunnel) copyFromDevice() { t.copy(fromDevice) }

// copy relays direction d: through a buffer of the handler's pool, or,
// with Handler.Splice, with io.Copy, so that Linux splices between TCP
// connections. A parkable source gets a read deadline parkAfter ahead,
// which ends the copy with nothing held back (a buffered copy writes
// each read whole before it reads again; a splice ends with its pipe
// empty): with bytes copied, the copy goes on; without, the direction
// parks and this goroutine ends, its buffer back in the pool.
func (t *tunnel) copy(d int) {
	src, dst := t.client, t.device
	if d == fromDevice {
		src, dst = t.device, t.client
	}
	park := canPark(src)
	after := cmp.Or(t.h.idleAfter, parkAfter)
	for {
		if park {
			_ = src.SetReadDeadline(time.Now().Add(after))
		}
		n, err := t.h.relay(dst, src)
		t.bytes[d] += n
		if park && errors.Is(err, os.ErrDeadlineExceeded) {
			if n > 0 || !t.park(d, src) {
				continue
			}
			return
		}
		t.done(err, dst)
		return
	}
}

// park registers direction d with the poller, which wakes it when src has
// bytes; false means that it cannot wait there (the tunnel is closing, or
// the poller failed) and must copy on.
func (t *tunnel) park(d int, src net.Conn) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.shut_ {
		return false
	}
	id, err := t.h.poll.arm(t, d, src, t.pollID[d])
	t.pollID[d] = id
	if err != nil {
		return false
	}
	t.parked[d] = true
	if t.h.parked != nil {
		t.h.parked()
	}
	return true
}

// wake starts direction d again, if it is still parked.
func (t *tunnel) wake(d int) {
	t.mu.Lock()
	ok := t.parked[d]
	t.parked[d] = false
	t.mu.Unlock()
	if !ok {
		return
	}
	if d == toDevice {
		go t.copyToDevice()
	} else {
		go t.copyFromDevice()
	}
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
	t.leave()
}

// leave ends a direction; the last one finishes the tunnel.
func (t *tunnel) leave() {
	if t.pending.Add(-1) == 0 {
		t.finish()
	}
}

// shut closes both connections once. err is the failure that caused it,
// if any; failures that follow a close by the proxy are not failures.
// Parked directions end with it: their connections left the poller when
// they were closed.
func (t *tunnel) shut(err error) {
	first := false
	t.closeOnce.Do(func() {
		first = true
		if err != nil && !t.closing.Load() {
			t.err = err
		}
		t.closing.Store(true)
		t.client.Close()
		t.device.Close()
	})
	if !first {
		return
	}
	t.mu.Lock()
	t.shut_ = true
	n := 0
	for d := range t.parked {
		if t.parked[d] {
			t.parked[d] = false
			n++
		}
	}
	t.mu.Unlock()
	for range n {
		t.leave()
	}
}

// close ends the tunnel on the proxy's behalf (idle, shutdown).
func (t *tunnel) close() {
	t.closing.Store(true)
	t.shut(nil)
}

func (t *tunnel) finish() {
	t.mu.Lock()
	ids := t.pollID
	t.mu.Unlock()
	t.shut(nil)
	for _, id := range ids {
		if id != 0 {
			t.h.poll.forget(id)
		}
	}
	h := t.h
	if m := h.Metrics; m != nil {
		m.ActiveTunnels.Dec()
		if t.err != nil {
			m.TunnelErrors.Inc()
		}
	}
	t.logEnd()
	h.mu.Lock()
	delete(h.tunnels, t)
	h.unwatchIdle()
	h.releaseLocked()
	h.mu.Unlock()
	if h.OnTunnelClosed != nil {
		h.OnTunnelClosed(TunnelInfo{UUID: t.uuid, Port: t.port, Via: t.via, Duration: time.Since(t.begin),
			BytesToDevice: t.bytes[toDevice], BytesFromDevice: t.bytes[fromDevice], Err: t.err})
	}
}

// TunnelInfo describes a tunnel that ended, for [Handler.OnTunnelClosed].
type TunnelInfo struct {
	// UUID and Port are the device and the port the tunnel reached.
	UUID string
	Port uint16
	// Via is where it went: "local" for a device of this host's, else
	// "service instance <id>", the peer it was forwarded to.
	Via string
	// Duration is how long it was open, from the CONNECT's 200.
	Duration time.Duration
	// BytesToDevice and BytesFromDevice are the bytes it carried each way.
	BytesToDevice, BytesFromDevice int64
	// Err is why it failed, or nil for a tunnel that ended normally
	// (either side closed, or the proxy closed it: idle, shut down).
	Err error
}

func (t *tunnel) logEnd() {
	log := t.h.logger()
	msg, level := "connectproxy: tunnel closed", slog.LevelDebug
	switch {
	case t.err != nil:
		msg, level = "connectproxy: tunnel failed", slog.LevelInfo
	case t.idleFor.Load() > 0:
		msg, level = "connectproxy: tunnel closed when idle", slog.LevelInfo
	}
	if !log.Enabled(context.Background(), level) {
		return // the attributes cost more than the tunnel's end
	}
	attrs := []any{"uuid", t.uuid, "port", t.port, "via", t.via, "duration", time.Since(t.begin).Round(time.Millisecond),
		"bytes_up", t.bytes[toDevice], "bytes_down", t.bytes[fromDevice]}
	switch {
	case t.err != nil:
		attrs = append(attrs, "err", t.err)
	case t.idleFor.Load() > 0:
		attrs = append(attrs, "idle", time.Duration(t.idleFor.Load()))
	}
	log.Log(context.Background(), level, msg, attrs...)
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
		h.waitGoroutines()
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
	h.waitGoroutines()
	return ctx.Err()
}

// waitGoroutines waits for the goroutines of ended tunnels' poller and idle sweep.
func (h *Handler) waitGoroutines() {
	h.poll.wg.Wait()
	h.sweeps.Wait()
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
