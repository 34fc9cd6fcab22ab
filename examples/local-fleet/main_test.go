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
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/obvpn/obvpn/connectproxy"
	"github.com/obvpn/obvpn/vpn/balena/balenatest"
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
		"16 callers at a time: 3 CONNECTs answered (p50 ", "devices' openvpn: RSS ", "  all: RSS ",
		"the API agrees with the hosts' status files on all 3 devices", "\ntargets met: online within 1m30s, reached within 30s, back within 1m30s"} {
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
//
// It runs the fleet in a memory cgroup (-memory-limit 1GiB) where the
// machine has one: the cgroup's figures are printed, nothing was killed
// for want of memory, and the cgroup is gone afterwards (leftovers).
func TestKillHost(t *testing.T) {
	args := []string{"-kill-host", "2"}
	wants := []string{"killing host2", "from the kill: every device online on the other hosts in",
		"the API agrees with the hosts' status files on all 6 devices", "\ntargets met: "}
	if err := memGroupPossible(); err != nil {
		if os.Getenv("OBVPN_E2E") == "1" {
			t.Fatalf("OBVPN_E2E=1 but %v", err)
		}
		t.Logf("without -memory-limit: %v", err)
	} else {
		args = append(args, "-memory-limit", "1GiB")
		wants = append(wants, "of its 1024.0 MiB limit; now ", "kernel; 0 processes killed for want of memory", ", the fleet fits in 1024.0 MiB")
	}
	out := runMoved(t, args...)
	for _, want := range wants {
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

// TestMissedTarget runs local-fleet -once with a target that no fleet
// can keep: every device is reached, but the exit status is 1 and the
// output says which target was missed.
func TestMissedTarget(t *testing.T) {
	vpntest.Require(t, "openvpn", "haproxy", "ip")
	var out, errs bytes.Buffer
	code := run([]string{"-once", "-devices", "1", "-timeout", "2m", "-target-online", "1ms"}, &out, &errs)
	t.Logf("stdout:\n%s\nstderr:\n%s", &out, &errs)
	if code != 1 {
		t.Errorf("exit status %d, want 1", code)
	}
	for _, want := range []string{"1/1 devices reached through the CONNECT proxy", "target missed: every device online in the API, from local-fleet's start in ",
		", target 1ms\n", "\n1 targets missed:\n"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q", want)
		}
	}
	if !strings.Contains(errs.String(), "local-fleet: 1 targets missed") {
		t.Errorf("stderr lacks the failure: %q", errs.String())
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
	groups, _ := filepath.Glob(filepath.Join(cgroupRoot, "*", "*", fmt.Sprintf("obvpn-fleet-%d", os.Getpid())))
	more, _ := filepath.Glob(filepath.Join(cgroupRoot, "*", "*", "*", fmt.Sprintf("obvpn-fleet-%d", os.Getpid())))
	return strings.Join(slices.Concat(left, dirs, groups, more), " ")
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

func TestByteSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
		str  string
	}{
		{"4GiB", 4 << 30, "4GiB"}, {"512MiB", 512 << 20, "512MiB"}, {"64KiB", 64 << 10, "65536"},
		{"1000", 1000, "1000"}, {"", 0, ""}, {"0", 0, ""}, {"1536MiB", 1536 << 20, "1536MiB"},
	} {
		var b byteSize
		if err := b.Set(tc.in); err != nil || int64(b) != tc.want || b.String() != tc.str {
			t.Errorf("%q: %d %q %v; want %d %q", tc.in, b, b.String(), err, tc.want, tc.str)
		}
	}
	for _, in := range []string{"4G", "GiB", "-1MiB", "4 GiB", "1.5GiB", "9999999999GiB"} {
		var b byteSize
		if err := b.Set(in); err == nil {
			t.Errorf("%q: %d, no error", in, b)
		}
	}
	var out, errs bytes.Buffer
	if code := run([]string{"-memory-limit", "4G"}, &out, &errs); code != 2 || !strings.Contains(errs.String(), `invalid value "4G" for flag -memory-limit: want a size such as 4GiB`) {
		t.Errorf("-memory-limit 4G: exit %d, %q", code, errs.String())
	}
}

func TestOwnGroups(t *testing.T) {
	for _, tc := range []struct{ in, v1, v2 string }{
		{"0::/user.slice/session-1.scope\n", "", "/user.slice/session-1.scope"},
		{"12:cpu,cpuacct:/\n4:memory:/process_api/f68\n1:name=systemd:/x\n0::/\n", "/process_api/f68", "/"},
		{"4:blkio,memory:/a\n", "/a", ""},
		{"garbage\n3:memoryx:/b\n", "", ""},
	} {
		if v1, v2 := ownGroups([]byte(tc.in)); v1 != tc.v1 || v2 != tc.v2 {
			t.Errorf("%q: %q %q, want %q %q", tc.in, v1, v2, tc.v1, tc.v2)
		}
	}
}

// TestDisagreements checks what settle looks for, on a host's status file
// and the API: a device listed as connected while the API has it offline
// or on another host, and a device online in the API that no serving host
// lists.
func TestDisagreements(t *testing.T) {
	const (
		a = "0123456789abcdef0123456789abcdef" // listed in host 1's status file
		b = "fedcba9876543210fedcba9876543210" // listed nowhere
	)
	dir := t.TempDir()
	if err := os.Mkdir(filepath.Join(dir, "run"), 0o700); err != nil {
		t.Fatal(err)
	}
	status := "TITLE,OpenVPN 2.6.14 x86_64-pc-linux-gnu\nTIME,2026-11-25 04:26:21,1795580781\n" +
		"HEADER,CLIENT_LIST,Common Name,Real Address,Virtual Address,Virtual IPv6 Address,Bytes Received,Bytes Sent,Connected Since,Connected Since (time_t),Username,Client ID,Peer ID,Data Channel Cipher\n" +
		"CLIENT_LIST," + strings.ToUpper(a) + ",192.0.2.10:37224,10.240.0.3,,991,1737,2026-11-25 04:26:18,1795580778," + a + ",0,0,AES-256-GCM\nEND\n"
	if err := os.WriteFile(filepath.Join(dir, "run", "server-1.status"), []byte(status), 0o600); err != nil {
		t.Fatal(err)
	}
	api := balenatest.New()
	f := &fleet{o: options{log: slog.New(slog.DiscardHandler)}, api: api,
		hosts: []*host{{id: 1, dir: dir, serviceID: 1}, {id: 2, dir: t.TempDir(), serviceID: 2}}}
	for _, u := range []string{a, b} {
		f.devices = append(f.devices, &device{Device: api.AddDevice(balenatest.Device{UUID: u, Key: "k"})})
	}
	check := func(wantOffline, wantStray []string) {
		t.Helper()
		offline, stray := f.disagreements()
		if !slices.Equal(offline, wantOffline) || !slices.Equal(stray, wantStray) {
			t.Errorf("offline %q, stray %q; want %q, %q", offline, stray, wantOffline, wantStray)
		}
	}
	check([]string{a}, nil) // connected, offline in the API
	api.SetOnline(a, 2)
	check([]string{a}, nil) // online on the other host
	api.SetOnline(a, 1)
	check(nil, nil)
	api.SetOnline(b, 2)
	check(nil, []string{b}) // online, but nowhere
	f.hosts[0].gone = true
	check(nil, []string{a, b}) // a's host no longer serves
}

// TestMakeMemGroup makes memory groups in a tree of plain files laid out
// like each kind of cgroup file system: where the group goes, what it is
// limited to, who is moved into it, and what use reads back.
func TestMakeMemGroup(t *testing.T) {
	for _, tc := range []struct {
		name, own, layout, want, limitFile string
		stat                               map[string]string
	}{
		{"v1", "4:memory:/process_api/f68\n0::/\n", "memory", "memory/process_api/f68/obvpn-fleet-42", "memory.limit_in_bytes",
			map[string]string{"memory.max_usage_in_bytes": "3000\n", "memory.stat": "cache 1\ntotal_rss 100\ntotal_cache 20\n",
				"memory.kmem.usage_in_bytes": "7\n", "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n"}},
		{"v2", "0::/user.slice/session-1.scope\n", "v2", "user.slice/obvpn-fleet-42", "memory.max",
			map[string]string{"memory.peak": "3000\n", "memory.stat": "anon 100\nfile 20\nkernel 7\n", "memory.events": "low 0\noom 3\noom_kill 2\n"}},
		{"v2 root", "0::/\n", "v2", "obvpn-fleet-42", "memory.max",
			map[string]string{"memory.peak": "3000\n", "memory.stat": "anon 100\nfile 20\nkernel 7\n", "memory.events": "oom_kill 2\n"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			if tc.layout == "memory" {
				mkfile(t, filepath.Join(root, "memory", "memory.limit_in_bytes"), "")
				mkfile(t, filepath.Join(root, "memory", "process_api", "f68", "cgroup.procs"), "")
			} else {
				mkfile(t, filepath.Join(root, "cgroup.controllers"), "memory\n")
				mkfile(t, filepath.Join(root, "user.slice", "session-1.scope", "cgroup.procs"), "")
			}
			g, err := makeMemGroup(root, []byte(tc.own), 42, 4<<30)
			if err != nil {
				t.Fatal(err)
			}
			if g.dir != filepath.Join(root, tc.want) {
				t.Errorf("group %s, want %s", g.dir, filepath.Join(root, tc.want))
			}
			for file, want := range map[string]string{tc.limitFile: "4294967296", "cgroup.procs": "42"} {
				if got, _ := os.ReadFile(filepath.Join(g.dir, file)); string(got) != want {
					t.Errorf("%s: %q, want %q", file, got, want)
				}
			}
			for file, content := range tc.stat {
				mkfile(t, filepath.Join(g.dir, file), content)
			}
			u, err := g.use()
			if err != nil || u != (memUse{peak: 3000, anon: 100, file: 20, kernel: 7, oomKills: 2}) {
				t.Errorf("use: %+v, %v", u, err)
			}
		})
	}
	if _, err := makeMemGroup(t.TempDir(), []byte("0::/\n"), 42, 1<<30); err == nil || !strings.Contains(err.Error(), "neither cgroup v1's memory controller nor cgroup v2 is mounted at") {
		t.Errorf("no cgroup file system: %v", err)
	}
}

func mkfile(t *testing.T, name, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(name), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(name, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}
