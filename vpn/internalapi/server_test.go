package internalapi

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/matryer/is"
	"github.com/obvpn/obvpn/vpn/hook"
)

// uuidA is a device of the tests.
const uuidA = "0123456789abcdef0123456789abcdef"

type fakeAuth struct{ allow map[string]string } // uuid → key

func (f fakeAuth) Authenticate(_ context.Context, uuid, key string) (bool, error) {
	return f.allow[uuid] == key, nil
}

// countedClients counts each device's sessions as the server's accounting
// does: every new session is learned ("+uuid@instance"), the end of the
// last one too ("-uuid@instance"), and a disconnect that comes before its
// connect cancels that connect.
type countedClients struct {
	mu  sync.Mutex
	n   map[string]int
	log []string
}

func (c *countedClients) Connected(instance int, ev hook.ClientEvent) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.n == nil {
		c.n = map[string]int{}
	}
	before := c.n[ev.CommonName]
	c.n[ev.CommonName]++
	if before >= 0 {
		c.log = append(c.log, fmt.Sprintf("+%s@%d", ev.CommonName, instance))
	}
}

func (c *countedClients) Disconnected(instance int, ev hook.ClientEvent) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.n == nil {
		c.n = map[string]int{}
	}
	before := c.n[ev.CommonName]
	c.n[ev.CommonName]--
	if before == 1 {
		c.log = append(c.log, fmt.Sprintf("-%s@%d", ev.CommonName, instance))
	}
	return before
}

func do(h http.Handler, remote, method, path, body string) *httptest.ResponseRecorder {
	r := httptest.NewRequest(method, path, strings.NewReader(body))
	r.RemoteAddr = remote
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	return w
}

func TestInternalAPIAuth(t *testing.T) {
	api := &Server{Auth: fakeAuth{map[string]string{uuidA: "key"}}, DelayOnAuthFail: 30 * time.Millisecond}
	tests := []struct {
		name, body string
		code       int
		delayed    bool
	}{
		{"allowed", `{"username":"` + uuidA + `","password":"key"}`, 200, false},
		{"denied", `{"username":"` + uuidA + `","password":"nope"}`, 401, true},
		{"malformed uuid is denied", `{"username":"not-a-uuid","password":"key"}`, 401, true},
		{"no username", `{"password":"key"}`, 400, false},
		{"no password", `{"username":"` + uuidA + `"}`, 400, false},
		{"empty password", `{"username":"` + uuidA + `","password":""}`, 400, false},
		{"not JSON", `username=x&password=y`, 400, false},
		{"wrong types", `{"username":1,"password":2}`, 400, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			start := time.Now()
			w := do(api, "127.0.0.1:5000", "POST", "/api/v1/auth/", tt.body)
			if w.Code != tt.code {
				t.Fatalf("status %d, want %d", w.Code, tt.code)
			}
			if tt.code == 200 && w.Body.String() != "OK" {
				t.Errorf("body %q", w.Body.String())
			}
			if took := time.Since(start); tt.delayed != (took >= 30*time.Millisecond) {
				t.Errorf("answered after %v; delayed: %v", took, tt.delayed)
			}
		})
	}
	if w := do(api, "127.0.0.1:5000", "GET", "/api/v1/auth/", ""); w.Code != 405 {
		t.Errorf("GET auth: %d", w.Code)
	}
	if w := do(api, "127.0.0.1:5000", "POST", "/api/v1/auth/", strings.Repeat(" ", maxAPIBody+1)+"{}"); w.Code != 400 {
		t.Errorf("huge body: %d", w.Code)
	}
}

func TestInternalAPIClients(t *testing.T) {
	is := is.New(t)
	state := &countedClients{}
	api := &Server{Clients: state, Instances: 2}
	const b = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
	post := func(inst, body string) int {
		return do(api, "[::1]:5000", "POST", "/api/v2/"+inst+"/clients/", body).Code
	}
	del := func(inst, body string) int {
		return do(api, "[::1]:5000", "DELETE", "/api/v2/"+inst+"/clients/", body).Code
	}

	is.Equal(post("1", `{"common_name":"`+uuidA+`"}`), 200)
	is.Equal(post("2", `{"common_name":"`+uuidA+`"}`), 200) // a second session
	is.Equal(del("1", `{"common_name":"`+uuidA+`","bytes_received":"10","bytes_sent":20,"time_duration":"3"}`), 400)
	is.Equal(del("2", `{"common_name":"`+uuidA+`","bytes_received":10,"bytes_sent":20,"time_duration":3}`), 200)
	// Out of order: the disconnect first, then the connect.
	is.Equal(del("1", `{"common_name":"`+b+`"}`), 400)
	is.Equal(post("1", `{"common_name":"`+b+`"}`), 200)
	// Each session is learned, with its instance, and the last one's end;
	// b never went online.
	is.Equal(state.log, []string{"+" + uuidA + "@1", "+" + uuidA + "@2", "-" + uuidA + "@2"})

	is.Equal(post("1", `{}`), 400)
	is.Equal(post("1", `{"common_name":"../x"}`), 400)
	is.Equal(del("1", `{"common_name":"`+uuidA+`","bytes_sent":-1}`), 400)
	is.Equal(post("3", `{"common_name":"`+uuidA+`"}`), 404)
	is.Equal(post("0", `{"common_name":"`+uuidA+`"}`), 404)
	is.Equal(post("x", `{"common_name":"`+uuidA+`"}`), 404)
	is.Equal(do(api, "[::1]:5000", "PUT", "/api/v2/1/clients/", `{}`).Code, 405)
	// A device in any letter case is one device, reported in lower case.
	state.log = nil
	is.Equal(post("1", `{"common_name":"`+strings.ToUpper(uuidA)+`"}`), 200)
	is.Equal(del("1", `{"common_name":"`+uuidA+`"}`), 200)
	is.Equal(state.log, []string{"+" + uuidA + "@1", "-" + uuidA + "@1"})
	// Upstream's client hooks leave the trailing slash out.
	is.Equal(do(api, "[::1]:5000", "POST", "/api/v2/1/clients", `{"common_name":"`+uuidA+`"}`).Code, 200)
	is.Equal(do(api, "[::1]:5000", "DELETE", "/api/v2/1/clients", `{"common_name":"`+uuidA+`"}`).Code, 200)
	is.Equal(do(api, "[::1]:5000", "POST", "/api/v2/1/clientsx", `{"common_name":"`+uuidA+`"}`).Code, 404)
	is.Equal(do(api, "[::1]:5000", "GET", "/nothing", ``).Code, 404)
}

