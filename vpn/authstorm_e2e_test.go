package vpn_test

import (
	"context"
	"fmt"
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
	"github.com/obvpn/obvpn/vpn/vpntest"
)

// The reconnect storm of TestAuthStorm: 50 devices at once, 10 of them
// with a wrong key, a balena API that takes 2 s to answer each device
// authentication, and the server's production settings
// (DELAY_ON_AUTH_FAIL 10 s, MAX_API_POST_WORKERS 80, the production
// balena client, two instances behind a managed HAProxy).
const (
	stormDevices = 50
	stormDenied  = 10
	stormLatency = 2 * time.Second
	stormDelay   = 10 * time.Second // DELAY_ON_AUTH_FAIL's default
	stormWorkers = 80               // MAX_API_POST_WORKERS's default, the reference container's
	// stormSlack is what the clients, OpenVPN's handshakes on a small
	// machine and its polling of the control files add to the API's time.
	stormSlack = 8 * time.Second
	// stormStallWindow bounds the run of the synchronous script mode: it
	// would take minutes to get through the storm.
	stormStallWindow = 30 * time.Second
)

// TestAuthStorm measures a reconnect storm in each auth mode, with real
// OpenVPN servers and clients: the allowed devices must all be connected
// in about the time the API needs for the whole storm (ceil(50/80) waves
// of 2 s), not serialised behind each other or behind the denied ones
// (40 × 2 s, or 10 × 10 s), and the denied ones must be refused, after
// DELAY_ON_AUTH_FAIL, with each device asked about once. Management mode
// answers asynchronously on the management interface; script mode defers
// with OpenVPN 2.6's auth_control_file. The synchronous script mode of
// old (vpn-auth -sync) runs the same storm for stormStallWindow, to show
// the stall that deferral removes. The figures are logged for each mode.
func TestAuthStorm(t *testing.T) {
	paths := vpntest.Require(t, "openvpn", "haproxy", "ip", "go")
	hooks := buildHooks(t, paths[3])
	floor := time.Duration((stormDevices+stormWorkers-1)/stormWorkers) * stormLatency
	for _, mode := range []struct {
		name  string
		auth  vpn.AuthMode
		sync  bool
		bound time.Duration // the allowed devices' time to connect; 0: measured only
	}{
		{"management", vpn.AuthManagement, false, floor + stormSlack},
		{"script", vpn.AuthScript, false, floor + stormSlack},
		{"script-sync", vpn.AuthScript, true, 0},
	} {
		t.Run(mode.name, func(t *testing.T) {
			h := hooks
			h.Sync = mode.sync
			st := runStorm(t, mode.auth, h, mode.bound == 0)
			allowed, refused := st.allowed, st.refused
			t.Logf("%s: %d/%d allowed devices connected: p50 %s, max %s; %d/%d denied refused: p50 %s, max %s; %d device auth requests",
				mode.name, len(allowed), stormDevices-stormDenied, pct(allowed, 50), pct(allowed, 100),
				len(refused), stormDenied, pct(refused, 50), pct(refused, 100), st.calls)
			if mode.bound == 0 {
				// The stall: within the time the other modes connect
				// everyone, the synchronous mode connects a few.
				n := 0
				for _, d := range allowed {
					if d <= floor+stormSlack {
						n++
					}
				}
				t.Logf("%s: %d of %d allowed devices connected within %s (the other modes' bound), %d within %s",
					mode.name, n, stormDevices-stormDenied, floor+stormSlack, len(allowed), stormStallWindow)
				if n == stormDevices-stormDenied {
					t.Errorf("the synchronous script mode connected every allowed device within %s: no stall to show", floor+stormSlack)
				}
				return
			}
			if len(allowed) != stormDevices-stormDenied {
				t.Errorf("%d of %d allowed devices connected", len(allowed), stormDevices-stormDenied)
			}
			if len(allowed) > 0 && allowed[len(allowed)-1] > mode.bound {
				t.Errorf("the last allowed device connected after %s, want within %s (API floor %s)", pct(allowed, 100), mode.bound, floor)
			}
			if len(refused) != stormDenied {
				t.Errorf("%d of %d denied devices refused", len(refused), stormDenied)
			}
			if len(refused) > 0 && refused[0] < stormDelay {
				t.Errorf("a denied device was refused after %s, before DELAY_ON_AUTH_FAIL (%s)", refused[0], stormDelay)
			}
			if st.calls != stormDevices {
				t.Errorf("%d device auth requests, want %d (one per device: no retry, no repeat)", st.calls, stormDevices)
			}
		})
	}
}

// stormResult holds the times from the storm's start to each allowed
// device's "Initialization Sequence Completed" and to each denied
// device's AUTH_FAILED, sorted, and the API's device auth requests.
type stormResult struct {
	allowed, refused []time.Duration
	calls            int
}

