//go:build linux

package deploy

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/obvpn/obvpn/vpn/balena/balenatest"
	"github.com/obvpn/obvpn/vpn/vpntest"
)

var liveImage = flag.String("image", "", "the image TestImageLive runs; empty means compose.yaml's (make image builds it)")

// liveAPIAddr is where the balena API (balenatest) listens in the test's
// world namespace: an address of the world's own, which the container
// reaches through its default route (the bridge), as it would reach an
// API host. It is in 198.51.100.0/24, the test hosts' range.
const liveAPIAddr = "198.51.100.254"

// liveServicePort is the port of the devices' service that the test
// reaches through the container's CONNECT proxy.
const liveServicePort = 8000

// TestImageLive runs the image as compose.yaml configures it, with podman
// (runtime runc) in a network namespace of the test's own, so that what
// podman and netavark set up there (the bridge, the published ports'
// iptables rules, net.ipv4.ip_forward) goes with that namespace. Against
// balenatest, two real OpenVPN devices with the balenaOS client
// configuration connect to the published VPN port, are reported online,
// and are reached through the published CONNECT proxy; the status files
// and the NSS index are where the deploy README says, and getent resolves
// the devices' names in the container; compose's healthcheck passes.
// podman stop drains within compose's grace period, the container exits
// 0 and the devices are reported offline. Afterwards nothing is left: no
// container, no network, no podman namespace, the machine's iptables
// rules and forwarding sysctls as before.
//
// It needs root, podman, openvpn and the image (make image); without
// them it skips, or fails under OBVPN_E2E=1.
func TestImageLive(t *testing.T) {
	vpntest.Require(t, "podman", "nsenter", "openvpn", "ip", "iptables-save", "getent")
	conf := podmanConf(t)
	before := snapshotHost(t, conf)
	t.Cleanup(func() { checkNothingLeft(t, conf, before) })

	world := vpntest.NewNetns(t, "world")
	pm := &podman{ns: world, conf: conf}
	svc := composeService(t)
	image := svc.Image
	if *liveImage != "" {
		image = *liveImage
	}
	if _, err := pm.output(context.Background(), "image", "exists", image); err != nil {
		requireMissing(t, "the image %s is not built (make image): %v", image, err)
	}

	w := newLiveWorld(t, world, 2)
	api, devices := w.api, w.devices

	// The container, with compose.yaml's settings and this API.
	host := requiredTestValues(t)
	host["VPN_SERVICE_API_KEY"] = api.ServiceKey
	host["BALENA_API_INTERNAL_HOST"] = w.apiAddr
	host["VPN_INSTANCE_COUNT"] = "2"
	env, err := composeEnvironment(svc, host)
	if err != nil {
		t.Fatal(err)
	}
	grace, err := time.ParseDuration(svc.StopGracePeriod)
	if err != nil {
		t.Fatalf("stop_grace_period: %v", err)
	}
	name := fmt.Sprintf("obvpn-live-%d", os.Getpid())
	args, err := podmanRunArgs(svc, env, name, image)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if _, err := pm.output(ctx, args...); err != nil {
		t.Fatalf("podman %s: %v", strings.Join(redactEnv(args), " "), err)
	}
	t.Cleanup(func() {
		// Whatever happened, the container goes before its namespace.
		if out, err := pm.output(context.Background(), "rm", "--force", "--time", "0", "--ignore", name); err != nil {
			t.Errorf("podman rm: %v: %s", err, out)
		}
	})
	logs, err := vpntest.Launch(pm.command(context.Background(), "logs", "--follow", name))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		logs.Stop()
		if t.Failed() {
			t.Logf("container log:\n%s", strings.Join(logs.Lines(), "\n"))
		}
	})
	if _, err := logs.WaitFor(ctx, "VPN server running"); err != nil {
		t.Fatal(err)
	}

	w.connect(ctx, t, publishedPort(t, svc, 443))

	// Compose's healthcheck, run as podman runs it (podman schedules it
	// with systemd timers, which this machine may not have).
	if out, err := pm.output(ctx, "healthcheck", "run", name); err != nil {
		t.Errorf("podman healthcheck run: %v: %s", err, out)
	}

	// Through the published CONNECT proxy, with a user's key.
	proxyAddr := net.JoinHostPort(devices[0].ns.WorldAddr.String(), strconv.Itoa(publishedPort(t, svc, 3128)))
	w.throughProxy(ctx, t, proxyAddr)
	if _, err := getThroughProxy(ctx, world, proxyAddr, "not-a-key", fmt.Sprintf("%s.balena:%d", devices[0].UUID, liveServicePort)); err == nil || !strings.Contains(err.Error(), "407") {
		t.Errorf("an unknown key through the proxy: %v, want 407", err)
	}

	// The status files and the NSS index where the deploy README says
	// (VPN_RUN_DIR, /run/openvpn), and getent through the NSS module.
	runDir := env["VPN_RUN_DIR"]
	if _, err := pm.output(ctx, "exec", name, "test", "-s", runDir+"/nss.index"); err != nil {
		t.Errorf("%s/nss.index: %v", runDir, err)
	}
	for _, d := range devices {
		out, err := pm.output(ctx, "exec", name, "getent", "hosts", d.UUID+".vpn")
		if err != nil {
			t.Errorf("getent hosts %s.vpn: %v", d.UUID, err)
			continue
		}
		addr := strings.Fields(out)[0]
		// OpenVPN rewrites the files every
		// VPN_STATUS_FILE_WRITE_INTERVAL_SECONDS (10 s), from outside
		// the container an event the test can only look for.
		want := "ROUTING_TABLE," + addr + "," + d.UUID + ","
		tick := time.NewTicker(200 * time.Millisecond)
		for {
			status, err := pm.output(ctx, "exec", name, "sh", "-c", "cat "+runDir+"/server-*.status")
			if err == nil && strings.Contains(status, want) {
				break
			}
			select {
			case <-ctx.Done():
				t.Fatalf("getent hosts %s.vpn: %s, which the status files in %s do not route to it (%v):\n%s", d.UUID, addr, runDir, err, status)
			case <-tick.C:
			}
		}
		tick.Stop()
	}

	// podman stop: SIGTERM, the drain, exit 0 within compose's grace
	// period (podman stop with no -t gives the container's stop timeout,
	// which --stop-timeout set from stop_grace_period).
	start := time.Now()
	if out, err := pm.output(ctx, "stop", name); err != nil {
		t.Fatalf("podman stop: %v: %s", err, out)
	}
	took := time.Since(start)
	code, err := pm.output(ctx, "inspect", "--format", "{{.State.ExitCode}}", name)
	if err != nil {
		t.Fatal(err)
	}
	if strings.TrimSpace(code) != "0" {
		t.Errorf("exit status %s after podman stop, want 0", code)
	}
	if took >= grace {
		t.Errorf("podman stop took %v, more than the grace period %v: SIGKILL, not the drain, ended it", took, grace)
	}
	if _, err := logs.WaitFor(ctx, "drained"); err != nil {
		t.Errorf("the log has no end of the drain: %v", err)
	}
	t.Logf("podman stop: %v (grace period %v)", took.Round(time.Millisecond), grace)
	w.offline(t)
}

