// Package otlptest is an in-memory OpenTelemetry trace receiver for
// tests: it serves OTLP/HTTP's POST /v1/traces (protobuf, optionally
// gzip-compressed), as a collector does, and keeps the spans it receives
// so that a test can look at them or wait for them.
//
// Use [NewServer] for a receiver on a loopback httptest server, or [New]
// and serve the [Receiver] (an http.Handler) on a listener of your own,
// such as one inside a network namespace. Point an exporter at it with
// OTEL_EXPORTER_OTLP_ENDPOINT=<URL> (the exporter appends /v1/traces), or
// otlptracehttp.WithEndpointURL(<URL>+"/v1/traces").
//
// It is not a collector: it speaks neither gRPC nor OTLP/JSON, and it
// keeps only what tests look at (names, ids, kinds, attributes as text,
// status, the resource's attributes).
package otlptest

import (
	"compress/gzip"
	"context"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"testing"

	collectortrace "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/protobuf/proto"
)

// Span is a span as the receiver got it.
type Span struct {
	// Name is the span's name.
	Name string
	// TraceID, SpanID and ParentSpanID are lower-case hex; ParentSpanID
	// is empty for a root span.
	TraceID, SpanID, ParentSpanID string
	// Kind is the span kind: "internal", "server", "client", "producer",
	// "consumer", or "unspecified".
	Kind string
	// Attributes holds the span's attributes, each value as text
	// (strconv's formatting for numbers and booleans).
	Attributes map[string]string
	// Error reports a span whose status is Error; StatusMessage is the
	// status's description.
	Error         bool
	StatusMessage string
	// Events names the span's events, in order ("exception" for a
	// recorded error).
	Events []string
	// Resource holds the attributes of the span's resource, such as
	// service.name.
	Resource map[string]string
	// Scope is the name of the instrumentation scope (the tracer).
	Scope string
}

// Receiver receives OTLP/HTTP trace exports. The zero value is not
// usable; call [New]. It is safe for concurrent use.
type Receiver struct {
	mu       sync.Mutex
	spans    []Span
	exports  int
	failures int
	changed  chan struct{} // closed and replaced when spans arrive
}

// New returns an empty receiver.
func New() *Receiver {
	return &Receiver{changed: make(chan struct{})}
}

// Server is a Receiver served by an httptest server on loopback.
type Server struct {
	*Receiver
	// URL is the server's base URL, "http://127.0.0.1:<port>": the value
	// of OTEL_EXPORTER_OTLP_ENDPOINT (the exporter appends /v1/traces).
	URL string

	ts *httptest.Server
}

// NewServer starts a receiver on loopback, closed when the test ends.
func NewServer(tb testing.TB) *Server {
	tb.Helper()
	r := New()
	ts := httptest.NewServer(r)
	tb.Cleanup(ts.Close)
	return &Server{Receiver: r, URL: ts.URL, ts: ts}
}

// Close stops the server. It may be called more than once.
func (s *Server) Close() { s.ts.Close() }

// maxBody bounds an export request's body.
const maxBody = 32 << 20

