package vpn_test

import (
	"bufio"
	"context"
	"encoding/base64"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/matryer/is"

	"github.com/obvpn/obvpn/subnet"
	"github.com/obvpn/obvpn/vpn"
	"github.com/obvpn/obvpn/vpn/balena/balenatest"
	"github.com/obvpn/obvpn/vpn/haproxy"
	"github.com/obvpn/obvpn/vpn/internalapi"
	"github.com/obvpn/obvpn/vpn/vpntest"
)

// readEnvFile reads an environment file as docker's --env-file takes it:
// NAME=VALUE lines, the value to the end of the line, comments and blank
// lines skipped.
func readEnvFile(t *testing.T, name string) map[string]string {
	t.Helper()
	f, err := os.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	env := map[string]string{}
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			t.Fatalf("%s: %q is not NAME=VALUE", name, line)
		}
		env[k] = v
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return env
}

func unb64(t *testing.T, s string) string {
	t.Helper()
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestReferenceContainerEnvironment loads the reference container's
// environment (testdata/reference-container.env: the variables that
// open-balena-vpn v12.3.105 reads, at their defaults there) unchanged, and
// checks the configuration field by field against what that container
// makes of it: one warning names the variables obvpn does not use, and
// the HAProxy configuration it renders is one haproxy takes.
func TestReferenceContainerEnvironment(t *testing.T) {
	is := is.New(t)
	env := readEnvFile(t, "testdata/reference-container.env")
	var logs strings.Builder
	l := vpn.Loader{Env: env, CPURequestFile: "/nonexistent/cpu_request", NumCPU: func() int { return 4 },
		Logger: slog.New(slog.NewTextHandler(&logs, nil))}
	c, err := l.Config()
	is.NoErr(err)

	// PRODUCTION_MODE=true and no VPN_INSTANCE_COUNT: one instance per
	// CPU; /10 + log2(4) is clamped to /16. The ports are the
	// container's, but for the internal API: the container's env.tmpl
	// sets VPN_API_PORT=30000 for every instance, obvpn defaults to a
	// port per instance from 30000 (README).
	is.Equal(c.Production, true)
	is.Equal(c.Plan, subnet.Plan{
		Base:      netip.MustParsePrefix("100.64.0.0/10"),
		Bits:      16,
		Ports:     subnet.Ports{VPN: 10000, Management: 20000, API: 30000},
		Instances: 4,
	})

	// server.conf.tmpl and the certificate templates.
	o := c.OpenVPN
	is.Equal(o.Proto, "tcp4-server")
	is.Equal(o.StatusInterval, 10*time.Second)
	is.Equal(o.KeepaliveFrequency, 10*time.Second)
	is.Equal(o.KeepaliveTimeout, 60*time.Second)
	is.Equal(o.DataCiphers, vpn.DefaultDataCiphers)
	is.Equal(o.BytecountInterval, 60*time.Second)
	is.Equal(string(o.CACert), unb64(t, env["VPN_OPENVPN_CA_CRT"]))
	is.Equal(string(o.ServerCert), unb64(t, env["VPN_OPENVPN_SERVER_CRT"]))
	is.Equal(string(o.ServerKey), unb64(t, env["VPN_OPENVPN_SERVER_KEY"]))
	is.Equal(string(o.DH), unb64(t, env["VPN_OPENVPN_SERVER_DH"]))
	is.Equal(o.Compression, vpn.CompressionMigrate) // the container's "compress lzo": README
	is.Equal(o.User, "nobody")
	is.Equal(o.Group, "nogroup")
	is.Equal(o.Providers, "legacy default")
	is.Equal(o.ExplicitExitNotify, 0)
	is.Equal(o.Isolation, vpn.IsolationOn) // the container's FORWARD policy DROP: README

	// src/utils/config.ts and env.tmpl.
	is.Equal(c.Auth, vpn.AuthConfig{Mode: vpn.AuthManagement, CacheTimeout: time.Minute, MaxWorkers: 80, DelayOnFail: 10 * time.Second})
	is.Equal(c.Balena.APIHost, "api.balena.test")
	is.Equal(c.Balena.APIInternalHost, "")
	is.Equal(c.Balena.BaseURL(), "https://api.balena.test")
	is.Equal(c.Balena.ServiceAPIKey, "test_vpn_key")
	is.Equal(c.Balena.GuestAPIKey, "test_guest_key")
	is.Equal(c.Balena.StateBatchSize, 8000)
	is.Equal(c.Balena.RegisterInterface, "")
	is.Equal(string(c.Balena.RootCA), unb64(t, env["ROOT_CA"]))
	roots, err := c.Balena.RootCAs()
	is.NoErr(err)
	is.True(roots != nil)

	// The proxy: the container always runs one on 3128; obvpn only when
	// VPN_CONNECT_PROXY_PORT asks for it (README).
	is.Equal(c.Proxy, vpn.ProxyConfig{Port: 0, ForwardPort: 3128, MaxTunnels: vpn.DefaultMaxTunnels})

	// haproxy.cfg.tmpl.
	is.Equal(c.HAProxy, haproxy.Config{Mode: haproxy.Managed, Port: 443, Socket: "/run/haproxy.sock", MonitorAddr: ":80",
		MaxConn: 10000, Timeout: 60 * time.Second, Threads: 2, CPUMap: "auto:1/1-2 0-1"})
	is.Equal(c.Metrics, vpn.MetricsConfig{Addr: ":8080", Timeout: 20 * time.Second, Token: "s3cr3t-monitor-token"})
	is.Equal(c.Bandwidth, vpn.BandwidthConfig{})
	is.Equal(c.Drain, vpn.DrainConfig{MinRatePerMinute: 500, Timeout: 120 * time.Second})
	is.Equal(c.RunDir, "/run/openvpn")
	is.Equal(c.NSSIndex, "")
	is.Equal(c.Verbose, true)
	is.Equal(c.TrustProxy, internalapi.TrustProxy{})
	is.Equal(c.Sentry, vpn.SentryConfig{Environment: "production"}) // SENTRY_DSN is unset: nothing is reported

	// One warning, naming the variables that are set and unused.
	lines := strings.Split(strings.TrimSpace(logs.String()), "\n")
	is.Equal(len(lines), 1)
	is.True(strings.Contains(lines[0], "level=WARN"))
	var named []string
	for name := range vpn.UnusedVariables {
		if strings.Contains(lines[0], name+":") {
			named = append(named, name)
		}
	}
	slices.Sort(named)
	is.Equal(named, []string{"IPTABLES_FORWARD_POLICY", "LEARN_ADDRESS_DEBUG", "NODE_EXTRA_CA_CERTS", "UV_THREADPOOL_SIZE",
		"VPN_CONNECT_INSTANCE_COUNT", "VPN_HOST"})
	for _, secret := range []string{"test_vpn_key", "test_guest_key", "s3cr3t-monitor-token"} {
		is.True(!strings.Contains(logs.String(), secret))
	}

	bins := vpntest.Require(t, "haproxy")
	file := filepath.Join(t.TempDir(), "haproxy.cfg")
	is.NoErr(os.WriteFile(file, []byte(c.RenderHAProxy()), 0o600))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(ctx, bins[0], "-c", "-f", file).CombinedOutput(); err != nil {
		t.Errorf("haproxy -c: %v\n%s\n%s", err, out, c.RenderHAProxy())
	}
}

// TestReferenceContainerEnvironmentStarts starts a real server, with a
// managed HAProxy, from the reference container's environment file
// unchanged but for what cannot be the same on a test host: the run
// directory and HAProxy's socket go to a temporary directory, the balena
// API is balenatest (its service key is the file's), and it all runs in a
// world namespace of its own. A balenaOS client dials the container's
// VPN_PORT, 443, and comes online; the monitor answers /ping to anyone and
// /metrics/haproxy, /cluster_metrics and /metrics/openvpn only with the
// token.
func TestReferenceContainerEnvironmentStarts(t *testing.T) {
	vpntest.Require(t, "openvpn", "haproxy", "ip")
	env := readEnvFile(t, "testdata/reference-container.env")
	run := t.TempDir()
	env["VPN_RUN_DIR"] = run
	env["VPN_HAPROXY_SOCKET"] = filepath.Join(run, "haproxy.sock")
	var logs syncBuffer
	cfg, err := vpn.Loader{Env: env, CPURequestFile: "/nonexistent/cpu_request", NumCPU: func() int { return 2 }}.Config()
	if err != nil {
		t.Fatal(err)
	}
	world := vpntest.NewNetns(t, "world")
	api := balenatest.NewServer(t)
	api.ServiceKey = env["VPN_SERVICE_API_KEY"]
	dev := api.AddDevice(balenatest.Device{UUID: "0123456789abcdef0123456789abcdef", Key: "device-key"})
	srv := &vpn.Server{Config: cfg, API: api.Client(), Command: world.CommandContext, Dial: world.Dial, Listen: world.Listen,
		Logger: slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))}
	ctx := runReady(t, srv, 60*time.Second, &logs)

	ca := filepath.Join(t.TempDir(), "ca.crt")
	if err := os.WriteFile(ca, cfg.OpenVPN.CACert, 0o644); err != nil {
		t.Fatal(err)
	}
	wctx, wcancel := context.WithTimeout(ctx, 60*time.Second)
	defer wcancel()
	c := vpntest.StartClient(t, vpntest.ClientOptions{Profile: vpntest.BalenaOS, Netns: world, Remote: "127.0.0.1:443", CA: ca,
		Username: dev.UUID, Password: dev.Key})
	if _, err := c.WaitFor(wctx, "Initialization Sequence Completed"); err != nil {
		t.Fatalf("the balenaOS client: %v\n%s", err, strings.Join(c.Lines(), "\n"))
	}
	waitOnline(t, wctx, api, dev.UUID)

	hc := &http.Client{Transport: &http.Transport{DialContext: world.Dial}}
	get := func(path, token string) (int, string) {
		req, _ := http.NewRequestWithContext(wctx, "GET", "http://127.0.0.1:80"+path, nil)
		if token != "" {
			req.SetBasicAuth("monitor", token)
		}
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, _ := get("/ping", ""); code != 200 {
		t.Errorf("/ping: %d", code)
	}
	token := env["MONITOR_SECRET_TOKEN"]
	for path, want := range map[string]string{
		"/metrics/haproxy": "haproxy_process_",
		"/cluster_metrics": "vpn_online_devices 1",
		"/metrics/openvpn": dev.UUID,
	} {
		if code, _ := get(path, ""); code != 401 {
			t.Errorf("%s without the token: %d, want 401", path, code)
		}
		if code, _ := get(path, "wrong"); code != 401 {
			t.Errorf("%s with a wrong token: %d, want 401", path, code)
		}
		if code, body := get(path, token); code != 200 || !strings.Contains(body, want) {
			t.Errorf("%s with the token: %d, lacks %q", path, code, want)
		}
	}
	if strings.Contains(logs.String(), token) || strings.Contains(logs.String(), env["VPN_SERVICE_API_KEY"]) {
		t.Error("a secret is in the logs")
	}
}
