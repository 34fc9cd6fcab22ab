package vpn_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/obvpn/obvpn/nss"
	"github.com/obvpn/obvpn/vpn/balena/balenatest"
	"github.com/obvpn/obvpn/vpn/vpntest"
)

// fleetDevice is a device of TestFleet: a namespace of its own with a web
// service on port 80, connected with one client profile.
type fleetDevice struct {
	name   string
	dev    *vpntest.Device
	api    balenatest.Device
	opts   vpntest.ClientOptions
	client *vpntest.Process
}

// TestFleet runs the whole server as production does (two instances
// behind a managed HAProxy, management-mode auth, the default status
// interval of 10 s, compress migrate, OpenVPN as nobody, devices isolated)
// in a world namespace that forwards IPv4, with two devices in namespaces
// of their own, for each client profile in the field: balenaOS's own
// resin.conf (comp-lzo) and a minimal modern client. Each device is
// reached through the CONNECT proxy; no openvpn server keeps uid 0; a
// device that routes the whole VPN range and the other device's link
// into its tunnel reaches neither the other device nor its link; the
// internal API answers no device, X-Forwarded-For: 127.0.0.1 and
// TRUST_PROXY=true notwithstanding; a SIGUSR1 restart of OpenVPN and a
// SIGKILL of every server openvpn are survived; and the stop drains.
func TestFleet(t *testing.T) {
	vpntest.Require(t, "openvpn", "haproxy", "ip")
	for _, p := range vpntest.Profiles {
		t.Run(string(p), func(t *testing.T) { testFleet(t, p) })
	}
}