// liveWorld is the balena API and the devices of a live test, in the
// test's world namespace.
type liveWorld struct {
	world   *vpntest.Netns
	api     *balenatest.API
	apiAddr string // host:port
	devices []*liveDevice
}

type liveDevice struct {
	balenatest.Device
	ns     *vpntest.Device
	client *vpntest.Process
}

// newLiveWorld serves the balena API in world, at liveAPIAddr, and makes n
// devices, each in a namespace of its own with a service on
// liveServicePort that the key "user-key" may reach.
func newLiveWorld(t *testing.T, world *vpntest.Netns, n int) *liveWorld {
	t.Helper()
	if out, err := exec.Command("ip", "-n", world.Name, "addr", "add", liveAPIAddr+"/32", "dev", "lo").CombinedOutput(); err != nil {
		t.Fatalf("ip addr add: %v: %s", err, out)
	}
	w := &liveWorld{world: world, api: balenatest.New()}
	l, err := world.Listen("tcp", liveAPIAddr+":0")
	if err != nil {
		t.Fatal(err)
	}
	w.apiAddr = l.Addr().String()
	hs := &http.Server{Handler: w.api}
	go hs.Serve(l)
	t.Cleanup(func() { hs.Close() })
	for i := range n {
		d := &liveDevice{Device: w.api.AddDevice(balenatest.Device{
			UUID: fmt.Sprintf("%032x", 0xd0+i), Key: fmt.Sprintf("device-key-%d", i)})}
		d.ns = vpntest.NewDevice(t, world)
		w.api.Grant("user-key", d.UUID, liveServicePort)
		// On every address of the device's own namespace: the VPN's
		// comes later.
		sl, err := d.ns.Listen("tcp", fmt.Sprintf("0.0.0.0:%d", liveServicePort))
		if err != nil {
			t.Fatal(err)
		}
		uuid := d.UUID
		ds := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "device %s\n", uuid)
		})}
		go ds.Serve(sl)
		t.Cleanup(func() { ds.Close() })
		w.devices = append(w.devices, d)
	}
	return w
}

