package connectproxy

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/matryer/is"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/obvpn/obvpn/vpn/balena"
	"github.com/obvpn/obvpn/vpn/balena/balenatest"
)

// The balena client implements the interfaces the handler needs.
var (
	_ Authorizer    = (*balena.Client)(nil)
	_ OnlineChecker = (*balena.Client)(nil)
	_ Locator       = (*balena.Client)(nil)
)

func target(uuid string, port uint16) string { return uuid + ".balena:" + strconv.Itoa(int(port)) }

// TestStatusCodes checks every answer of the proxy, with the exact status
// line.
func TestStatusCodes(t *testing.T) {
	svc := startService(t, echo)
	public := startService(t, echo)
	closed := closedPort(t)

	tests := []struct {
		name   string
		setup  func(w *world)
		target string
		header []string
		want   string
	}{
		{"public port, no key: the guest key", nil, target(devUUID, public.port), nil,
			"HTTP/1.0 200 Connection Established"},
		{"public port, no key, no guest key", func(w *world) {
			c := w.api.Client()
			c.GuestKey = ""
			w.h.Authorizer = c
		}, target(devUUID, public.port), nil,
			"HTTP/1.0 407 Proxy Authorization Required"},
		{"private port, the right key", nil, target(devUUID, svc.port), []string{"Proxy-Authorization: " + basic("anyone", opKey)},
			"HTTP/1.0 200 Connection Established"},
		{"private port, the right key, no user name", nil, target(devUUID, svc.port), []string{"Proxy-Authorization: " + basic("", opKey)},
			"HTTP/1.0 200 Connection Established"},
		{"private port, no key", nil, target(devUUID, svc.port), nil,
			"HTTP/1.0 407 Proxy Authorization Required"},
		{"private port, an unknown key", nil, target(devUUID, svc.port), []string{"Proxy-Authorization: " + basic("u", "nobody-SECRET")},
			"HTTP/1.0 407 Proxy Authorization Required"},
		{"private port, a key of another device", nil, target(devUUID, svc.port), []string{"Proxy-Authorization: " + basic("u", "other-SECRET")},
			"HTTP/1.0 407 Proxy Authorization Required"},
		{"private port, the guest key", nil, target(devUUID, svc.port), []string{"Proxy-Authorization: " + basic("u", balenatest.DefaultGuestKey)},
			"HTTP/1.0 407 Proxy Authorization Required"},
		{"key without a colon is the key, as a reference peer sends it", nil, target(devUUID, svc.port), []string{"Proxy-Authorization: Basic " + "b3BlcmF0b3ItU0VDUkVU"},
			"HTTP/1.0 200 Connection Established"},
		{"a wrong key without a colon", nil, target(devUUID, svc.port), []string{"Proxy-Authorization: Basic " + base64.StdEncoding.EncodeToString([]byte("wrong-SECRET"))},
			"HTTP/1.0 407 Proxy Authorization Required"},
		{"not a device", nil, "example.com:443", nil, "HTTP/1.0 403 Forbidden"},
		{"port out of range", nil, devUUID + ".balena:65536", nil, "HTTP/1.0 403 Forbidden"},
		{"not here, device offline", func(w *world) {
			w.res = newResolver()
			w.h.Resolver = w.res
			w.api.SetOffline(devUUID)
		}, target(devUUID, public.port), nil, "HTTP/1.0 503 Service Unavailable"},
		{"here, the API says offline: a device here is online", func(w *world) { w.api.SetOffline(devUUID) }, target(devUUID, public.port), nil,
			"HTTP/1.0 200 Connection Established"},
		{"canAccess fails", func(w *world) { w.api.FailNext(balenatest.CanAccess, 1, 500) }, target(devUUID, public.port), nil,
			"HTTP/1.0 500 Internal Server Error"},
		{"not here, the online check fails", func(w *world) {
			w.res = newResolver()
			w.h.Resolver = w.res
			w.api.FailNext(balenatest.DeviceOnline, 1, 502)
		}, target(devUUID, public.port), nil, "HTTP/1.0 500 Internal Server Error"},
		{"here, the online check would fail: not asked", func(w *world) { w.api.FailNext(balenatest.DeviceOnline, 1, 502) }, target(devUUID, public.port), nil,
			"HTTP/1.0 200 Connection Established"},
		{"API unreachable", func(w *world) {
			c := w.api.Client()
			c.BaseURL = "http://" + net.JoinHostPort("127.0.0.1", strconv.Itoa(int(closed)))
			w.h.Authorizer = c
		}, target(devUUID, public.port), nil, "HTTP/1.0 500 Internal Server Error"},
		{"device service down", func(w *world) { w.api.Grant(opKey, devUUID, closed) }, target(devUUID, closed), []string{"Proxy-Authorization: " + basic("u", opKey)},
			"HTTP/1.0 500 Internal Server Error"},
		{"not here and held by no server", func(w *world) {
			w.res = newResolver()
			w.h.Resolver = w.res
			w.api.SetOnline(devUUID, 0)
		}, target(devUUID, public.port), nil, "HTTP/1.0 500 Internal Server Error"},
		{"not here, the API says here", func(w *world) {
			w.res = newResolver()
			w.h.Resolver = w.res
		}, target(devUUID, svc.port), []string{"Proxy-Authorization: " + basic("u", opKey)}, "HTTP/1.0 500 Internal Server Error"},
		{"locate fails", func(w *world) {
			w.res = newResolver()
			w.h.Resolver = w.res
			w.api.FailNext(balenatest.LocateDevice, 1, 500)
		}, target(devUUID, svc.port), []string{"Proxy-Authorization: " + basic("u", opKey)}, "HTTP/1.0 500 Internal Server Error"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := newWorld(t, tt.setup)
			w.addDevice(devUUID, svc.port, public.port)
			w.api.AddDevice(balenatest.Device{UUID: dev2UUID, Key: "other-SECRET"})
			if tt.setup != nil {
				tt.setup(w) // again: addDevice reset the device's state
			}
			a := connect(t, w.addr, tt.target, tt.header...)
			if a.line != tt.want {
				t.Fatalf("got %q, want %q", a.line, tt.want)
			}
			if a.status == 200 {
				a.roundTrip(t, "hello")
			} else {
				a.waitEOF(t, 5*time.Second) // the proxy closes after an error
			}
		})
	}
}

