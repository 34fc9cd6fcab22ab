package connectproxy

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"
)

// signature returns this server's mark in the Forwarded header.
func (h *Handler) signature() string {
	return "By=open-balena-vpn(" + strconv.FormatInt(h.ServiceID, 10) + ")"
}

// forwardedBy reports whether the Forwarded header values hold the
// signature of the service instance id: a "by" parameter (in any case,
// quoted or not) whose value is "open-balena-vpn(<id>)".
func forwardedBy(values []string, id int64) bool {
	want := "open-balena-vpn(" + strconv.FormatInt(id, 10) + ")"
	for _, v := range values {
		for elem := range strings.SplitSeq(v, ",") {
			for pair := range strings.SplitSeq(elem, ";") {
				name, val, ok := strings.Cut(strings.TrimSpace(pair), "=")
				if !ok || !strings.EqualFold(strings.TrimSpace(name), "by") {
					continue
				}
				val = strings.TrimSpace(val)
				if len(val) >= 2 && val[0] == '"' && val[len(val)-1] == '"' {
					val = val[1 : len(val)-1]
				}
				if val == want {
					return true
				}
			}
		}
	}
	return false
}

// forward asks the proxy of the VPN server at addr, service instance sid,
// for a tunnel to t, and returns the connection and the bytes that came
// with the peer's 200.
func (h *Handler) forward(ctx context.Context, r *http.Request, t Target, key string, sid int64, addr netip.Addr, log reqLog) (_ net.Conn, _ []byte, err error) {
	ctx, span := h.startForward(ctx, sid, addr)
	defer func() { endSpan(span, err) }()
	fwd := r.Header.Values("Forwarded")
	if forwardedBy(fwd, h.ServiceID) {
		return nil, nil, ErrLoop
	}
	port := h.ForwardPort
	if port == 0 {
		if la, ok := r.Context().Value(http.LocalAddrContextKey).(net.Addr); ok {
			if ta, ok := la.(*net.TCPAddr); ok {
				port = ta.Port
			}
		}
	}
	if port == 0 {
		return nil, nil, fmt.Errorf("forwarding to service instance %d: no forward port", sid)
	}
	peer := netip.AddrPortFrom(addr, uint16(port)).String()
	conn, err := h.dial(ctx, peer)
	if err != nil {
		return nil, nil, mark(ctx, FingerprintForward, fmt.Errorf("forwarding to service instance %d at %s: %w", sid, peer, err))
	}
	log.Info("connectproxy: forwarding", "service_instance", sid, "peer", peer)

	d := Dialer{Key: key, Header: h.traceHeader(ctx), Forwarded: append(slices.Clip(fwd), h.signature())}
	req, err := d.request(t.UUID + ".balena:" + strconv.Itoa(int(t.Port)))
	if err == nil {
		var early []byte
		if early, err = handshake(ctx, conn, req); err == nil {
			return conn, early, nil
		}
	}
	conn.Close()
	err = fmt.Errorf("forwarding to service instance %d at %s: %w", sid, peer, err)
	if netFailure(err) {
		// The peer's connection failed (reset, timed out); a peer that
		// refuses (not 200) or hangs up (EOF) answered.
		err = mark(ctx, FingerprintForward, err)
	}
	return nil, nil, err
}

// handshake sends a CONNECT request on conn and reads the answer's head,
// as a Dialer does; a failure is the peer's (ErrPeer). It returns the
// bytes that arrived after the head.
func handshake(ctx context.Context, conn net.Conn, req string) ([]byte, error) {
	early, err := exchange(ctx, conn, req)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrPeer, err)
	}
	return early, nil
}

// ctxErr returns the context's error if the context ended (or its
// deadline passed: the connection's deadline may fire first), else err.
func ctxErr(ctx context.Context, err error) error {
	if e := ctx.Err(); e != nil {
		return e
	}
	if d, ok := ctx.Deadline(); ok && !time.Now().Before(d) {
		return context.DeadlineExceeded
	}
	return err
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}
