package connectproxy

import (
	"context"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"

	"github.com/obvpn/obvpn/vpn/balena"
	"github.com/obvpn/obvpn/vpn/balena/balenatest"
)

// spanLog is a span processor that keeps the ended spans and lets a test
// wait for them.
type spanLog struct {
	mu      sync.Mutex
	ended   []sdktrace.ReadOnlySpan
	changed chan struct{}
}

func (l *spanLog) OnStart(context.Context, sdktrace.ReadWriteSpan) {}
func (l *spanLog) Shutdown(context.Context) error                  { return nil }
func (l *spanLog) ForceFlush(context.Context) error                { return nil }
func (l *spanLog) OnEnd(s sdktrace.ReadOnlySpan) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.ended = append(l.ended, s)
	close(l.changed)
	l.changed = make(chan struct{})
}

// wait returns the ended spans once done says they are complete; it fails
// the test after 5 s.
func (l *spanLog) wait(t *testing.T, done func([]sdktrace.ReadOnlySpan) bool) []sdktrace.ReadOnlySpan {
	t.Helper()
	deadline := time.NewTimer(5 * time.Second)
	defer deadline.Stop()
	for {
		l.mu.Lock()
		spans, changed := append([]sdktrace.ReadOnlySpan(nil), l.ended...), l.changed
		l.mu.Unlock()
		if done(spans) {
			return spans
		}
		select {
		case <-changed:
		case <-deadline.C:
			t.Fatalf("spans not complete within 5 s: %q", names(spans))
		}
	}
}

func names(spans []sdktrace.ReadOnlySpan) []string {
	var out []string
	for _, s := range spans {
		out = append(out, s.Name())
	}
	sort.Strings(out)
	return out
}

func count(spans []sdktrace.ReadOnlySpan, name string) int {
	n := 0
	for _, s := range spans {
		if s.Name() == name {
			n++
		}
	}
	return n
}

func first(spans []sdktrace.ReadOnlySpan, name string) sdktrace.ReadOnlySpan {
	for _, s := range spans {
		if s.Name() == name {
			return s
		}
	}
	return nil
}

func spanAttrs(s sdktrace.ReadOnlySpan) map[string]string {
	m := map[string]string{}
	for _, kv := range s.Attributes() {
		m[string(kv.Key)] = kv.Value.String()
	}
	return m
}

// traced gives the handler and its balena client an SDK provider whose
// spans log keeps, and the W3C propagator.
func traced(t *testing.T, log *spanLog, hs ...*Handler) {
	t.Helper()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(log))
	t.Cleanup(func() { _ = tp.Shutdown(context.Background()) })
	for _, h := range hs {
		h.TracerProvider, h.Propagator = tp, propagation.TraceContext{}
		c := h.Authorizer.(*balena.Client)
		c.TracerProvider, c.Propagator = tp, propagation.TraceContext{}
	}
}

const (
	callerTrace  = "4bf92f3577b34da6a3ce929d0e0e4736"
	callerSpan   = "00f067aa0ba902b7"
	callerHeader = "traceparent: 00-" + callerTrace + "-" + callerSpan + "-01"
)