func TestTooManyTunnels(t *testing.T) {
	is := is.New(t)
	svc := startService(t, echo)
	w := newWorld(t, func(w *world) { w.h.MaxTunnels = 1 })
	w.addDevice(devUUID, svc.port, svc.port)
	a := connect(t, w.addr, target(devUUID, svc.port))
	is.Equal(a.status, 200)
	b := connect(t, w.addr, target(devUUID, svc.port))
	is.Equal(b.line, "HTTP/1.0 503 Service Unavailable")
	// a's 200 comes before its tunnel is counted as open: wait for it,
	// so that the wait for none below means that a's place is free.
	waitFor(t, func() bool { return w.h.Tunnels() == 1 })
	a.conn.Close()
	if ti := w.waitClosed(t); ti.UUID != devUUID || ti.Via != "local" || w.h.Tunnels() != 0 {
		t.Fatalf("closed %+v, %d still open", ti, w.h.Tunnels())
	}
	c := connect(t, w.addr, target(devUUID, svc.port))
	is.Equal(c.status, 200)
}

// waitFor polls cond until it holds, for at most 5 s: for states that
// have no event to wait on (a tunnel's goroutines ending).
func waitFor(t testing.TB, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 5 s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestMethodNotAllowed(t *testing.T) {
	is := is.New(t)
	w := newWorld(t, nil)
	resp, err := http.Get("http://" + w.addr + "/")
	is.NoErr(err)
	resp.Body.Close()
	is.Equal(resp.StatusCode, 405)
	is.Equal(resp.Header.Get("Allow"), "CONNECT")

	w2 := newWorld(t, func(w *world) {
		w.h.Next = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "next") })
	})
	resp, err = http.Get("http://" + w2.addr + "/ping")
	is.NoErr(err)
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	is.Equal(resp.StatusCode, 200)
	is.Equal(string(b), "next")
}

func TestNoTarget(t *testing.T) {
	is := is.New(t)
	// net/http refuses an empty CONNECT target before the handler.
	w := newWorld(t, nil)
	c, err := net.Dial("tcp", w.addr)
	is.NoErr(err)
	defer c.Close()
	io.WriteString(c, "CONNECT  HTTP/1.1\r\n\r\n")
	a := readAnswer(t, c)
	is.Equal(a.status, 400)

	// The handler answers 400 itself when it gets one.
	h := &Handler{Authorizer: AllowAll}
	rec := httptest.NewRecorder()
	r := httptest.NewRequest(http.MethodConnect, "/", nil)
	r.RequestURI, r.Host = "", ""
	h.ServeHTTP(rec, r)
	is.Equal(rec.Code, 400)
}