func testFleet(t *testing.T, profile vpntest.Profile) {
	ws := startWorldServer(t, map[string]string{
		"VPN_CONNECT_PROXY_PORT": "3128", "TRUST_PROXY": "true",
		"DELAY_ON_AUTH_FAIL": "0", "DEFAULT_SIGTERM_TIMEOUT": "10",
	})
	world, api := ws.world, ws.api
	if out, err := world.Command("sysctl", "-q", "-w", "net.ipv4.ip_forward=1").CombinedOutput(); err != nil {
		t.Fatalf("ip_forward in the world: %v: %s", err, out)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 150*time.Second)
	defer cancel()

	devs := startFleetDevices(t, ctx, ws, profile, "A", "B")
	for _, d := range devs {
		if _, err := d.client.WaitFor(ctx, "Initialization Sequence Completed"); err != nil {
			t.Fatal(err)
		}
	}
	reachAll := func(when string) {
		t.Helper()
		for _, d := range devs {
			waitUntil(t, ctx, func() bool {
				b, err := viaConnect(ctx, world, "127.0.0.1:3128", d.api.UUID+".balena:80", api.ServiceKey)
				return err == nil && string(b) == "hello from "+d.name
			})
		}
		t.Logf("%s: both devices reached through the CONNECT proxy", when)
	}
	reachAll("connected")
	checkUnprivileged(t, ws)
	measureReachable(t, ctx, ws, profile)

	// Isolation: A and B route the whole VPN range, and each other's link,
	// into their tunnels; the world forwards IPv4; still neither reaches
	// the other.
	resolver := &nss.Resolver{Globs: []string{filepath.Join(ws.run, "server-*.status")}, Interval: -1}
	a, b := devs[0], devs[1]
	for _, d := range devs {
		routeIntoTunnel(t, d, profile, "10.240.0.0/16")
	}
	routeIntoTunnel(t, a, profile, b.dev.Addr.String()+"/32")
	routeIntoTunnel(t, b, profile, a.dev.Addr.String()+"/32")
	bVPN := rateLookup(t, ctx, resolver, b.api.UUID)
	for _, target := range []string{bVPN.String(), b.dev.Addr.String()} {
		if got, err := fetchFrom(ctx, a.dev, target+":80"); err == nil {
			t.Errorf("device A reached device B at %s through the VPN: %q", target, got)
		}
	}
	if rules := isolationRules(t, world); rules != 2 {
		t.Errorf("%d isolation rules while running, want 2 (tun1 and tun2)", rules)
	}
	// The world itself still reaches B's link (the host is allowed).
	if got, err := fetchFrom(ctx, world, b.dev.Addr.String()+":80"); err != nil || got != "hello from B" {
		t.Errorf("the server host could not reach B's link: %q, %v", got, err)
	}

	// The internal API answers no device, neither on the link nor through
	// the tunnel, whatever the request says.
	for _, addr := range []string{a.dev.WorldAddr.String(), "10.240.0.1", "10.240.1.1"} {
		c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: a.dev.Dial}}
		req, _ := http.NewRequest("POST", "http://"+addr+":8081/api/v1/auth/",
			strings.NewReader(`{"username":"`+a.api.UUID+`","password":"`+a.api.Key+`"}`))
		req.Header.Set("X-Forwarded-For", "127.0.0.1")
		if resp, err := c.Do(req); err == nil {
			resp.Body.Close()
			t.Errorf("the internal API at %s answered a device: %s", addr, resp.Status)
		}
	}

	// SIGUSR1: OpenVPN restarts within its process, as nobody, keeping
	// its tun device and its files; the devices come back.
	marks := make([]int, len(devs))
	for i, d := range devs {
		marks[i] = len(d.client.Lines())
	}
	pids := map[int]int{}
	for id := 1; id <= 2; id++ {
		pids[id] = serverPID(t, ws.run, id)
		if err := syscall.Kill(pids[id], syscall.SIGUSR1); err != nil {
			t.Fatal(err)
		}
	}
	waitReconnected(t, ctx, devs, marks)
	for id := 1; id <= 2; id++ {
		if got := serverPID(t, ws.run, id); got != pids[id] {
			t.Errorf("SIGUSR1 replaced instance %d's openvpn process: pid %d, then %d", id, pids[id], got)
		}
		statusRewritten(t, ctx, filepath.Join(ws.run, fmt.Sprintf("server-%d.status", id)))
	}
	reachAll("after SIGUSR1")

	// SIGKILL of every server openvpn: the instances restart them, the
	// devices reconnect.
	for i, d := range devs {
		marks[i] = len(d.client.Lines())
	}
	old := map[int]int{}
	for id := 1; id <= 2; id++ {
		old[id] = serverPID(t, ws.run, id)
		if err := syscall.Kill(old[id], syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
	}
	waitUntil(t, ctx, func() bool {
		for id := 1; id <= 2; id++ {
			if p, err := readPID(ws.run, id); err != nil || p == old[id] || syscall.Kill(p, 0) != nil {
				return false
			}
		}
		return true
	})
	waitReconnected(t, ctx, devs, marks)
	checkUnprivileged(t, ws)
	reachAll("after SIGKILL of every openvpn")

	// The stop drains: both devices are let go and reported offline.
	ws.cancel()
	if err := ws.wait(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	for _, d := range devs {
		if st, _ := api.Device(d.api.UUID); st.ConnectedToVPN {
			t.Errorf("device %s still online after the stop", d.name)
		}
	}
	if rules := isolationRules(t, world); rules != 0 {
		t.Errorf("%d isolation rules left after the stop", rules)
	}
}

// isolationRules counts the policy rules in n that refuse packets from a
// tun device.
func isolationRules(t *testing.T, n *vpntest.Netns) int {
	t.Helper()
	out, err := n.Command("ip", "-4", "rule", "show").CombinedOutput()
	if err != nil {
		t.Fatalf("ip rule show: %v: %s", err, out)
	}
	count := 0
	for _, l := range strings.Split(string(out), "\n") {
		if strings.Contains(l, "iif tun") && strings.Contains(l, "prohibit") {
			count++
		}
	}
	return count
}

// TestFleetIsolationOff is TestFleet's control: with
// VPN_DEVICE_ISOLATION=off, in the same world that forwards IPv4, a device
// that routes the VPN range into its tunnel does reach the other device,
// so the isolation check above is one that can fail.
func TestFleetIsolationOff(t *testing.T) {
	vpntest.Require(t, "openvpn", "haproxy", "ip")
	ws := startWorldServer(t, map[string]string{"VPN_DEVICE_ISOLATION": "off", "VPN_INSTANCE_COUNT": "1"})
	if out, err := ws.world.Command("sysctl", "-q", "-w", "net.ipv4.ip_forward=1").CombinedOutput(); err != nil {
		t.Fatalf("ip_forward in the world: %v: %s", err, out)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	devs := startFleetDevices(t, ctx, ws, vpntest.Minimal, "A", "B")
	for _, d := range devs {
		if _, err := d.client.WaitFor(ctx, "Initialization Sequence Completed"); err != nil {
			t.Fatal(err)
		}
		routeIntoTunnel(t, d, vpntest.Minimal, "10.240.0.0/16")
	}
	if rules := isolationRules(t, ws.world); rules != 0 {
		t.Errorf("%d isolation rules with VPN_DEVICE_ISOLATION=off", rules)
	}
	resolver := &nss.Resolver{Globs: []string{filepath.Join(ws.run, "server-*.status")}, Interval: -1}
	bVPN := rateLookup(t, ctx, resolver, devs[1].api.UUID)
	if got, err := fetchFrom(ctx, devs[0].dev, bVPN.String()+":80"); err != nil || got != "hello from B" {
		t.Errorf("without isolation, A did not reach B at %s: %q, %v", bVPN, got, err)
	}
}

// measureReachable connects one more device, C, and measures how soon
// the CONNECT proxy reaches it, and how soon it stops reaching it once
// its client has exited, with the default status interval of 10 s: the
// addresses come from the management interface, not from the next status
// file. "Up" is from the moment the API says C is online (the state
// reporter sends at most a pass a second, so that comes up to 1 s after
// the client's initialization, which it also logs) to the first answer
// from C; "down" from the client's exit to the first CONNECT that does
// not reach C (that CONNECT itself answers only after the proxy's retry
// delay, the status interval, when the API still says C is online). The
// figures are logged; the test requires them to be well under the
// interval.
func measureReachable(t *testing.T, ctx context.Context, ws *worldServer, profile vpntest.Profile) {
	t.Helper()
	// The state reporter makes at most a pass a second (SPEC §4), and the
	// proxy asks the API whether C is online: C comes after a second of
	// quiet, as after any quiet second in the field, so that the figure is
	// not the pass interval. (Not a synchronisation: a condition of the
	// measurement.)
	time.Sleep(1100 * time.Millisecond)
	c := startFleetDevices(t, ctx, ws, profile, "C")[0]
	if _, err := c.client.WaitFor(ctx, "Initialization Sequence Completed"); err != nil {
		t.Fatal(err)
	}
	initialized := time.Now()
	poll := func(what string, cond func() bool) {
		for !cond() {
			if ctx.Err() != nil {
				t.Fatalf("device C: %s: not in time", what)
			}
			time.Sleep(2 * time.Millisecond) // polling an outside answer: no event to wait on
		}
	}
	poll("online in the API", func() bool { d, _ := ws.api.Device(c.api.UUID); return d.ConnectedToVPN })
	online := time.Now()
	reached := func() bool {
		b, err := viaConnect(ctx, ws.world, "127.0.0.1:3128", c.api.UUID+".balena:80", ws.api.ServiceKey)
		return err == nil && string(b) == "hello from C"
	}
	poll("reached", reached)
	up := time.Since(online)
	fromInit := time.Since(initialized)
	// The NSS module's index, which the server keeps in its run
	// directory, has it too.
	indexed := func() bool {
		ix, err := nss.ReadIndex(filepath.Join(ws.run, "nss.index"))
		if err != nil {
			return false
		}
		_, err = ix.Lookup(c.api.UUID + ".vpn")
		return err == nil
	}
	poll("in the NSS index", indexed)
	inIndex := time.Since(online)
	c.client.Stop()
	exited := time.Now()
	poll("out of the NSS index", func() bool { return !indexed() })
	outOfIndex := time.Since(exited)
	var failedAt time.Time
	var answeredIn time.Duration
	poll("unreachable", func() bool {
		at := time.Now()
		if reached() {
			return false
		}
		failedAt, answeredIn = at, time.Since(at)
		return true
	})
	down := failedAt.Sub(exited)
	t.Logf("%s: device C reached through the proxy %v after its client's initialization (the server's CLIENT:ESTABLISHED is about 1 ms before it); "+
		"online in the API %v after the initialization; reached %v after that; "+
		"in the NSS index %v after that; out of the index %v after its client exited, and a CONNECT started %v after the exit no more reached it "+
		"(answered after %v) (status interval %v)", profile,
		fromInit.Round(time.Millisecond), online.Sub(initialized).Round(time.Millisecond), up.Round(time.Millisecond), inIndex.Round(time.Millisecond),
		outOfIndex.Round(time.Millisecond), down.Round(time.Millisecond), answeredIn.Round(time.Millisecond), ws.cfg.OpenVPN.StatusInterval)
	if limit := ws.cfg.OpenVPN.StatusInterval / 2; fromInit > limit || down > limit || inIndex > limit || outOfIndex > limit {
		t.Errorf("reached %v after online, unreached %v after exit: not from the management interface (status interval %v)", up, down, ws.cfg.OpenVPN.StatusInterval)
	}
}

// startFleetDevices adds a device to the API for each name, with a web
// service on port 80 of a namespace of its own, and starts its client
// with profile against the world's HAProxy.
func startFleetDevices(t *testing.T, ctx context.Context, ws *worldServer, profile vpntest.Profile, names ...string) []*fleetDevice {
	t.Helper()
	var devs []*fleetDevice
	for _, name := range names {
		d := &fleetDevice{name: name, dev: vpntest.NewDevice(t, ws.world)}
		d.api = ws.api.AddDevice(balenatest.Device{UUID: fmt.Sprintf("%032x", 0xf1ee7+int(name[0])), Key: "key-" + name})
		l, err := d.dev.Listen("tcp", "0.0.0.0:80")
		if err != nil {
			t.Fatal(err)
		}
		hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, "hello from "+name)
		})}
		go hs.Serve(l)
		t.Cleanup(func() { hs.Close() })
		d.opts = vpntest.ClientOptions{Profile: profile, Netns: d.dev.Netns,
			Remote: d.dev.WorldAddr.String() + ":1194", CA: ws.pki.CAFile,
			Username: d.api.UUID, Password: d.api.Key, Tunnel: true}
		d.client = vpntest.StartClient(t, d.opts)
		devs = append(devs, d)
	}
	return devs
}

