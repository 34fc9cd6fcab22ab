package vpn_test

import (
	"bufio"
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/obvpn/obvpn/nss"
	"github.com/obvpn/obvpn/subnet"
	"github.com/obvpn/obvpn/vpn"
	"github.com/obvpn/obvpn/vpn/balena/balenatest"
	"github.com/obvpn/obvpn/vpn/haproxy"
	"github.com/obvpn/obvpn/vpn/vpntest"
)

// TestServer runs the whole server with two real instances in a world
// namespace against balenatest: a device with the right key connects and
// is reported online with the registered service id, one with a wrong key
// is refused, the internal API answers, and a stop reports the device
// offline.
func TestServer(t *testing.T) {
	vpntest.Require(t, "openvpn", "ip")
	world := vpntest.NewNetns(t, "world")
	pki := vpntest.NewPKI(t)
	api := balenatest.NewServer(t)
	good := api.AddDevice(balenatest.Device{UUID: "0123456789abcdef0123456789abcdef", Key: "good-key"})
	api.AddDevice(balenatest.Device{UUID: "fedcba9876543210fedcba9876543210", Key: "other-key"})
	cfg, err := vpn.Loader{Env: map[string]string{
		"VPN_BASE_SUBNET":                        "10.240.0.0/16",
		"VPN_INSTANCE_SUBNET_BITMASK":            "24",
		"VPN_INSTANCE_COUNT":                     "2",
		"VPN_RUN_DIR":                            t.TempDir(),
		"BALENA_API_INTERNAL_HOST":               strings.TrimPrefix(api.URL, "http://"),
		"VPN_SERVICE_API_KEY":                    api.ServiceKey,
		"VPN_OPENVPN_CA_CRT":                     string(pki.CACert),
		"VPN_OPENVPN_SERVER_CRT":                 string(pki.ServerCert),
		"VPN_OPENVPN_SERVER_KEY":                 string(pki.ServerKey),
		"VPN_API_PORT":                           "8081",
		"VPN_METRICS_ADDR":                       "127.0.0.1:8080",
		"VPN_CONNECT_PROXY_PORT":                 "3128",
		"VPN_HAPROXY":                            "off",
		"VPN_STATUS_FILE_WRITE_INTERVAL_SECONDS": "1",
		"DELAY_ON_AUTH_FAIL":                     "0",
		"DEFAULT_SIGTERM_TIMEOUT":                "10",
		"VPN_BYTECOUNT_INTERVAL":                 "1",
	}}.Config()
	if err != nil {
		t.Fatal(err)
	}
	srv := &vpn.Server{
		Config:  cfg,
		API:     api.Client(),
		Command: world.CommandContext,
		Dial:    world.Dial,
		Listen:  world.Listen,
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	var runErr error
	go func() { runErr = srv.Run(ctx); close(done) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			t.Error("Run did not return")
		}
	})
	select {
	case <-srv.Ready():
	case <-done:
		t.Fatalf("Run: %v", runErr)
	case <-time.After(30 * time.Second):
		t.Fatal("not ready within 30 s")
	}

	wctx, wcancel := context.WithTimeout(ctx, 60*time.Second)
	defer wcancel()
	ok := vpntest.StartClient(t, vpntest.ClientOptions{Netns: world, Remote: "127.0.0.1:10001", CA: pki.CAFile,
		Username: good.UUID, Password: good.Key})
	bad := vpntest.StartClient(t, vpntest.ClientOptions{Netns: world, Remote: "127.0.0.1:10002", CA: pki.CAFile,
		Username: "fedcba9876543210fedcba9876543210", Password: "stolen-key"})
	if _, err := ok.WaitFor(wctx, "Initialization Sequence Completed"); err != nil {
		t.Fatal(err)
	}
	if _, err := bad.WaitFor(wctx, "AUTH_FAILED"); err != nil {
		t.Fatal(err)
	}
	// Online in the API, managed by the registered instance.
	waitAPI(t, wctx, api, func(a *balenatest.API) bool {
		d, _ := a.Device(good.UUID)
		return d.ConnectedToVPN && d.ServiceInstance != 0 && d.ServiceInstance == srv.ServiceID()
	})

	// The internal API and the metrics, from inside the world.
	hc := &http.Client{Transport: &http.Transport{DialContext: world.Dial}}
	for url, want := range map[string]string{
		"http://127.0.0.1:8081/ping":            "OK",
		"http://127.0.0.1:8080/cluster_metrics": "vpn_online_devices 1",
	} {
		resp, err := hc.Get(url)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if !strings.Contains(string(b), want) {
			t.Errorf("%s: %q lacks %q", url, b, want)
		}
	}

	// A device in a namespace of its own, with a web service, reached
	// through the server's CONNECT proxy and the tunnel, with each client
	// profile in turn. Each device session replaces the one before (same
	// common name).
	dev := vpntest.NewDevice(t, world)
	wl, err := dev.Listen("tcp", "0.0.0.0:80")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "hello from "+good.UUID)
	})}
	go hs.Serve(wl)
	defer hs.Close()
	for _, profile := range vpntest.Profiles {
		web := vpntest.StartClient(t, vpntest.ClientOptions{Profile: profile, Netns: dev.Netns, Remote: dev.WorldAddr.String() + ":10001",
			CA: pki.CAFile, Username: good.UUID, Password: good.Key, Tunnel: true})
		if _, err := web.WaitFor(wctx, "Initialization Sequence Completed"); err != nil {
			t.Fatal(err)
		}
		var body []byte
		waitUntil(t, wctx, func() bool {
			b, err := viaConnect(wctx, world, "127.0.0.1:3128", good.UUID+".balena:80", api.ServiceKey)
			body = b
			return err == nil
		})
		if string(body) != "hello from "+good.UUID {
			t.Errorf("%s: through the proxy: %q", profile, body)
		}
		if profile != vpntest.Profiles[len(vpntest.Profiles)-1] {
			web.Stop() // else it would take its session back from the next
		}
	}

	// From the device's namespace (another host, for the server) the
	// internal API gives no answer at all: it listens on loopback only.
	remote := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: dev.Dial}}
	for _, path := range []string{"/ping", "/api/v1/auth/", "/api/v2/1/clients/"} {
		if resp, err := remote.Get("http://" + dev.WorldAddr.String() + ":8081" + path); err == nil {
			resp.Body.Close()
			t.Errorf("%s from %s: %s, want no answer", path, dev.Addr, resp.Status)
		}
	}

	// The metrics of the session so far: one device online (its two
	// clients share a common name, so each new session of one ends the
	// other's, with its bytes: at least two sessions, one ended), one
	// denial, the proxy's tunnel.
	scrape := func() map[string]float64 {
		resp, err := hc.Get("http://127.0.0.1:8080/cluster_metrics")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		metrics := map[string]float64{}
		sc := bufio.NewScanner(resp.Body)
		for sc.Scan() {
			if name, v, ok := strings.Cut(sc.Text(), " "); ok && !strings.HasPrefix(name, "#") {
				metrics[name], _ = strconv.ParseFloat(v, 64)
			}
		}
		return metrics
	}
	metrics := scrape()
	// Sessions that live show in the bitrate histograms at every scrape
	// with new byte counts (one a second here), and in the byte counters.
	seen, rx := metrics["vpn_session_avg_rx_bitrate_count"], metrics["vpn_rx_bytes_total"]
	waitUntil(t, wctx, func() bool {
		m := scrape()
		return m["vpn_session_avg_rx_bitrate_count"] >= seen+2 && m["vpn_rx_bytes_total"] > rx
	})
	for name, ok := range map[string]func(float64) bool{
		"vpn_online_devices":         func(v float64) bool { return v == 1 },
		"vpn_devices_total":          func(v float64) bool { return v >= 2 },
		"vpn_auth_failures_total":    func(v float64) bool { return v == 1 },
		"vpn_rx_bytes_total":         func(v float64) bool { return v > 0 },
		"vpn_tx_bytes_total":         func(v float64) bool { return v > 0 },
		"vpn_session_duration_count": func(v float64) bool { return v >= 1 },
		"vpn_proxy_total_tunnels":    func(v float64) bool { return v >= 1 },
	} {
		if v, found := metrics[name]; !found || !ok(v) {
			t.Errorf("metric %s = %v (found: %v)", name, v, found)
		}
	}

	// A stop reports the device offline.
	cancel()
	<-done
	if runErr != nil {
		t.Fatalf("Run = %v", runErr)
	}
	if d, _ := api.Device(good.UUID); d.ConnectedToVPN {
		t.Error("the device is still online in the API after the stop")
	}
}

