package vpn

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/obvpn/obvpn/vpn/haproxy"
)

func TestRequireMonitorToken(t *testing.T) {
	ok := http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "metrics") })
	for _, tt := range []struct {
		name, token, path, user, pass string
		want                          int
	}{
		{"no token guards nothing", "", "/cluster_metrics", "", "", 200},
		{"ping is open", "s3cret", "/ping", "", "", 200},
		{"no credentials", "s3cret", "/cluster_metrics", "", "", 401},
		{"wrong token", "s3cret", "/cluster_metrics", haproxy.MonitorUser, "s3cre", 401},
		{"longer token", "s3cret", "/metrics/openvpn", haproxy.MonitorUser, "s3cret!", 401},
		{"wrong user", "s3cret", "/cluster_metrics", "admin", "s3cret", 401},
		{"token", "s3cret", "/metrics/openvpn", haproxy.MonitorUser, "s3cret", 200},
		{"token with a colon", "a:b", "/metrics", haproxy.MonitorUser, "a:b", 200},
	} {
		t.Run(tt.name, func(t *testing.T) {
			req := httptest.NewRequest("GET", tt.path, nil)
			if tt.user != "" {
				req.SetBasicAuth(tt.user, tt.pass)
			}
			rec := httptest.NewRecorder()
			RequireMonitorToken(tt.token, ok).ServeHTTP(rec, req)
			if rec.Code != tt.want {
				t.Errorf("got %d, want %d", rec.Code, tt.want)
			}
			if tt.want == 401 && !strings.HasPrefix(rec.Header().Get("WWW-Authenticate"), "Basic ") {
				t.Errorf("WWW-Authenticate %q, want a Basic challenge", rec.Header().Get("WWW-Authenticate"))
			}
			if strings.Contains(rec.Body.String(), tt.token) && tt.token != "" && tt.want == 401 {
				t.Errorf("the answer holds the token: %q", rec.Body.String())
			}
		})
	}
}

// TestHAProxyMaxConn checks maxconn against the file limit: the default
// and a given value are lowered to what the limit allows, with a comment,
// unless the file limit is set; a limit that is unknown or large enough
// lowers nothing.
func TestHAProxyMaxConn(t *testing.T) {
	for _, tt := range []struct {
		name            string
		h               haproxy.Config
		fdLimit         uint64
		want, wantFrom  int
		ulimit, comment bool
	}{
		{"default, no limit known", haproxy.Config{}, 0, 10000, 0, false, false},
		{"default, large limit", haproxy.Config{}, 1 << 20, 10000, 0, false, false},
		{"default, 20000 descriptors", haproxy.Config{}, 20000, 7960, 10000, false, true},
		{"given, 1024 descriptors", haproxy.Config{MaxConn: 5000}, 1024, 369, 5000, false, true},
		{"file limit set", haproxy.Config{MaxConn: 50000, FileLimit: 200000}, 20000, 50000, 0, true, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			n, from := tt.h.MaxConnFor(tt.fdLimit)
			if n != tt.want || from != tt.wantFrom {
				t.Errorf("maxConn(%d) = %d, %d; want %d, %d", tt.fdLimit, n, from, tt.want, tt.wantFrom)
			}
			c := &Config{HAProxy: tt.h}
			text := c.renderHAProxy(tt.fdLimit)
			if got := strings.Count(text, "\tmaxconn "+itoa(tt.want)+"\n"); got != 2 {
				t.Errorf("maxconn %d: %d times, want twice (global and the VPN frontend):\n%s", tt.want, got, text)
			}
			if got := strings.Contains(text, "ulimit-n"); got != tt.ulimit {
				t.Errorf("ulimit-n in the configuration: %v, want %v", got, tt.ulimit)
			}
			if got := strings.Contains(text, "# maxconn lowered"); got != tt.comment {
				t.Errorf("the lowering's comment: %v, want %v", got, tt.comment)
			}
		})
	}
}

// TestRenderHAProxyKnobs checks the documented zero values of the HAProxy
// settings on a hand-built Config, and the settings given.
func TestRenderHAProxyKnobs(t *testing.T) {
	for _, tt := range []struct {
		name string
		c    Config
		want []string
		not  []string
	}{
		{"zero values", Config{},
			[]string{"\tnbthread 2\n", "\tcpu-map auto:1/1-2 0-1\n", "\ttimeout client 60s\n", "\ttimeout server 60s\n", "\tmaxconn 10000\n"},
			[]string{"userlist", "http-request auth", "prometheus-exporter"}},
		{"keepalive timeout", Config{OpenVPN: OpenVPNConfig{KeepaliveTimeout: 9 * time.Second}},
			[]string{"\ttimeout client 9s\n", "\ttimeout server 9s\n"}, nil},
		{"haproxy timeout wins", Config{OpenVPN: OpenVPNConfig{KeepaliveTimeout: 9 * time.Second}, HAProxy: haproxy.Config{Timeout: 45 * time.Second}},
			[]string{"\ttimeout client 45s\n", "\ttimeout server 45s\n"}, []string{"9s"}},
		{"threads and no cpu map", Config{HAProxy: haproxy.Config{Threads: 4, CPUMap: "none", FileLimit: 65536}},
			[]string{"\tnbthread 4\n", "\tulimit-n 65536\n"}, []string{"cpu-map"}},
		{"token", Config{Metrics: MetricsConfig{Addr: ":9090", Token: "t"}, HAProxy: haproxy.Config{NodeExporter: "127.0.0.1:9000"}},
			[]string{"userlist obvpn-monitor\n\tuser monitor insecure-password 't'\n", "\thttp-request auth realm obvpn-monitor unless monitor_auth\n",
				"\thttp-request use-service prometheus-exporter if { path /metrics/haproxy }\n",
				"\tuse_backend node-exporter if { path /metrics/node }\n", "\tserver node_exporter 127.0.0.1:9000\n",
				"\thttp-request return status 503 content-type text/plain string \"process-exporter: not configured\" if { path /metrics/process }\n",
				"\tuse_backend vpn-metrics if { path /cluster_metrics /metrics/openvpn }\n", "\tserver vpn_metrics 127.0.0.1:9090\n",
				"\ttimeout server 25s\n"},
			[]string{"process_exporter"}},
		{"token, metrics on one address", Config{Metrics: MetricsConfig{Addr: "192.0.2.1:9090", Token: "t", Timeout: time.Minute}},
			[]string{"\tserver vpn_metrics 192.0.2.1:9090\n", "\ttimeout server 65s\n"}, nil},
		{"token, metrics on any port", Config{Metrics: MetricsConfig{Addr: "127.0.0.1:0", Token: "t"}},
			[]string{"string \"vpn-metrics: not configured\" if { path /cluster_metrics /metrics/openvpn }"}, []string{"backend vpn-metrics"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			text := tt.c.renderHAProxy(0)
			for _, w := range tt.want {
				if !strings.Contains(text, w) {
					t.Errorf("no %q in:\n%s", w, text)
				}
			}
			for _, n := range tt.not {
				if strings.Contains(text, n) {
					t.Errorf("%q in:\n%s", n, text)
				}
			}
		})
	}
}

func itoa(n int) string { return strconv.Itoa(n) }
