package main

import (
	"bufio"
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/obvpn/obvpn/cmd/internal/sentrysetup/sentrytest"
	"github.com/obvpn/obvpn/vpn"
	"github.com/obvpn/obvpn/vpn/balena/balenatest"
	"github.com/obvpn/obvpn/vpn/vpntest"
)

// TestSentryEndToEnd runs the built command in a world namespace with
// SENTRY_DSN at an ingestion endpoint inside it, and keys and tokens that
// hold "SECRET". The balena API fails the first state report: its event
// arrives with the fingerprint device-state-update-error, the release and
// the environment, and no secret; a device with a wrong key is refused
// without an event; the device with its key connects, is reported online
// once the report is retried, and is reached through the CONNECT proxy;
// SIGTERM stops the server with status 0.
func TestSentryEndToEnd(t *testing.T) {
	goBin := vpntest.Require(t, "openvpn", "ip", "go")[2]
	bin := filepath.Join(t.TempDir(), "open-balena-vpn")
	if out, err := exec.Command(goBin, "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("building: %v\n%s", err, out)
	}

	world := vpntest.NewNetns(t, "world")
	pki := vpntest.NewPKI(t)
	api := balenatest.New()
	api.ServiceKey, api.GuestKey = "SECRET-service-key", "SECRET-guest-key"
	dev := api.AddDevice(balenatest.Device{UUID: "0123456789abcdef0123456789abcdef", Key: "SECRET-device-key"})
	api.FailNext(balenatest.StateReport, 1, http.StatusInternalServerError)
	serve := func(h http.Handler) string {
		l, err := world.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		hs := &http.Server{Handler: h}
		go hs.Serve(l)
		t.Cleanup(func() { hs.Close() })
		return l.Addr().String()
	}
	apiAddr := serve(api)
	rcv := sentrytest.New()
	dsn := sentrytest.DSN(serve(rcv))

	// The device, in a namespace of its own, with a web service.
	device := vpntest.NewDevice(t, world)
	dl, err := device.Listen("tcp", "0.0.0.0:80")
	if err != nil {
		t.Fatal(err)
	}
	web := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "hello from the device") })}
	go web.Serve(dl)
	t.Cleanup(func() { web.Close() })

	b64 := base64.StdEncoding.EncodeToString
	cmd := exec.Command("ip", "netns", "exec", world.Name, bin)
	cmd.Env = []string{
		"PATH=/usr/sbin:/usr/bin:/sbin:/bin",
		"VPN_BASE_SUBNET=10.240.0.0/16", "VPN_INSTANCE_SUBNET_BITMASK=24", "VPN_INSTANCE_COUNT=1",
		"VPN_RUN_DIR=" + t.TempDir(),
		"BALENA_API_INTERNAL_HOST=" + apiAddr, "VPN_SERVICE_API_KEY=" + api.ServiceKey, "VPN_GUEST_API_KEY=" + api.GuestKey,
		"VPN_OPENVPN_CA_CRT=" + b64(pki.CACert), "VPN_OPENVPN_SERVER_CRT=" + b64(pki.ServerCert),
		"VPN_OPENVPN_SERVER_KEY=" + b64(pki.ServerKey),
		"VPN_API_BASE_PORT=30000", "VPN_METRICS_ADDR=127.0.0.1:8080", "VPN_CONNECT_PROXY_PORT=3128",
		"MONITOR_SECRET_TOKEN=SECRET-monitor-token",
		"DELAY_ON_AUTH_FAIL=0", "DEFAULT_SIGTERM_TIMEOUT=10", "VPN_HAPROXY=off",
		"SENTRY_DSN=" + dsn, "PRODUCTION_MODE=false",
	}
	srv := startServer(t, cmd)

	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	remote := device.WorldAddr.String() + ":10001"
	client := vpntest.StartClient(t, vpntest.ClientOptions{Netns: device.Netns, Remote: remote, CA: pki.CAFile,
		Username: dev.UUID, Password: dev.Key, Tunnel: true})
	if _, err := client.WaitFor(ctx, "Initialization Sequence Completed"); err != nil {
		t.Fatal(err)
	}
	bad := vpntest.StartClient(t, vpntest.ClientOptions{Netns: world, Remote: "127.0.0.1:10001", CA: pki.CAFile,
		Username: dev.UUID, Password: "SECRET-stolen-key"})
	if _, err := bad.WaitFor(ctx, "AUTH_FAILED"); err != nil {
		t.Fatal(err)
	}

	// The failed report's event.
	ev, err := rcv.WaitFor(ctx, sentrytest.Fingerprinted(vpn.FingerprintStateUpdate))
	if err != nil {
		t.Fatal(err)
	}
	if ev.Level != "warning" || ev.Environment != "development" || ev.Release == "" || ev.Logger != "open-balena-vpn" {
		t.Errorf("event level %q, environment %q, release %q, logger %q; want warning, development, a release, open-balena-vpn",
			ev.Level, ev.Environment, ev.Release, ev.Logger)
	}
	if len(ev.Exception) == 0 || !strings.Contains(ev.Exception[len(ev.Exception)-1].Value, "500") {
		t.Errorf("exception %+v, want the API's 500", ev.Exception)
	}

	// Reported online once the report is retried, and reached.
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
	for {
		b, err := viaProxy(ctx, world, "127.0.0.1:3128", dev.UUID+".balena:80", api.ServiceKey)
		if err == nil && string(b) == "hello from the device" {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("the device was not reached through the proxy: %q, %v", b, err)
		case <-time.After(50 * time.Millisecond):
		}
	}

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

	// Only the failed report was an error: not the stolen key.
	for _, ev := range rcv.Events() {
		if len(ev.Fingerprint) != 1 || ev.Fingerprint[0] != vpn.FingerprintStateUpdate {
			t.Errorf("unexpected event %v: %s", ev.Fingerprint, ev.Raw)
		}
	}
	if rcv.Contains("SECRET") {
		for _, r := range rcv.Requests() {
			t.Logf("%s %v\n%s", r.Path, r.Header, r.Body)
		}
		t.Error("a key or token reached Sentry")
	}
	if all := srv.logs(); strings.Contains(all, "SECRET") {
		t.Error("a key or token is in the server's log")
	}
	if rcv.Failures() != 0 {
		t.Errorf("%d envelopes not understood", rcv.Failures())
	}
	t.Logf("%d events, %d envelopes", len(rcv.Events()), len(rcv.Requests()))
}

// viaProxy opens a tunnel to target through the CONNECT proxy at proxy,
// from n, with key, and GETs / through it.
func viaProxy(ctx context.Context, n *vpntest.Netns, proxy, target, key string) ([]byte, error) {
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