// TestZeroHandler checks that the zero Handler works, and denies.
func TestZeroHandler(t *testing.T) {
	is := is.New(t)
	srv := &Server{}
	addr := serve(t, srv, "127.0.0.1:0")
	a := connect(t, addr, target(devUUID, 22))
	is.Equal(a.line, "HTTP/1.0 407 Proxy Authorization Required")
	a = connect(t, addr, "example.com:443")
	is.Equal(a.status, 403)
}

// TestAPIDownNotCached checks that a failed canAccess is a 500 and is not
// cached: the next request asks again and gets through.
func TestAPIDownNotCached(t *testing.T) {
	is := is.New(t)
	svc := startService(t, echo)
	w := newWorld(t, nil)
	w.addDevice(devUUID, svc.port)
	w.api.FailNext(balenatest.CanAccess, 1, http.StatusServiceUnavailable)
	auth := "Proxy-Authorization: " + basic("u", opKey)
	is.Equal(connect(t, w.addr, target(devUUID, svc.port), auth).status, 500)
	a := connect(t, w.addr, target(devUUID, svc.port), auth)
	is.Equal(a.status, 200)
	a.roundTrip(t, "back")
	is.Equal(w.api.Calls(balenatest.CanAccess), 2)
}

// TestAccessCache checks the 5 s cache per (uuid, port, key).
func TestAccessCache(t *testing.T) {
	is := is.New(t)
	svc := startService(t, echo)
	other := startService(t, echo)
	var mu sync.Mutex
	now := time.Unix(1000, 0)
	w := newWorld(t, func(w *world) {
		w.h.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	})
	w.addDevice(devUUID, svc.port, other.port)
	auth := "Proxy-Authorization: " + basic("u", opKey)
	open := func(port uint16, hdr ...string) {
		t.Helper()
		a := connect(t, w.addr, target(devUUID, port), hdr...)
		is.Equal(a.status, 200)
		a.conn.Close()
	}
	open(svc.port, auth)
	open(svc.port, auth)
	is.Equal(w.api.Calls(balenatest.CanAccess), 1) // cached
	open(other.port, auth)
	is.Equal(w.api.Calls(balenatest.CanAccess), 2) // another port
	open(other.port)
	is.Equal(w.api.Calls(balenatest.CanAccess), 3) // another key

	mu.Lock()
	now = now.Add(4999 * time.Millisecond)
	mu.Unlock()
	open(svc.port, auth)
	is.Equal(w.api.Calls(balenatest.CanAccess), 3)
	mu.Lock()
	now = now.Add(time.Millisecond)
	mu.Unlock()
	open(svc.port, auth)
	is.Equal(w.api.Calls(balenatest.CanAccess), 4) // expired

	// A denial is cached too.
	bad := "Proxy-Authorization: " + basic("u", "nobody-SECRET")
	is.Equal(connect(t, w.addr, target(devUUID, svc.port), bad).status, 407)
	is.Equal(connect(t, w.addr, target(devUUID, svc.port), bad).status, 407)
	is.Equal(w.api.Calls(balenatest.CanAccess), 5)
}

// TestAccessShared checks that identical questions in flight share one
// call, and that a waiter whose asker went away asks again. It runs in a
// synctest bubble: synctest.Wait returns once every caller is blocked,
// the waiters on the question in flight.
func TestAccessShared(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		is := is.New(t)
		release := make(chan struct{})
		var mu sync.Mutex
		calls := 0
		h := &Handler{Authorizer: AuthorizerFunc(func(ctx context.Context, uuid string, port uint16, key string) (int64, bool, error) {
			mu.Lock()
			calls++
			mu.Unlock()
			select {
			case <-release:
				return 7, true, nil
			case <-ctx.Done():
				return 0, false, ctx.Err()
			}
		})}
		count := func() int { mu.Lock(); defer mu.Unlock(); return calls }
		tg := Target{UUID: devUUID, TLD: "balena", Port: 22}
		ctx1, cancel1 := context.WithCancel(context.Background())
		first := make(chan error, 1)
		go func() { _, _, err := h.canAccess(ctx1, tg, "k"); first <- err }()
		synctest.Wait()
		is.Equal(count(), 1)

		const n = 5
		var wg sync.WaitGroup
		results := make(chan int64, n)
		for range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				id, ok, err := h.canAccess(context.Background(), tg, "k")
				if err == nil && ok {
					results <- id
				}
			}()
		}
		// Every waiter joined the question in flight: none asked.
		synctest.Wait()
		is.Equal(count(), 1)
		// The first asker goes away: one waiter asks again, the others share.
		cancel1()
		is.True(errors.Is(<-first, context.Canceled))
		synctest.Wait()
		is.Equal(count(), 2)
		close(release)
		wg.Wait()
		close(results)
		got := 0
		for id := range results {
			is.Equal(id, int64(7))
			got++
		}
		is.Equal(got, n)
		is.Equal(count(), 2)
	})
}

