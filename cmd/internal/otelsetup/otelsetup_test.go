package otelsetup_test

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/obvpn/obvpn/cmd/internal/otelsetup"
	"github.com/obvpn/obvpn/vpn/balena"
	"github.com/obvpn/obvpn/vpn/vpntest/otlptest"
)

// otelVars are the variables a test may set; each test starts with all of
// them empty.
var otelVars = []string{"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
	"OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_SDK_DISABLED", "OTEL_TRACES_SAMPLER",
	"OTEL_TRACES_SAMPLER_ARG", "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_PROTOCOL",
	"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"}

// setup runs Setup with env and, when the test ends, leaves
// OpenTelemetry's globals as a process starts with them: a no-op
// provider and propagator.
func setup(t *testing.T, env map[string]string) (*otelsetup.Telemetry, error) {
	t.Helper()
	for _, k := range otelVars {
		t.Setenv(k, env[k])
	}
	t.Cleanup(func() {
		otel.SetTracerProvider(noop.NewTracerProvider())
		otel.SetTextMapPropagator(propagation.NewCompositeTextMapPropagator())
	})
	tel, err := otelsetup.Setup(context.Background(), otelsetup.Options{})
	if tel != nil {
		t.Cleanup(func() { _ = tel.Shutdown(context.Background()) })
	}
	return tel, err
}

// fakeAPI records the traceparent header of each request.
func fakeAPI(t *testing.T) (*balena.Client, func() []string) {
	t.Helper()
	var mu sync.Mutex
	var got []string
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		got = append(got, r.Header.Get("traceparent"))
		mu.Unlock()
		io.WriteString(w, "OK")
	}))
	t.Cleanup(ts.Close)
	// Nil TracerProvider and Propagator: the globals that Setup installed.
	c := &balena.Client{BaseURL: ts.URL, ServiceKey: "svc", HTTPClient: ts.Client(), RetryMax: -1}
	return c, func() []string {
		mu.Lock()
		defer mu.Unlock()
		return append([]string(nil), got...)
	}
}

func parse(h string) trace.SpanContext {
	ctx := propagation.TraceContext{}.Extract(context.Background(), propagation.MapCarrier{"traceparent": h})
	return trace.SpanContextFromContext(ctx)
}

// TestExport: with OTEL_EXPORTER_OTLP_ENDPOINT, the spans reach the
// receiver over OTLP/HTTP, at the latest when Shutdown flushes them, with
// the service name and the resource attributes of the environment.
func TestExport(t *testing.T) {
	rcv := otlptest.NewServer(t)
	tel, err := setup(t, map[string]string{
		"OTEL_EXPORTER_OTLP_ENDPOINT": rcv.URL,
		"OTEL_RESOURCE_ATTRIBUTES":    "deployment.environment=test,service.namespace=balena",
	})
	if err != nil {
		t.Fatal(err)
	}
	if !tel.Exporting || tel.Endpoint != rcv.URL {
		t.Errorf("Exporting %v to %q, want true to %q", tel.Exporting, tel.Endpoint, rcv.URL)
	}
	api, got := fakeAPI(t)
	ctx, span := otel.Tracer("test").Start(context.Background(), "test.parent")
	if err := api.ReportState(ctx, 1, []string{"0123"}, true); err != nil {
		t.Fatal(err)
	}
	span.End()
	sc := parse(got()[0])
	if !sc.IsValid() || !sc.IsSampled() || sc.TraceID() != span.SpanContext().TraceID() {
		t.Fatalf("traceparent %q, want one of trace %v, sampled", got()[0], span.SpanContext().TraceID())
	}

	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := tel.Shutdown(sctx); err != nil {
		t.Fatal(err)
	}
	spans := rcv.Spans()
	if len(spans) != 2 {
		t.Fatalf("%d spans received, want 2: %+v", len(spans), spans)
	}
	client := otlptest.Named(spans, "POST /services/vpn/client-connect")
	parent := otlptest.Named(spans, "test.parent")
	if len(client) != 1 || len(parent) != 1 {
		t.Fatalf("spans %+v, want the parent and the client span", spans)
	}
	if client[0].ParentSpanID != parent[0].SpanID || client[0].SpanID != sc.SpanID().String() || client[0].Kind != "client" {
		t.Errorf("client span %+v: want the parent's child, with the traceparent's span id %v", client[0], sc.SpanID())
	}
	for k, want := range map[string]string{"service.name": "open-balena-vpn", "deployment.environment": "test",
		"service.namespace": "balena", "telemetry.sdk.language": "go"} {
		if got := parent[0].Resource[k]; got != want {
			t.Errorf("resource %s = %q, want %q", k, got, want)
		}
	}
	if rcv.Failures() != 0 {
		t.Errorf("%d exports refused", rcv.Failures())
	}
}

