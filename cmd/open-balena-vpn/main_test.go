package main

import (
	"bufio"
	"context"
	"encoding/base64"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/obvpn/obvpn/vpn/balena/balenatest"
	"github.com/obvpn/obvpn/vpn/vpntest"
	"github.com/obvpn/obvpn/vpn/vpntest/otlptest"
)

func TestConfigErrorExit2(t *testing.T) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go not found")
	}
	bin := filepath.Join(t.TempDir(), "open-balena-vpn")
	if out, err := exec.Command(goBin, "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	cmd := exec.Command(bin)
	cmd.Env = []string{"PATH=/usr/bin:/bin", "VPN_BASE_SUBNET=10.240.1.0/12"}
	out, err := cmd.CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 2 {
		t.Fatalf("exit: %v", err)
	}
	want := "open-balena-vpn: VPN_BASE_SUBNET=\"10.240.1.0/12\": base prefix 10.240.1.0/12: host bits set (did you mean 10.240.0.0/12?)\n"
	if string(out) != want {
		t.Errorf("output %q, want %q", out, want)
	}
}

// TestStartupWarnings checks that the command names, before anything
// else, the reference container's variables it does not use and the
// variable it took of two names that disagree.
func TestStartupWarnings(t *testing.T) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go not found")
	}
	bin := filepath.Join(t.TempDir(), "open-balena-vpn")
	if out, err := exec.Command(goBin, "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	cmd := exec.Command(bin)
	cmd.Env = []string{"PATH=/usr/bin:/bin", "UV_THREADPOOL_SIZE=128", "VPN_HOST=127.0.0.1",
		"API_HOST=api.balena.test", "BALENA_API_HOST=api.example.com", "VPN_SERVICE_API_KEY=k"}
	out, err := cmd.CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 2 {
		t.Fatalf("exit: %v\n%s", err, out)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) != 3 {
		t.Fatalf("got %d lines, want two warnings and the error:\n%s", len(lines), out)
	}
	for _, want := range []string{"UV_THREADPOOL_SIZE", "VPN_HOST"} {
		if !strings.Contains(lines[0], "WRN") || !strings.Contains(lines[0], want) {
			t.Errorf("first line %q: want a warning naming %s", lines[0], want)
		}
	}
	if !strings.Contains(lines[1], "WRN") || !strings.Contains(lines[1], "taking API_HOST") {
		t.Errorf("second line %q: want a warning that API_HOST was taken", lines[1])
	}
	if want := "open-balena-vpn: VPN_BASE_SUBNET: required, not set"; lines[2] != want {
		t.Errorf("last line %q, want %q", lines[2], want)
	}
}

// TestEndToEnd runs the built command in a world namespace, with the
// balena API (balenatest) served inside it, in both authentication modes:
// a device with its key connects and is reported online, SIGTERM stops the
// server with status 0 and the device is reported offline. With
// OTEL_EXPORTER_OTLP_ENDPOINT at a receiver in the world, the device
// auth and state-report calls carry a valid traceparent and the spans
// arrive.
func TestEndToEnd(t *testing.T) {
	goBin := vpntest.Require(t, "openvpn", "ip", "go")[2]
	dir := t.TempDir()
	// OpenVPN runs the script-mode hooks as nobody: let others in, as
	// /usr/local/bin does.
	for _, d := range []string{dir, filepath.Dir(dir)} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []string{"open-balena-vpn", "vpn-auth", "vpn-client-event"} {
		if out, err := exec.Command(goBin, "build", "-o", filepath.Join(dir, c), "../"+c).CombinedOutput(); err != nil {
			t.Fatalf("building %s: %v\n%s", c, err, out)
		}
	}
	for _, mode := range []string{"management", "script"} {
		t.Run(mode, func(t *testing.T) { endToEnd(t, dir, mode) })
	}
}