// viaConnect fetches "/" from target through the CONNECT proxy at proxy,
// dialling from inside n.
func viaConnect(ctx context.Context, n *vpntest.Netns, proxy, target, key string) ([]byte, error) {
	conn, err := n.Dial(ctx, "tcp", proxy)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	auth := base64.StdEncoding.EncodeToString([]byte("x:" + key))
	fmt.Fprintf(conn, "CONNECT %s HTTP/1.1\r\nHost: %s\r\nProxy-Authorization: Basic %s\r\n\r\n", target, target, auth)
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, &http.Request{Method: "CONNECT"})
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != 200 {
		return nil, fmt.Errorf("CONNECT: %s", resp.Status)
	}
	fmt.Fprintf(conn, "GET / HTTP/1.1\r\nHost: device\r\nConnection: close\r\n\r\n")
	resp, err = http.ReadResponse(br, nil)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	return io.ReadAll(resp.Body)
}

func waitUntil(t *testing.T, ctx context.Context, cond func() bool) {
	t.Helper()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatal("condition not met in time")
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// waitAPI waits until cond holds for the balena API, checking it after
// each of the API's changes, and fails the test when ctx ends first.
func waitAPI(t *testing.T, ctx context.Context, api *balenatest.Server, cond func(*balenatest.API) bool) {
	t.Helper()
	if err := api.WaitFor(ctx, cond); err != nil {
		t.Fatal(err)
	}
}

// waitOnline waits until the balena API says that every device of uuids
// is connected to the VPN.
func waitOnline(t *testing.T, ctx context.Context, api *balenatest.Server, uuids ...string) {
	t.Helper()
	waitAPI(t, ctx, api, func(a *balenatest.API) bool {
		for _, u := range uuids {
			if d, _ := a.Device(u); !d.ConnectedToVPN {
				return false
			}
		}
		return true
	})
}

// worldServer is a vpn.Server running in a world namespace of its own
// against balenatest, for the tests below.
type worldServer struct {
	world *vpntest.Netns
	pki   *vpntest.PKI
	api   *balenatest.Server
	run   string // the run directory
	cfg   *vpn.Config
	srv   *vpn.Server
	// cancel ends Run's context; wait waits for Run and returns its error.
	cancel context.CancelFunc
	wait   func() error
}

// startWorldServer starts a Server with two instances behind a managed
// HAProxy on 127.0.0.1:1194 (monitor on 127.0.0.1:8088) unless env says
// otherwise, and returns once it is ready.
func startWorldServer(t *testing.T, env map[string]string) *worldServer {
	t.Helper()
	ws := &worldServer{world: vpntest.NewNetns(t, "world"), pki: vpntest.NewPKI(t), api: balenatest.NewServer(t), run: t.TempDir()}
	vars := map[string]string{
		"VPN_BASE_SUBNET": "10.240.0.0/16", "VPN_INSTANCE_SUBNET_BITMASK": "24", "VPN_INSTANCE_COUNT": "2",
		"VPN_RUN_DIR": ws.run, "VPN_HAPROXY_SOCKET": filepath.Join(ws.run, "haproxy.sock"),
		"VPN_PORT": "1194", "VPN_HAPROXY_MONITOR_ADDR": "127.0.0.1:8088",
		"BALENA_API_INTERNAL_HOST": strings.TrimPrefix(ws.api.URL, "http://"), "VPN_SERVICE_API_KEY": ws.api.ServiceKey,
		"VPN_OPENVPN_CA_CRT": string(ws.pki.CACert), "VPN_OPENVPN_SERVER_CRT": string(ws.pki.ServerCert),
		"VPN_OPENVPN_SERVER_KEY": string(ws.pki.ServerKey), "VPN_API_PORT": "8081",
	}
	for k, v := range env {
		vars[k] = v
	}
	cfg, err := vpn.Loader{Env: vars}.Config()
	if err != nil {
		t.Fatal(err)
	}
	if env["VPN_METRICS_ADDR"] == "" {
		cfg.Metrics.Addr = vpn.MetricsOff // no metrics server unless asked for
	}
	ws.cfg = cfg
	ws.srv = &vpn.Server{Config: cfg, API: ws.api.Client(), Command: ws.world.CommandContext, Dial: ws.world.Dial, Listen: ws.world.Listen}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	var runErr error
	go func() { runErr = ws.srv.Run(ctx); close(done) }()
	ws.cancel = cancel
	ws.wait = func() error { <-done; return runErr }
	t.Cleanup(func() { cancel(); <-done })
	select {
	case <-ws.srv.Ready():
	case <-done:
		t.Fatalf("Run: %v", runErr)
	case <-time.After(30 * time.Second):
		t.Fatal("not ready within 30 s")
	}
	return ws
}

// TestServerBehindHAProxy runs the server with a managed HAProxy in the
// world namespace: the instances register when they take clients, two
// devices that dial VPN_PORT land on different instances (leastconn), the
// monitor's /ping answers 200, and a stop ends haproxy too.
func TestServerBehindHAProxy(t *testing.T) {
	vpntest.Require(t, "openvpn", "haproxy", "ip")
	ws := startWorldServer(t, map[string]string{"VPN_STATUS_FILE_WRITE_INTERVAL_SECONDS": "1"})
	world, pki, api, run, cfg := ws.world, ws.pki, ws.api, ws.run, ws.cfg
	devs := []balenatest.Device{
		api.AddDevice(balenatest.Device{UUID: "0123456789abcdef0123456789abcdef", Key: "k1"}),
		api.AddDevice(balenatest.Device{UUID: "fedcba9876543210fedcba9876543210", Key: "k2"}),
	}
	wctx, wcancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer wcancel()

	hc := &http.Client{Transport: &http.Transport{DialContext: world.Dial}}
	resp, err := hc.Get("http://127.0.0.1:8088/ping")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("/ping with both instances up: %d", resp.StatusCode)
	}

	// With both instances' openvpn killed, the monitor fails until they are
	// back.
	if !ping503WhenDown(t, wctx, hc, run) {
		t.Error("/ping never answered 503 with both openvpn processes dead")
	}
	// Wait for both instances to take clients again (registered ready).
	waitUntil(t, wctx, func() bool {
		resp, err := hc.Get("http://127.0.0.1:8088/ping")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})
	hap := &haproxy.Runtime{Socket: cfg.HAProxy.Socket}
	waitUntil(t, wctx, func() bool {
		st, err := hap.ServersState(wctx, haproxy.Backend)
		return err == nil && len(st) == 2 && st[0].Up && st[1].Up
	})
	for _, d := range devs {
		c := vpntest.StartClient(t, vpntest.ClientOptions{Netns: world, Remote: "127.0.0.1:1194", CA: pki.CAFile,
			Username: d.UUID, Password: d.Key})
		if _, err := c.WaitFor(wctx, "Initialization Sequence Completed"); err != nil {
			t.Fatal(err)
		}
	}
	// leastconn: one device on each instance, as the status files say.
	r := &nss.Resolver{Globs: []string{filepath.Join(run, "server-*.status")}}
	waitUntil(t, wctx, func() bool {
		clients, _ := r.Clients()
		if testing.Verbose() {
			for _, c := range clients {
				t.Logf("instance %d: %s %s", c.Instance, c.CommonName, c.RealAddress)
			}
		}
		seen := map[int]bool{}
		for _, c := range clients {
			seen[c.Instance] = true
		}
		return len(clients) == 2 && seen[1] && seen[2]
	})

	ws.cancel()
	if err := ws.wait(); err != nil {
		t.Fatalf("Run = %v", err)
	}
	if _, err := hc.Get("http://127.0.0.1:8088/ping"); err == nil {
		t.Error("haproxy still answers after the stop")
	}
}