// connect starts every device's openvpn (balenaOS's configuration) to
// vpnPort on the world's side of its link, where the container's port is
// published, and waits until the API holds them online.
func (w *liveWorld) connect(ctx context.Context, t *testing.T, vpnPort int) {
	t.Helper()
	caFile := writeSearchable(t, "ca.crt", mustDecode(t, pki(t).CA))
	for _, d := range w.devices {
		d.client = vpntest.StartClient(t, vpntest.ClientOptions{Profile: vpntest.BalenaOS, Netns: d.ns.Netns,
			Remote: net.JoinHostPort(d.ns.WorldAddr.String(), strconv.Itoa(vpnPort)), CA: caFile,
			Username: d.UUID, Password: d.Key, Tunnel: true})
	}
	for _, d := range w.devices {
		if _, err := d.client.WaitFor(ctx, "Initialization Sequence Completed"); err != nil {
			t.Fatalf("device %s: %v", d.UUID, err)
		}
	}
	tick := time.NewTicker(20 * time.Millisecond) // the API has no event for a report
	defer tick.Stop()
	for _, d := range w.devices {
		for {
			got, _ := w.api.Device(d.UUID)
			if got.ConnectedToVPN && got.ServiceInstance != 0 {
				break
			}
			select {
			case <-ctx.Done():
				t.Fatalf("device %s was not reported online: %+v", d.UUID, got)
			case <-tick.C:
			}
		}
	}
}

// throughProxy GETs every device's service through the CONNECT proxy at
// proxyAddr with the user's key.
func (w *liveWorld) throughProxy(ctx context.Context, t *testing.T, proxyAddr string) {
	t.Helper()
	for _, d := range w.devices {
		got, err := getThroughProxy(ctx, w.world, proxyAddr, "user-key", fmt.Sprintf("%s.balena:%d", d.UUID, liveServicePort))
		if err != nil {
			t.Errorf("device %s through the proxy: %v", d.UUID, err)
		} else if want := "device " + d.UUID + "\n"; got != want {
			t.Errorf("device %s through the proxy: got %q, want %q", d.UUID, got, want)
		}
	}
}

// offline checks that the API holds every device offline.
func (w *liveWorld) offline(t *testing.T) {
	t.Helper()
	for _, d := range w.devices {
		if got, _ := w.api.Device(d.UUID); got.ConnectedToVPN {
			t.Errorf("device %s is still online in the API after the stop", d.UUID)
		}
	}
}

// podman runs podman in a namespace with the test's own containers.conf
// (examples/deploy/podman/containers-conf.sh), never the machine's.
type podman struct {
	ns   *vpntest.Netns
	conf string
}

// podmanConf writes the test's containers.conf and returns its path.
func podmanConf(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("bash", "podman/containers-conf.sh").Output()
	if err != nil {
		t.Fatalf("podman/containers-conf.sh: %v", err)
	}
	conf := filepath.Join(t.TempDir(), "containers.conf")
	if err := os.WriteFile(conf, out, 0o644); err != nil {
		t.Fatal(err)
	}
	return conf
}

// command runs podman in the namespace: only its network namespace is
// entered (nsenter), since ip netns exec's fresh /sys hides the cgroup
// mounts that runc needs.
func (p *podman) command(ctx context.Context, args ...string) *exec.Cmd {
	argv := append([]string{"--net=/var/run/netns/" + p.ns.Name, "podman"}, args...)
	cmd := exec.CommandContext(ctx, "nsenter", argv...)
	cmd.Env = append(os.Environ(), "CONTAINERS_CONF="+p.conf)
	return cmd
}

// output runs podman and returns its standard output; an error holds its
// standard error.
func (p *podman) output(ctx context.Context, args ...string) (string, error) {
	cmd := p.command(ctx, args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), fmt.Errorf("podman %s: %w: %s", args[0], err, strings.TrimSpace(stderr.String()))
	}
	return string(out), nil
}