func endToEnd(t *testing.T, bin, mode string) {
	world := vpntest.NewNetns(t, "world")
	pki := vpntest.NewPKI(t)
	api := balenatest.New()
	dev := api.AddDevice(balenatest.Device{UUID: "0123456789abcdef0123456789abcdef", Key: "device-key"})
	l, err := world.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: api}
	go hs.Serve(l)
	t.Cleanup(func() { hs.Close() })
	rcv := otlptest.New()
	ol, err := world.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	otlpSrv := &http.Server{Handler: rcv}
	go otlpSrv.Serve(ol)
	t.Cleanup(func() { otlpSrv.Close() })

	b64 := base64.StdEncoding.EncodeToString
	cmd := exec.Command("ip", "netns", "exec", world.Name, filepath.Join(bin, "open-balena-vpn"))
	cmd.Env = []string{
		"PATH=/usr/sbin:/usr/bin:/sbin:/bin",
		"VPN_BASE_SUBNET=10.240.0.0/16", "VPN_INSTANCE_SUBNET_BITMASK=24", "VPN_INSTANCE_COUNT=2",
		"VPN_RUN_DIR=" + t.TempDir(),
		"BALENA_API_INTERNAL_HOST=" + l.Addr().String(), "VPN_SERVICE_API_KEY=" + api.ServiceKey,
		"VPN_OPENVPN_CA_CRT=" + b64(pki.CACert), "VPN_OPENVPN_SERVER_CRT=" + b64(pki.ServerCert),
		"VPN_OPENVPN_SERVER_KEY=" + b64(pki.ServerKey),
		"VPN_API_BASE_PORT=30000", "VPN_METRICS_ADDR=127.0.0.1:8080", "VPN_AUTH_MODE=" + mode,
		"DELAY_ON_AUTH_FAIL=0", "DEFAULT_SIGTERM_TIMEOUT=10", "VPN_HAPROXY=off",
		"OTEL_EXPORTER_OTLP_ENDPOINT=http://" + ol.Addr().String(), "OTEL_BSP_SCHEDULE_DELAY=100",
	}
	srv := startServer(t, cmd)

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	client := vpntest.StartClient(t, vpntest.ClientOptions{Netns: world, Remote: "127.0.0.1:10002", CA: pki.CAFile,
		Username: dev.UUID, Password: dev.Key})
	if _, err := client.WaitFor(ctx, "Initialization Sequence Completed"); err != nil {
		t.Fatal(err)
	}
	for {
		if d, _ := api.Device(dev.UUID); d.ConnectedToVPN && d.ServiceInstance != 0 {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatal("the device was not reported online")
		case err := <-srv.exited:
			t.Fatalf("the server exited: %v", err)
		case <-time.After(20 * time.Millisecond):
		}
	}
	bad := vpntest.StartClient(t, vpntest.ClientOptions{Netns: world, Remote: "127.0.0.1:10001", CA: pki.CAFile,
		Username: dev.UUID, Password: "stolen"})
	if _, err := bad.WaitFor(ctx, "AUTH_FAILED"); err != nil {
		t.Fatal(err)
	}

	// The device leaves while the server runs: reported offline (in script
	// mode through vpn-client-event), and the metrics follow the session.
	client.Stop()
	waitAPI := func(online bool) {
		t.Helper()
		for {
			if d, _ := api.Device(dev.UUID); d.ConnectedToVPN == online {
				return
			}
			select {
			case <-ctx.Done():
				t.Fatalf("the device was not reported online=%v", online)
			case err := <-srv.exited:
				t.Fatalf("the server exited: %v", err)
			case <-time.After(20 * time.Millisecond):
			}
		}
	}
	waitAPI(false)
	hc := &http.Client{Transport: &http.Transport{DialContext: world.Dial}, Timeout: 5 * time.Second}
	resp, err := hc.Get("http://127.0.0.1:8080/cluster_metrics")
	if err != nil {
		t.Fatal(err)
	}
	metrics, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{"vpn_online_devices 0", "vpn_devices_total 1", "vpn_auth_failures_total 1", "vpn_session_duration_count 1"} {
		if !strings.Contains(string(metrics), want+"\n") {
			t.Errorf("metrics lack %q", want)
		}
	}
	// Back, for the stop to report it offline.
	client = vpntest.StartClient(t, vpntest.ClientOptions{Netns: world, Remote: "127.0.0.1:10002", CA: pki.CAFile,
		Username: dev.UUID, Password: dev.Key})
	if _, err := client.WaitFor(ctx, "Initialization Sequence Completed"); err != nil {
		t.Fatal(err)
	}
	waitAPI(true)

	if err := syscall.Kill(cmd.Process.Pid, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-srv.exited:
		srv.stopped = true
		if err != nil {
			t.Fatalf("exit after SIGTERM: %v", err)
		}
	case <-ctx.Done():
		t.Fatal("no exit after SIGTERM")
	}
	if d, _ := api.Device(dev.UUID); d.ConnectedToVPN {
		t.Error("the device is still online in the API after the stop")
	}
	checkTraces(t, api, rcv, mode)
}

