package balena_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/matryer/is"

	"github.com/obvpn/obvpn/vpn/balena"
)

// seen is one request as the fake API received it.
type seen struct {
	method, uri, auth, contentType, body string
}

// fakeAPI answers every request with status and body and records it.
func fakeAPI(t *testing.T, status int, body string) (*balena.Client, *[]seen) {
	t.Helper()
	var got []seen
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		got = append(got, seen{r.Method, r.RequestURI, r.Header.Get("Authorization"), r.Header.Get("Content-Type"), string(b)})
		w.WriteHeader(status)
		io.WriteString(w, body)
	}))
	t.Cleanup(ts.Close)
	c := &balena.Client{BaseURL: ts.URL + "/", ServiceKey: "svc", GuestKey: "guest", HTTPClient: ts.Client(), RetryMax: -1}
	return c, &got
}

// uuid is written in both cases: the client sends every UUID in lower
// case (lower), one device in any case.
const (
	uuid  = "0123456789abcdef0123456789ABCDEF"
	lower = "0123456789abcdef0123456789abcdef"
)

// TestWire checks the exact request of every endpoint: method, path and
// query, bearer and body.
func TestWire(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name   string
		status int
		answer string
		call   func(c *balena.Client) error
		want   seen
	}{
		{"device auth", 200, "", func(c *balena.Client) error {
			ok, err := c.DeviceAuth(ctx, uuid, "devkey")
			if !ok {
				return errors.New("denied")
			}
			return err
		}, seen{"GET", "/services/vpn/auth/" + lower, "Bearer devkey", "", ""}},
		{"client-connect", 200, "", func(c *balena.Client) error {
			return c.ReportState(ctx, 7, []string{"aa", "BB"}, true)
		}, seen{"POST", "/services/vpn/client-connect", "Bearer svc", "application/json", `{"serviceId":7,"uuids":["aa","bb"],"connected":true}`}},
		{"client-disconnect", 200, "", func(c *balena.Client) error {
			return c.ReportState(ctx, 7, []string{"aa"}, false)
		}, seen{"POST", "/services/vpn/client-disconnect", "Bearer svc", "application/json", `{"serviceId":7,"uuids":["aa"],"connected":false}`}},
		{"register with address", 201, `{"id":42,"ip_address":"192.0.2.10"}`, func(c *balena.Client) error {
			id, err := c.RegisterService(ctx, netip.MustParseAddr("192.0.2.10"))
			if err == nil && id != 42 {
				return errors.New("wrong id")
			}
			return err
		}, seen{"POST", "/v7/service_instance", "Bearer svc", "application/json", `{"ip_address":"192.0.2.10"}`}},
		{"register without address", 201, `{"id":43}`, func(c *balena.Client) error {
			_, err := c.RegisterService(ctx, netip.Addr{})
			return err
		}, seen{"POST", "/v7/service_instance", "Bearer svc", "application/json", `{}`}},
		{"heartbeat", 200, "OK", func(c *balena.Client) error {
			return c.Heartbeat(ctx, 42)
		}, seen{"PATCH", "/v7/service_instance(42)", "Bearer svc", "application/json", `{"is_alive":true}`}},
		{"canAccess with key", 200, `{"d":[{"id":5}]}`, func(c *balena.Client) error {
			id, ok, err := c.CanAccess(ctx, uuid, 22222, "userkey")
			if err == nil && (!ok || id != 5) {
				return errors.New("wrong answer")
			}
			return err
		}, seen{"POST", "/v7/device(uuid=@uuid)/canAccess?@uuid='" + lower + "'", "Bearer userkey", "application/json",
			`{"action":{"or":["tunnel-any","tunnel-22222"]}}`}},
		{"canAccess with the guest key", 200, `{"d":[{"id":5}]}`, func(c *balena.Client) error {
			_, _, err := c.CanAccess(ctx, uuid, 80, "")
			return err
		}, seen{"POST", "/v7/device(uuid=@uuid)/canAccess?@uuid='" + lower + "'", "Bearer guest", "application/json",
			`{"action":{"or":["tunnel-any","tunnel-80"]}}`}},
		{"device online", 200, `{"d":[{"id":5}]}`, func(c *balena.Client) error {
			ok, err := c.DeviceOnline(ctx, 5)
			if err == nil && !ok {
				return errors.New("offline")
			}
			return err
		}, seen{"GET", "/v7/device(@id)?$select=id&$filter=is_connected_to_vpn&@id=5", "Bearer svc", "", ""}},
		{"locate", 200, `{"d":[{"id":3,"ip_address":"198.51.100.3"}]}`, func(c *balena.Client) error {
			id, addr, known, err := c.LocateDevice(ctx, uuid, "userkey")
			if err == nil && (id != 3 || addr != netip.MustParseAddr("198.51.100.3") || !known) {
				return errors.New("wrong answer")
			}
			return err
		}, seen{"GET", "/v7/service_instance?$select=id,ip_address&$filter=manages__device/any(d:d/uuid%20eq%20'" + lower + "'%20and%20d/is_connected_to_vpn)",
			"Bearer userkey", "", ""}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			is := is.New(t)
			c, got := fakeAPI(t, tt.status, tt.answer)
			is.NoErr(tt.call(c))
			is.Equal(len(*got), 1)
			is.Equal((*got)[0], tt.want)
		})
	}
}