func TestInternalAPILoopbackOnly(t *testing.T) {
	api := &Server{Auth: fakeAuth{map[string]string{uuidA: "key"}}}
	body := `{"username":"` + uuidA + `","password":"key"}`
	for remote, want := range map[string]int{
		"127.0.0.1:1":          200,
		"127.1.2.3:1":          200,
		"[::1]:1":              200,
		"[::ffff:127.0.0.1]:1": 200,
		"192.0.2.1:1":          401,
		"[2001:db8::1]:1":      401,
		"[::ffff:192.0.2.1]:1": 401,
		"garbage":              401,
	} {
		if w := do(api, remote, "POST", "/api/v1/auth/", body); w.Code != want {
			t.Errorf("from %s: %d, want %d", remote, w.Code, want)
		}
		if w := do(api, remote, "POST", "/api/v2/1/clients/", `{"common_name":"`+uuidA+`"}`); (w.Code == 401) != (want == 401) {
			t.Errorf("clients from %s: %d", remote, w.Code)
		}
		if w := do(api, remote, "GET", "/ping", ""); w.Code != 200 || w.Body.String() != "OK" {
			t.Errorf("ping from %s: %d %q", remote, w.Code, w.Body.String())
		}
	}
}

// TestInternalAPIIgnoresForwardedFor: whatever TRUST_PROXY says, a remote
// caller that claims to be loopback in X-Forwarded-For is still remote.
func TestInternalAPIIgnoresForwardedFor(t *testing.T) {
	for _, trust := range []TrustProxy{{All: true}, {Hops: 1}, {Prefixes: []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}}} {
		api := &Server{Auth: fakeAuth{map[string]string{uuidA: "key"}}, TrustProxy: trust}
		r := httptest.NewRequest("POST", "/api/v1/auth/", strings.NewReader(`{"username":"`+uuidA+`","password":"key"}`))
		r.RemoteAddr = "192.0.2.1:1"
		r.Header.Set("X-Forwarded-For", "127.0.0.1")
		w := httptest.NewRecorder()
		api.ServeHTTP(w, r)
		if w.Code != 401 {
			t.Errorf("TRUST_PROXY=%s, X-Forwarded-For: 127.0.0.1 from 192.0.2.1: %d, want 401", trust, w.Code)
		}
	}
}

func TestClientAddr(t *testing.T) {
	lo := netip.MustParsePrefix("127.0.0.0/8")
	tests := []struct {
		name  string
		trust TrustProxy
		peer  string
		xff   string
		want  string
	}{
		{"no trust ignores the header", TrustProxy{}, "192.0.2.1:1", "127.0.0.1", "192.0.2.1"},
		{"all", TrustProxy{All: true}, "127.0.0.1:1", "198.51.100.7, 192.0.2.1", "198.51.100.7"},
		{"one hop", TrustProxy{Hops: 1}, "127.0.0.1:1", "198.51.100.7, 192.0.2.1", "192.0.2.1"},
		{"hops beyond the chain", TrustProxy{Hops: 9}, "127.0.0.1:1", "192.0.2.1", "192.0.2.1"},
		{"prefix: the nearest untrusted", TrustProxy{Prefixes: []netip.Prefix{lo}}, "127.0.0.1:1", "198.51.100.7, 192.0.2.1, 127.0.0.2", "192.0.2.1"},
		{"prefix: untrusted peer", TrustProxy{Prefixes: []netip.Prefix{lo}}, "192.0.2.9:1", "127.0.0.1", "192.0.2.9"},
		{"forged header", TrustProxy{All: true}, "127.0.0.1:1", "127.0.0.1, not-an-ip", "invalid IP"},
		{"mapped", TrustProxy{}, "[::ffff:127.0.0.1]:1", "", "127.0.0.1"},
	}
	for _, tt := range tests {
		r := httptest.NewRequest("GET", "/", nil)
		r.RemoteAddr = tt.peer
		if tt.xff != "" {
			r.Header.Set("X-Forwarded-For", tt.xff)
		}
		if got := clientAddr(r, tt.trust); got.String() != tt.want {
			t.Errorf("%s: %s, want %s", tt.name, got, tt.want)
		}
	}
}
