package vpn

import (
	"context"
	"errors"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/obvpn/obvpn/vpn/balena/balenatest"
	"github.com/obvpn/obvpn/vpn/internalapi"
)

// recorder returns an SDK provider whose ended spans the recorder keeps.
func recorder(t *testing.T) (*sdktrace.TracerProvider, *tracetest.SpanRecorder) {
	t.Helper()
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	t.Cleanup(func() { _ = tp.Shutdown(context.Background()) })
	return tp, rec
}

// attrs returns a span's attributes as text.
func attrs(s sdktrace.ReadOnlySpan) map[string]string {
	m := map[string]string{}
	for _, kv := range s.Attributes() {
		m[string(kv.Key)] = kv.Value.String()
	}
	return m
}

func spansNamed(spans []sdktrace.ReadOnlySpan, name string) []sdktrace.ReadOnlySpan {
	var out []sdktrace.ReadOnlySpan
	for _, s := range spans {
		if s.Name() == name {
			out = append(out, s)
		}
	}
	return out
}

// TestAuthSpans: every Authenticate is a vpn.auth span that says whether
// the cache answered and what the result was; a denial is not an error,
// an API failure is; the key is in no attribute.
func TestAuthSpans(t *testing.T) {
	tp, rec := recorder(t)
	api := &fakeAuthAPI{answers: map[string]func() (bool, error){
		"0123": func() (bool, error) { return false, errors.New("balena: 500 Internal Server Error") },
	}}
	a := &Authenticator{API: api, CacheTimeout: time.Minute, TracerProvider: tp}
	ctx := context.Background()
	tests := []struct {
		name, uuid, key string
		cache, result   string
		isErr           bool
	}{
		{"first check", uuidA, "good", "miss", "allow", false},
		{"cached", uuidA, "good", "hit", "allow", false},
		{"denied", uuidA, "bad-SECRET", "miss", "deny", false},
		{"denied, cached", uuidA, "bad-SECRET", "hit", "deny", false},
		{"API failure", "0123", "good", "miss", "error", true},
		{"malformed", "not-a-uuid", "good", "", "deny", false},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, _ = a.Authenticate(ctx, tc.uuid, tc.key)
			spans := rec.Ended()
			if len(spans) != i+1 {
				t.Fatalf("%d spans, want %d", len(spans), i+1)
			}
			s := spans[i]
			got := attrs(s)
			if s.Name() != "vpn.auth" || got["vpn.auth.cache"] != tc.cache || got["vpn.auth.result"] != tc.result {
				t.Errorf("span %s %v, want vpn.auth with cache %q, result %q", s.Name(), got, tc.cache, tc.result)
			}
			if isErr := s.Status().Code == codes.Error; isErr != tc.isErr {
				t.Errorf("status %v, want error %v", s.Status(), tc.isErr)
			}
			if tc.isErr && (len(s.Events()) == 0 || s.Events()[0].Name != "exception") {
				t.Errorf("events %v, want the error recorded", s.Events())
			}
			for k, v := range got {
				if strings.Contains(v, "SECRET") || strings.Contains(v, "good") {
					t.Errorf("attribute %s = %q holds the key", k, v)
				}
			}
		})
	}
}