func TestNoKeyNoAuthorization(t *testing.T) {
	is := is.New(t)
	c, got := fakeAPI(t, 200, `{"d":[]}`)
	c.GuestKey = ""
	_, ok, err := c.CanAccess(context.Background(), uuid, 80, "")
	is.NoErr(err)
	is.True(!ok)
	is.Equal((*got)[0].auth, "")
}

func TestAnswers(t *testing.T) {
	ctx := context.Background()
	t.Run("device auth", func(t *testing.T) {
		for _, tt := range []struct {
			status  int
			ok, err bool
		}{{200, true, false}, {401, false, false}, {403, false, false}, {503, false, true}, {500, false, true}, {404, false, true}} {
			is := is.New(t)
			c, _ := fakeAPI(t, tt.status, "")
			ok, err := c.DeviceAuth(ctx, uuid, "k")
			is.Equal(ok, tt.ok)
			is.Equal(err != nil, tt.err)
			var ae *balena.APIError
			if tt.err {
				is.True(errors.As(err, &ae))
				is.Equal(ae.StatusCode, tt.status)
			}
			is.Equal(errors.Is(err, balena.ErrBusy), tt.status == 503) // busy: an answer callers can tell
		}
	})
	t.Run("canAccess", func(t *testing.T) {
		for _, tt := range []struct {
			status  int
			body    string
			id      int64
			ok, err bool
		}{
			{200, `{"d":[{"id":9}]}`, 9, true, false},
			{200, `{"d":[]}`, 0, false, false},
			{200, `{}`, 0, false, false},
			{200, `{"d":[{"id":9},{"id":10}]}`, 0, false, false},
			{401, ``, 0, false, false},
			{403, ``, 0, false, false},
			{500, `boom`, 0, false, true},
			{200, `not json`, 0, false, true},
		} {
			is := is.New(t)
			c, _ := fakeAPI(t, tt.status, tt.body)
			id, ok, err := c.CanAccess(ctx, uuid, 80, "k")
			is.Equal(id, tt.id)
			is.Equal(ok, tt.ok)
			is.Equal(err != nil, tt.err)
		}
	})
	t.Run("locate", func(t *testing.T) {
		for _, tt := range []struct {
			status     int
			body       string
			id         int64
			addr       string
			known, err bool
		}{
			{200, `{"d":[{"id":3,"ip_address":"192.0.2.1"}]}`, 3, "192.0.2.1", true, false},
			{200, `{"d":[{"id":3,"ip_address":null}]}`, 3, "", true, false},
			{200, `{"d":[]}`, 0, "", true, false},
			{401, ``, 0, "", false, false},
			{500, ``, 0, "", false, true},
			{200, `{"d":[{"id":3,"ip_address":"nonsense"}]}`, 0, "", false, true},
		} {
			is := is.New(t)
			c, _ := fakeAPI(t, tt.status, tt.body)
			id, addr, known, err := c.LocateDevice(ctx, uuid, "k")
			is.Equal(id, tt.id)
			if tt.addr == "" {
				is.True(!addr.IsValid())
			} else {
				is.Equal(addr.String(), tt.addr)
			}
			is.Equal(known, tt.known)
			is.Equal(err != nil, tt.err)
		}
	})
	t.Run("register without id", func(t *testing.T) {
		is := is.New(t)
		c, _ := fakeAPI(t, 201, `{}`)
		_, err := c.RegisterService(ctx, netip.Addr{})
		is.True(err != nil)
	})
	t.Run("state report refused", func(t *testing.T) {
		is := is.New(t)
		c, _ := fakeAPI(t, 401, `Unauthorized`)
		err := c.ReportState(ctx, 1, []string{"aa"}, true)
		var ae *balena.APIError
		is.True(errors.As(err, &ae))
		is.Equal(ae.StatusCode, 401)
		is.Equal(ae.Body, "Unauthorized")
		is.Equal(ae.Path, "/services/vpn/client-connect")
	})
}