// routeIntoTunnel routes prefix into d's tunnel.
func routeIntoTunnel(t *testing.T, d *fleetDevice, profile vpntest.Profile, prefix string) {
	t.Helper()
	if out, err := d.dev.Command("ip", "route", "replace", prefix, "dev", vpntest.TunDev(profile)).CombinedOutput(); err != nil {
		t.Fatalf("device %s: ip route replace %s: %v: %s", d.name, prefix, err, out)
	}
}

// dialer is a namespace that dials: a *vpntest.Netns or *vpntest.Device.
type dialer interface {
	Dial(ctx context.Context, network, addr string) (net.Conn, error)
}

// fetchFrom GETs http://addr/ from n, within 3 s.
func fetchFrom(ctx context.Context, n dialer, addr string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	c := &http.Client{Transport: &http.Transport{DialContext: n.Dial, DisableKeepAlives: true}}
	req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+addr+"/", nil)
	resp, err := c.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// readPID reads instance id's pid file.
func readPID(run string, id int) (int, error) {
	b, err := os.ReadFile(filepath.Join(run, fmt.Sprintf("server-%d.pid", id)))
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(strings.TrimSpace(string(b)))
}

func serverPID(t *testing.T, run string, id int) int {
	t.Helper()
	p, err := readPID(run, id)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// checkUnprivileged checks that no instance's openvpn keeps uid 0 (real,
// effective, saved or file system).
func checkUnprivileged(t *testing.T, ws *worldServer) {
	t.Helper()
	for id := 1; id <= 2; id++ {
		pid := serverPID(t, ws.run, id)
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range strings.Split(string(b), "\n") {
			if rest, ok := strings.CutPrefix(l, "Uid:"); ok {
				for _, f := range strings.Fields(rest) {
					if f == "0" {
						t.Errorf("instance %d's openvpn (pid %d) keeps uid 0: %s", id, pid, l)
					}
				}
			}
		}
	}
}

// waitReconnected waits until every device's client has completed a new
// initialization after the line marks[i] of its output.
//
// A balenaOS client that comes back on another instance is pushed another
// address, and must reopen its tun device, which it can no longer do
// once it runs as its unprivileged user: it exits ("Cannot open TUN/TAP
// dev /dev/net/tun: Permission denied"), and balenaOS's openvpn.service
// (Restart=always, RestartSec=10s) starts it again. The kit has no
// systemd: this restarts such a client at once, as the unit would.
func waitReconnected(t *testing.T, ctx context.Context, devs []*fleetDevice, marks []int) {
	t.Helper()
	for i, d := range devs {
		_, err := d.client.WaitFrom(ctx, marks[i], "Initialization Sequence Completed")
		if err != nil && ctx.Err() == nil && d.opts.Profile != vpntest.Minimal {
			t.Logf("device %s's client exited (%v); restarting it, as balenaOS's openvpn.service does", d.name, err)
			d.client = vpntest.StartClient(t, d.opts)
			_, err = d.client.WaitFor(ctx, "Initialization Sequence Completed")
		}
		if err != nil {
			t.Fatalf("device %s did not reconnect: %v", d.name, err)
		}
	}
}

// statusRewritten waits until path is rewritten from now on, and reads
// whole.
func statusRewritten(t *testing.T, ctx context.Context, path string) {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	waitUntil(t, ctx, func() bool {
		now, err := os.Stat(path)
		if err != nil || !now.ModTime().After(fi.ModTime()) {
			return false
		}
		f, err := os.Open(path)
		if err != nil {
			return false
		}
		defer f.Close()
		_, err = nss.ParseStatus(f)
		return err == nil || !errors.Is(err, nss.ErrIncomplete)
	})
}
