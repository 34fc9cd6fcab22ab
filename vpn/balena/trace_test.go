package balena_test

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"sync"
	"testing"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/obvpn/obvpn/vpn/balena"
)

// headerAPI answers every endpoint with one body that each call accepts,
// and records each request's traceparent header.
func headerAPI(t *testing.T) (*httptest.Server, func() []string) {
	t.Helper()
	var mu sync.Mutex
	var got []string
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		mu.Lock()
		got = append(got, r.Header.Get("traceparent"))
		mu.Unlock()
		io.WriteString(w, `{"id":7,"d":[{"id":7,"ip_address":"192.0.2.7"}]}`)
	}))
	t.Cleanup(ts.Close)
	return ts, func() []string {
		mu.Lock()
		defer mu.Unlock()
		return append([]string(nil), got...)
	}
}

// calls makes every call of the client once, each with its span name.
var calls = []struct {
	span string
	call func(ctx context.Context, c *balena.Client) error
}{
	{"GET /services/vpn/auth/{uuid}", func(ctx context.Context, c *balena.Client) error {
		_, err := c.DeviceAuth(ctx, uuid, "devkey")
		return err
	}},
	{"POST /services/vpn/client-connect", func(ctx context.Context, c *balena.Client) error {
		return c.ReportState(ctx, 7, []string{uuid}, true)
	}},
	{"POST /services/vpn/client-disconnect", func(ctx context.Context, c *balena.Client) error {
		return c.ReportState(ctx, 7, []string{uuid}, false)
	}},
	{"POST /v7/service_instance", func(ctx context.Context, c *balena.Client) error {
		_, err := c.RegisterService(ctx, netip.MustParseAddr("192.0.2.7"))
		return err
	}},
	{"PATCH /v7/service_instance({id})", func(ctx context.Context, c *balena.Client) error {
		return c.Heartbeat(ctx, 7)
	}},
	{"POST /v7/device(uuid=@uuid)/canAccess", func(ctx context.Context, c *balena.Client) error {
		_, _, err := c.CanAccess(ctx, uuid, 22, "userkey")
		return err
	}},
	{"GET /v7/device(@id)", func(ctx context.Context, c *balena.Client) error {
		_, err := c.DeviceOnline(ctx, 7)
		return err
	}},
	{"GET /v7/service_instance", func(ctx context.Context, c *balena.Client) error {
		_, _, _, err := c.LocateDevice(ctx, uuid, "userkey")
		return err
	}},
}

// TestTraceparentSDK: with an SDK provider, as the commands install it,
// every call is a client span and carries its traceparent, even without a
// trace in the caller's context; a call inside a span is its child.
func TestTraceparentSDK(t *testing.T) {
	ts, got := headerAPI(t)
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	t.Cleanup(func() { _ = tp.Shutdown(context.Background()) })
	hc := ts.Client()
	base := hc.Transport
	c := &balena.Client{BaseURL: ts.URL, ServiceKey: "svc", HTTPClient: hc, RetryMax: -1,
		TracerProvider: tp, Propagator: propagation.TraceContext{}}

	for i, tc := range calls {
		if err := tc.call(context.Background(), c); err != nil {
			t.Fatalf("%s: %v", tc.span, err)
		}
		sc := extract(got()[i])
		if !sc.IsValid() || !sc.IsSampled() {
			t.Fatalf("%s: traceparent %q, want a valid sampled one", tc.span, got()[i])
		}
		spans := rec.Ended()
		s := spans[len(spans)-1]
		if s.Name() != tc.span || s.SpanKind() != trace.SpanKindClient {
			t.Errorf("span %q (%v), want %q (client)", s.Name(), s.SpanKind(), tc.span)
		}
		if s.SpanContext().SpanID() != sc.SpanID() || s.SpanContext().TraceID() != sc.TraceID() {
			t.Errorf("%s: traceparent %q is not the client span's %v", tc.span, got()[i], s.SpanContext())
		}
	}
	if hc.Transport != base {
		t.Error("the caller's HTTPClient was changed")
	}

	// Inside a span: the request is its child, in its trace.
	ctx, parent := tp.Tracer("test").Start(context.Background(), "parent")
	if err := calls[0].call(ctx, c); err != nil {
		t.Fatal(err)
	}
	parent.End()
	h := got()
	sc := extract(h[len(h)-1])
	if sc.TraceID() != parent.SpanContext().TraceID() {
		t.Errorf("trace %v, want the parent's %v", sc.TraceID(), parent.SpanContext().TraceID())
	}
	spans := rec.Ended()
	if child := spans[len(spans)-2]; child.Parent().SpanID() != parent.SpanContext().SpanID() {
		t.Errorf("the request's span has parent %v, want %v", child.Parent().SpanID(), parent.SpanContext().SpanID())
	}
}

// TestTraceparentGlobal: with nil fields the client uses OpenTelemetry's
// globals. The global no-op provider makes no spans of its own, so a call
// without a trace carries no traceparent, and a call in a trace that came
// from elsewhere (a remote parent) passes that trace on.
func TestTraceparentGlobal(t *testing.T) {
	prev := otel.GetTextMapPropagator()
	otel.SetTextMapPropagator(propagation.TraceContext{})
	t.Cleanup(func() { otel.SetTextMapPropagator(prev) })

	ts, got := headerAPI(t)
	c := &balena.Client{BaseURL: ts.URL, ServiceKey: "svc", HTTPClient: ts.Client(), RetryMax: -1}
	if err := calls[1].call(context.Background(), c); err != nil {
		t.Fatal(err)
	}
	if h := got()[0]; h != "" {
		t.Errorf("no-op provider, no trace: traceparent %q, want none", h)
	}

	const remote = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
	ctx := propagation.TraceContext{}.Extract(context.Background(), propagation.MapCarrier{"traceparent": remote})
	for _, tc := range calls {
		if err := tc.call(ctx, c); err != nil {
			t.Fatalf("%s: %v", tc.span, err)
		}
	}
	for i, h := range got()[1:] {
		if h != remote {
			t.Errorf("%s: traceparent %q, want the remote parent's %q", calls[i].span, h, remote)
		}
	}
}

// extract parses a traceparent header.
func extract(h string) trace.SpanContext {
	ctx := propagation.TraceContext{}.Extract(context.Background(), propagation.MapCarrier{"traceparent": h})
	return trace.SpanContextFromContext(ctx)
}