// TestServerDrain: on stop with 20 devices connected, the instances go to
// drain in HAProxy, every device is killed one by one within
// DEFAULT_SIGTERM_TIMEOUT,
// the API ends with all of them offline, and Run returns nil.
func TestServerDrain(t *testing.T) {
	vpntest.Require(t, "openvpn", "haproxy", "ip")
	ws := startWorldServer(t, map[string]string{
		"DEFAULT_SIGTERM_TIMEOUT": "10", "MINIMUM_DRAIN_RATE_PER_MINUTE": "600", // 100 ms apart
	})
	world, pki, api, cfg := ws.world, ws.pki, ws.api, ws.cfg
	wctx, wcancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer wcancel()
	var clients []*vpntest.Process
	var uuids []string
	for i := range 20 {
		d := api.AddDevice(balenatest.Device{UUID: fmt.Sprintf("%032x", i+1), Key: "k"})
		uuids = append(uuids, d.UUID)
		c := vpntest.StartClient(t, vpntest.ClientOptions{Netns: world, Remote: "127.0.0.1:1194", CA: pki.CAFile,
			Username: d.UUID, Password: d.Key})
		if _, err := c.WaitFor(wctx, "Initialization Sequence Completed"); err != nil {
			t.Fatal(err)
		}
		clients = append(clients, c)
	}
	waitOnline(t, wctx, api, uuids...)
	before := make([]int, len(clients))
	for i, c := range clients {
		before[i] = len(c.Lines())
	}

	start := time.Now()
	ws.cancel()
	hap := &haproxy.Runtime{Socket: cfg.HAProxy.Socket}
	drained := false
	for !drained && time.Since(start) < 2*time.Second {
		if st, err := hap.ServersState(wctx, haproxy.Backend); err == nil && len(st) == 2 && st[0].Draining && st[1].Draining {
			drained = true
		}
	}
	if !drained {
		t.Error("HAProxy never showed both servers draining")
	}
	err := ws.wait()
	took := time.Since(start)
	if err != nil {
		t.Fatalf("Run = %v", err)
	}
	if took > 10*time.Second+3*time.Second {
		t.Errorf("the stop took %v, over the 10 s drain timeout", took)
	}
	for i, c := range clients {
		// Each client lost its session: told to go (its connection reset,
		// "restarting"), or gone. (OpenVPN 2.6.14 clients sometimes die on
		// an assertion when the server's reset and the kill cross.)
		if _, err := c.WaitFrom(wctx, before[i], "restarting"); err != nil {
			select {
			case <-c.Exited():
			default:
				t.Errorf("client %d: %v", i, err)
			}
		}
	}
	for _, u := range uuids {
		if d, _ := api.Device(u); d.ConnectedToVPN {
			t.Errorf("%s still online in the API after the drain", u)
		}
	}
	t.Logf("drained %d devices in %v", len(clients), took)
}