// ServeHTTP serves POST /v1/traces.
func (r *Receiver) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	if req.URL.Path != "/v1/traces" {
		http.NotFound(w, req)
		return
	}
	if req.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		http.Error(w, "Method Not Allowed", http.StatusMethodNotAllowed)
		return
	}
	if ct := req.Header.Get("Content-Type"); ct != "application/x-protobuf" {
		r.fail()
		http.Error(w, "want Content-Type application/x-protobuf, got "+strconv.Quote(ct), http.StatusUnsupportedMediaType)
		return
	}
	body := io.Reader(req.Body)
	if req.Header.Get("Content-Encoding") == "gzip" {
		zr, err := gzip.NewReader(req.Body)
		if err != nil {
			r.fail()
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		defer zr.Close()
		body = zr
	}
	b, err := io.ReadAll(io.LimitReader(body, maxBody))
	if err != nil {
		r.fail()
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	spans, err := Decode(b)
	if err != nil {
		r.fail()
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	r.mu.Lock()
	r.spans = append(r.spans, spans...)
	r.exports++
	close(r.changed)
	r.changed = make(chan struct{})
	r.mu.Unlock()

	out, _ := proto.Marshal(&collectortrace.ExportTraceServiceResponse{})
	w.Header().Set("Content-Type", "application/x-protobuf")
	_, _ = w.Write(out)
}

func (r *Receiver) fail() {
	r.mu.Lock()
	r.failures++
	r.mu.Unlock()
}

// Decode decodes the body of an OTLP/HTTP trace export
// (ExportTraceServiceRequest, protobuf).
func Decode(b []byte) ([]Span, error) {
	var req collectortrace.ExportTraceServiceRequest
	if err := proto.Unmarshal(b, &req); err != nil {
		return nil, fmt.Errorf("otlptest: decoding the export: %w", err)
	}
	var out []Span
	for _, rs := range req.GetResourceSpans() {
		res := attrs(rs.GetResource().GetAttributes())
		for _, ss := range rs.GetScopeSpans() {
			for _, s := range ss.GetSpans() {
				sp := Span{
					Name:          s.GetName(),
					TraceID:       hex.EncodeToString(s.GetTraceId()),
					SpanID:        hex.EncodeToString(s.GetSpanId()),
					ParentSpanID:  hex.EncodeToString(s.GetParentSpanId()),
					Kind:          kind(s.GetKind()),
					Attributes:    attrs(s.GetAttributes()),
					Error:         s.GetStatus().GetCode() == tracepb.Status_STATUS_CODE_ERROR,
					StatusMessage: s.GetStatus().GetMessage(),
					Resource:      res,
					Scope:         ss.GetScope().GetName(),
				}
				for _, e := range s.GetEvents() {
					sp.Events = append(sp.Events, e.GetName())
				}
				out = append(out, sp)
			}
		}
	}
	return out, nil
}

func kind(k tracepb.Span_SpanKind) string {
	switch k {
	case tracepb.Span_SPAN_KIND_INTERNAL:
		return "internal"
	case tracepb.Span_SPAN_KIND_SERVER:
		return "server"
	case tracepb.Span_SPAN_KIND_CLIENT:
		return "client"
	case tracepb.Span_SPAN_KIND_PRODUCER:
		return "producer"
	case tracepb.Span_SPAN_KIND_CONSUMER:
		return "consumer"
	}
	return "unspecified"
}

func attrs(kvs []*commonpb.KeyValue) map[string]string {
	m := make(map[string]string, len(kvs))
	for _, kv := range kvs {
		m[kv.GetKey()] = value(kv.GetValue())
	}
	return m
}

func value(v *commonpb.AnyValue) string {
	switch x := v.GetValue().(type) {
	case *commonpb.AnyValue_StringValue:
		return x.StringValue
	case *commonpb.AnyValue_BoolValue:
		return strconv.FormatBool(x.BoolValue)
	case *commonpb.AnyValue_IntValue:
		return strconv.FormatInt(x.IntValue, 10)
	case *commonpb.AnyValue_DoubleValue:
		return strconv.FormatFloat(x.DoubleValue, 'g', -1, 64)
	case *commonpb.AnyValue_BytesValue:
		return hex.EncodeToString(x.BytesValue)
	case *commonpb.AnyValue_ArrayValue:
		s := "["
		for i, e := range x.ArrayValue.GetValues() {
			if i > 0 {
				s += ","
			}
			s += value(e)
		}
		return s + "]"
	}
	return ""
}

// Spans returns the spans received so far, in the order they came.
func (r *Receiver) Spans() []Span {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Span(nil), r.spans...)
}

// Exports returns the number of export requests received and decoded.
func (r *Receiver) Exports() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.exports
}

// Failures returns the number of export requests refused (wrong content
// type, malformed body).
func (r *Receiver) Failures() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.failures
}

// WaitFor waits until done, called with every span received so far each
// time more arrive, returns true, and returns those spans; or until ctx
// ends, and returns the spans and ctx's error.
func (r *Receiver) WaitFor(ctx context.Context, done func([]Span) bool) ([]Span, error) {
	for {
		r.mu.Lock()
		spans, changed := append([]Span(nil), r.spans...), r.changed
		r.mu.Unlock()
		if done(spans) {
			return spans, nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return spans, ctx.Err()
		}
	}
}

// Named returns the spans called name.
func Named(spans []Span, name string) []Span {
	var out []Span
	for _, s := range spans {
		if s.Name == name {
			out = append(out, s)
		}
	}
	return out
}