// TestInvalidUUID checks that a UUID that is not hexadecimal never reaches
// the API.
func TestInvalidUUID(t *testing.T) {
	ctx := context.Background()
	c, got := fakeAPI(t, 200, `{"d":[{"id":1}]}`)
	for _, bad := range []string{"", "../v7/device", "abc'", "abc def", "abc%20", "g123", "abc?x=1", strings.Repeat("a", 129)} {
		_, err := c.DeviceAuth(ctx, bad, "k")
		if !errors.Is(err, balena.ErrInvalidUUID) {
			t.Errorf("DeviceAuth(%q): got %v, want ErrInvalidUUID", bad, err)
		}
		_, _, err = c.CanAccess(ctx, bad, 80, "k")
		if !errors.Is(err, balena.ErrInvalidUUID) {
			t.Errorf("CanAccess(%q): got %v, want ErrInvalidUUID", bad, err)
		}
		_, _, _, err = c.LocateDevice(ctx, bad, "k")
		if !errors.Is(err, balena.ErrInvalidUUID) {
			t.Errorf("LocateDevice(%q): got %v, want ErrInvalidUUID", bad, err)
		}
	}
	if len(*got) != 0 {
		t.Fatalf("the API got %d requests, want none", len(*got))
	}
}

// TestRetries checks that reads are retried and POSTs that change state
// are not.
func TestRetries(t *testing.T) {
	is := is.New(t)
	var calls atomic.Int32
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if calls.Add(1)%2 == 1 {
			w.WriteHeader(http.StatusBadGateway)
			return
		}
		io.WriteString(w, `{"d":[{"id":1}]}`)
	}))
	defer ts.Close()
	c := &balena.Client{BaseURL: ts.URL, ServiceKey: "svc", HTTPClient: ts.Client()}
	ctx := context.Background()

	ok, err := c.DeviceOnline(ctx, 1)
	is.NoErr(err)
	is.True(ok)
	is.Equal(calls.Load(), int32(2)) // retried once

	calls.Store(0)
	_, ok, err = c.CanAccess(ctx, uuid, 80, "k")
	is.NoErr(err)
	is.True(ok)
	is.Equal(calls.Load(), int32(2))

	calls.Store(0)
	err = c.ReportState(ctx, 1, []string{"aa"}, true)
	var ae *balena.APIError
	is.True(errors.As(err, &ae))
	is.Equal(ae.StatusCode, http.StatusBadGateway)
	is.Equal(calls.Load(), int32(1)) // not retried

	calls.Store(0)
	_, err = c.RegisterService(ctx, netip.Addr{})
	is.True(errors.As(err, &ae))
	is.Equal(calls.Load(), int32(1))

	calls.Store(0)
	c2 := &balena.Client{BaseURL: ts.URL, ServiceKey: "svc", HTTPClient: ts.Client(), RetryMax: -1}
	_, err = c2.DeviceOnline(ctx, 1)
	is.True(errors.As(err, &ae))
	is.Equal(calls.Load(), int32(1))
}

