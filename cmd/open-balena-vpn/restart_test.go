package main

import (
	"context"
	"encoding/base64"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/obvpn/obvpn/cmd/internal/sdnotify/sdnotifytest"
	"github.com/obvpn/obvpn/vpn/balena/balenatest"
	"github.com/obvpn/obvpn/vpn/vpntest"
)

// restartStreams is how many streams run through the proxy across each
// restart.
const restartStreams = 5

// TestRestarts runs the built command as production does (two OpenVPN
// instances behind a managed HAProxy, management-mode auth) with real
// devices connected through HAProxy, each in a namespace of its own, and
// restarts it three ways, with streams through the proxy and a load of
// CONNECT and GET /ping requests running across each:
//
//   - an in-place upgrade (SIGHUP): no device reconnects, the OpenVPN and
//     HAProxy processes keep their pids, the API gets no auth call and
//     no state report, no request is refused or unanswered, and every
//     stream arrives whole;
//   - a kill -9 of the server and a start of a new one, as systemd's
//     Restart=always does: no device reconnects, the same pids, no auth
//     call and no state report (the proxy's tunnels went with the
//     killed process);
//   - a stop (SIGTERM, the drain) and a start, for comparison: every
//     device reconnects.
//
// It logs the figures of each: reconnects, auth calls, state reports,
// refused and unanswered requests, bytes lost, and the time until every
// device is online and reachable through the proxy again. 10 devices, or
// OBVPN_RESTART_DEVICES.
func TestRestarts(t *testing.T) {
	n := 10
	if v := os.Getenv("OBVPN_RESTART_DEVICES"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < restartStreams {
			t.Fatalf("OBVPN_RESTART_DEVICES=%q: want a number of at least %d", v, restartStreams)
		}
	}
	rw := newRestartWorld(t, n)
	figs := []restartFigures{
		rw.measure("in-place upgrade (SIGHUP)", rw.upgrade),
		rw.measure("kill -9, then a new process", rw.killAndStart),
		rw.measure("stop (SIGTERM), then a new process", rw.stopAndStart),
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%d devices, %d streams through the proxy:\n", n, restartStreams)
	fmt.Fprintln(&b, "| restart | device reconnects | auth calls | state reports (devices) | refused | unanswered | bytes lost | as before after |")
	fmt.Fprintln(&b, "| --- | --- | --- | --- | --- | --- | --- | --- |")
	for _, f := range figs {
		fmt.Fprintln(&b, f.row())
	}
	t.Log(b.String())
	for _, f := range figs[:2] {
		if f.reconnects != 0 || f.auths != 0 || f.reports != 0 || !f.samePids {
			t.Errorf("%s: %d reconnects, %d auth calls, %d state reports, same pids %v; want none and the same pids",
				f.name, f.reconnects, f.auths, f.reports, f.samePids)
		}
	}
	if up := figs[0]; up.refused != 0 || up.unanswered != 0 || up.lost != 0 || up.streamErrs != 0 {
		t.Errorf("%s: %d refused, %d unanswered, %d bytes lost, %d streams broken; want none", up.name, up.refused, up.unanswered, up.lost, up.streamErrs)
	}
	if f := figs[2]; f.reconnects < n {
		t.Errorf("%s: %d reconnects, want every device's (%d): the comparison did not restart OpenVPN", f.name, f.reconnects, n)
	}
}

// restartWorld is TestRestarts': the built command in a world namespace,
// its balena API, its notification socket, and the devices.
type restartWorld struct {
	t       *testing.T
	ctx     context.Context
	bin     string
	runDir  string
	world   *vpntest.Netns
	api     *balenatest.API
	notify  *sdnotifytest.Socket
	env     []string
	devs    []balenatest.Device
	clients []*vpntest.Process // each device's first client
	procsMu sync.Mutex
	procs   [][]*vpntest.Process // each device's clients, the supervisor's restarts included
	srv     *groupProc
	pid     int        // the server's main pid
	old     chan error // the exit of the process an upgrade replaced, until waitOld
}

func newRestartWorld(t *testing.T, n int) *restartWorld {
	goBin := vpntest.Require(t, "openvpn", "haproxy", "ip", "go")[3]
	dir := t.TempDir()
	rw := &restartWorld{t: t, bin: filepath.Join(dir, "open-balena-vpn"), runDir: t.TempDir()}
	if out, err := exec.Command(goBin, "build", "-o", rw.bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(120+2*n)*time.Second)
	t.Cleanup(cancel)
	rw.ctx = ctx
	rw.world = vpntest.NewNetns(t, "world")
	pki := vpntest.NewPKI(t)
	rw.api = balenatest.New()
	l, err := rw.world.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: rw.api}
	go hs.Serve(l)
	t.Cleanup(func() { hs.Close() })
	rw.notify = sdnotifytest.NewSocket(t)
	// The data plane outlives every server process: stopped at the end.
	t.Cleanup(func() { killDataPlane(rw.runDir) })
	b64 := base64.StdEncoding.EncodeToString
	rw.env = []string{
		"PATH=/usr/sbin:/usr/bin:/sbin:/bin",
		"VPN_BASE_SUBNET=10.240.0.0/16", "VPN_INSTANCE_SUBNET_BITMASK=24", "VPN_INSTANCE_COUNT=2",
		"VPN_RUN_DIR=" + rw.runDir, "VPN_HAPROXY_SOCKET=" + filepath.Join(rw.runDir, "haproxy.sock"),
		"VPN_PORT=1194", "VPN_HAPROXY_MONITOR_ADDR=127.0.0.1:8088",
		"BALENA_API_INTERNAL_HOST=" + l.Addr().String(), "VPN_SERVICE_API_KEY=" + rw.api.ServiceKey,
		"VPN_OPENVPN_CA_CRT=" + b64(pki.CACert), "VPN_OPENVPN_SERVER_CRT=" + b64(pki.ServerCert),
		"VPN_OPENVPN_SERVER_KEY=" + b64(pki.ServerKey),
		"VPN_API_BASE_PORT=30000", "VPN_METRICS_ADDR=127.0.0.1:8080", "VPN_CONNECT_PROXY_PORT=3128",
		"VPN_STATUS_FILE_WRITE_INTERVAL_SECONDS=1",
		"DELAY_ON_AUTH_FAIL=0", "DEFAULT_SIGTERM_TIMEOUT=5", "NOTIFY_SOCKET=" + rw.notify.Addr, "VPN_UPGRADE_TIMEOUT=30",
	}
	rw.start()

	for i := range n {
		d := rw.api.AddDevice(balenatest.Device{UUID: fmt.Sprintf("%032x", 0xde0000+i), Key: fmt.Sprintf("key-%d", i)})
		device := vpntest.NewDevice(t, rw.world)
		sink, err := device.Listen("tcp", "0.0.0.0:9000")
		if err != nil {
			t.Fatal(err)
		}
		go serveSink(sink)
		t.Cleanup(func() { sink.Close() })
		rw.devs = append(rw.devs, d)
		opts := vpntest.ClientOptions{Netns: device.Netns,
			Remote: device.WorldAddr.String() + ":1194", CA: pki.CAFile, Username: d.UUID, Password: d.Key, Tunnel: true}
		c := vpntest.StartClient(t, opts)
		rw.clients = append(rw.clients, c)
		rw.procs = append(rw.procs, []*vpntest.Process{c})
		rw.supervise(i, c, opts)
	}
	for _, c := range rw.clients {
		if _, err := c.WaitFor(ctx, "Initialization Sequence Completed"); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := rw.asBefore(); err != nil {
		t.Fatal(err)
	}
	return rw
}

// clientRestartDelay is how long balenaOS's openvpn.service waits before it
// starts a client that exited (Restart=always, RestartSec=10s): a client
// that lands on another instance after its server restarted is pushed
// another address, cannot reopen its tun device as its own user, and
// exits (see the README's "Under a fleet of balenaOS devices").
const clientRestartDelay = 10 * time.Second

// supervise starts device i's client again, clientRestartDelay after it
// exits, as balenaOS does, until the test ends.
func (rw *restartWorld) supervise(i int, c *vpntest.Process, opts vpntest.ClientOptions) {
	var wg sync.WaitGroup
	stop := make(chan struct{})
	rw.t.Cleanup(func() { close(stop); wg.Wait() })
	wg.Go(func() {
		for {
			select {
			case <-c.Exited():
			case <-stop:
				return
			}
			select {
			case <-time.After(clientRestartDelay): // systemd's wait, not an event
			case <-stop:
				return
			}
			c = vpntest.StartClient(rw.t, opts)
			rw.procsMu.Lock()
			rw.procs[i] = append(rw.procs[i], c)
			rw.procsMu.Unlock()
		}
	})
}

// inits counts device i's "Initialization Sequence Completed", over all
// its clients.
func (rw *restartWorld) inits(i int) int {
	rw.procsMu.Lock()
	defer rw.procsMu.Unlock()
	n := 0
	for _, c := range rw.procs[i] {
		n += countInits(c)
	}
	return n
}

// start starts a server process and waits for its READY=1.
func (rw *restartWorld) start() {
	t := rw.t
	cmd := exec.Command("ip", "netns", "exec", rw.world.Name, rw.bin)
	cmd.Env = rw.env
	rw.srv = startGroup(t, cmd)
	rw.pid = cmd.Process.Pid
	rw.waitReady(rw.pid)
}

// waitReady waits for READY=1 from pid.
func (rw *restartWorld) waitReady(pid int) {
	t := rw.t
	for {
		m, err := rw.notify.Next(rw.ctx)
		if err != nil {
			t.Fatalf("waiting for READY=1 from %d: %v", pid, err)
		}
		if m.Has("READY=1") && m.Value("MAINPID") == strconv.Itoa(pid) {
			return
		}
	}
}

// killDataPlane kills the OpenVPN and HAProxy processes that the servers
// of runDir left (they run in process groups of their own, and outlive
// the server on purpose).
func killDataPlane(runDir string) {
	for _, pid := range dataPlanePids(runDir) {
		syscall.Kill(pid, syscall.SIGKILL)
	}
}

// dataPlanePids returns the pids of the instances' openvpn and of
// haproxy in runDir, from their pid files.
func dataPlanePids(runDir string) []int {
	var pids []int
	for _, name := range []string{"server-1.pid", "server-2.pid", "haproxy.pid"} {
		b, err := os.ReadFile(filepath.Join(runDir, name))
		if err != nil {
			continue
		}
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 1 {
			pids = append(pids, pid)
		}
	}
	return pids
}

// asBefore waits until every device is online in the API and reachable
// through the proxy, and returns when.
func (rw *restartWorld) asBefore() (time.Time, error) {
	for _, d := range rw.devs {
		if err := rw.api.WaitFor(rw.ctx, func(a *balenatest.API) bool {
			dev, _ := a.Device(d.UUID)
			return dev.ConnectedToVPN
		}); err != nil {
			return time.Time{}, fmt.Errorf("device %s not online: %w", d.UUID, err)
		}
	}
	for _, d := range rw.devs {
		for {
			st, err := startStream(rw.ctx, rw.world, d.UUID, rw.api.ServiceKey)
			if err == nil {
				st.finish()
				if _, _, err = st.result(rw.ctx); err == nil {
					break
				}
			}
			select {
			case <-rw.ctx.Done():
				return time.Time{}, fmt.Errorf("device %s not reachable: %v", d.UUID, err)
			case <-time.After(100 * time.Millisecond): // a device on its way back
			}
		}
	}
	return time.Now(), nil
}

// restartFigures are the figures of one restart.
type restartFigures struct {
	name                       string
	reconnects, auths, reports int
	reportedDevices            int
	refused, unanswered        int
	lost                       int64 // bytes sent that did not arrive
	streamErrs                 int
	samePids                   bool
	took                       time.Duration
}

func (f restartFigures) row() string {
	return fmt.Sprintf("| %s | %d | %d | %d (%d) | %d | %d | %d | %v |", f.name, f.reconnects, f.auths, f.reports,
		f.reportedDevices, f.refused, f.unanswered, f.lost, f.took.Round(10*time.Millisecond))
}

// measure restarts the server with restart, with streams and a load
// running across it, and returns the figures.
func (rw *restartWorld) measure(name string, restart func()) restartFigures {
	t := rw.t
	f := restartFigures{name: name}
	inits := make([]int, len(rw.devs))
	for i := range rw.devs {
		inits[i] = rw.inits(i)
	}
	auths, reports := countRequests(rw.api, balenatest.DeviceAuth), len(rw.api.StateReports())
	pids := fmt.Sprint(dataPlanePids(rw.runDir))
	var streams []*stream
	for _, d := range rw.devs[:restartStreams] {
		st, err := startStream(rw.ctx, rw.world, d.UUID, rw.api.ServiceKey)
		if err != nil {
			t.Fatalf("%s: a stream: %v", name, err)
		}
		streams = append(streams, st)
	}
	load := startLoad(rw.world, rw.devs[len(rw.devs)-1].UUID)
	began := time.Now()
	restart()
	for _, st := range streams {
		st.finish()
	}
	stats := load.stop(rw.ctx, t)
	f.refused, f.unanswered = stats.refused, stats.failed
	for _, st := range streams {
		sent, got, err := st.result(rw.ctx)
		if err != nil || sent != got {
			f.streamErrs++
			f.lost += bytesOf(sent) - bytesOf(got)
		}
	}
	back, err := rw.asBefore()
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	f.took = back.Sub(began)
	rw.waitOld()
	for i := range rw.devs {
		f.reconnects += rw.inits(i) - inits[i]
	}
	f.auths = countRequests(rw.api, balenatest.DeviceAuth) - auths
	for _, r := range rw.api.StateReports()[reports:] {
		f.reports++
		f.reportedDevices += len(r.UUIDs)
	}
	f.samePids = fmt.Sprint(dataPlanePids(rw.runDir)) == pids
	return f
}

// bytesOf is the count of a stream's "count hash".
func bytesOf(s string) int64 {
	n, _ := strconv.ParseInt(strings.Fields(s + " 0")[0], 10, 64)
	return n
}

func countInits(c *vpntest.Process) int {
	return strings.Count(strings.Join(c.Lines(), "\n"), "Initialization Sequence Completed")
}

// upgrade is SIGHUP, until the successor says READY=1 with its pid; the
// old process exits once its tunnels have ended (waitOld).
func (rw *restartWorld) upgrade() {
	t := rw.t
	if err := syscall.Kill(rw.pid, syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	for {
		m, err := rw.notify.Next(rw.ctx)
		if err != nil {
			t.Fatalf("the upgrade: %v", err)
		}
		if pid, _ := strconv.Atoi(m.Value("MAINPID")); m.Has("READY=1") && pid != 0 && pid != rw.pid {
			rw.pid = pid
			rw.old = rw.srv.exited
			return
		}
	}
}

// waitOld waits for the process that an upgrade replaced to exit.
func (rw *restartWorld) waitOld() {
	if rw.old == nil {
		return
	}
	select {
	case err := <-rw.old:
		if err != nil {
			rw.t.Errorf("the upgraded process exited: %v, want status 0", err)
		}
	case <-rw.ctx.Done():
		rw.t.Fatal("the upgraded process did not exit")
	}
	rw.old = nil
}

// killAndStart kills the server with SIGKILL and starts another.
func (rw *restartWorld) killAndStart() {
	if err := syscall.Kill(rw.pid, syscall.SIGKILL); err != nil {
		rw.t.Fatal(err)
	}
	rw.waitGone()
	rw.start()
}

// stopAndStart stops the server with SIGTERM (the drain) and starts
// another.
func (rw *restartWorld) stopAndStart() {
	if err := syscall.Kill(rw.pid, syscall.SIGTERM); err != nil {
		rw.t.Fatal(err)
	}
	rw.waitGone()
	rw.start()
}

// waitGone waits until the current server process has gone: its stderr
// (which the upgrade's successor shares) is closed once every process of
// the group has.
func (rw *restartWorld) waitGone() {
	select {
	case <-rw.srv.closed:
		rw.srv.stopped = true
	case <-rw.ctx.Done():
		rw.t.Fatal("the server did not go")
	}
}
