package vpn_test

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/obvpn/obvpn/vpn"
	"github.com/obvpn/obvpn/vpn/balena/balenatest"
	"github.com/obvpn/obvpn/vpn/haproxy"
	"github.com/obvpn/obvpn/vpn/vpntest"
)

// haproxyTestEnv is a complete environment for vpn.Loader with real PEM
// values from pki (or placeholders when pki is nil), overridden by extra.
func haproxyTestEnv(pki *vpntest.PKI, extra map[string]string) map[string]string {
	ca, crt, key := "-----BEGIN CERTIFICATE-----\nTUlJQg==\n-----END CERTIFICATE-----\n",
		"-----BEGIN CERTIFICATE-----\nTUlJQg==\n-----END CERTIFICATE-----\n",
		"-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1ieXRlcw==\n-----END PRIVATE KEY-----\n"
	if pki != nil {
		ca, crt, key = string(pki.CACert), string(pki.ServerCert), string(pki.ServerKey)
	}
	env := map[string]string{
		"VPN_BASE_SUBNET":             "10.240.0.0/16",
		"VPN_INSTANCE_SUBNET_BITMASK": "24",
		"VPN_INSTANCE_COUNT":          "2",
		"BALENA_API_HOST":             "api.example.com",
		"VPN_SERVICE_API_KEY":         "service-key",
		"VPN_OPENVPN_CA_CRT":          ca,
		"VPN_OPENVPN_SERVER_CRT":      crt,
		"VPN_OPENVPN_SERVER_KEY":      key,
	}
	for k, v := range extra {
		env[k] = v
	}
	return env
}

// haproxySections splits an HAProxy configuration into its sections, keyed
// by their header line ("global", "frontend vpn", "backend vpn-workers"),
// each the list of its trimmed, non-comment lines.
func haproxySections(cfg string) map[string][]string {
	sections := map[string][]string{}
	cur := ""
	for _, line := range strings.Split(cfg, "\n") {
		trimmed := strings.Join(strings.Fields(line), " ")
		if trimmed == "" || strings.HasPrefix(trimmed, "#") {
			continue
		}
		if line[0] != ' ' && line[0] != '\t' { // a section header
			cur = trimmed
			sections[cur] = nil
			continue
		}
		sections[cur] = append(sections[cur], trimmed)
	}
	return sections
}

// withPrefix returns the lines that start with the keyword prefix.
func withPrefix(lines []string, prefix string) []string {
	var out []string
	for _, l := range lines {
		if l == prefix || strings.HasPrefix(l, prefix+" ") {
			out = append(out, l)
		}
	}
	return out
}