func TestResinDeprecated(t *testing.T) {
	is := is.New(t)
	svc := startService(t, echo)
	w := newWorld(t, nil)
	w.addDevice(devUUID, svc.port, svc.port)
	a := connect(t, w.addr, devUUID+".resin:"+strconv.Itoa(int(svc.port)))
	is.Equal(a.status, 200)
	a.roundTrip(t, "x")
	is.True(strings.Contains(w.log.String(), "deprecated"))
	b := connect(t, w.addr, devUUID+".vpn:"+strconv.Itoa(int(svc.port)))
	is.Equal(b.status, 200)
}

// TestRetryLocally checks the second look after the status-file interval:
// a device that shows up in the status files meanwhile is served here.
func TestRetryLocally(t *testing.T) {
	is := is.New(t)
	svc := startService(t, echo)
	w := newWorld(t, func(w *world) { w.h.RetryDelay = 200 * time.Millisecond })
	w.addDevice(devUUID, svc.port, svc.port)
	w.res = newResolver()
	w.h.Resolver = w.res // not in the status files yet
	go func() {
		// The status file is rewritten while the proxy waits.
		waitFor(t, func() bool { w.res.mu.Lock(); defer w.res.mu.Unlock(); return w.res.calls >= 1 })
		w.res.add(devUUID)
	}()
	a := connect(t, w.addr, target(devUUID, svc.port))
	is.Equal(a.status, 200)
	a.roundTrip(t, "late")
	w.res.mu.Lock()
	is.Equal(w.res.calls, 2)
	w.res.mu.Unlock()
}

// TestEarlyBytes checks that bytes sent right behind the request head are
// relayed first.
func TestEarlyBytes(t *testing.T) {
	is := is.New(t)
	got := make(chan string, 1)
	svc := startService(t, func(c net.Conn) {
		defer c.Close()
		b, _ := io.ReadAll(c)
		got <- string(b)
	})
	w := newWorld(t, nil)
	w.addDevice(devUUID, svc.port, svc.port)
	c, err := net.Dial("tcp", w.addr)
	is.NoErr(err)
	defer c.Close()
	tg := target(devUUID, svc.port)
	_, err = io.WriteString(c, "CONNECT "+tg+" HTTP/1.1\r\nHost: "+tg+"\r\n\r\nEARLY BYTES")
	is.NoErr(err)
	a := readAnswer(t, c)
	is.Equal(a.status, 200)
	io.WriteString(c, " and later ones")
	c.(*net.TCPConn).CloseWrite()
	is.Equal(<-got, "EARLY BYTES and later ones")
}

// TestHalfClose checks that an end of stream is passed on in each
// direction while the other direction goes on.
func TestHalfClose(t *testing.T) {
	t.Run("caller first", func(t *testing.T) {
		is := is.New(t)
		// The service reads to the end, then answers.
		svc := startService(t, func(c net.Conn) {
			defer c.Close()
			b, _ := io.ReadAll(c)
			io.WriteString(c, "got "+string(b))
			c.(*net.TCPConn).CloseWrite()
		})
		w := newWorld(t, nil)
		w.addDevice(devUUID, svc.port, svc.port)
		a := connect(t, w.addr, target(devUUID, svc.port))
		is.Equal(a.status, 200)
		io.WriteString(a.conn, "question")
		is.NoErr(a.conn.(*net.TCPConn).CloseWrite())
		b, err := io.ReadAll(a.r)
		is.NoErr(err)
		is.Equal(string(b), "got question")
	})
	t.Run("device first", func(t *testing.T) {
		is := is.New(t)
		// The service speaks and half-closes, then reads what comes.
		got := make(chan string, 1)
		svc := startService(t, func(c net.Conn) {
			defer c.Close()
			io.WriteString(c, "banner")
			c.(*net.TCPConn).CloseWrite()
			b, _ := io.ReadAll(c)
			got <- string(b)
		})
		w := newWorld(t, nil)
		w.addDevice(devUUID, svc.port, svc.port)
		a := connect(t, w.addr, target(devUUID, svc.port))
		is.Equal(a.status, 200)
		b, err := io.ReadAll(a.r) // ends: the device's end of stream came through
		is.NoErr(err)
		is.Equal(string(b), "banner")
		io.WriteString(a.conn, "still talking")
		a.conn.(*net.TCPConn).CloseWrite()
		is.Equal(<-got, "still talking")
	})
}

