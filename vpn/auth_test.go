package vpn

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/matryer/is"
)

// fakeAuthAPI answers from a table and counts calls; with gate set, every
// call waits for a value on it.
type fakeAuthAPI struct {
	mu       sync.Mutex
	answers  map[string]func() (bool, error) // by uuid
	calls    atomic.Int64
	inFlight atomic.Int64
	maxSeen  atomic.Int64
	gate     chan struct{}
	started  chan struct{}
}

func (f *fakeAuthAPI) DeviceAuth(ctx context.Context, uuid, key string) (bool, error) {
	f.calls.Add(1)
	n := f.inFlight.Add(1)
	defer f.inFlight.Add(-1)
	for {
		m := f.maxSeen.Load()
		if n <= m || f.maxSeen.CompareAndSwap(m, n) {
			break
		}
	}
	if f.started != nil {
		f.started <- struct{}{}
	}
	if f.gate != nil {
		select {
		case <-f.gate:
		case <-ctx.Done():
			return false, ctx.Err()
		}
	}
	f.mu.Lock()
	answer := f.answers[uuid]
	f.mu.Unlock()
	if answer == nil {
		return key == "good", nil
	}
	return answer()
}

const uuidA = "0123456789abcdef0123456789abcdef"

func TestAuthenticatorCache(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		is := is.New(t)
		api := &fakeAuthAPI{}
		a := &Authenticator{API: api, CacheTimeout: time.Minute}
		ctx := context.Background()

		ok, err := a.Authenticate(ctx, uuidA, "good")
		is.NoErr(err)
		is.True(ok)
		ok, err = a.Authenticate(ctx, uuidA, "good")
		is.NoErr(err)
		is.True(ok)
		is.Equal(api.calls.Load(), int64(1)) // the allow was cached

		ok, err = a.Authenticate(ctx, uuidA, "bad")
		is.NoErr(err)
		is.True(!ok)
		_, _ = a.Authenticate(ctx, uuidA, "bad")
		is.Equal(api.calls.Load(), int64(2)) // the deny too, per key

		// On the bubble's clock, as every sleep in a synctest bubble: the
		// cache's age, not a wait.
		time.Sleep(time.Minute - time.Nanosecond)
		_, _ = a.Authenticate(ctx, uuidA, "good")
		is.Equal(api.calls.Load(), int64(2)) // not yet expired
		time.Sleep(time.Nanosecond)
		_, _ = a.Authenticate(ctx, uuidA, "good")
		is.Equal(api.calls.Load(), int64(3)) // expired
		a.Wait()
	})
}

func TestAuthenticatorErrorsNotCached(t *testing.T) {
	is := is.New(t)
	unavailable := errors.New("balena API: 503 Service Unavailable")
	var fail atomic.Bool
	fail.Store(true)
	api := &fakeAuthAPI{answers: map[string]func() (bool, error){
		uuidA: func() (bool, error) {
			if fail.Load() {
				return false, unavailable
			}
			return true, nil
		},
	}}
	a := &Authenticator{API: api, CacheTimeout: time.Hour}
	ok, err := a.Authenticate(context.Background(), uuidA, "k")
	is.True(errors.Is(err, unavailable))
	is.True(!ok)
	fail.Store(false)
	ok, err = a.Authenticate(context.Background(), uuidA, "k")
	is.NoErr(err)
	is.True(ok) // the 503 was not cached
	is.Equal(api.calls.Load(), int64(2))
}

func TestAuthenticatorBadCredentials(t *testing.T) {
	api := &fakeAuthAPI{}
	a := &Authenticator{API: api}
	for _, c := range []struct{ uuid, key string }{
		{"", "k"}, {uuidA, ""}, {"../../v7/device", "k"}, {"0123-4567", "k"}, {"abc def", "k"}, {"abcg", "k"},
	} {
		ok, err := a.Authenticate(context.Background(), c.uuid, c.key)
		if ok || !errors.Is(err, ErrBadCredentials) {
			t.Errorf("Authenticate(%q, %q) = %v, %v; want ErrBadCredentials", c.uuid, c.key, ok, err)
		}
	}
	if n := api.calls.Load(); n != 0 {
		t.Errorf("the API was asked %d times about malformed credentials", n)
	}
}

func TestAuthenticatorDedup(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		is := is.New(t)
		api := &fakeAuthAPI{gate: make(chan struct{}), started: make(chan struct{}, 100)}
		a := &Authenticator{API: api, CacheTimeout: 0} // no cache: sharing must come from dedup
		const n = 50
		var wg sync.WaitGroup
		results := make(chan bool, n)
		for range n {
			wg.Go(func() {
				ok, err := a.Authenticate(context.Background(), uuidA, "good")
				if err != nil {
					t.Error(err)
				}
				results <- ok
			})
		}
		synctest.Wait() // every caller waits: one in the API, the others for its answer
		is.Equal(len(api.started), 1)
		close(api.gate)
		wg.Wait()
		close(results)
		for ok := range results {
			is.True(ok)
		}
		is.Equal(api.calls.Load(), int64(1))
		a.Wait()
	})
}

