package main

import (
	"bufio"
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/obvpn/obvpn/cmd/internal/sentrysetup/sentrytest"
	"github.com/obvpn/obvpn/connectproxy"
	"github.com/obvpn/obvpn/vpn/balena/balenatest"
)

// TestSentry runs the command with SENTRY_DSN at an in-process ingestion
// endpoint: a CONNECT whose access check the API fails is reported as
// proxy-tunnel-error, in the production environment, without a key; a
// CONNECT with a wrong key is refused without an event. The event is
// flushed when the proxy stops.
func TestSentry(t *testing.T) {
	rcv := sentrytest.NewServer(t)
	api := balenatest.NewServer(t)
	api.ServiceKey, api.GuestKey = "service-SECRET", "guest-SECRET"
	si := api.AddServiceInstance(netip.MustParseAddr("127.0.0.1"))
	api.AddDevice(balenatest.Device{UUID: uuid, Key: "device-SECRET"})
	api.Grant("operator-SECRET", uuid, 80)
	api.SetOnline(uuid, si.ID)
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "server-1.status"), []byte(statusFile(uuid, "127.0.0.1")), 0o644); err != nil {
		t.Fatal(err)
	}
	setenv(t, map[string]string{
		"VPN_CONNECT_PROXY_PORT":   "3128",
		"BALENA_API_INTERNAL_HOST": strings.TrimPrefix(api.URL, "http://"),
		"VPN_SERVICE_API_KEY":      api.ServiceKey,
		"VPN_GUEST_API_KEY":        api.GuestKey,
		"VPN_SERVICE_ID":           strconv.FormatInt(si.ID, 10),
		"NSS_OPENVPN_STATUS_GLOB":  filepath.Join(dir, "server-*.status"),
		"VPN_NSS_INDEX":            "off",
	})
	t.Setenv("SENTRY_DSN", rcv.DSN)
	t.Setenv("VPN_SENTRY_DSN", "")
	t.Setenv("PRODUCTION_MODE", "true")

	var logs syncBuffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addrs := make(chan net.Addr, 1)
	exit := make(chan int, 1)
	go func() {
		exit <- run(ctx, []string{"-listen", "127.0.0.1:0"}, io.Discard, log, new(slog.LevelVar), func(a net.Addr) { addrs <- a })
	}()
	var addr string
	select {
	case a := <-addrs:
		addr = a.String()
	case code := <-exit:
		t.Fatalf("exited with %d:\n%s", code, logs.String())
	}
	connect := func(key string) string {
		t.Helper()
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(20 * time.Second))
		target := uuid + ".balena:80"
		fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\nProxy-Authorization: Basic %s\r\n\r\n",
			target, target, base64.StdEncoding.EncodeToString([]byte("me:"+key)))
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(line)
	}
	if got := connect("wrong-SECRET"); got != "HTTP/1.0 407 Proxy Authorization Required" {
		t.Fatalf("wrong key: %q", got)
	}
	api.FailNext(balenatest.CanAccess, -1, 500) // its retries too
	if got := connect("operator-SECRET"); got != "HTTP/1.0 500 Internal Server Error" {
		t.Fatalf("canAccess failing: %q", got)
	}
	cancel()
	select {
	case code := <-exit:
		if code != 0 {
			t.Fatalf("exit %d", code)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("connect-proxy did not stop")
	}

	// Flushed on exit: the event is there without waiting.
	evs := rcv.Events()
	if len(evs) != 1 {
		t.Fatalf("%d events, want 1:\n%s", len(evs), logs.String())
	}
	ev := evs[0]
	if len(ev.Fingerprint) != 1 || ev.Fingerprint[0] != connectproxy.FingerprintTunnel || ev.Level != "error" ||
		ev.Environment != "production" || ev.Logger != "connect-proxy" {
		t.Errorf("event %v %q %q %q, want %s, error, production, connect-proxy", ev.Fingerprint, ev.Level, ev.Environment, ev.Logger, connectproxy.FingerprintTunnel)
	}
	if ev.Contexts["log"]["status"] != float64(500) {
		t.Errorf("log context %v", ev.Contexts["log"])
	}
	if rcv.Contains("SECRET") {
		t.Errorf("a key reached Sentry: %s", ev.Raw)
	}
	if strings.Contains(logs.String(), "SECRET") {
		t.Errorf("a key was logged:\n%s", logs.String())
	}
}