func TestSlowHeadCutOff(t *testing.T) {
	is := is.New(t)
	api := balenatest.NewServer(t)
	srv := &Server{Handler: &Handler{Authorizer: api.Client()}, ReadHeaderTimeout: 200 * time.Millisecond}
	addr := serve(t, srv, "127.0.0.1:0")
	c, err := net.Dial("tcp", addr)
	is.NoErr(err)
	defer c.Close()
	start := time.Now()
	io.WriteString(c, "CONNECT "+devUUID+".balena:22 HTTP/1.1\r\nHost: x\r\n") // and nothing more
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c)
	var ne net.Error
	is.True(!(errors.As(err, &ne) && ne.Timeout())) // the server closed it
	is.True(!strings.Contains(string(b), "200"))
	is.True(time.Since(start) < 3*time.Second)
	is.Equal(api.Calls(balenatest.CanAccess), 0)
}

func TestHugeHeaderRefused(t *testing.T) {
	is := is.New(t)
	api := balenatest.NewServer(t)
	srv := &Server{Handler: &Handler{Authorizer: api.Client()}}
	addr := serve(t, srv, "127.0.0.1:0")
	c, err := net.Dial("tcp", addr)
	is.NoErr(err)
	defer c.Close()
	go func() {
		tg := devUUID + ".balena:22"
		io.WriteString(c, "CONNECT "+tg+" HTTP/1.1\r\nHost: "+tg+"\r\nX-Bomb: "+strings.Repeat("a", 64<<10)+"\r\n\r\n")
	}()
	a := readAnswer(t, c)
	is.Equal(a.status, http.StatusRequestHeaderFieldsTooLarge)
	is.Equal(api.Calls(balenatest.CanAccess), 0)
}

func TestIdleTimeout(t *testing.T) {
	is := is.New(t)
	svc := startService(t, echo)
	w := newWorld(t, func(w *world) { w.h.IdleTimeout = 300 * time.Millisecond })
	w.addDevice(devUUID, svc.port, svc.port)
	a := connect(t, w.addr, target(devUUID, svc.port))
	is.Equal(a.status, 200)
	// Traffic every 100 ms keeps it open for three times the limit.
	a.roundTrip(t, "tick")
	for range 9 {
		time.Sleep(100 * time.Millisecond)
		a.roundTrip(t, "tick")
	}
	// Silence closes it, no sooner than the limit (less the kernel's
	// clock granularity).
	last := time.Now()
	a.waitEOF(t, 5*time.Second)
	is.True(time.Since(last) >= 280*time.Millisecond)
	ti := w.waitClosed(t)
	is.Equal(ti.BytesToDevice, int64(10*len("tick")))
	is.NoErr(ti.Err)
	is.True(strings.Contains(w.log.String(), "idle"))
}

func TestShutdown(t *testing.T) {
	is := is.New(t)
	svc := startService(t, echo)
	api := balenatest.NewServer(t)
	api.AddDevice(balenatest.Device{UUID: devUUID, PublicPorts: []uint16{svc.port}})
	h := &Handler{Authorizer: api.Client(), Resolver: newResolver(devUUID)}
	srv := &Server{Handler: h}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	is.NoErr(err)
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()

	a := connect(t, l.Addr().String(), target(devUUID, svc.port))
	is.Equal(a.status, 200)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	err = srv.Shutdown(ctx) // the tunnel stays open: it is closed at the deadline
	is.True(errors.Is(err, context.DeadlineExceeded))
	a.waitEOF(t, 5*time.Second)
	is.Equal(h.Tunnels(), 0)
	is.Equal(<-done, http.ErrServerClosed)

	// A shut handler refuses new tunnels.
	rec := httptest.NewRecorder()
	r := httptest.NewRequest(http.MethodConnect, "/", nil)
	r.RequestURI = target(devUUID, svc.port)
	h.ServeHTTP(rec, r)
	is.Equal(rec.Code, 503)
}

