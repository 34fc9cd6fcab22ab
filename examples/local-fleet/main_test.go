package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/obvpn/obvpn/connectproxy"
	"github.com/obvpn/obvpn/vpn/vpntest"
)

// TestMain lets the test binary be a host of the fleet, as local-fleet
// runs itself for each host.
func TestMain(m *testing.M) {
	if os.Getenv(hostEnv) == "1" {
		os.Exit(serveHost())
	}
	os.Exit(m.Run())
}

// TestOnce runs the demo as CI does, local-fleet -once -devices 3, with
// devices of both client profiles (-profile mixed): every
// device comes online and is reached through the proxy, the exit status is
// 0, the figures are printed, and nothing the demo made is left behind.
func TestOnce(t *testing.T) {
	vpntest.Require(t, "openvpn", "haproxy", "ip")
	before := leftovers(t)
	var out, errs bytes.Buffer
	code := run([]string{"-once", "-devices", "3", "-profile", "mixed", "-timeout", "2m"}, &out, &errs)
	t.Logf("stdout:\n%s\nstderr:\n%s", &out, &errs)
	if code != 0 {
		t.Fatalf("exit status %d, want 0", code)
	}
	for _, want := range []string{"3/3 devices online", "3/3 devices reached through the CONNECT proxy", "vpn_online_devices=3", "drained in",
		"all 3 devices online in the API in", "3 device auths, ", "state-report requests carrying 3 device reports",
		"16 callers at a time: 3 CONNECTs answered (p50 ", "devices' openvpn: RSS ", "  all: RSS "} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q", want)
		}
	}
	if rows := strings.Count(out.String(), "  yes  "); rows != 3 {
		t.Errorf("%d table rows say yes, want 3", rows)
	}
	if after := leftovers(t); after != before {
		t.Errorf("left behind: %q (before: %q)", after, before)
	}
}

// TestKillHost runs local-fleet -once -hosts 2 -devices 6 -kill-host 2:
// every device is reached through both hosts' proxies (forwarding), then
// host 2 is killed, its devices come back on host 1, and every device is
// reached again.
func TestKillHost(t *testing.T) {
	out := runMoved(t, "-kill-host", "2")
	for _, want := range []string{"killing host2", "from the kill: every device online on the other hosts in"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q", want)
		}
	}
}

// TestDrainHost runs local-fleet -once -hosts 2 -devices 6 -drain-host 1:
// host 1 drains and exits 0, and its devices come back on host 2.
func TestDrainHost(t *testing.T) {
	out := runMoved(t, "-drain-host", "1")
	for _, want := range []string{"draining host1", "host1 drained and exited with status 0 in", "from the drain: every device online on the other hosts in"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q", want)
		}
	}
}

// runMoved runs local-fleet -once with two hosts, six devices and args,
// checks what both kinds of move have in common, and returns the output.
func runMoved(t *testing.T, args ...string) string {
	t.Helper()
	vpntest.Require(t, "openvpn", "haproxy", "ip")
	before := leftovers(t)
	var out, errs bytes.Buffer
	code := run(append([]string{"-once", "-hosts", "2", "-devices", "6", "-profile", "mixed", "-timeout", "2m"}, args...), &out, &errs)
	t.Logf("stdout:\n%s\nstderr:\n%s", &out, &errs)
	if code != 0 {
		t.Fatalf("exit status %d, want 0", code)
	}
	first, after, ok := strings.Cut(out.String(), "\nkilling ")
	if !ok {
		first, after, ok = strings.Cut(out.String(), "\ndraining host")
	}
	if !ok {
		t.Fatal("no kill or drain in the output")
	}
	// Before: both hosts hold devices, and both proxies reach every device.
	if !strings.Contains(first, "6/6 devices reached through the CONNECT proxy of each of the 2 hosts") {
		t.Error("before the move, not every device was reached through both proxies")
	}
	if !strings.Contains(first, " host1 ") || !strings.Contains(first, " host2 ") {
		t.Error("before the move, the devices are not spread over both hosts")
	}
	// After: every device is on the surviving host, and reached.
	moved := "host2"
	if strings.Contains(strings.Join(args, " "), "-drain-host 1") {
		moved = "host1"
	}
	table := after[strings.Index(after, "UUID"):]
	table = table[:strings.Index(table, "\n\n")]
	if rows := strings.Count(table, "  yes  "); rows != 6 {
		t.Errorf("after the move %d rows say yes, want 6:\n%s", rows, table)
	}
	if strings.Contains(table, " "+moved+" ") {
		t.Errorf("after the move a device is still on %s:\n%s", moved, table)
	}
	if after := leftovers(t); after != before {
		t.Errorf("left behind: %q (before: %q)", after, before)
	}
	return out.String()
}

