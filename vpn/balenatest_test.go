package vpn_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/matryer/is"

	"github.com/obvpn/obvpn/vpn"
	"github.com/obvpn/obvpn/vpn/balena/balenatest"
)

// TestAuthenticatorWithBalenatest: the cache and dedup rules against the
// in-memory balena API, counting the requests it gets.
func TestAuthenticatorWithBalenatest(t *testing.T) {
	is := is.New(t)
	api := balenatest.NewServer(t)
	d := api.AddDevice(balenatest.Device{UUID: "0123456789abcdef0123456789abcdef", Key: "k1"})
	a := &vpn.Authenticator{API: productionClient(api), CacheTimeout: time.Minute} // retries on, as in production
	ctx := context.Background()

	// 503: denied, and not cached.
	api.FailNext(balenatest.DeviceAuth, 1, 503)
	ok, err := a.Authenticate(ctx, d.UUID, d.Key)
	is.True(!ok && err != nil)
	ok, err = a.Authenticate(ctx, d.UUID, d.Key)
	is.NoErr(err)
	is.True(ok)
	is.Equal(api.Calls(balenatest.DeviceAuth), 2)
	// 200: cached.
	ok, _ = a.Authenticate(ctx, d.UUID, d.Key)
	is.True(ok)
	is.Equal(api.Calls(balenatest.DeviceAuth), 2)
	// 401: denied, cached too.
	ok, err = a.Authenticate(ctx, d.UUID, "wrong")
	is.NoErr(err)
	is.True(!ok)
	ok, _ = a.Authenticate(ctx, d.UUID, "wrong")
	is.True(!ok)
	is.Equal(api.Calls(balenatest.DeviceAuth), 3)

	// Concurrent identical checks share one request; different devices
	// are bounded by MaxInFlight.
	b := &vpn.Authenticator{API: api.Client(), MaxInFlight: 3}
	api.DelayNext(balenatest.DeviceAuth, -1, 50*time.Millisecond)
	defer api.ClearFaults()
	before := api.Calls(balenatest.DeviceAuth)
	var wg sync.WaitGroup
	for range 30 {
		wg.Go(func() {
			if ok, err := b.Authenticate(ctx, d.UUID, d.Key); !ok || err != nil {
				t.Errorf("shared check: %v %v", ok, err)
			}
		})
	}
	wg.Wait()
	is.True(api.Calls(balenatest.DeviceAuth)-before < 30) // shared, though uncached
	b.Wait()
}

// TestReporterOutageWithBalenatest: 500 connects and disconnects while the
// API fails every state report, then the API comes back: the devices it
// holds online are exactly those online in truth, reported in about
// ceil(N/batch) requests per direction.
func TestReporterOutageWithBalenatest(t *testing.T) {
	is := is.New(t)
	api := balenatest.NewServer(t)
	var uuids []string
	for i := range 300 {
		d := api.AddDevice(balenatest.Device{UUID: fmt.Sprintf("%032x", i+1), Key: "k"})
		uuids = append(uuids, d.UUID)
	}
	si := api.AddServiceInstance(netip.Addr{})
	r := &vpn.Reporter{API: api.Client(), ServiceID: func() int64 { return si.ID }, BatchSize: 50,
		Interval: time.Millisecond, MaxBackoff: 5 * time.Millisecond}
	api.FailNext(balenatest.StateReport, -1, 503)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()

	var conns vpn.Connections
	rng := rand.New(rand.NewPCG(5, 6))
	for range 500 {
		u := uuids[rng.IntN(len(uuids))]
		if rng.IntN(3) > 0 || conns.Count(u) <= 0 {
			if conns.Connect(u) == 0 {
				r.Set(u, vpn.DeviceState{Connected: true})
			}
		} else if conns.Disconnect(u) == 1 {
			r.Set(u, vpn.DeviceState{Connected: false})
		}
	}
	// The outage lasts while the reporter retries many times.
	wctx, wcancel := context.WithTimeout(ctx, 30*time.Second)
	defer wcancel()
	waitAPI(t, wctx, api, func(a *balenatest.API) bool { return a.Calls(balenatest.StateReport) >= 20 })
	pending := r.Pending()
	before := api.Calls(balenatest.StateReport)
	api.ClearFaults()
	// The reporter's own bookkeeping has no event: poll it, with the
	// deadline.
	waitUntil(t, wctx, func() bool { return r.Pending() == 0 })
	cancel()
	is.True(errors.Is(<-done, context.Canceled))

	online := map[string]bool{}
	for _, u := range conns.Online() {
		online[u] = true
	}
	for _, u := range uuids {
		d, _ := api.Device(u)
		if d.ConnectedToVPN != online[u] {
			t.Errorf("%s: API says connected=%v, truth %v", u, d.ConnectedToVPN, online[u])
		}
		if d.ConnectedToVPN && d.ServiceInstance != si.ID {
			t.Errorf("%s: managed by %d, want %d", u, d.ServiceInstance, si.ID)
		}
	}
	up := len(online)
	sent := api.Calls(balenatest.StateReport) - before
	want := (up+49)/50 + (pending-up+49)/50
	is.True(sent >= want && sent <= want+2)
	t.Logf("%d pending after the outage (%d online): %d requests, ceil(N/batch) = %d", pending, up, sent, want)
}