func TestShutdownWaits(t *testing.T) {
	is := is.New(t)
	svc := startService(t, echo)
	h := &Handler{Authorizer: AllowAll, Resolver: newResolver(devUUID)}
	srv := &Server{Handler: h}
	addr := serve(t, srv, "127.0.0.1:0")
	a := connect(t, addr, target(devUUID, svc.port))
	is.Equal(a.status, 200)
	done := make(chan error, 1)
	go func() { done <- h.Shutdown(context.Background()) }()
	a.roundTrip(t, "still works while shutting down")
	a.conn.Close()
	is.NoErr(<-done)
}

func TestMetrics(t *testing.T) {
	is := is.New(t)
	svc := startService(t, echo)
	reg := prometheus.NewRegistry()
	m, err := NewMetrics(reg)
	is.NoErr(err)
	_, err = NewMetrics(reg)
	is.True(err != nil) // registered twice
	closed := closedPort(t)
	w := newWorld(t, func(w *world) { w.h.Metrics = m })
	w.addDevice(devUUID, svc.port, svc.port, closed)

	a := connect(t, w.addr, target(devUUID, svc.port))
	is.Equal(a.status, 200)
	is.Equal(value(m.ActiveTunnels), 1.0)
	is.Equal(value(m.TotalTunnels), 1.0)
	a.roundTrip(t, "x")
	a.conn.Close()
	waitFor(t, func() bool { return value(m.ActiveTunnels) == 0 })
	is.Equal(value(m.TunnelErrors), 0.0)

	is.Equal(connect(t, w.addr, target(devUUID, closed)).status, 500)
	is.Equal(value(m.TunnelErrors), 1.0)
	is.Equal(value(m.TotalTunnels), 1.0)

	// A tunnel that breaks (the caller resets it) is an error.
	b := connect(t, w.addr, target(devUUID, svc.port))
	is.Equal(b.status, 200)
	b.roundTrip(t, "y")
	b.conn.(*net.TCPConn).SetLinger(0)
	io.WriteString(b.conn, "unread")
	b.conn.Close()
	waitFor(t, func() bool { return value(m.ActiveTunnels) == 0 })
	is.Equal(value(m.TunnelErrors), 2.0)
	is.Equal(value(m.TotalTunnels), 2.0)

	names := map[string]bool{}
	mfs, err := reg.Gather()
	is.NoErr(err)
	for _, mf := range mfs {
		names[mf.GetName()] = true
	}
	is.True(names["vpn_proxy_active_tunnels"] && names["vpn_proxy_total_tunnels"] && names["vpn_proxy_tunnel_errors"])
}

func TestErrorHandler(t *testing.T) {
	is := is.New(t)
	var got error
	w := newWorld(t, func(w *world) {
		w.h.ErrorHandler = func(rw http.ResponseWriter, r *http.Request, err error) {
			got = err
			http.Error(rw, "custom", http.StatusTeapot)
		}
	})
	a := connect(t, w.addr, "example.com:443")
	is.Equal(a.status, http.StatusTeapot)
	var se *StatusError
	is.True(errors.As(got, &se))
	is.Equal(se.Code, 403)
	is.True(errors.Is(got, ErrInvalidTarget))
}

func TestProxyKey(t *testing.T) {
	for _, tt := range []struct{ header, want string }{
		{basic("balena", "k"), "k"},
		{basic("", "k:with:colons"), "k:with:colons"},
		{"basic " + basic("u", "k")[6:], "k"},
		{"Basic !!!", ""},
		{"Bearer k", ""},
		{"Basic " + "aw==", "k"}, // "k": no colon, the key itself, as a reference peer forwards it
		{"", ""},
	} {
		h := http.Header{}
		if tt.header != "" {
			h.Set("Proxy-Authorization", tt.header)
		}
		if got := proxyKey(h); got != tt.want {
			t.Errorf("proxyKey(%q) = %q, want %q", tt.header, got, tt.want)
		}
	}
}

