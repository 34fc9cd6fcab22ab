package otlptest_test

import (
	"bytes"
	"compress/gzip"
	"context"
	"net/http"
	"testing"
	"time"

	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"

	"github.com/obvpn/obvpn/vpn/vpntest/otlptest"
)

// TestReceiver exports spans with the SDK's OTLP/HTTP exporter, gzip
// compressed, and waits for them.
func TestReceiver(t *testing.T) {
	rcv := otlptest.NewServer(t)
	exp, err := otlptracehttp.New(context.Background(), otlptracehttp.WithEndpointURL(rcv.URL+"/v1/traces"),
		otlptracehttp.WithCompression(otlptracehttp.GzipCompression))
	if err != nil {
		t.Fatal(err)
	}
	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp, sdktrace.WithBatchTimeout(10*time.Millisecond)))
	t.Cleanup(func() { _ = tp.Shutdown(context.Background()) })
	ctx, parent := tp.Tracer("test").Start(context.Background(), "parent")
	_, child := tp.Tracer("test").Start(ctx, "child")
	child.End()
	parent.End()

	wctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	spans, err := rcv.WaitFor(wctx, func(s []otlptest.Span) bool { return len(s) == 2 })
	if err != nil {
		t.Fatalf("%v: %+v", err, spans)
	}
	c, p := otlptest.Named(spans, "child")[0], otlptest.Named(spans, "parent")[0]
	if c.ParentSpanID != p.SpanID || c.TraceID != p.TraceID || p.ParentSpanID != "" || c.Scope != "test" {
		t.Errorf("child %+v, parent %+v", c, p)
	}
}

// TestRefused: a body that is not an OTLP protobuf export is refused and
// counted.
func TestRefused(t *testing.T) {
	rcv := otlptest.NewServer(t)
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write([]byte{0xff, 0xff, 0xff})
	zw.Close()
	for _, tc := range []struct {
		name, ct, ce string
		body         []byte
		want         int
	}{
		{"json", "application/json", "", []byte("{}"), http.StatusUnsupportedMediaType},
		{"garbage", "application/x-protobuf", "", []byte{0xff, 0xff, 0xff}, http.StatusBadRequest},
		{"gzip garbage", "application/x-protobuf", "gzip", gz.Bytes(), http.StatusBadRequest},
		{"empty export", "application/x-protobuf", "", nil, http.StatusOK},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequest("POST", rcv.URL+"/v1/traces", bytes.NewReader(tc.body))
			req.Header.Set("Content-Type", tc.ct)
			if tc.ce != "" {
				req.Header.Set("Content-Encoding", tc.ce)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != tc.want {
				t.Errorf("got %d, want %d", resp.StatusCode, tc.want)
			}
		})
	}
	if rcv.Failures() != 3 || rcv.Exports() != 1 {
		t.Errorf("failures %d, exports %d; want 3 and 1", rcv.Failures(), rcv.Exports())
	}
}

// FuzzDecode: no input makes Decode panic.
func FuzzDecode(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte{0x0a, 0x02, 0x0a, 0x00})
	f.Fuzz(func(t *testing.T, b []byte) {
		_, _ = otlptest.Decode(b)
	})
}
