package vpn

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/matryer/is"
)

// st is a session's state on instance 1, connected or not.
func st(connected bool) DeviceState { return DeviceState{Connected: connected, Instance: 1} }

func TestConnections(t *testing.T) {
	is := is.New(t)
	var c Connections
	is.Equal(c.Connect("a"), 0) // online
	is.Equal(c.Connect("a"), 1) // a second session
	is.Equal(c.Disconnect("a"), 2)
	is.Equal(c.Online(), []string{"a"}) // still online
	is.Equal(c.Disconnect("a"), 1)      // offline
	is.Equal(c.Online(), []string(nil))

	// A disconnect before its connect: -1, and the late connect makes 0,
	// not online.
	is.Equal(c.Disconnect("b"), 0)
	is.Equal(c.Count("b"), -1)
	is.Equal(c.Connect("b"), -1)
	is.Equal(c.Count("b"), 0)
	is.Equal(c.Online(), []string(nil))
	is.Equal(len(c.counts), 0) // nothing kept for devices at zero
}

// fakeStateAPI records reports and holds the state the balena API would:
// which devices are online for which service.
type fakeStateAPI struct {
	mu       sync.Mutex
	online   map[string]int64 // uuid → service id
	requests int
	sizes    []int
	fail     func() error // non-nil: the answer to the next call
	calls    chan struct{}
}

func newFakeStateAPI() *fakeStateAPI {
	return &fakeStateAPI{online: map[string]int64{}, calls: make(chan struct{}, 1<<16)}
}

func (f *fakeStateAPI) ReportState(ctx context.Context, id int64, uuids []string, connected bool) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	defer func() { f.calls <- struct{}{} }()
	f.requests++
	if f.fail != nil {
		if err := f.fail(); err != nil {
			return err
		}
	}
	f.sizes = append(f.sizes, len(uuids))
	for _, u := range uuids {
		if connected {
			f.online[u] = id
		} else {
			delete(f.online, u)
		}
	}
	return nil
}

func (f *fakeStateAPI) onlineSet() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for u := range f.online {
		out = append(out, u)
	}
	slices.Sort(out)
	return out
}

func TestReporterBatches(t *testing.T) {
	is := is.New(t)
	api := newFakeStateAPI()
	r := &Reporter{API: api, ServiceID: func() int64 { return 7 }, BatchSize: 100}
	for i := range 250 {
		r.Set(fmt.Sprintf("%032x", i), st(true))
	}
	for i := range 30 {
		r.Set(fmt.Sprintf("%032x", 1000+i), st(true))
	}
	is.NoErr(r.Flush(context.Background()))
	for i := range 30 {
		r.Set(fmt.Sprintf("%032x", 1000+i), st(false))
	}
	is.Equal(r.Pending(), 30)
	is.NoErr(r.Flush(context.Background()))
	is.Equal(r.Pending(), 0)
	is.Equal(api.sizes, []int{100, 100, 80, 30}) // ceil(280/100) connects, one disconnect
	is.Equal(len(api.onlineSet()), 250)

	// A disconnect of a device the API holds as disconnected sends nothing.
	r.Set(fmt.Sprintf("%032x", 1000), st(false))
	r.Set(fmt.Sprintf("%032x", 9999), st(false))
	is.Equal(r.Pending(), 0)
	// A connect and a disconnect before the pass sends nothing either.
	r.Set(fmt.Sprintf("%032x", 3000), st(true))
	r.Set(fmt.Sprintf("%032x", 3000), st(false))
	is.Equal(r.Pending(), 0)
	// A new session of a device the API holds as connected is reported
	// again: another server may have claimed the device in between.
	r.Set(fmt.Sprintf("%032x", 1), st(true))
	r.Set(fmt.Sprintf("%032x", 2), st(false))
	r.Set(fmt.Sprintf("%032x", 2), DeviceState{Connected: true, Instance: 2})
	is.Equal(r.Pending(), 2)
	is.NoErr(r.Flush(context.Background()))
	is.Equal(api.sizes[4:], []int{2})
	is.Equal(len(api.onlineSet()), 250)
}

func TestReporterNotRegistered(t *testing.T) {
	is := is.New(t)
	api := newFakeStateAPI()
	var id int64
	var mu sync.Mutex
	r := &Reporter{API: api, ServiceID: func() int64 { mu.Lock(); defer mu.Unlock(); return id }}
	r.Set("aa", st(true))
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	is.True(r.Flush(ctx) != nil) // cannot report without a service id
	is.Equal(api.requests, 0)
	mu.Lock()
	id = 3
	mu.Unlock()
	is.NoErr(r.Flush(context.Background()))
	is.Equal(api.online["aa"], int64(3))
}

// TestReporterOutage drives 500 random connects and disconnects through
// Connections into a Reporter while the API fails every request, then lets
// the API recover: the final online set must equal the truth, reached in
// ceil(N/batch) requests per direction.
func TestReporterOutage(t *testing.T) {
	synctest.Test(t, testReporterOutage)
}