// TestNoEndpoint: without an endpoint nothing is exported, yet the API
// calls carry a valid, sampled traceparent, even outside any trace.
func TestNoEndpoint(t *testing.T) {
	tel, err := setup(t, map[string]string{"OTEL_SERVICE_NAME": "vpn-eu1"})
	if err != nil {
		t.Fatal(err)
	}
	if tel.Exporting {
		t.Error("exporting without an endpoint")
	}
	api, got := fakeAPI(t)
	if err := api.ReportState(context.Background(), 1, []string{"0123"}, true); err != nil {
		t.Fatal(err)
	}
	if sc := parse(got()[0]); !sc.IsValid() || !sc.IsSampled() {
		t.Errorf("traceparent %q, want a valid sampled one", got()[0])
	}
	if err := tel.Shutdown(context.Background()); err != nil {
		t.Error(err)
	}
}

// TestSampler: OTEL_TRACES_SAMPLER is the SDK's: always_off exports
// nothing, and the traceparent says "not sampled".
func TestSampler(t *testing.T) {
	rcv := otlptest.NewServer(t)
	tel, err := setup(t, map[string]string{"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": rcv.URL + "/v1/traces",
		"OTEL_TRACES_SAMPLER": "always_off"})
	if err != nil {
		t.Fatal(err)
	}
	api, got := fakeAPI(t)
	if err := api.ReportState(context.Background(), 1, []string{"0123"}, true); err != nil {
		t.Fatal(err)
	}
	if sc := parse(got()[0]); !sc.IsValid() || sc.IsSampled() {
		t.Errorf("traceparent %q, want a valid one, not sampled", got()[0])
	}
	if err := tel.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	if n := len(rcv.Spans()); n != 0 {
		t.Errorf("%d spans exported, want none", n)
	}
}

// TestDisabled: OTEL_SDK_DISABLED installs no SDK; an incoming trace is
// still passed on, and nothing else is.
func TestDisabled(t *testing.T) {
	rcv := otlptest.NewServer(t)
	tel, err := setup(t, map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": rcv.URL, "OTEL_SDK_DISABLED": "true"})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := tel.TracerProvider.(noop.TracerProvider); tel.Exporting || !ok {
		t.Errorf("provider %T, exporting %v: want the no-op provider, not exporting", tel.TracerProvider, tel.Exporting)
	}
	api, got := fakeAPI(t)
	if err := api.ReportState(context.Background(), 1, []string{"0123"}, true); err != nil {
		t.Fatal(err)
	}
	const remote = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
	ctx := otel.GetTextMapPropagator().Extract(context.Background(), propagation.MapCarrier{"traceparent": remote})
	if err := api.ReportState(ctx, 1, []string{"0123"}, true); err != nil {
		t.Fatal(err)
	}
	if h := got(); h[0] != "" || h[1] != remote {
		t.Errorf("traceparents %q, want none, then %q", h, remote)
	}
	if err := tel.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	if rcv.Exports() != 0 {
		t.Error("spans exported with the SDK disabled")
	}
}

// TestErrors: malformed variables are errors that name them.
func TestErrors(t *testing.T) {
	tests := []struct {
		name string
		env  map[string]string
		want string
	}{
		{"disabled", map[string]string{"OTEL_SDK_DISABLED": "maybe"}, "OTEL_SDK_DISABLED"},
		{"resource", map[string]string{"OTEL_RESOURCE_ATTRIBUTES": "novalue"}, "OTEL_RESOURCE_ATTRIBUTES"},
		{"exporter", map[string]string{"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"},
		{"protocol", map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317",
			"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "OTEL_EXPORTER_OTLP_PROTOCOL"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := setup(t, tc.env)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v, want an error naming %s", err, tc.want)
			}
		})
	}
}