// checkTraces checks that the device auth and state-report calls carried
// a valid traceparent, each the id of a client span that reached the
// receiver (flushed on exit), under a vpn.auth or vpn.state.report span.
func checkTraces(t *testing.T, api *balenatest.API, rcv *otlptest.Receiver, mode string) {
	t.Helper()
	spans := map[string]otlptest.Span{} // by span id
	for _, s := range rcv.Spans() {
		spans[s.SpanID] = s
	}
	calls := map[balenatest.Endpoint]int{}
	for _, r := range api.Requests() {
		if r.Endpoint != balenatest.DeviceAuth && r.Endpoint != balenatest.StateReport {
			continue
		}
		calls[r.Endpoint]++
		tp := strings.Split(r.Header.Get("traceparent"), "-")
		if len(tp) != 4 || tp[0] != "00" || len(tp[1]) != 32 || len(tp[2]) != 16 || tp[3] != "01" {
			t.Errorf("%s %s: traceparent %q, want a valid sampled one", r.Method, r.URI, r.Header.Get("traceparent"))
			continue
		}
		s, ok := spans[tp[2]]
		if !ok || s.TraceID != tp[1] || s.Kind != "client" {
			t.Errorf("%s %s: no client span %s of trace %s reached the receiver", r.Method, r.URI, tp[2], tp[1])
			continue
		}
		want := "vpn.auth"
		if r.Endpoint == balenatest.StateReport {
			want = "vpn.state.report"
		}
		if p := spans[s.ParentSpanID]; p.Name != want || p.Resource["service.name"] != "open-balena-vpn" {
			t.Errorf("%s %s: the client span's parent is %q of %q, want %s of open-balena-vpn", r.Method, r.URI, p.Name, p.Resource["service.name"], want)
		}
	}
	// Two good connects and a stolen key; online, offline, online, and
	// offline at the stop.
	if calls[balenatest.DeviceAuth] < 2 || calls[balenatest.StateReport] < 4 {
		t.Errorf("calls %v, want at least 2 device auths and 4 state reports", calls)
	}
	if mode == "script" {
		// vpn-auth's requests to the internal API are server spans, the
		// auth their child.
		var n int
		for _, s := range otlptest.Named(rcv.Spans(), "vpn.auth") {
			if p := spans[s.ParentSpanID]; p.Name == "POST /api/v1/auth/" && p.Kind == "server" {
				n++
			}
		}
		if n < 2 {
			t.Errorf("%d vpn.auth spans under the internal API's request spans, want at least 2", n)
		}
	}
	if rcv.Failures() != 0 {
		t.Errorf("%d exports refused", rcv.Failures())
	}
	t.Logf("%s: %d spans in %d exports; traced calls %v", mode, len(spans), rcv.Exports(), calls)
}

// serverProc is the server command under test: its log lines, collected
// for the test's failure output, and its exit.
type serverProc struct {
	exited  chan error // the command's Wait
	stopped bool       // the test saw it exit; else the clean-up kills it

	mu    sync.Mutex
	lines []string
}

// startServer starts cmd in a process group of its own, collects its
// stderr, and kills the group when the test ends, unless the test saw the
// server exit (stopped); a failed test gets the server's log.
func startServer(t *testing.T, cmd *exec.Cmd) *serverProc {
	t.Helper()
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &serverProc{exited: make(chan error, 1)}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			p.mu.Lock()
			p.lines = append(p.lines, sc.Text())
			p.mu.Unlock()
		}
		p.exited <- cmd.Wait()
	}()
	t.Cleanup(func() {
		if !p.stopped {
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-p.exited
		}
		if t.Failed() {
			t.Logf("server log:\n%s", p.logs())
		}
	})
	return p
}

// logs returns the server's log so far.
func (p *serverProc) logs() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return strings.Join(p.lines, "\n")
}