// TestRenderHAProxyContent checks the configuration RenderHAProxy renders
// for configs loaded from the environment (SPEC §7): the TCP frontend
// binding VPN_PORT (with accept-proxy exactly when
// VPN_HAPROXY_USEPROXYPROTOCOL=true), balance leastconn over backend
// vpn-workers made from a disabled server-template of the instance count,
// the HTTP monitor frontend whose /ping fails while no vpn-workers server
// is up, and the admin stats socket at VPN_HAPROXY_SOCKET.
func TestRenderHAProxyContent(t *testing.T) {
	tests := []struct {
		name string
		env  map[string]string
		// The exact lines wanted.
		bind, monitorBind, template, socket string
	}{
		{
			name:        "defaults",
			env:         map[string]string{},
			bind:        "bind :443",
			monitorBind: "bind :80",
			template:    "server-template vpn 1-2 127.0.0.1:10000 disabled",
			socket:      "stats socket /run/haproxy.sock mode 600 level admin",
		},
		{
			name: "port socket and monitor",
			env: map[string]string{"VPN_PORT": "1194", "VPN_HAPROXY_SOCKET": "/tmp/obvpn/admin.sock",
				"VPN_HAPROXY_MONITOR_ADDR": "127.0.0.1:8088", "VPN_HAPROXY_USEPROXYPROTOCOL": "false"},
			bind:        "bind :1194",
			monitorBind: "bind 127.0.0.1:8088",
			template:    "server-template vpn 1-2 127.0.0.1:10000 disabled",
			socket:      "stats socket /tmp/obvpn/admin.sock mode 600 level admin",
		},
		{
			name:        "proxy protocol",
			env:         map[string]string{"VPN_PORT": "1194", "VPN_HAPROXY_USEPROXYPROTOCOL": "true"},
			bind:        "bind :1194 accept-proxy",
			monitorBind: "bind :80",
			template:    "server-template vpn 1-2 127.0.0.1:10000 disabled",
			socket:      "stats socket /run/haproxy.sock mode 600 level admin",
		},
		{
			name:        "one instance",
			env:         map[string]string{"VPN_INSTANCE_COUNT": "1"},
			bind:        "bind :443",
			monitorBind: "bind :80",
			template:    "server-template vpn 1-1 127.0.0.1:10000 disabled",
			socket:      "stats socket /run/haproxy.sock mode 600 level admin",
		},
		{
			// SPEC §7 spells the template address 127.0.0.1:10000, the
			// default VPN_BASE_PORT; the code follows VPN_BASE_PORT (the
			// address is a placeholder until an instance registers).
			name:        "base port",
			env:         map[string]string{"VPN_BASE_PORT": "11000"},
			bind:        "bind :443",
			monitorBind: "bind :80",
			template:    "server-template vpn 1-2 127.0.0.1:11000 disabled",
			socket:      "stats socket /run/haproxy.sock mode 600 level admin",
		},
		{
			name: "sixteen instances external mode",
			env: map[string]string{"VPN_INSTANCE_COUNT": "16", "VPN_HAPROXY": "external",
				"VPN_HAPROXY_USEPROXYPROTOCOL": "true", "VPN_PORT": "8443"},
			bind:        "bind :8443 accept-proxy",
			monitorBind: "bind :80",
			template:    "server-template vpn 1-16 127.0.0.1:10000 disabled",
			socket:      "stats socket /run/haproxy.sock mode 600 level admin",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := vpn.Loader{Env: haproxyTestEnv(nil, tt.env)}.Config()
			if err != nil {
				t.Fatalf("Config: %v", err)
			}
			text := cfg.RenderHAProxy()
			s := haproxySections(text)
			defer func() {
				if t.Failed() {
					t.Logf("rendered configuration:\n%s", text)
				}
			}()

			// want checks that section has exactly the lines of keyword
			// prefix in want.
			want := func(section, prefix string, want ...string) {
				t.Helper()
				lines, ok := s[section]
				if !ok {
					t.Errorf("no section %q; got sections %v", section, keys(s))
					return
				}
				if got := withPrefix(lines, prefix); !slices.Equal(got, want) {
					t.Errorf("%s: %q lines: got %q, want %q", section, prefix, got, want)
				}
			}

			want("global", "stats socket", tt.socket)

			want("frontend vpn", "mode", "mode tcp")
			want("frontend vpn", "bind", tt.bind)
			want("frontend vpn", "default_backend", "default_backend "+haproxy.Backend)

			want("backend "+haproxy.Backend, "mode", "mode tcp")
			want("backend "+haproxy.Backend, "balance", "balance leastconn")
			want("backend "+haproxy.Backend, "server-template", tt.template)
			want("backend "+haproxy.Backend, "server") // only the template

			want("frontend monitor", "mode", "mode http")
			want("frontend monitor", "bind", tt.monitorBind)
			want("frontend monitor", "monitor-uri", "monitor-uri /ping")
			want("frontend monitor", "acl", "acl vpn_dead nbsrv("+haproxy.Backend+") lt 1")
			want("frontend monitor", "monitor fail", "monitor fail if vpn_dead")

			// accept-proxy nowhere but on the VPN bind, and there only with
			// the proxy protocol.
			wantAccept := tt.env["VPN_HAPROXY_USEPROXYPROTOCOL"] == "true"
			if got := strings.Count(text, "accept-proxy"); got != map[bool]int{false: 0, true: 1}[wantAccept] {
				t.Errorf("accept-proxy occurs %d times, want it %v only on the VPN bind", got, wantAccept)
			}
			wantSections := []string{"backend " + haproxy.Backend, "defaults", "frontend monitor", "frontend vpn", "global"}
			if got := keys(s); !slices.Equal(got, wantSections) {
				t.Errorf("sections: got %q, want %q", got, wantSections)
			}
		})
	}
}

func keys(m map[string][]string) []string {
	var k []string
	for s := range m {
		k = append(k, s)
	}
	slices.Sort(k)
	return k
}