// TestInternalAPITrace: a script-mode auth request is a server span in the
// trace its traceparent names; the authentication is its child, and the
// balena API request is the authentication's child and carries the trace
// to the API.
func TestInternalAPITrace(t *testing.T) {
	tp, rec := recorder(t)
	prop := propagation.TraceContext{}
	bt := balenatest.NewServer(t)
	dev := bt.AddDevice(balenatest.Device{UUID: uuidA, Key: "device-key"})
	client := bt.Client()
	client.TracerProvider, client.Propagator = tp, prop
	api := &internalapi.Server{Auth: &Authenticator{API: client, TracerProvider: tp}, TracerProvider: tp, Propagator: prop}

	const traceID, parentID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
	r := httptest.NewRequest("POST", "/api/v1/auth/", strings.NewReader(`{"username":"`+dev.UUID+`","password":"device-key"}`))
	r.RemoteAddr = "127.0.0.1:1234"
	r.Header.Set("traceparent", "00-"+traceID+"-"+parentID+"-01")
	w := httptest.NewRecorder()
	api.ServeHTTP(w, r)
	if w.Code != 200 {
		t.Fatalf("status %d, want 200", w.Code)
	}
	// /ping is no span.
	pr := httptest.NewRequest("GET", "/ping", nil)
	pr.RemoteAddr = "127.0.0.1:1234"
	pw := httptest.NewRecorder()
	api.ServeHTTP(pw, pr)
	if w := pw; w.Code != 200 {
		t.Fatalf("/ping: %d", w.Code)
	}

	spans := rec.Ended()
	server, auth, call := spansNamed(spans, "POST /api/v1/auth/"), spansNamed(spans, "vpn.auth"), spansNamed(spans, "GET /services/vpn/auth/{uuid}")
	if len(server) != 1 || len(auth) != 1 || len(call) != 1 || len(spans) != 3 {
		names := []string{}
		for _, s := range spans {
			names = append(names, s.Name())
		}
		t.Fatalf("spans %q, want the request's, vpn.auth and the API call", names)
	}
	if got := server[0].SpanContext().TraceID().String(); got != traceID {
		t.Errorf("server span in trace %s, want the caller's %s", got, traceID)
	}
	if got := server[0].Parent().SpanID().String(); got != parentID || !server[0].Parent().IsRemote() {
		t.Errorf("server span's parent %s, want the caller's %s (remote)", got, parentID)
	}
	if auth[0].Parent().SpanID() != server[0].SpanContext().SpanID() {
		t.Error("vpn.auth is not the request's child")
	}
	if call[0].Parent().SpanID() != auth[0].SpanContext().SpanID() {
		t.Error("the API call is not vpn.auth's child")
	}
	var sent string
	for _, req := range bt.Requests() {
		if req.Endpoint == balenatest.DeviceAuth {
			sent = req.Header.Get("traceparent")
		}
	}
	if want := "00-" + traceID + "-" + call[0].SpanContext().SpanID().String() + "-01"; sent != want {
		t.Errorf("the API got traceparent %q, want %q", sent, want)
	}
}

// TestReporterSpans: each batch of a pass is a vpn.state.report span with
// its size and direction; a failed batch is an error.
func TestReporterSpans(t *testing.T) {
	tp, rec := recorder(t)
	api := newFakeStateAPI()
	r := &Reporter{API: api, ServiceID: func() int64 { return 7 }, BatchSize: 2, TracerProvider: tp}
	for _, u := range []string{"01", "02", "03", "04"} {
		r.Set(u, st(true))
	}
	if err := r.pass(context.Background()); err != nil {
		t.Fatal(err)
	}
	r.Set("04", st(false))
	if err := r.pass(context.Background()); err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, s := range spansNamed(rec.Ended(), "vpn.state.report") {
		a := attrs(s)
		got = append(got, a["vpn.state.uuids"]+"/"+a["vpn.state.connected"]+"/"+a["vpn.service.id"])
	}
	if want := []string{"2/true/7", "2/true/7", "1/false/7"}; strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("batches %q, want %q", got, want)
	}

	api.mu.Lock()
	api.fail = func() error { return errors.New("503 Service Unavailable") }
	api.mu.Unlock()
	r.Set("05", st(true))
	if err := r.pass(context.Background()); err == nil {
		t.Fatal("a failed pass without an error")
	}
	spans := rec.Ended()
	if s := spans[len(spans)-1]; s.Status().Code != codes.Error {
		t.Errorf("failed batch's status %v, want Error", s.Status())
	}
}

// TestServiceSpans: each registration attempt and each heartbeat is a
// span; a failed registration is an error.
func TestServiceSpans(t *testing.T) {
	tp, rec := recorder(t)
	api := &fakeServiceAPI{failures: 1, beats: make(chan int64, 10)}
	s := &Service{API: api, Interval: time.Millisecond, TracerProvider: tp}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	<-api.beats
	<-api.beats
	cancel()
	<-done

	reg := spansNamed(rec.Ended(), "vpn.service.register")
	if len(reg) != 2 || reg[0].Status().Code != codes.Error || reg[1].Status().Code == codes.Error {
		t.Fatalf("%d registration spans, want a failed one and a good one", len(reg))
	}
	if id := attrs(reg[1])["vpn.service.id"]; id != "42" {
		t.Errorf("registration attributes %v, want vpn.service.id 42", reg[1].Attributes())
	}
	if beats := spansNamed(rec.Ended(), "vpn.service.heartbeat"); len(beats) < 2 {
		t.Errorf("%d heartbeat spans, want at least 2", len(beats))
	}
}