// TestReferencePeer: a reference server that forwards a CONNECT to this one
// sends the caller's key as Basic base64(<key>), without a "user:" part,
// and its signature in Forwarded; the key opens the port it grants. A
// device named in upper case is the same device: the API is asked, and
// the resolver searched, in lower case.
func TestReferencePeer(t *testing.T) {
	w := newWorld(t, nil)
	svc := startService(t, echo)
	w.addDevice(devUUID, svc.port)
	target := devUUID + ".balena:" + fmt.Sprint(svc.port)
	refKey := "Proxy-Authorization: Basic " + base64.StdEncoding.EncodeToString([]byte(opKey))
	a := connect(t, w.addr, target, refKey, "Forwarded: by=open-balena-vpn(99)")
	if a.status != http.StatusOK {
		t.Fatalf("a reference peer's forward: %s", a.line)
	}
	a.roundTrip(t, "hello from a reference peer")

	upper := strings.ToUpper(devUUID) + ".balena:" + fmt.Sprint(svc.port)
	b := connect(t, w.addr, upper, "Proxy-Authorization: "+basic("balena", opKey))
	if b.status != http.StatusOK {
		t.Fatalf("CONNECT %s: %s", upper, b.line)
	}
	b.roundTrip(t, "HELLO")
	for _, c := range w.api.AccessChecks() {
		if c.UUID != devUUID {
			t.Errorf("canAccess asked for %q, want %q", c.UUID, devUUID)
		}
	}
}

func TestForwardedBy(t *testing.T) {
	for _, tt := range []struct {
		values []string
		id     int64
		want   bool
	}{
		{[]string{"By=open-balena-vpn(1)"}, 1, true},
		{[]string{"By=open-balena-vpn(12)"}, 1, false},
		{[]string{"for=192.0.2.1, By=open-balena-vpn(2),By=open-balena-vpn(3)"}, 3, true},
		{[]string{"for=192.0.2.1;by=\"open-balena-vpn(4)\""}, 4, true},
		{[]string{"x", "By=open-balena-vpn(5)"}, 5, true},
		{[]string{"XBy=open-balena-vpn(5)"}, 5, false},
		{nil, 0, false},
	} {
		if got := forwardedBy(tt.values, tt.id); got != tt.want {
			t.Errorf("forwardedBy(%q, %d) = %v, want %v", tt.values, tt.id, got, tt.want)
		}
	}
}

// TestHandshakeKeepsEarlyBytes checks that bytes that arrive in the same
// segment as a peer's 200 are kept (the reference system drops them).
func TestHandshakeKeepsEarlyBytes(t *testing.T) {
	is := is.New(t)
	for _, tt := range []struct {
		answer string
		early  string
		err    bool
	}{
		{"HTTP/1.0 200 Connection Established\r\n\r\nSSH-2.0-OpenSSH_9.2\r\n", "SSH-2.0-OpenSSH_9.2\r\n", false},
		{"HTTP/1.1 200 OK\r\nProxy-Agent: x\r\n\r\n", "", false},
		{"HTTP/1.0 407 Proxy Authorization Required\r\n\r\n", "", true},
		{"HTTP/1.0 2000 what\r\n\r\n", "", true},
		{"SSH-2.0-x\r\n\r\n", "", true},
		{"HTTP/1.0 200 OK\r\n", "", true}, // closed before the head ends
	} {
		const req = "CONNECT x HTTP/1.0\r\n\r\n"
		c1, c2 := net.Pipe()
		go func() {
			io.ReadFull(c2, make([]byte, len(req)))
			io.WriteString(c2, tt.answer)
			c2.Close()
		}()
		early, err := handshake(context.Background(), c1, req)
		is.Equal(err != nil, tt.err)
		if err != nil {
			is.True(errors.Is(err, ErrPeer))
		}
		is.Equal(string(early), tt.early)
		c1.Close()
	}
}

// TestHandshakeContext checks that a silent peer does not hold the request
// beyond its context.
func TestHandshakeContext(t *testing.T) {
	is := is.New(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	is.NoErr(err)
	defer l.Close()
	go func() {
		c, err := l.Accept()
		if err == nil {
			defer c.Close()
			io.Copy(io.Discard, c)
		}
	}()
	c, err := net.Dial("tcp", l.Addr().String())
	is.NoErr(err)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err = handshake(ctx, c, "CONNECT x HTTP/1.0\r\n\r\n")
	is.True(errors.Is(err, ErrPeer))
	is.True(errors.Is(err, context.DeadlineExceeded))
}

// value reads a gauge's or a counter's value.
func value(c prometheus.Metric) float64 {
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		panic(err)
	}
	if g := m.GetGauge(); g != nil {
		return g.GetValue()
	}
	return m.GetCounter().GetValue()
}