// TestRenderHAProxyValid runs haproxy -c on the rendered configuration for
// each variant the content test covers: with and without the proxy
// protocol, one and many instances.
func TestRenderHAProxyValid(t *testing.T) {
	bins := vpntest.Require(t, "haproxy")
	for _, tt := range []struct {
		name string
		env  map[string]string
	}{
		{"plain", map[string]string{"VPN_HAPROXY_USEPROXYPROTOCOL": "false"}},
		{"proxy protocol", map[string]string{"VPN_HAPROXY_USEPROXYPROTOCOL": "true"}},
		{"one instance proxy protocol", map[string]string{"VPN_INSTANCE_COUNT": "1", "VPN_HAPROXY_USEPROXYPROTOCOL": "true"}},
		{"sixteen instances", map[string]string{"VPN_INSTANCE_COUNT": "16"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			env := map[string]string{"VPN_RUN_DIR": dir, "VPN_HAPROXY_SOCKET": filepath.Join(dir, "admin.sock"),
				"VPN_PORT": "1194", "VPN_HAPROXY_MONITOR_ADDR": "127.0.0.1:8088"}
			for k, v := range tt.env {
				env[k] = v
			}
			cfg, err := vpn.Loader{Env: haproxyTestEnv(nil, env)}.Config()
			if err != nil {
				t.Fatalf("Config: %v", err)
			}
			text := cfg.RenderHAProxy()
			if got, want := strings.Contains(text, "accept-proxy"), env["VPN_HAPROXY_USEPROXYPROTOCOL"] == "true"; got != want {
				t.Errorf("accept-proxy in the configuration: got %v, want %v", got, want)
			}
			file := filepath.Join(dir, "haproxy.cfg")
			if err := os.WriteFile(file, []byte(text), 0o600); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			out, err := exec.CommandContext(ctx, bins[0], "-c", "-f", file).CombinedOutput()
			if err != nil {
				t.Errorf("haproxy -c: got %v, want a valid configuration:\n%s\nconfiguration:\n%s", err, out, text)
			}
		})
	}
}

// recordCommands wraps a command factory and records the names it runs.
type recordCommands struct {
	mu    sync.Mutex
	names []string
	next  func(ctx context.Context, name string, args ...string) *exec.Cmd
}

func (r *recordCommands) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	r.mu.Lock()
	r.names = append(r.names, filepath.Base(name))
	r.mu.Unlock()
	return r.next(ctx, name, args...)
}

func (r *recordCommands) ran(name string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Contains(r.names, name)
}