// testReporterOutage runs in a synctest bubble, with the production
// Interval (1 s) and MaxBackoff (30 s).
func testReporterOutage(t *testing.T) {
	is := is.New(t)
	api := newFakeStateAPI()
	var down sync.Mutex
	outage := true
	api.fail = func() error {
		down.Lock()
		defer down.Unlock()
		if outage {
			return errors.New("503 Service Unavailable")
		}
		return nil
	}
	r := &Reporter{API: api, ServiceID: func() int64 { return 1 }, BatchSize: 64}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()

	var conns Connections
	rng := rand.New(rand.NewPCG(3, 4))
	devices := make([]string, 200)
	for i := range devices {
		devices[i] = fmt.Sprintf("%032x", i)
	}
	for range 500 {
		u := devices[rng.IntN(len(devices))]
		if rng.IntN(3) > 0 || conns.Count(u) <= 0 {
			if conns.Connect(u) == 0 {
				r.Set(u, st(true))
			}
		} else if conns.Disconnect(u) == 1 {
			r.Set(u, st(false))
		}
	}
	// Let the outage be seen several times, then end it: passes at 0, 1,
	// 3, 7 and 15 s, the wait doubling from the interval.
	start := time.Now()
	for range 5 {
		<-api.calls
	}
	is.Equal(time.Since(start), 15*time.Second)
	is.Equal(len(api.onlineSet()), 0)
	pending := r.Pending()
	truth := conns.Online()
	api.mu.Lock()
	down.Lock()
	outage = false
	before := api.requests
	down.Unlock()
	api.mu.Unlock()

	// The next pass comes within MaxBackoff and sends everything (on the
	// bubble's clock: the backoff's length, not a wait).
	time.Sleep(30 * time.Second)
	synctest.Wait()
	is.Equal(r.Pending(), 0)
	cancel()
	is.True(errors.Is(<-done, context.Canceled))
	is.Equal(api.onlineSet(), truth)
	// Once the API is back, one pass sends every pending device in
	// ceil(n/batch) requests per direction; allow for a pass that was
	// already failing when the outage ended.
	api.mu.Lock()
	sent := api.requests - before
	api.mu.Unlock()
	up := len(truth)
	want := (up+63)/64 + (pending-up+63)/64
	is.True(sent >= want && sent <= want+2) // requests after the outage
	t.Logf("%d devices pending after the outage, %d online; %d requests to report them (bound %d)", pending, up, sent, want)
}

// blockingStateAPI holds each report until the test lets it go.
type blockingStateAPI struct {
	*fakeStateAPI
	started chan []string
	release chan struct{}
}

func (b blockingStateAPI) ReportState(ctx context.Context, id int64, uuids []string, connected bool) error {
	b.started <- uuids
	<-b.release
	return b.fakeStateAPI.ReportState(ctx, id, uuids, connected)
}

// TestReporterChangeWhileSending: a device that goes back to the state the
// API last acknowledged while the opposite is being sent is sent again, so
// that the API ends with the truth.
func TestReporterChangeWhileSending(t *testing.T) {
	for _, first := range []bool{true, false} {
		t.Run(fmt.Sprint("acknowledged ", !first), func(t *testing.T) {
			is := is.New(t)
			api := blockingStateAPI{newFakeStateAPI(), make(chan []string, 1), make(chan struct{})}
			r := &Reporter{API: api, ServiceID: func() int64 { return 7 }}
			ctx := context.Background()
			// The API acknowledges the device in state !first (a
			// disconnected device was connected before).
			done := make(chan error, 1)
			prelude := []bool{true}
			if first {
				prelude = append(prelude, false)
			}
			for _, c := range prelude {
				r.Set("a", st(c))
				go func() { done <- r.Flush(ctx) }()
				<-api.started
				api.release <- struct{}{}
				is.NoErr(<-done)
			}

			// Now first is sent, and while it is in flight the device
			// goes back to !first.
			r.Set("a", st(first))
			go func() { done <- r.Flush(ctx) }()
			is.Equal(<-api.started, []string{"a"})
			r.Set("a", st(!first))
			is.Equal(r.Pending(), 1)
			api.release <- struct{}{}
			<-api.started // the second pass sends !first again
			api.release <- struct{}{}
			is.NoErr(<-done)
			is.Equal(r.Pending(), 0)
			_, online := api.online["a"]
			is.Equal(online, !first) // the API holds the truth
		})
	}
}

// TestReporterRunWakesOnSet: with the production Interval (1 s), a change
// is sent at once after a quiet spell, and the next one a full interval
// after the pass before it, not sooner.
func TestReporterRunWakesOnSet(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		is := is.New(t)
		api := newFakeStateAPI()
		r := &Reporter{API: api, ServiceID: func() int64 { return 1 }}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- r.Run(ctx) }()
		start := time.Now()
		r.Set("ab", st(true))
		<-api.calls
		is.Equal(time.Since(start), time.Duration(0))
		synctest.Wait()
		is.Equal(r.Pending(), 0)
		r.Set("ab", st(false))
		<-api.calls
		is.Equal(time.Since(start), time.Second) // the interval between passes
		synctest.Wait()
		is.Equal(r.Pending(), 0)
		cancel()
		is.True(errors.Is(<-done, context.Canceled))
		is.Equal(api.onlineSet(), []string(nil))
		is.Equal(api.requests, 2)
	})
}