func TestAuthenticatorConcurrencyBound(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		is := is.New(t)
		api := &fakeAuthAPI{gate: make(chan struct{}), started: make(chan struct{}, 100)}
		a := &Authenticator{API: api, MaxInFlight: 4}
		var wg sync.WaitGroup
		for i := range 20 {
			wg.Go(func() {
				_, _ = a.Authenticate(context.Background(), fmt.Sprintf("%032x", i), "good")
			})
		}
		synctest.Wait() // everybody waits: four in the API, the others for a place
		is.Equal(len(api.started), 4)
		close(api.gate)
		wg.Wait()
		a.Wait()
		is.Equal(api.maxSeen.Load(), int64(4))
		is.Equal(api.calls.Load(), int64(20))
	})
}

func TestAuthenticatorCallerGivesUp(t *testing.T) {
	is := is.New(t)
	api := &fakeAuthAPI{gate: make(chan struct{}), started: make(chan struct{}, 2)}
	a := &Authenticator{API: api, CacheTimeout: time.Minute}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { _, err := a.Authenticate(ctx, uuidA, "good"); done <- err }()
	<-api.started
	cancel()
	is.True(errors.Is(<-done, context.Canceled))
	// The request goes on and its answer is cached for the next caller.
	close(api.gate)
	a.Wait()
	ok, err := a.Authenticate(context.Background(), uuidA, "good")
	is.NoErr(err)
	is.True(ok)
	is.Equal(api.calls.Load(), int64(1))
}

func TestAuthenticatorTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		is := is.New(t)
		api := &fakeAuthAPI{gate: make(chan struct{})} // never released
		a := &Authenticator{API: api, Timeout: 20 * time.Second}
		start := time.Now()
		ok, err := a.Authenticate(context.Background(), uuidA, "good")
		is.True(!ok)
		is.True(errors.Is(err, context.DeadlineExceeded))
		is.Equal(time.Since(start), 20*time.Second) // exactly Timeout
		a.Wait()
	})
}

// TestAuthenticatorQueueNotTimed: Timeout bounds a request from the moment
// it has its place: in a storm that queues for longer than Timeout, every
// device still gets its answer.
func TestAuthenticatorQueueNotTimed(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		is := is.New(t)
		api := &fakeAuthAPI{answers: map[string]func() (bool, error){}}
		a := &Authenticator{API: api, MaxInFlight: 1, Timeout: 200 * time.Millisecond}
		const n = 8 // 8 × 50 ms in a row: twice the timeout
		for i := range n {
			// The API's latency, on the bubble's clock: not a wait.
			api.answers[fmt.Sprintf("%032x", i)] = func() (bool, error) { time.Sleep(50 * time.Millisecond); return true, nil }
		}
		start := time.Now()
		var wg sync.WaitGroup
		var allowed atomic.Int64
		for i := range n {
			wg.Go(func() {
				if ok, err := a.Authenticate(context.Background(), fmt.Sprintf("%032x", i), "good"); ok && err == nil {
					allowed.Add(1)
				}
			})
		}
		wg.Wait()
		a.Wait()
		is.Equal(allowed.Load(), int64(n))
		is.Equal(time.Since(start), n*50*time.Millisecond) // one at a time, none cut short
	})
}

func TestAuthenticatorSweep(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		is := is.New(t)
		a := &Authenticator{API: &fakeAuthAPI{}, CacheTimeout: time.Second}
		for i := range 1023 {
			_, _ = a.Authenticate(context.Background(), fmt.Sprintf("%x", i+1), "good")
		}
		// On the bubble's clock: the entries' age, not a wait.
		time.Sleep(2 * time.Second)
		_, _ = a.Authenticate(context.Background(), "ffff", "good") // the 1024th entry sweeps
		a.Wait()
		a.mu.Lock()
		defer a.mu.Unlock()
		is.Equal(len(a.cache), 1)
	})
}

// TestAuthenticatorLetterCase: a device's UUID in any case is one device:
// one cache entry, and the API is asked in lower case.
func TestAuthenticatorLetterCase(t *testing.T) {
	is := is.New(t)
	api := &fakeAuthAPI{answers: map[string]func() (bool, error){uuidA: func() (bool, error) { return true, nil }}}
	a := &Authenticator{API: api, CacheTimeout: time.Minute}
	for _, u := range []string{strings.ToUpper(uuidA), uuidA, "0123456789ABCdef0123456789abcdef"} {
		ok, err := a.Authenticate(context.Background(), u, "k")
		is.NoErr(err)
		is.True(ok) // asked as uuidA, which the fake allows
	}
	is.Equal(api.calls.Load(), int64(1))
}
