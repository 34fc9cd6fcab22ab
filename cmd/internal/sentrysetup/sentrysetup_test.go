package sentrysetup_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/matryer/is"

	"github.com/obvpn/obvpn/cmd/internal/sentrysetup"
	"github.com/obvpn/obvpn/cmd/internal/sentrysetup/sentrytest"
	"github.com/obvpn/obvpn/connectproxy"
	"github.com/obvpn/obvpn/vpn"
)

func TestFingerprintKeyIsTheLibraries(t *testing.T) {
	is := is.New(t)
	is.Equal(sentrysetup.FingerprintKey, vpn.FingerprintKey)
	is.Equal(sentrysetup.FingerprintKey, connectproxy.FingerprintKey)
}

func closeReporter(t *testing.T, r *sentrysetup.Reporter) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if !r.Close(ctx) {
		t.Fatal("events not flushed")
	}
}

// TestNoDSN: without a DSN no SDK runs, the handler is the one given, and
// nothing is sent, even with SENTRY_DSN in the environment (which the SDK
// would read on its own).
func TestNoDSN(t *testing.T) {
	is := is.New(t)
	srv := sentrytest.NewServer(t)
	t.Setenv("SENTRY_DSN", srv.DSN)
	r, err := sentrysetup.Setup(sentrysetup.Options{})
	is.NoErr(err)
	is.True(!r.Enabled())
	var buf bytes.Buffer
	next := slog.NewTextHandler(&buf, nil)
	h := r.Handler(next, "open-balena-vpn")
	is.Equal(h, slog.Handler(next))
	slog.New(h).Error("device state report failed", "err", errors.New("boom"), slog.String(vpn.FingerprintKey, vpn.FingerprintStateUpdate))
	closeReporter(t, r)
	is.True(strings.Contains(buf.String(), "device state report failed"))
	is.Equal(len(srv.Requests()), 0)

	var zero sentrysetup.Reporter
	is.True(!zero.Enabled())
	is.True(zero.Close(context.Background()))
}

func TestBadDSN(t *testing.T) {
	for _, dsn := range []string{"https://SECRETkey@[::1/1", "ftp://SECRETkey@host/1", "https://host/1", "https://SECRETkey@host/"} {
		t.Run(dsn, func(t *testing.T) {
			_, err := sentrysetup.Setup(sentrysetup.Options{DSN: dsn})
			if err == nil {
				t.Fatal("no error")
			}
			if strings.Contains(err.Error(), "SECRET") {
				t.Errorf("the error repeats the DSN's key: %v", err)
			}
		})
	}
}

// apiError is an error of the kind the balena client returns.
type apiError struct{ body string }

func (e *apiError) Error() string { return "balena: POST /services/vpn/client-connect: 500: " + e.body }