// TestStaysUp runs the demo without -once: once it says how to try it by
// hand, the proxy answers on the host's side of the relay exactly as the
// printed curl command uses it, and the metrics too; when the context
// ends, it drains and removes everything.
func TestStaysUp(t *testing.T) {
	vpntest.Require(t, "openvpn", "haproxy", "ip")
	before := leftovers(t)
	proxy, metrics := freeAddr(t), freeAddr(t)
	out := &watcher{want: "Ctrl-C drains", seen: make(chan struct{})}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- demo(ctx, options{devicesFile: "devices.json", timeout: 2 * time.Minute,
			proxyAddr: proxy, metricsAddr: metrics, log: slog.New(slog.DiscardHandler), out: out})
	}()
	select {
	case <-out.seen:
	case err := <-done:
		t.Fatalf("demo returned early: %v\n%s", err, out)
	case <-time.After(3 * time.Minute):
		t.Fatalf("no instructions within 3 minutes:\n%s", out)
	}

	// The curl command of the instructions, done with net/http.
	uuid := "0123456789abcdef0123456789abcdef" // the first of devices.json
	if !strings.Contains(out.String(), "curl -x http://"+proxy+" --proxytunnel http://"+uuid+".balena/") {
		t.Errorf("instructions lack the curl command:\n%s", out)
	}
	d := &connectproxy.Dialer{ProxyAddr: proxy}
	client := &http.Client{Transport: &http.Transport{DialContext: d.DialContext, DisableKeepAlives: true}, Timeout: 10 * time.Second}
	resp, err := client.Get("http://" + uuid + ".balena/")
	if err != nil {
		t.Fatalf("through the relayed proxy: %v", err)
	}
	page, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !bytes.Contains(page, []byte("hello from device "+uuid)) {
		t.Errorf("through the relayed proxy: %s %q", resp.Status, page)
	}
	resp, err = http.Get("http://" + metrics + "/cluster_metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(body), "vpn_online_devices 5") {
		t.Errorf("relayed metrics lack vpn_online_devices 5")
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("demo: %v", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("demo did not return within a minute of the end of its context")
	}
	if !strings.Contains(out.String(), "drained in") {
		t.Errorf("no drain in the output:\n%s", out)
	}
	if after := leftovers(t); after != before {
		t.Errorf("left behind: %q (before: %q)", after, before)
	}
	if _, err := net.DialTimeout("tcp", proxy, time.Second); err == nil {
		t.Error("the relay still listens")
	}
}

// leftovers lists this process's namespaces and the demo's temporary
// directories.
func leftovers(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		t.Fatal(err)
	}
	var left []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		if name, _, _ := strings.Cut(sc.Text(), " "); strings.Contains(name, fmt.Sprintf("-%d-", os.Getpid())) {
			left = append(left, name)
		}
	}
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), "local-fleet-*"))
	return strings.Join(append(left, dirs...), " ")
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// watcher is an output that closes seen when want has been written.
type watcher struct {
	mu   sync.Mutex
	buf  bytes.Buffer
	want string
	seen chan struct{}
	once sync.Once
}

func (w *watcher) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(p)
	if strings.Contains(w.buf.String(), w.want) {
		w.once.Do(func() { close(w.seen) })
	}
	return len(p), nil
}

func (w *watcher) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}

func TestLoadDevices(t *testing.T) {
	rs, err := loadDevices(options{})
	if err != nil || len(rs) != 5 {
		t.Fatalf("devices.json: %d devices, %v; want 5", len(rs), err)
	}
	rs, err = loadDevices(options{devices: 7})
	if err != nil || len(rs) != 7 || len(rs[0].UUID) != 32 || rs[0].UUID == rs[1].UUID {
		t.Fatalf("-devices 7: %v, %v", rs, err)
	}
	dir := t.TempDir()
	for _, tc := range []struct {
		name, json, want string
	}{
		{"not json", `{`, "unexpected end of JSON"},
		{"empty", `[]`, "0 devices"},
		{"bad uuid", `[{"uuid":"not-hex","key":"k"}]`, "device 1: want a hexadecimal uuid"},
		{"no key", `[{"uuid":"00ff"}]`, "device 1: want a hexadecimal uuid and a key"},
		{"twice", `[{"uuid":"00ff","key":"a"},{"uuid":"00FF","key":"b"}]`, "device 2: uuid 00FF twice"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			file := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "-")+".json")
			if err := os.WriteFile(file, []byte(tc.json), 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := loadDevices(options{devicesFile: file})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v, want an error with %q", err, tc.want)
			}
		})
	}
	if _, err := loadDevices(options{devices: maxDevices + 1}); err == nil {
		t.Errorf("-devices %d: no error", maxDevices+1)
	}
}

func TestFlags(t *testing.T) {
	var out, errs bytes.Buffer
	if code := run([]string{"-devices"}, &out, &errs); code != 2 {
		t.Errorf("a flag without its value: exit %d, want 2", code)
	}
	if code := run([]string{"extra"}, &out, &errs); code != 2 {
		t.Errorf("an argument: exit %d, want 2", code)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"-kill-host", "1"}, "-kill-host 1: with -hosts 1 no host is left to take the devices"},
		{[]string{"-hosts", "1", "-drain-host", "1"}, "-drain-host 1: with -hosts 1 no host is left"},
		{[]string{"-hosts", "2", "-kill-host", "3"}, "-kill-host 3: want a host from 1 to 2"},
		{[]string{"-hosts", "2", "-drain-host", "-1"}, "-drain-host -1: want a host from 1 to 2"},
		{[]string{"-hosts", "3", "-kill-host", "1", "-drain-host", "2"}, "one at a time"},
		{[]string{"-hosts", "0"}, "-hosts 0: want 1 to 63"},
	} {
		errs.Reset()
		if code := run(tc.args, &out, &errs); code != 2 || !strings.Contains(errs.String(), tc.want) || strings.Count(errs.String(), "\n") != 1 {
			t.Errorf("%q: exit %d, %q; want 2 and one line with %q", tc.args, code, errs.String(), tc.want)
		}
	}
}
