package vpn

import (
	"context"
	"errors"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/matryer/is"
)

type fakeServiceAPI struct {
	mu         sync.Mutex
	failures   int // registrations to fail first
	registered []netip.Addr
	beats      chan int64
	beatErr    error // the heartbeats' answer
}

func (f *fakeServiceAPI) RegisterService(_ context.Context, addr netip.Addr) (int64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.registered = append(f.registered, addr)
	if f.failures > 0 {
		f.failures--
		return 0, errors.New("500 Internal Server Error")
	}
	return 42, nil
}

func (f *fakeServiceAPI) Heartbeat(_ context.Context, id int64) error {
	f.beats <- id
	return f.beatErr
}

func TestServiceRegistersAndBeats(t *testing.T) {
	is := is.New(t)
	api := &fakeServiceAPI{failures: 2, beats: make(chan int64, 10)}
	addr := netip.MustParseAddr("198.51.100.5")
	s := &Service{API: api, Addr: addr, Interval: time.Millisecond}
	reg := s.Registered()
	is.Equal(s.ID(), int64(0))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	<-reg
	is.Equal(s.ID(), int64(42))
	is.Equal(<-api.beats, int64(42))
	is.Equal(<-api.beats, int64(42))
	cancel()
	is.True(errors.Is(<-done, context.Canceled))
	api.mu.Lock()
	defer api.mu.Unlock()
	is.Equal(api.registered, []netip.Addr{addr, addr, addr}) // two failures, then success
}

func TestServiceStopsWhileUnregistered(t *testing.T) {
	api := &fakeServiceAPI{failures: 1 << 30, beats: make(chan int64)}
	s := &Service{API: api, Interval: time.Millisecond}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := s.Run(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Run = %v", err)
	}
	if s.ID() != 0 {
		t.Fatal("registered")
	}
}

func TestInterfaceIPv4(t *testing.T) {
	a, err := InterfaceIPv4("lo")
	if err != nil {
		t.Skipf("no loopback interface named lo: %v", err)
	}
	if !a.IsLoopback() || !a.Is4() {
		t.Errorf("lo: %s", a)
	}
	if _, err := InterfaceIPv4("obvpn-no-such-if"); err == nil {
		t.Error("no error for a missing interface")
	}
}