// podmanRunArgs turns the compose service into podman run's arguments, as
// compose would create the container: the capabilities, devices, init,
// published ports, tmpfs, environment, restart policy, healthcheck and
// stop grace period. It refuses settings it does not know how to pass,
// so that the live test never runs less than compose.yaml says.
func podmanRunArgs(svc composeSvc, env map[string]string, name, image string) ([]string, error) {
	args := []string{"run", "--detach", "--name", name}
	if svc.Init {
		args = append(args, "--init")
	}
	for _, c := range svc.CapDrop {
		args = append(args, "--cap-drop", c)
	}
	for _, c := range svc.CapAdd {
		args = append(args, "--cap-add", c)
	}
	for _, o := range svc.SecurityOpt {
		args = append(args, "--security-opt", o)
	}
	for _, d := range svc.Devices {
		args = append(args, "--device", d)
	}
	for _, p := range svc.Ports {
		spec := p.Published + ":" + strconv.Itoa(p.Target)
		if p.HostIP != "" {
			spec = p.HostIP + ":" + spec
		}
		if p.Protocol != "" {
			spec += "/" + p.Protocol
		}
		args = append(args, "--publish", spec)
	}
	for _, m := range svc.Tmpfs {
		args = append(args, "--tmpfs", m)
	}
	for _, k := range slices.Sorted(maps.Keys(env)) {
		args = append(args, "--env", k+"="+env[k])
	}
	if svc.Restart != "" {
		args = append(args, "--restart", svc.Restart)
	}
	if svc.StopSignal != "" {
		args = append(args, "--stop-signal", svc.StopSignal)
	}
	if svc.StopGracePeriod != "" {
		d, err := time.ParseDuration(svc.StopGracePeriod)
		if err != nil {
			return nil, fmt.Errorf("stop_grace_period: %w", err)
		}
		args = append(args, "--stop-timeout", strconv.Itoa(int(d/time.Second)))
	}
	if hc := svc.Healthcheck; len(hc.Test) > 0 {
		switch hc.Test[0] {
		case "CMD":
			cmd, _ := json.Marshal(hc.Test[1:])
			args = append(args, "--health-cmd", string(cmd))
		case "CMD-SHELL":
			args = append(args, "--health-cmd", strings.Join(hc.Test[1:], " "))
		default:
			return nil, fmt.Errorf("healthcheck test %q: want CMD or CMD-SHELL", hc.Test)
		}
		for flag, v := range map[string]string{"--health-interval": hc.Interval, "--health-timeout": hc.Timeout, "--health-start-period": hc.StartPeriod} {
			if v != "" {
				args = append(args, flag, v)
			}
		}
		if hc.Retries > 0 {
			args = append(args, "--health-retries", strconv.Itoa(hc.Retries))
		}
	}
	if len(svc.Entrypoint) > 0 || len(svc.Command) > 0 || svc.StopSignal != "" && svc.StopSignal != "SIGTERM" {
		return nil, errors.New("compose.yaml sets an entrypoint, a command or a stop signal, which the live test does not pass on")
	}
	return append(args, image), nil
}

// redactEnv returns args with the values of --env left out: they hold the
// server's key.
func redactEnv(args []string) []string {
	out := slices.Clone(args)
	for i := 1; i < len(out); i++ {
		if out[i-1] == "--env" {
			k, _, _ := strings.Cut(out[i], "=")
			out[i] = k + "=…"
		}
	}
	return out
}

// publishedPort is the host port that compose publishes container port
// target on.
func publishedPort(t *testing.T, svc composeSvc, target int) int {
	t.Helper()
	for _, p := range svc.Ports {
		if p.Target == target {
			n, err := strconv.Atoi(p.Published)
			if err != nil {
				t.Fatalf("ports: %d published on %q: %v", target, p.Published, err)
			}
			return n
		}
	}
	t.Fatalf("ports: %d not published", target)
	return 0
}

