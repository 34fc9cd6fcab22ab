package vpn_test

import (
	"context"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/obvpn/obvpn/vpn/balena/balenatest"
	"github.com/obvpn/obvpn/vpn/vpntest"
)

// TestServerClose: Close during a drain that would take minutes (one
// client a minute) stops the server at once: Run returns within seconds,
// and neither HAProxy nor any openvpn is left running.
func TestServerClose(t *testing.T) {
	vpntest.Require(t, "openvpn", "haproxy", "ip")
	ws := startWorldServer(t, map[string]string{"DEFAULT_SIGTERM_TIMEOUT": "300", "MINIMUM_DRAIN_RATE_PER_MINUTE": "1"})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for _, uuid := range []string{"0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210"} {
		d := ws.api.AddDevice(balenatest.Device{UUID: uuid, Key: "k-" + uuid[:4]})
		c := vpntest.StartClient(t, vpntest.ClientOptions{Netns: ws.world, Remote: "127.0.0.1:1194", CA: ws.pki.CAFile,
			Username: d.UUID, Password: d.Key, Extra: []string{"connect-retry 1 1"}})
		if _, err := c.WaitFor(ctx, "Initialization Sequence Completed"); err != nil {
			t.Fatal(err)
		}
	}
	// Both sessions counted (the drain kills what the server counts).
	waitOnline(t, ctx, ws.api, "0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210")
	var pids []int
	files, _ := filepath.Glob(filepath.Join(ws.run, "server-*.pid"))
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil {
			t.Fatal(err)
		}
		pids = append(pids, pid)
	}
	if len(pids) != 2 {
		t.Fatalf("%d openvpn pid files, want 2", len(pids))
	}

	ws.cancel() // the drain starts: a minute between two kills
	hap := &http.Client{Transport: &http.Transport{DialContext: ws.world.Dial}, Timeout: time.Second}
	waitUntil(t, ctx, func() bool {
		// HAProxy's monitor fails once both instances are draining.
		resp, err := hap.Get("http://127.0.0.1:8088/ping")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusServiceUnavailable
	})
	start := time.Now()
	ws.srv.Close()
	done := make(chan error, 1)
	go func() { done <- ws.wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Run = %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Run did not return within 20 s of Close")
	}
	t.Logf("Run returned %v after Close", time.Since(start).Round(time.Millisecond))
	for _, pid := range pids {
		if syscall.Kill(pid, 0) == nil {
			t.Errorf("openvpn %d still runs", pid)
		}
	}
	if resp, err := hap.Get("http://127.0.0.1:8088/ping"); err == nil {
		resp.Body.Close()
		t.Error("haproxy still answers")
	}
}
