package vpn

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/obvpn/obvpn/vpn/balena/balenatest"
)

// fpRecorder is a slog.Handler that keeps the fingerprint of every record
// (empty for none), by level.
type fpRecorder struct {
	mu     sync.Mutex
	fps    []string
	lvl    []slog.Level
	logged chan slog.Level // every record's level, if not nil
}

func newFPRecorder() *fpRecorder { return &fpRecorder{logged: make(chan slog.Level, 64)} }

// wait waits for a record at level l or above.
func (r *fpRecorder) wait(t *testing.T, l slog.Level) {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case got := <-r.logged:
			if got >= l {
				return
			}
		case <-timeout:
			t.Fatalf("no record at level %v", l)
		}
	}
}

func (r *fpRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (r *fpRecorder) WithAttrs([]slog.Attr) slog.Handler       { return r }
func (r *fpRecorder) WithGroup(string) slog.Handler            { return r }
func (r *fpRecorder) Handle(_ context.Context, rec slog.Record) error {
	fp := ""
	rec.Attrs(func(a slog.Attr) bool {
		if a.Key == FingerprintKey {
			fp = a.Value.String()
		}
		return true
	})
	r.mu.Lock()
	defer r.mu.Unlock()
	r.fps, r.lvl = append(r.fps, fp), append(r.lvl, rec.Level)
	select {
	case r.logged <- rec.Level:
	default:
	}
	return nil
}

// fingerprints returns the fingerprints logged at warn level or above.
func (r *fpRecorder) fingerprints() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for i, fp := range r.fps {
		if r.lvl[i] >= slog.LevelWarn {
			out = append(out, fp)
		}
	}
	return out
}

func TestAuthFingerprints(t *testing.T) {
	tests := []struct {
		name   string
		fault  int // the API's status for the check, 0 for none
		key    string
		want   []string
		denied bool
	}{
		{name: "allowed", key: "SECRET-key"},
		{name: "wrong key (401/403)", key: "SECRET-wrong", denied: true},
		{name: "busy (503)", fault: http.StatusServiceUnavailable, key: "SECRET-key", denied: true},
		{name: "API fails (500)", fault: http.StatusInternalServerError, key: "SECRET-key", denied: true, want: []string{FingerprintAuth}},
		{name: "unexpected answer (404)", fault: http.StatusNotFound, key: "SECRET-key", denied: true, want: []string{FingerprintAuth}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := balenatest.NewServer(t)
			d := srv.AddDevice(balenatest.Device{UUID: "0123456789abcdef0123456789abcdef", Key: "SECRET-key"})
			if tt.fault != 0 {
				srv.FailNext(balenatest.DeviceAuth, 1, tt.fault)
			}
			rec := newFPRecorder()
			a := &Authenticator{API: srv.Client(), Logger: slog.New(rec)}
			ok, _ := a.Authenticate(context.Background(), d.UUID, tt.key)
			a.Wait()
			if ok == tt.denied {
				t.Errorf("allowed %v, want %v", ok, !tt.denied)
			}
			if got := rec.fingerprints(); !equal(got, tt.want) {
				t.Errorf("fingerprints %q, want %q", got, tt.want)
			}
		})
	}
}

func TestStateFingerprints(t *testing.T) {
	srv := balenatest.NewServer(t)
	d := srv.AddDevice(balenatest.Device{UUID: "0123456789abcdef0123456789abcdef", Key: "k"})
	si := srv.AddServiceInstance(netip.Addr{})
	srv.FailNext(balenatest.StateReport, 1, http.StatusBadGateway)
	rec := newFPRecorder()
	var mu sync.Mutex
	var id int64 // not registered at first: held back, not an error
	r := &Reporter{API: srv.Client(), ServiceID: func() int64 { mu.Lock(); defer mu.Unlock(); return id },
		Interval: time.Millisecond, Logger: slog.New(rec)}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	r.Set(d.UUID, st(true))
	rec.wait(t, slog.LevelDebug) // held back
	mu.Lock()
	id = si.ID
	mu.Unlock()
	rec.wait(t, slog.LevelWarn) // the 502
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatal(err)
	}
	if got, want := rec.fingerprints(), []string{FingerprintStateUpdate}; !equal(got, want) {
		t.Errorf("fingerprints %q, want %q", got, want)
	}
}

func TestServiceFingerprints(t *testing.T) {
	srv := balenatest.NewServer(t)
	srv.FailNext(balenatest.RegisterService, 1, http.StatusInternalServerError)
	srv.FailNext(balenatest.Heartbeat, 1, http.StatusInternalServerError)
	rec := newFPRecorder()
	s := &Service{API: srv.Client(), Interval: time.Millisecond, Logger: slog.New(rec)}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	want := []string{FingerprintServiceRegistration, FingerprintServiceHeartbeat}
	rec.wait(t, slog.LevelWarn) // the registration's 500
	rec.wait(t, slog.LevelWarn) // the heartbeat's
	cancel()
	<-done
	if got := rec.fingerprints(); !equal(got, want) {
		t.Errorf("fingerprints %q, want %q", got, want)
	}
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