// TestEvents logs records as the library packages do, at every level,
// with and without fingerprints, and checks what arrives.
func TestEvents(t *testing.T) {
	is := is.New(t)
	srv := sentrytest.NewServer(t)
	r, err := sentrysetup.Setup(sentrysetup.Options{
		DSN: srv.DSN, Release: "v1.2.3", Environment: "production", ServerName: "vpn-1",
		Secrets: []string{"SECRET-service-key", "SECRET-monitor-token", ""},
	})
	is.NoErr(err)
	is.True(r.Enabled())
	var buf bytes.Buffer
	log := slog.New(r.Handler(slog.NewTextHandler(&buf, nil), "open-balena-vpn")).With("instance", 2)

	cause := &apiError{body: `{"message":"bad","api_key":"SECRET-json-field"} sent with Bearer SECRET-device-key to https://u:SECRET-pass@api.example.com/x?apikey=SECRET-query&n=1 (key SECRET-service-key)`}
	err1 := fmt.Errorf("reporting 3 devices: %w", cause)
	log.Warn("device state report failed; will retry", "err", err1, "pending", 3, "retry_in", 10*time.Second,
		slog.String(vpn.FingerprintKey, vpn.FingerprintStateUpdate),
		"api_key", "SECRET-attr", "Authorization", "Basic SECRET-basic",
		slog.Group("req", "url", "http://user:SECRET-group@h/", "password", "SECRET-group-pass"))
	log.WithGroup("proxy").Error("connectproxy: request refused", "err", errors.New("dial tcp 10.0.0.2:3128: connection refused"),
		"status", 500, slog.String(connectproxy.FingerprintKey, connectproxy.FingerprintForward))
	// Not sent: below warn level, or without a fingerprint.
	log.Info("registered", slog.String(vpn.FingerprintKey, vpn.FingerprintServiceRegistration))
	log.Debug("debug", slog.String(vpn.FingerprintKey, vpn.FingerprintServiceRegistration))
	log.Error("could not limit a client's bandwidth", "err", errors.New("tc failed"))
	log.Warn("device authentication: the balena API is busy; device denied", "uuid", "0123")
	closeReporter(t, r)

	// Every record still reaches the next handler, at its level (Info).
	for _, msg := range []string{"device state report failed", "request refused", "registered", "could not limit", "busy"} {
		is.True(strings.Contains(buf.String(), msg))
	}
	is.True(!strings.Contains(buf.String(), "msg=debug"))

	events := srv.Events()
	if len(events) != 2 {
		t.Fatalf("got %d events, want 2: %+v", len(events), events)
	}
	ev, err := srv.WaitFor(context.Background(), sentrytest.Fingerprinted(vpn.FingerprintStateUpdate))
	is.NoErr(err)
	is.Equal(ev.Level, "warning")
	is.Equal(ev.Message, "device state report failed; will retry")
	is.Equal(ev.Logger, "open-balena-vpn")
	is.Equal(ev.Release, "v1.2.3")
	is.Equal(ev.Environment, "production")
	is.Equal(ev.ServerName, "vpn-1")
	is.Equal(ev.Tags["fingerprint"], vpn.FingerprintStateUpdate)
	is.Equal(ev.Tags["instance"], "2")
	fields := ev.Contexts["log"]
	is.Equal(fields["pending"], float64(3))
	is.Equal(fields["retry_in"], "10s")
	is.Equal(fields["instance"], float64(2))
	is.Equal(fields["api_key"], sentrysetup.Filtered)
	is.Equal(fields["Authorization"], sentrysetup.Filtered)
	is.Equal(fields["req.password"], sentrysetup.Filtered)
	is.Equal(fields["req.url"], "http://[Filtered]@h/")
	// The chain, outermost last, scrubbed.
	vals := ev.Exception
	if len(vals) != 2 {
		t.Fatalf("exceptions %+v, want the wrapper and its cause", vals)
	}
	is.Equal(vals[0].Type, "*sentrysetup_test.apiError")
	is.True(strings.HasPrefix(vals[1].Value, "reporting 3 devices: balena: POST /services/vpn/client-connect: 500: "))
	for _, want := range []string{`"api_key":"[Filtered]"`, "Bearer [Filtered]", "https://[Filtered]@api.example.com/x?apikey=[Filtered]&n=1", "(key [Filtered])"} {
		is.True(strings.Contains(vals[1].Value, want))
	}

	ev, err = srv.WaitFor(context.Background(), sentrytest.Fingerprinted(connectproxy.FingerprintForward))
	is.NoErr(err)
	is.Equal(ev.Level, "error")
	is.Equal(ev.Tags["fingerprint"], connectproxy.FingerprintForward)
	is.Equal(ev.Contexts["log"]["proxy.status"], float64(500))
	is.Equal(ev.Contexts["log"]["instance"], float64(2)) // set before the group

	// No secret anywhere: not in the events, not in the envelopes.
	for _, req := range srv.Requests() {
		if bytes.Contains(req.Body, []byte("SECRET")) {
			t.Errorf("an envelope holds a secret:\n%s", req.Body)
		}
		for k, v := range req.Header {
			if strings.Contains(strings.Join(v, " "), "SECRET") {
				t.Errorf("header %s holds a secret: %q", k, v)
			}
		}
	}
	is.Equal(srv.Failures(), 0)
}

// TestConcurrentLogging logs from many goroutines (run with -race).
func TestConcurrentLogging(t *testing.T) {
	srv := sentrytest.NewServer(t)
	r, err := sentrysetup.Setup(sentrysetup.Options{DSN: srv.DSN})
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(r.Handler(slog.DiscardHandler, "connect-proxy"))
	done := make(chan struct{})
	for i := range 8 {
		go func() {
			defer func() { done <- struct{}{} }()
			l := log.With("worker", i)
			for j := range 5 {
				l.Error("failed", "n", j, "err", errors.New("x"), slog.String(sentrysetup.FingerprintKey, "proxy-tunnel-error"))
			}
		}()
	}
	for range 8 {
		<-done
	}
	closeReporter(t, r)
	if n := len(srv.Events()); n != 40 {
		t.Errorf("got %d events, want 40", n)
	}
}

// TestCloseBounded: an endpoint that does not answer holds Close no
// longer than its context.
func TestCloseBounded(t *testing.T) {
	release := make(chan struct{})
	hung := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	t.Cleanup(hung.Close)
	t.Cleanup(func() { close(release) }) // before hung.Close, which waits for the handlers
	r, err := sentrysetup.Setup(sentrysetup.Options{DSN: sentrytest.DSN(strings.TrimPrefix(hung.URL, "http://"))})
	if err != nil {
		t.Fatal(err)
	}
	slog.New(r.Handler(slog.DiscardHandler, "t")).Error("x", slog.String(sentrysetup.FingerprintKey, "api-auth-error"))
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	if r.Close(ctx) {
		t.Error("Close reports the events sent")
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("Close took %v with a 300ms context", d)
	}
}

func TestRelease(t *testing.T) {
	if r := sentrysetup.Release(); r == "" {
		t.Error("empty release")
	}
}
