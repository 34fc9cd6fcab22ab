package vpn_test

import (
	"context"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/obvpn/obvpn/vpn/balena/balenatest"
	"github.com/obvpn/obvpn/vpn/haproxy"
	"github.com/obvpn/obvpn/vpn/vpntest"
)

// get sends GET url with the monitoring credentials user:pass (none when
// user is empty) and returns the status, the WWW-Authenticate header and
// the body.
func get(t *testing.T, hc *http.Client, url, user, pass string) (int, string, string) {
	t.Helper()
	req, err := http.NewRequest("GET", url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if user != "" {
		req.SetBasicAuth(user, pass)
	}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header.Get("WWW-Authenticate"), string(b)
}

// TestServerMonitoring runs the server with MONITOR_SECRET_TOKEN set
// behind its managed HAProxy, with a real device: the monitor frontend
// answers /ping to anyone and everything else only with the credentials
// (401 and a challenge without them or with a wrong token), serves
// HAProxy's own exporter, the server's metrics, the per-client byte
// counts by common name and the node exporter, and 503 for the process
// exporter, which is not configured; the server's own metrics listener
// wants the credentials too; the rendered haproxy.cfg, which holds the
// token, is readable by its owner only.
func TestServerMonitoring(t *testing.T) {
	vpntest.Require(t, "openvpn", "haproxy", "ip")
	const token = "t0k3n-$ecret\"x"
	ws := startWorldServer(t, map[string]string{
		"MONITOR_SECRET_TOKEN":   token,
		"VPN_METRICS_ADDR":       "127.0.0.1:8090",
		"VPN_BYTECOUNT_INTERVAL": "1",
		"VPN_NODE_EXPORTER_ADDR": "127.0.0.1:9100",
	})
	world, pki, api, run := ws.world, ws.pki, ws.api, ws.run

	// A node exporter in the world namespace.
	l, err := world.Listen("tcp", "127.0.0.1:9100")
	if err != nil {
		t.Fatal(err)
	}
	node := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "node_exporter_build_info{path=\""+r.URL.Path+"\"} 1\n")
	})}
	go node.Serve(l)
	t.Cleanup(func() { node.Close() })

	fi, err := os.Stat(filepath.Join(run, "haproxy.cfg"))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("haproxy.cfg mode %v, want 0600: it holds the token", fi.Mode().Perm())
	}

	hc := &http.Client{Transport: &http.Transport{DialContext: world.Dial}}
	const monitor, metrics = "http://127.0.0.1:8088", "http://127.0.0.1:8090"
	if code, _, _ := get(t, hc, monitor+"/ping", "", ""); code != 200 {
		t.Errorf("HAProxy's /ping without credentials: %d, want 200", code)
	}
	if code, _, body := get(t, hc, metrics+"/ping", "", ""); code != 200 || body != "OK" {
		t.Errorf("the metrics listener's /ping without credentials: %d %q, want 200 OK", code, body)
	}
	for _, tt := range []struct {
		base, path string
		code       int
		body       string // in the body with the credentials
	}{
		{monitor, "/metrics/haproxy", 200, "haproxy_process_nbthread 2"},
		{monitor, "/cluster_metrics", 200, "vpn_online_devices"},
		{monitor, "/metrics/openvpn", 200, ""},
		{monitor, "/metrics/node", 200, `node_exporter_build_info{path="/metrics/node"} 1`},
		{monitor, "/metrics/process", 503, "process-exporter: not configured"},
		{monitor, "/elsewhere", 404, "not found"},
		{metrics, "/cluster_metrics", 200, "vpn_online_devices"},
		{metrics, "/metrics", 200, "vpn_online_devices"},
		{metrics, "/metrics/openvpn", 200, ""},
	} {
		url := tt.base + tt.path
		for _, cred := range [][2]string{{"", ""}, {haproxy.MonitorUser, "wrong"}, {"admin", token}, {haproxy.MonitorUser, token + "x"}} {
			code, challenge, _ := get(t, hc, url, cred[0], cred[1])
			if code != 401 || !strings.HasPrefix(challenge, "Basic ") {
				t.Errorf("GET %s as %q: %d, WWW-Authenticate %q; want 401 and a Basic challenge", url, cred[0], code, challenge)
			}
		}
		code, _, body := get(t, hc, url, haproxy.MonitorUser, token)
		if code != tt.code || !strings.Contains(body, tt.body) {
			t.Errorf("GET %s with the token: %d, want %d with %q in:\n%.2000s", url, code, tt.code, tt.body, body)
		}
	}

	// A device: its byte counts by common name, from the management
	// interface's BYTECOUNT_CLI.
	d := api.AddDevice(balenatest.Device{UUID: "0123456789abcdef0123456789abcdef", Key: "k1"})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c := vpntest.StartClient(t, vpntest.ClientOptions{Netns: world, Remote: "127.0.0.1:1194", CA: pki.CAFile,
		Username: d.UUID, Password: d.Key})
	if _, err := c.WaitFor(ctx, "Initialization Sequence Completed"); err != nil {
		t.Fatal(err)
	}
	rx := regexp.MustCompile(`openvpn_server_client_received_bytes_total\{common_name="` + d.UUID + `",instance="[12]"\} (\d+)`)
	for _, base := range []string{monitor, metrics} {
		waitUntil(t, ctx, func() bool {
			_, _, body := get(t, hc, base+"/metrics/openvpn", haproxy.MonitorUser, token)
			m := rx.FindStringSubmatch(body)
			if m == nil {
				return false
			}
			n, _ := strconv.Atoi(m[1])
			return n > 0 && strings.Contains(body, "openvpn_server_connected_clients{instance=")
		})
	}
}