// getThroughProxy asks the CONNECT proxy at proxyAddr, from ns, for a
// tunnel to target with key, and GETs / through it; it returns the body.
func getThroughProxy(ctx context.Context, ns *vpntest.Netns, proxyAddr, key, target string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	c, err := ns.Dial(ctx, "tcp", proxyAddr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	auth := base64.StdEncoding.EncodeToString([]byte("user:" + key))
	fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\nProxy-Authorization: Basic %s\r\n\r\n", target, target, auth)
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil {
		return "", fmt.Errorf("CONNECT %s: %w", target, err)
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("CONNECT %s: %s", target, resp.Status)
	}
	fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", target)
	r, err := http.ReadResponse(br, nil)
	if err != nil {
		return "", fmt.Errorf("GET through %s: %w", target, err)
	}
	defer r.Body.Close()
	body, err := io.ReadAll(r.Body)
	return string(body), err
}

// writeSearchable writes a file that an unprivileged openvpn (balenaOS's
// runs as nobody once it is up) can read again when it reconnects.
func writeSearchable(t *testing.T, name string, data []byte) string {
	t.Helper()
	dir := t.TempDir()
	for _, d := range []string{dir, filepath.Dir(dir)} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	file := filepath.Join(dir, name)
	if err := os.WriteFile(file, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return file
}

func mustDecode(t *testing.T, b64 string) []byte {
	t.Helper()
	b, err := base64.StdEncoding.DecodeString(b64)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// requireMissing skips t for a missing prerequisite, or fails it under
// OBVPN_E2E=1, as vpntest.Require does for commands.
func requireMissing(t *testing.T, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if os.Getenv("OBVPN_E2E") == "1" {
		t.Fatalf("OBVPN_E2E=1 but %s", msg)
	}
	t.Skipf("%s (set OBVPN_E2E=1 to make this a failure)", msg)
}

// hostState is what the test must leave as it found it in the machine's
// own namespaces.
type hostState struct {
	iptables   string            // iptables-save and ip6tables-save, comments left out
	sysctls    map[string]string // the forwarding sysctls
	containers []string          // podman's containers
	networks   []string          // podman's networks
	netns      []string          // podman's namespaces (netns-*) in /run/netns
}

var forwardingSysctls = []string{"net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding", "net/ipv4/conf/all/route_localnet"}

func snapshotHost(t *testing.T, conf string) hostState {
	t.Helper()
	s := hostState{sysctls: map[string]string{}}
	for _, save := range []string{"iptables-save", "ip6tables-save"} {
		out, err := exec.Command(save).Output()
		if err != nil {
			if errors.Is(err, exec.ErrNotFound) && save == "ip6tables-save" {
				continue
			}
			t.Fatalf("%s: %v", save, err)
		}
		for _, line := range strings.Split(string(out), "\n") {
			if !strings.HasPrefix(line, "#") {
				s.iptables += line + "\n"
			}
		}
	}
	for _, k := range forwardingSysctls {
		b, err := os.ReadFile("/proc/sys/" + k)
		if err != nil {
			t.Fatal(err)
		}
		s.sysctls[k] = strings.TrimSpace(string(b))
	}
	lines := func(args ...string) []string {
		cmd := exec.Command("podman", args...)
		cmd.Env = append(os.Environ(), "CONTAINERS_CONF="+conf)
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("podman %s: %v", strings.Join(redactEnv(args), " "), err)
		}
		return strings.Fields(string(out))
	}
	s.containers = lines("ps", "--all", "--format", "{{.Names}}")
	s.networks = lines("network", "ls", "--format", "{{.Name}}")
	entries, _ := os.ReadDir("/var/run/netns")
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), "netns-") {
			s.netns = append(s.netns, e.Name())
		}
	}
	return s
}

// checkNothingLeft compares the host with before, once every other
// cleanup of the test has run.
func checkNothingLeft(t *testing.T, conf string, before hostState) {
	t.Helper()
	after := snapshotHost(t, conf)
	if after.iptables != before.iptables {
		t.Errorf("the machine's iptables rules changed:\nbefore:\n%s\nafter:\n%s", before.iptables, after.iptables)
	}
	for _, k := range forwardingSysctls {
		if after.sysctls[k] != before.sysctls[k] {
			t.Errorf("%s is %s, was %s", k, after.sysctls[k], before.sysctls[k])
		}
	}
	for what, l := range map[string][2][]string{"containers": {before.containers, after.containers},
		"networks": {before.networks, after.networks}, "podman namespaces": {before.netns, after.netns}} {
		for _, n := range l[1] {
			if !slices.Contains(l[0], n) {
				t.Errorf("left behind: %s %s", what, n)
			}
		}
	}
}