// TestRetryBounds runs the retry policy with the production settings (the
// zero RetryMax, as the server builds its client): a Retry-After is
// waited out up to MaxRetryAfter and makes the answer final beyond it, no
// retry outlives the caller's deadline, and device authentication is sent
// exactly once, a 503 (busy) included.
func TestRetryBounds(t *testing.T) {
	ctx := context.Background()
	api := func(t *testing.T, answer func(n int32, w http.ResponseWriter)) (*balena.Client, *atomic.Int32) {
		var calls atomic.Int32
		ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			answer(calls.Add(1), w)
		}))
		t.Cleanup(ts.Close)
		return &balena.Client{BaseURL: ts.URL, ServiceKey: "svc", HTTPClient: ts.Client()}, &calls
	}
	busy := func(retryAfter string) func(int32, http.ResponseWriter) {
		return func(_ int32, w http.ResponseWriter) {
			if retryAfter != "" {
				w.Header().Set("Retry-After", retryAfter)
			}
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	}
	t.Run("Retry-After beyond the cap is final", func(t *testing.T) {
		is := is.New(t)
		for _, ra := range []string{"3600", time.Now().Add(time.Hour).UTC().Format(http.TimeFormat)} {
			c, calls := api(t, busy(ra))
			start := time.Now()
			_, err := c.DeviceOnline(ctx, 1)
			took := time.Since(start)
			is.True(errors.Is(err, balena.ErrBusy))
			is.Equal(calls.Load(), int32(1))
			if took >= balena.MaxRetryAfter {
				t.Errorf("Retry-After %s: returned after %v, want within %v", ra, took, balena.MaxRetryAfter)
			}
		}
	})
	t.Run("Retry-After within the cap is waited out", func(t *testing.T) {
		is := is.New(t)
		c, calls := api(t, func(n int32, w http.ResponseWriter) {
			if n == 1 {
				busy("1")(n, w)
				return
			}
			io.WriteString(w, `{"d":[{"id":1}]}`)
		})
		start := time.Now()
		ok, err := c.DeviceOnline(ctx, 1)
		is.NoErr(err)
		is.True(ok)
		is.Equal(calls.Load(), int32(2))
		if took := time.Since(start); took < time.Second || took > balena.MaxRetryAfter {
			t.Errorf("answered after %v, want about the Retry-After of 1 s", took)
		}
	})
	t.Run("no wait outlives the deadline", func(t *testing.T) {
		is := is.New(t)
		c, calls := api(t, busy("2"))
		dctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
		defer cancel()
		start := time.Now()
		_, _, _, err := c.LocateDevice(dctx, uuid, "k")
		is.True(errors.Is(err, balena.ErrBusy)) // the answer, not the deadline's error
		is.Equal(calls.Load(), int32(1))
		if took := time.Since(start); took >= 500*time.Millisecond {
			t.Errorf("returned after %v, past the caller's deadline", took)
		}
	})
	t.Run("5xx retried RetryMax times, backing off", func(t *testing.T) {
		is := is.New(t)
		c, calls := api(t, func(_ int32, w http.ResponseWriter) { w.WriteHeader(http.StatusBadGateway) })
		start := time.Now()
		err := c.Heartbeat(ctx, 1)
		var ae *balena.APIError
		is.True(errors.As(err, &ae))
		is.Equal(ae.StatusCode, http.StatusBadGateway)
		is.Equal(calls.Load(), int32(3)) // the default RetryMax is 2
		if took := time.Since(start); took < 300*time.Millisecond || took > 3*time.Second {
			t.Errorf("gave up after %v, want the backoff of 100 ms + 200 ms", took)
		}
	})
	t.Run("device auth is sent once", func(t *testing.T) {
		for _, answer := range []func(int32, http.ResponseWriter){
			busy(""), busy("1"), busy("3600"),
			func(_ int32, w http.ResponseWriter) { w.WriteHeader(http.StatusBadGateway) },
		} {
			is := is.New(t)
			c, calls := api(t, answer)
			ok, err := c.DeviceAuth(ctx, uuid, "k")
			is.True(!ok)
			is.True(err != nil)
			is.Equal(calls.Load(), int32(1))
		}
	})
	t.Run("device auth: a connection error is one attempt", func(t *testing.T) {
		is := is.New(t)
		var dials atomic.Int32
		tr := &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			dials.Add(1)
			return nil, errors.New("refused")
		}}
		c := &balena.Client{BaseURL: "http://api.invalid", HTTPClient: &http.Client{Transport: tr}}
		_, err := c.DeviceAuth(ctx, uuid, "k")
		is.True(err != nil)
		is.Equal(dials.Load(), int32(1))
	})
}

// TestKeysNotLogged checks that the client's debug log holds no key, also
// when requests fail and are retried.
func TestKeysNotLogged(t *testing.T) {
	var buf bytes.Buffer
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusServiceUnavailable)
	}))
	defer ts.Close()
	c := &balena.Client{
		BaseURL: ts.URL, ServiceKey: "SERVICE-SECRET", GuestKey: "GUEST-SECRET", HTTPClient: ts.Client(), RetryMax: 1,
		Logger: slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	ctx := context.Background()
	c.DeviceAuth(ctx, uuid, "DEVICE-SECRET")
	c.CanAccess(ctx, uuid, 80, "")
	c.CanAccess(ctx, uuid, 80, "USER-SECRET")
	c.DeviceOnline(ctx, 1)
	c.LocateDevice(ctx, uuid, "USER-SECRET")
	c.Heartbeat(ctx, 1)
	if buf.Len() == 0 {
		t.Fatal("nothing logged; the test checks nothing")
	}
	if s := buf.String(); strings.Contains(s, "SECRET") {
		t.Fatalf("a key was logged:\n%s", s)
	}
}

func TestContext(t *testing.T) {
	is := is.New(t)
	block := make(chan struct{})
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-block:
		case <-r.Context().Done():
		}
	}))
	defer ts.Close()
	defer close(block)
	c := &balena.Client{BaseURL: ts.URL, ServiceKey: "svc", HTTPClient: ts.Client()}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := c.DeviceOnline(ctx, 1)
	is.True(errors.Is(err, context.Canceled))
}