// TestShutdownCancelsSetUp checks that a Shutdown out of time also ends
// requests still being set up (here, waiting to look for the device once
// more).
func TestShutdownCancelsSetUp(t *testing.T) {
	is := is.New(t)
	svc := startService(t, echo)
	w := newWorld(t, func(w *world) { w.h.RetryDelay = time.Hour })
	w.addDevice(devUUID, svc.port, svc.port)
	w.res = newResolver() // the API says here, the status files do not
	w.h.Resolver = w.res
	answered := make(chan string, 1)
	go func() {
		c, err := net.Dial("tcp", w.addr)
		if err != nil {
			answered <- err.Error()
			return
		}
		defer c.Close()
		tg := target(devUUID, svc.port)
		io.WriteString(c, "CONNECT "+tg+" HTTP/1.1\r\nHost: "+tg+"\r\n\r\n")
		b, _ := io.ReadAll(c)
		answered <- string(b)
	}()
	waitFor(t, func() bool { return w.api.Calls(balenatest.LocateDevice) == 1 })

	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := w.srv.Shutdown(ctx)
	is.True(errors.Is(err, context.DeadlineExceeded))
	is.True(time.Since(start) < 5*time.Second)
	is.Equal(<-answered, "HTTP/1.0 500 Internal Server Error\r\n\r\n")
}

func TestServerClose(t *testing.T) {
	is := is.New(t)
	svc := startService(t, echo)
	h := &Handler{Authorizer: AllowAll, Resolver: newResolver(devUUID)}
	srv := &Server{Handler: h}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	is.NoErr(err)
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	a := connect(t, l.Addr().String(), target(devUUID, svc.port))
	is.Equal(a.status, 200)
	is.NoErr(srv.Close())
	a.waitEOF(t, 5*time.Second)
	is.Equal(<-done, http.ErrServerClosed)
	is.Equal(h.Tunnels(), 0)
}

// TestDeadlinesClearedAfterHijack: an http.Server's read and write
// timeouts bound the request head, not the tunnel that follows it.
func TestDeadlinesClearedAfterHijack(t *testing.T) {
	svc := startService(t, echo)
	w := newWorld(t, nil)
	w.addDevice(devUUID, svc.port, svc.port)
	hs := &http.Server{Handler: w.h, ReadTimeout: 200 * time.Millisecond, WriteTimeout: 200 * time.Millisecond,
		ReadHeaderTimeout: 200 * time.Millisecond}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go hs.Serve(l)
	defer hs.Close()
	a := connect(t, l.Addr().String(), target(devUUID, svc.port))
	if a.status != 200 {
		t.Fatalf("CONNECT: %s", a.line)
	}
	a.roundTrip(t, "before")
	time.Sleep(500 * time.Millisecond) // past both timeouts: what is tested, not a synchronisation
	a.roundTrip(t, "after the server's timeouts")
}

// TestLocalDeviceIsOnline: a device found here is online here, and the
// API is not asked whether it is; one found nowhere here is.
func TestLocalDeviceIsOnline(t *testing.T) {
	svc := startService(t, echo)
	w := newWorld(t, nil)
	w.addDevice(devUUID, svc.port)
	a := connect(t, w.addr, target(devUUID, svc.port), "Proxy-Authorization: "+basic("u", opKey))
	if a.status != 200 {
		t.Fatalf("got %q, want 200", a.line)
	}
	a.roundTrip(t, "here")
	if n := w.api.Calls(balenatest.DeviceOnline); n != 0 {
		t.Errorf("the API was asked %d times whether a device here is online", n)
	}

	w.res.mu.Lock()
	delete(w.res.names, devUUID+".vpn")
	w.res.mu.Unlock()
	w.api.SetOffline(devUUID)
	a = connect(t, w.addr, target(devUUID, svc.port), "Proxy-Authorization: "+basic("u", opKey))
	if a.status != 503 || w.api.Calls(balenatest.DeviceOnline) != 1 {
		t.Fatalf("not here and offline: got %q after %d online checks, want 503 after 1", a.line, w.api.Calls(balenatest.DeviceOnline))
	}
}