// TestServerLimits: with VPN_DOWNRATE and VPN_UPRATE, a device's address
// gets its tc class on the instance's tun device (down rate) and on the
// IFB device (up rate) when OpenVPN learns it, and loses them when the
// device goes.
func TestServerLimits(t *testing.T) {
	vpntest.Require(t, "openvpn", "ip", "tc")
	ws := startWorldServer(t, map[string]string{"VPN_INSTANCE_COUNT": "1", "VPN_HAPROXY": "off",
		"VPN_DOWNRATE": "10mbit", "VPN_UPRATE": "1mbit"})
	world, pki, api := ws.world, ws.pki, ws.api
	d := api.AddDevice(balenatest.Device{UUID: "0123456789abcdef0123456789abcdef", Key: "k"})
	wctx, wcancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer wcancel()
	classes := func(dev string) string {
		out, _ := world.Command("tc", "class", "show", "dev", dev).CombinedOutput()
		return string(out)
	}
	c := vpntest.StartClient(t, vpntest.ClientOptions{Netns: world, Remote: "127.0.0.1:10001", CA: pki.CAFile,
		Username: d.UUID, Password: d.Key})
	if _, err := c.WaitFor(wctx, "Initialization Sequence Completed"); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, wctx, func() bool {
		return strings.Contains(classes("tun1"), "rate 10Mbit") && strings.Contains(classes("obvpnifb1"), "rate 1Mbit")
	})
	c.Stop()
	waitUntil(t, wctx, func() bool {
		return !strings.Contains(classes("tun1"), "rate 10Mbit") && !strings.Contains(classes("obvpnifb1"), "rate 1Mbit")
	})
	ws.cancel()
	if err := ws.wait(); err != nil {
		t.Fatalf("Run = %v", err)
	}
	if out, err := world.Command("ip", "link", "show", "obvpnifb1").CombinedOutput(); err == nil {
		t.Errorf("the IFB device is still there after the stop: %s", out)
	}
}