// TestServerExternalHAProxy runs the server with VPN_HAPROXY=external
// against a haproxy the test runs itself in the world namespace, from the
// configuration RenderHAProxy gives for the same plan: the server runs no
// haproxy and writes no HAProxy configuration, registers its two instances
// through the admin socket (up, at 127.0.0.1 and the instance ports), a
// device dialling VPN_PORT through that haproxy connects, and after the
// stop the haproxy still runs, with both servers out of rotation (drain or
// maint) and its /ping failing.
func TestServerExternalHAProxy(t *testing.T) {
	bins := vpntest.Require(t, "openvpn", "haproxy", "ip")
	world := vpntest.NewNetns(t, "world")
	pki := vpntest.NewPKI(t)
	api := balenatest.NewServer(t)
	run, hapDir := t.TempDir(), t.TempDir()
	socket := filepath.Join(hapDir, "admin.sock")
	env := map[string]string{
		"VPN_RUN_DIR": run, "VPN_HAPROXY": "external", "VPN_HAPROXY_SOCKET": socket,
		"VPN_PORT": "1194", "VPN_HAPROXY_MONITOR_ADDR": "127.0.0.1:8088",
		"BALENA_API_INTERNAL_HOST": strings.TrimPrefix(api.URL, "http://"), "VPN_SERVICE_API_KEY": api.ServiceKey,
		"VPN_API_PORT": "8081", "DEFAULT_SIGTERM_TIMEOUT": "10", "DELAY_ON_AUTH_FAIL": "0",
	}
	cfg, err := vpn.Loader{Env: haproxyTestEnv(pki, env)}.Config()
	if err != nil {
		t.Fatal(err)
	}
	cfg.Metrics.Addr = vpn.MetricsOff
	if cfg.HAProxy.Mode != haproxy.External {
		t.Fatalf("mode: got %q, want %q", cfg.HAProxy.Mode, haproxy.External)
	}
	ctx, cancelAll := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancelAll()

	// The external haproxy: the same plan, its own directory (pid file).
	env["VPN_RUN_DIR"] = hapDir
	hcfg, err := vpn.Loader{Env: haproxyTestEnv(pki, env)}.Config()
	if err != nil {
		t.Fatal(err)
	}
	hfile := filepath.Join(hapDir, "haproxy.cfg")
	if err := os.WriteFile(hfile, []byte(hcfg.RenderHAProxy()), 0o600); err != nil {
		t.Fatal(err)
	}
	hp, err := vpntest.Launch(world.Command(bins[1], "-W", "-db", "-f", hfile))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(hp.Stop)
	defer func() {
		if t.Failed() {
			t.Logf("haproxy's output:\n%s", strings.Join(hp.Lines(), "\n"))
		}
	}()
	hap := &haproxy.Runtime{Socket: socket}
	waitUntil(t, ctx, func() bool {
		select {
		case <-hp.Exited():
			t.Fatalf("haproxy exited at start:\n%s", strings.Join(hp.Lines(), "\n"))
		default:
		}
		qctx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		_, err := hap.Command(qctx, "show info")
		return err == nil
	})
	st, err := hap.ServersState(ctx, haproxy.Backend)
	if err != nil {
		t.Fatal(err)
	}
	if len(st) != 2 || st[0].Up || st[1].Up || !st[0].Maint || !st[1].Maint {
		t.Fatalf("servers before the server runs: got %+v, want vpn1 and vpn2 disabled (maint)", st)
	}
	hc := &http.Client{Transport: &http.Transport{DialContext: world.Dial}, Timeout: 5 * time.Second}
	defer hc.CloseIdleConnections()
	ping := func() int {
		resp, err := hc.Get("http://127.0.0.1:8088/ping")
		if err != nil {
			t.Fatalf("GET /ping: %v", err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if got := ping(); got != 503 {
		t.Errorf("/ping before the server runs: got %d, want 503", got)
	}

	// The server, in external mode.
	cmds := &recordCommands{next: world.CommandContext}
	srv := &vpn.Server{Config: cfg, API: api.Client(), Command: cmds.Command, Dial: world.Dial, Listen: world.Listen}
	sctx, stop := context.WithCancel(context.Background())
	done := make(chan struct{})
	var runErr error
	go func() { runErr = srv.Run(sctx); close(done) }()
	t.Cleanup(func() {
		stop()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			t.Error("Run did not return within 30 s")
		}
	})
	select {
	case <-srv.Ready():
	case <-done:
		t.Fatalf("Run: %v", runErr)
	case <-ctx.Done():
		t.Fatal("not ready in time")
	}

	// Registered: both servers up, at the instances' addresses.
	var want []string
	for id := 1; id <= 2; id++ {
		in, _ := cfg.Plan.Instance(id)
		want = append(want, fmt.Sprintf("vpn%d 127.0.0.1:%d up", id, in.Port))
	}
	var got []string
	waitUntil(t, ctx, func() bool {
		st, err := hap.ServersState(ctx, haproxy.Backend)
		got = got[:0]
		for _, s := range st {
			got = append(got, fmt.Sprintf("%s %s %s", s.Name, s.Addr, map[bool]string{true: "up", false: "down"}[s.Up]))
		}
		return err == nil && slices.Equal(got, want)
	})
	if !slices.Equal(got, want) {
		t.Fatalf("registered servers: got %q, want %q", got, want)
	}
	if got := ping(); got != 200 {
		t.Errorf("/ping with the instances registered: got %d, want 200", got)
	}
	if cmds.ran("haproxy") {
		t.Errorf("external mode: the server ran haproxy (commands %q)", cmds.names)
	}
	for _, f := range []string{"haproxy.cfg", "haproxy.pid"} {
		if _, err := os.Stat(filepath.Join(run, f)); err == nil {
			t.Errorf("external mode: the server wrote %s into its run directory", f)
		}
	}

	// A device through the external haproxy's VPN_PORT.
	d := api.AddDevice(balenatest.Device{UUID: "0123456789abcdef0123456789abcdef", Key: "k1"})
	c := vpntest.StartClient(t, vpntest.ClientOptions{Netns: world, Remote: "127.0.0.1:1194", CA: pki.CAFile,
		Username: d.UUID, Password: d.Key})
	if _, err := c.WaitFor(ctx, "Initialization Sequence Completed"); err != nil {
		t.Fatalf("client through haproxy: %v\n%s", err, strings.Join(c.Lines(), "\n"))
	}
	waitOnline(t, ctx, api, d.UUID)

	// The stop leaves the external haproxy running, with the servers out
	// of rotation.
	stop()
	select {
	case <-done:
	case <-ctx.Done():
		t.Fatal("Run did not return in time")
	}
	if runErr != nil {
		t.Fatalf("Run = %v, want nil", runErr)
	}
	select {
	case <-hp.Exited():
		t.Fatalf("the external haproxy exited with the server (code %d)", hp.ExitCode())
	default:
	}
	st, err = hap.ServersState(ctx, haproxy.Backend)
	if err != nil {
		t.Fatalf("the external haproxy's socket after the stop: %v", err)
	}
	if len(st) != 2 {
		t.Fatalf("servers after the stop: got %+v, want vpn1 and vpn2", st)
	}
	for _, s := range st {
		if s.Up || !(s.Draining || s.Maint) {
			t.Errorf("%s after the stop: got up=%v draining=%v maint=%v, want not up, draining or maint",
				s.Name, s.Up, s.Draining, s.Maint)
		}
	}
	if got := ping(); got != 503 {
		t.Errorf("/ping after the stop: got %d, want 503", got)
	}
	if d, _ := api.Device(d.UUID); d.ConnectedToVPN {
		t.Error("the device is still online in the API after the stop")
	}
	t.Logf("servers after the stop: %+v", st)
}