// TestConnectSpans: a CONNECT is a connectproxy.connect span in the
// caller's trace, with a child per step; only a 500 is an error.
func TestConnectSpans(t *testing.T) {
	svc := startService(t, echo)
	tests := []struct {
		name   string
		setup  func(w *world)
		header []string
		status string
		steps  []string // the children of connectproxy.connect, sorted
		isErr  bool
	}{
		{"tunnel", nil, []string{"Proxy-Authorization: " + basic("", opKey)}, "200",
			[]string{"connectproxy.access", "connectproxy.dial", "connectproxy.lookup"}, false},
		{"denied", nil, nil, "407", []string{"connectproxy.access"}, false},
		{"offline", func(w *world) { w.res = newResolver(); w.h.Resolver = w.res; w.api.SetOffline(devUUID) },
			[]string{"Proxy-Authorization: " + basic("", opKey)}, "503",
			[]string{"connectproxy.access", "connectproxy.lookup", "connectproxy.online"}, false},
		{"API failure", func(w *world) { w.api.FailNext(balenatest.CanAccess, 3, 500) }, nil, "500",
			[]string{"connectproxy.access"}, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			log := &spanLog{changed: make(chan struct{})}
			w := newWorld(t, func(w *world) { traced(t, log, w.h) })
			w.addDevice(devUUID, svc.port)
			if tc.setup != nil {
				tc.setup(w)
			}
			a := connect(t, w.addr, target(devUUID, svc.port), append(tc.header, callerHeader)...)
			if got := strings.Fields(a.line); len(got) < 2 || got[1] != tc.status {
				t.Fatalf("answer %q, want %s", a.line, tc.status)
			}
			if a.status == 200 {
				a.roundTrip(t, "traced")
			}
			spans := log.wait(t, func(s []sdktrace.ReadOnlySpan) bool { return count(s, "connectproxy.connect") == 1 })
			conn := first(spans, "connectproxy.connect")
			if got := conn.SpanContext().TraceID().String(); got != callerTrace || conn.Parent().SpanID().String() != callerSpan {
				t.Errorf("connect span in trace %s under %s, want the caller's %s under %s", got, conn.Parent().SpanID(), callerTrace, callerSpan)
			}
			at := spanAttrs(conn)
			if at["http.response.status_code"] != tc.status || at["connectproxy.uuid"] != devUUID {
				t.Errorf("connect span attributes %v, want status %s and the uuid", at, tc.status)
			}
			if isErr := conn.Status().Code == codes.Error; isErr != tc.isErr {
				t.Errorf("connect span status %v, want error %v", conn.Status(), tc.isErr)
			}
			var steps []sdktrace.ReadOnlySpan
			for _, s := range spans {
				if s.Parent().SpanID() == conn.SpanContext().SpanID() {
					steps = append(steps, s)
				}
			}
			if got := names(steps); strings.Join(got, " ") != strings.Join(tc.steps, " ") {
				t.Errorf("steps %q, want %q", got, tc.steps)
			}
			// Every API call carried the caller's trace.
			for _, r := range w.api.Requests() {
				if h := r.Header.Get("traceparent"); !strings.HasPrefix(h, "00-"+callerTrace+"-") {
					t.Errorf("%s %s: traceparent %q, not in the caller's trace", r.Method, r.URI, h)
				}
			}
			if s := first(spans, "connectproxy.access"); spanAttrs(s)["connectproxy.cache"] != "miss" {
				t.Errorf("access span attributes %v, want a cache miss", spanAttrs(s))
			}
		})
	}
}

// TestForwardTrace: a CONNECT that A forwards to B carries the trace to
// B (a traceparent under A's forward span), so that B's connect span is
// the forward's child, in the caller's trace.
func TestForwardTrace(t *testing.T) {
	svc := startService(t, echo)
	log := &spanLog{changed: make(chan struct{})}
	p := newPair(t, func(p *pair) { traced(t, log, p.a, p.b) })
	p.onB(devUUID, svc.port)

	a := connect(t, p.addrA, target(devUUID, svc.port), "Proxy-Authorization: "+basic("", opKey), callerHeader)
	if a.status != 200 {
		t.Fatalf("answer %q", a.line)
	}
	a.roundTrip(t, "through two traced proxies")
	spans := log.wait(t, func(s []sdktrace.ReadOnlySpan) bool { return count(s, "connectproxy.connect") == 2 })
	fwd := first(spans, "connectproxy.forward")
	if fwd == nil {
		t.Fatalf("no forward span: %q", names(spans))
	}
	hs := p.headers()
	if len(hs) != 1 {
		t.Fatalf("%d requests reached B", len(hs))
	}
	want := "00-" + callerTrace + "-" + fwd.SpanContext().SpanID().String() + "-01"
	if got := hs[0].Get("traceparent"); got != want {
		t.Errorf("B got traceparent %q, want %q (A's forward span)", got, want)
	}
	var connA, connB sdktrace.ReadOnlySpan
	for _, s := range spans {
		if s.Name() != "connectproxy.connect" {
			continue
		}
		if s.Parent().SpanID() == fwd.SpanContext().SpanID() {
			connB = s
		} else {
			connA = s
		}
	}
	if connB == nil || connA == nil {
		t.Fatal("B's connect span is not the forward's child")
	}
	if fwd.Parent().SpanID() != connA.SpanContext().SpanID() || connA.Parent().SpanID().String() != callerSpan {
		t.Error("the forward is not A's step, or A is not the caller's child")
	}
	if at := spanAttrs(connA); at["connectproxy.via"] == "local" || at["http.response.status_code"] != "200" {
		t.Errorf("A's connect attributes %v, want a forward and 200", at)
	}
	if n := count(spans, "connectproxy.dial"); n != 2 {
		t.Errorf("%d dial spans, want 2 (A to B, B to the device)", n)
	}
	for _, s := range spans {
		if s.SpanContext().TraceID().String() != callerTrace {
			t.Errorf("span %s in trace %s, want %s", s.Name(), s.SpanContext().TraceID(), callerTrace)
		}
	}
}
