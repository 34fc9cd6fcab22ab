package vpn_test

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/matryer/is"

	"github.com/obvpn/obvpn/vpn"
	"github.com/obvpn/obvpn/vpn/balena"
	"github.com/obvpn/obvpn/vpn/balena/balenatest"
	"github.com/obvpn/obvpn/vpn/hook"
	"github.com/obvpn/obvpn/vpn/internalapi"
)

// productionClient is a client of api with the settings the server gives
// its own (Server.API nil): retries on.
func productionClient(api *balenatest.Server) *balena.Client {
	return &balena.Client{BaseURL: api.URL, ServiceKey: api.ServiceKey, GuestKey: api.GuestKey}
}

// syncBuffer is a log sink that tests read while the code under test
// writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestAuthBusy: a 503 from the balena API to a device authentication is
// an answer, "busy, try later", with the production client (retries on):
// one request, the device denied after DelayOnAuthFail like any denial,
// the answer not cached, the error one that callers can tell
// (vpn.ErrAPIBusy), logged at info level and without the key.
func TestAuthBusy(t *testing.T) {
	is := is.New(t)
	api := balenatest.NewServer(t)
	d := api.AddDevice(balenatest.Device{UUID: "0123456789abcdef0123456789abcdef", Key: "device-secret"})
	var logs syncBuffer
	log := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	auth := &vpn.Authenticator{API: productionClient(api), CacheTimeout: time.Minute, MaxInFlight: 1, Logger: log}
	const delay = 300 * time.Millisecond
	internal := &internalapi.Server{Auth: auth, DelayOnAuthFail: delay, Logger: log}
	srv := httptest.NewServer(internal)
	t.Cleanup(srv.Close)
	client := &hook.Client{BaseURL: srv.URL}
	ctx := context.Background()

	api.FailNext(balenatest.DeviceAuth, 1, http.StatusServiceUnavailable)
	ok, err := auth.Authenticate(ctx, d.UUID, d.Key)
	is.True(!ok)
	is.True(errors.Is(err, vpn.ErrAPIBusy))
	is.Equal(api.Calls(balenatest.DeviceAuth), 1) // not retried

	api.FailNext(balenatest.DeviceAuth, 1, http.StatusServiceUnavailable)
	start := time.Now()
	err = client.Auth(ctx, d.UUID, d.Key)
	took := time.Since(start)
	is.True(errors.Is(err, hook.ErrDenied))
	is.Equal(api.Calls(balenatest.DeviceAuth), 2) // asked again: the first 503 was not cached
	if took < delay {
		t.Errorf("denied after %v, want DelayOnAuthFail (%v) first", took, delay)
	}

	// The only place among the checks in flight is free again at once:
	// the next check is answered without waiting for a retry.
	start = time.Now()
	is.NoErr(client.Auth(ctx, d.UUID, d.Key))
	is.Equal(api.Calls(balenatest.DeviceAuth), 3)
	if took := time.Since(start); took > delay {
		t.Errorf("allowed after %v", took)
	}

	out := logs.String()
	if !strings.Contains(out, "level=INFO msg=\"device authentication: the balena API is busy") {
		t.Errorf("the busy API is not logged at info level:\n%s", out)
	}
	if strings.Contains(out, "level=WARN") || strings.Contains(out, "level=ERROR") {
		t.Errorf("a busy API is logged as a fault:\n%s", out)
	}
	if strings.Contains(out, d.Key) {
		t.Errorf("a key was logged:\n%s", out)
	}
}