// runStorm runs one storm against a fresh server in mode; with partial,
// it stops after stormStallWindow instead of waiting for every device.
func runStorm(t *testing.T, mode vpn.AuthMode, hooks vpn.ScriptHooks, partial bool) stormResult {
	world := vpntest.NewNetns(t, "world")
	pki := vpntest.NewPKI(t)
	api := balenatest.NewServer(t)
	run := searchableDir(t, "run")
	vars := map[string]string{
		"VPN_BASE_SUBNET": "10.240.0.0/16", "VPN_INSTANCE_SUBNET_BITMASK": "24", "VPN_INSTANCE_COUNT": "2",
		"VPN_RUN_DIR": run, "VPN_HAPROXY_SOCKET": filepath.Join(run, "haproxy.sock"),
		"VPN_PORT": "1194", "VPN_HAPROXY_MONITOR_ADDR": "127.0.0.1:8088",
		"BALENA_API_INTERNAL_HOST": strings.TrimPrefix(api.URL, "http://"), "VPN_SERVICE_API_KEY": api.ServiceKey,
		"VPN_OPENVPN_CA_CRT": string(pki.CACert), "VPN_OPENVPN_SERVER_CRT": string(pki.ServerCert),
		"VPN_OPENVPN_SERVER_KEY": string(pki.ServerKey), "VPN_API_PORT": "8081",
		"VPN_AUTH_MODE": string(mode), "DEFAULT_SIGTERM_TIMEOUT": "5",
	}
	cfg, err := vpn.Loader{Env: vars}.Config()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Auth.DelayOnFail != stormDelay || cfg.Auth.MaxWorkers != stormWorkers {
		t.Fatalf("defaults changed: DELAY_ON_AUTH_FAIL %s, MAX_API_POST_WORKERS %d", cfg.Auth.DelayOnFail, cfg.Auth.MaxWorkers)
	}
	cfg.Metrics.Addr = vpn.MetricsOff
	// API nil: the server's own balena client, retries and all.
	srv := &vpn.Server{Config: cfg, Hooks: hooks, Command: world.CommandContext, Dial: world.Dial, Listen: world.Listen}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()
	stopped := false
	stop := func() {
		if !stopped {
			stopped = true
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Run: %v", err)
			}
		}
	}
	t.Cleanup(stop)
	select {
	case <-srv.Ready():
	case err := <-done:
		stopped = true
		t.Fatalf("Run: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("not ready within 30 s")
	}

	type device struct {
		uuid, key string
		denied    bool
	}
	devs := make([]device, stormDevices)
	for i := range devs {
		d := api.AddDevice(balenatest.Device{UUID: fmt.Sprintf("%032x", 0xa11<<16+i), Key: fmt.Sprintf("key-%d", i)})
		devs[i] = device{uuid: d.UUID, key: d.Key, denied: i%(stormDevices/stormDenied) == 2}
		if devs[i].denied {
			devs[i].key = "wrong-" + d.Key
		}
	}
	api.DelayNext(balenatest.DeviceAuth, -1, stormLatency)

	wait := 90 * time.Second
	if partial {
		wait = stormStallWindow
	}
	wctx, wcancel := context.WithTimeout(context.Background(), wait)
	defer wcancel()
	var mu sync.Mutex
	var res stormResult
	var wg sync.WaitGroup
	start := time.Now()
	for _, d := range devs {
		c := vpntest.StartClient(t, vpntest.ClientOptions{Netns: world, Remote: "127.0.0.1:1194", CA: pki.CAFile,
			Username: d.uuid, Password: d.key})
		wg.Go(func() {
			want, list := "Initialization Sequence Completed", &res.allowed
			if d.denied {
				want, list = "AUTH_FAILED", &res.refused
			}
			if _, err := c.WaitFor(wctx, want); err != nil {
				if !partial {
					t.Errorf("device %s (denied %v): %v", d.uuid, d.denied, err)
				}
				return
			}
			took := time.Since(start)
			mu.Lock()
			*list = append(*list, took)
			mu.Unlock()
			if d.denied {
				if l := c.Lines(); slices.ContainsFunc(l, func(s string) bool { return strings.Contains(s, "Initialization Sequence Completed") }) {
					t.Errorf("denied device %s connected", d.uuid)
				}
			}
		})
	}
	wg.Wait()
	res.calls = api.Calls(balenatest.DeviceAuth)
	slices.Sort(res.allowed)
	slices.Sort(res.refused)
	api.ClearFaults()
	stop()
	return res
}

// pct returns the p-th percentile of sorted, or "-" when it is empty.
func pct(sorted []time.Duration, p int) string {
	if len(sorted) == 0 {
		return "-"
	}
	i := min(len(sorted)-1, (len(sorted)*p)/100)
	if p == 50 {
		i = (len(sorted) - 1) / 2
	}
	return sorted[i].Round(10 * time.Millisecond).String()
}

// buildHooks builds vpn-auth and vpn-client-event where OpenVPN's user
// can run them.
func buildHooks(t *testing.T, goBin string) vpn.ScriptHooks {
	t.Helper()
	dir := searchableDir(t, "bin")
	for _, c := range []string{"vpn-auth", "vpn-client-event"} {
		if out, err := exec.Command(goBin, "build", "-o", filepath.Join(dir, c), "../cmd/"+c).CombinedOutput(); err != nil {
			t.Fatalf("building %s: %v\n%s", c, err, out)
		}
	}
	return vpn.ScriptHooks{Auth: filepath.Join(dir, "vpn-auth"), ClientEvent: filepath.Join(dir, "vpn-client-event")}
}

// searchableDir returns a new directory named name in the test's
// temporary directory, which others (OpenVPN's user) may search, as they
// may /usr/local/bin and /run/openvpn.
func searchableDir(t *testing.T, name string) string {
	t.Helper()
	base := t.TempDir()
	dir := filepath.Join(base, name)
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{filepath.Dir(base), base, dir} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}