// ping503WhenDown SIGKILLs every openvpn whose pid file is in run and
// polls the monitor's /ping until it answers 503 (the instances are set to
// maint), which must happen before they restart.
func ping503WhenDown(t *testing.T, ctx context.Context, hc *http.Client, run string) bool {
	t.Helper()
	pids, _ := filepath.Glob(filepath.Join(run, "server-*.pid"))
	for _, f := range pids {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
		if pid > 1 {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	// HAProxy's monitor has no event to wait on: poll it, with a deadline.
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	for {
		resp, err := hc.Get("http://127.0.0.1:8088/ping")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 503 {
				return true
			}
		}
		select {
		case <-ctx.Done():
			return false
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// TestHandBuiltConfig runs a Server on the Config of
// ExampleConfig_WithDefaults, built by hand with no Loader: everything
// left zero takes its documented default (a managed HAProxy on 443 with
// its monitor on :80, metrics on :8080, instance ports from 10001), in a
// world namespace, and a balenaOS device comes online through HAProxy.
func TestHandBuiltConfig(t *testing.T) {
	vpntest.Require(t, "openvpn", "haproxy", "ip")
	world, pki, api := vpntest.NewNetns(t, "world"), vpntest.NewPKI(t), balenatest.NewServer(t)
	run := t.TempDir()
	cfg := &vpn.Config{
		Plan:    subnet.Plan{Base: netip.MustParsePrefix("10.240.0.0/16"), Bits: 24, Instances: 2},
		OpenVPN: vpn.OpenVPNConfig{CACert: pki.CACert, ServerCert: pki.ServerCert, ServerKey: pki.ServerKey},
		Balena:  vpn.BalenaConfig{APIInternalHost: strings.TrimPrefix(api.URL, "http://"), ServiceAPIKey: api.ServiceKey},
		RunDir:  run,
		HAProxy: haproxy.Config{Socket: filepath.Join(run, "haproxy.sock")},
	}
	dev := api.AddDevice(balenatest.Device{UUID: "0123456789abcdef0123456789abcdef", Key: "k"})
	srv := &vpn.Server{Config: cfg, Command: world.CommandContext, Dial: world.Dial, Listen: world.Listen}
	ctx := runReady(t, srv, 30*time.Second, nil)
	wctx, wcancel := context.WithTimeout(ctx, 60*time.Second)
	defer wcancel()
	c := vpntest.StartClient(t, vpntest.ClientOptions{Netns: world, Remote: "127.0.0.1:443", CA: pki.CAFile, Username: dev.UUID, Password: dev.Key})
	if _, err := c.WaitFor(wctx, "Initialization Sequence Completed"); err != nil {
		t.Fatal(err)
	}
	waitOnline(t, wctx, api, dev.UUID)
	hc := &http.Client{Transport: &http.Transport{DialContext: world.Dial}}
	for url, want := range map[string]string{
		"http://127.0.0.1:80/ping":              "",
		"http://127.0.0.1:8080/cluster_metrics": "vpn_online_devices 1",
	} {
		resp, err := hc.Get(url)
		if err != nil {
			t.Fatalf("%s: %v", url, err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || !strings.Contains(string(b), want) {
			t.Errorf("%s: %s %q, want 200 with %q", url, resp.Status, b, want)
		}
	}
	if _, err := os.Stat(filepath.Join(run, "nss.index")); err != nil {
		t.Errorf("the NSS index is not in the run directory: %v", err)
	}
}

// runReady runs srv until the test ends (then it checks that Run returned
// nil, and prints logs, if given, when the test failed), and returns once
// srv is ready, with the context that Run's ends with the test.
func runReady(t *testing.T, srv *vpn.Server, within time.Duration, logs fmt.Stringer) context.Context {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run = %v", err)
		}
		if logs != nil && t.Failed() {
			t.Logf("server logs:\n%s", logs)
		}
	})
	select {
	case <-srv.Ready():
	case err := <-done:
		done <- err
		t.Fatalf("Run: %v", err)
	case <-time.After(within):
		t.Fatalf("not ready within %v", within)
	}
	return ctx
}
