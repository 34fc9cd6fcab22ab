package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

const (
	devA = "0123456789abcdef0123456789abcdef"
	devB = "fedcba9876543210fedcba9876543210"
)

// need returns the path of a command, skipping the test without it (a
// failure under OBVPN_E2E=1).
func need(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err == nil {
		return p
	}
	if os.Getenv("OBVPN_E2E") == "1" {
		t.Fatalf("OBVPN_E2E=1 but %s is missing: %v", name, err)
	}
	t.Skipf("%s is not installed (set OBVPN_E2E=1 to make this a failure)", name)
	return ""
}

func statusV2(routes ...string) string {
	var b strings.Builder
	b.WriteString("TITLE,OpenVPN 2.6.14\nTIME,2026-11-25 04:26:21,1795580781\n")
	b.WriteString("HEADER,ROUTING_TABLE,Virtual Address,Common Name,Real Address,Last Ref,Last Ref (time_t)\n")
	for i := 0; i+1 < len(routes); i += 2 {
		fmt.Fprintf(&b, "ROUTING_TABLE,%s,%s,192.0.2.1:1194,x,1795580778\n", routes[i+1], routes[i])
	}
	b.WriteString("END\n")
	return b.String()
}

// rewrite rewrites path in place, as OpenVPN does.
func rewrite(t *testing.T, path, content string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteString(content); err != nil {
		t.Fatal(err)
	}
}

// TestModule builds the module, and runs getent with it in a mount
// namespace of its own whose /etc/nsswitch.conf says "hosts: files
// openvpn": the host's configuration is never touched.
func TestModule(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("OBVPN_E2E") == "1" {
			t.Fatal("OBVPN_E2E=1 but not root: a mount namespace needs root")
		}
		t.Skip("needs root for a mount namespace (set OBVPN_E2E=1 to make this a failure)")
	}
	goBin := need(t, "go")
	gcc := need(t, "gcc")
	unshare := need(t, "unshare")
	need(t, "getent")

	dir := t.TempDir()
	so := filepath.Join(dir, "libnss_openvpn.so.2")
	if out, err := exec.Command(goBin, "build", "-buildmode=c-shared", "-o", so, ".").CombinedOutput(); err != nil {
		t.Fatalf("building the module: %v\n%s", err, out)
	}
	check := filepath.Join(dir, "nsscheck")
	if out, err := exec.Command(gcc, "-O1", "-Wall", "-o", check, "testdata/nsscheck.c", "-ldl").CombinedOutput(); err != nil {
		t.Fatalf("building nsscheck: %v\n%s", err, out)
	}
	nsswitch := filepath.Join(dir, "nsswitch.conf")
	if err := os.WriteFile(nsswitch, []byte("passwd: files\ngroup: files\nhosts: files openvpn\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	status := filepath.Join(dir, "server-1.status")
	rewrite(t, status, statusV2(devA, "10.240.0.3", strings.ToUpper(devB), "10.240.0.4"))
	env := append(os.Environ(), "LD_LIBRARY_PATH="+dir, "NSS_OPENVPN_STATUS_GLOB="+filepath.Join(dir, "server-*.status"))

	getent := func(args ...string) (string, int) {
		t.Helper()
		script := fmt.Sprintf("mount --bind %q /etc/nsswitch.conf && exec getent \"$@\"", nsswitch)
		cmd := exec.Command(unshare, append([]string{"--mount", "sh", "-c", script, "sh"}, args...)...)
		cmd.Env = env
		out, err := cmd.Output()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		return strings.Join(strings.Fields(string(out)), " "), code
	}

	tests := []struct {
		args []string
		out  string
		code int
	}{
		{[]string{"hosts", devA + ".vpn"}, "10.240.0.3 " + devA + ".vpn", 0},
		{[]string{"hosts", strings.ToUpper(devA) + ".VPN"}, "10.240.0.3 " + strings.ToUpper(devA) + ".VPN", 0},
		{[]string{"hosts", devB + ".vpn"}, "10.240.0.4 " + devB + ".vpn", 0},
		{[]string{"ahostsv4", devB + ".vpn"}, "10.240.0.4 STREAM " + devB + ".vpn 10.240.0.4 DGRAM 10.240.0.4 RAW", 0},
		{[]string{"hosts", "ffffffffffffffffffffffffffffffff.vpn"}, "", 2}, // unknown
		{[]string{"hosts", devA}, "", 2}, // not .vpn: not ours
		{[]string{"hosts", devA + ".vpn.example"}, "", 2},
		{[]string{"hosts", "localhost"}, "127.0.0.1 localhost", 0}, // files still answers
	}
	for _, tt := range tests {
		out, code := getent(tt.args...)
		if code != tt.code || out != tt.out {
			t.Errorf("getent %v = %q, exit %d; want %q, exit %d", tt.args, out, code, tt.out, tt.code)
		}
	}

	// Rewritten in place between two lookups.
	rewrite(t, status, statusV2(devA, "10.240.0.9"))
	if out, _ := getent("hosts", devA+".vpn"); out != "10.240.0.9 "+devA+".vpn" {
		t.Errorf("after the rewrite: %q", out)
	}
	if _, code := getent("hosts", devB+".vpn"); code != 2 {
		t.Errorf("a device gone from the file still resolves")
	}

	// A status file as OpenVPN 2.6.14 wrote it (captured in nss/testdata).
	real, err := os.ReadFile("../../nss/testdata/openvpn-2.6-v2.status")
	if err != nil {
		t.Fatal(err)
	}
	rewrite(t, filepath.Join(dir, "server-2.status"), string(real))
	if out, _ := getent("hosts", "FEDCBA9876543210fedcba9876543210.vpn"); out != "10.240.32.4 FEDCBA9876543210fedcba9876543210.vpn" {
		t.Errorf("from OpenVPN's own file: %q", out)
	}

	// The entry points directly: tiny buffers, the address family, short
	// names. Status -2 with errno 34 is NSS_STATUS_TRYAGAIN with ERANGE;
	// 0 with errno 2 is NSS_STATUS_NOTFOUND with ENOENT.
	for _, c := range []struct {
		name, af, buflen, want string
	}{
		{devA + ".vpn", "4", "1024", "1 0 0 10.240.0.9"},
		{devA + ".vpn", "4", "8", "-2 34 -1 -"},
		{devA + ".vpn", "4", "40", "-2 34 -1 -"},
		{devA + ".vpn", "4", "100", "1 0 0 10.240.0.9"},
		{devA + ".vpn", "6", "1024", "0 2 1 -"},
		{"", "4", "1024", "0 2 1 -"},
		{"a", "4", "1024", "0 2 1 -"},
		{".vpn", "4", "1024", "0 2 1 -"},
		{"x.vpn", "4", "1024", "0 2 1 -"},
	} {
		cmd := exec.Command(check, so, c.name, c.af, c.buflen)
		cmd.Env = env
		out, err := cmd.CombinedOutput()
		if got := strings.TrimSpace(string(out)); err != nil || got != c.want {
			t.Errorf("nsscheck %q af %s buflen %s = %q (%v), want %q", c.name, c.af, c.buflen, got, err, c.want)
		}
	}
}

// TestMakeInstallNSS runs the Makefile's install-nss twice and
// uninstall-nss once on a copy of nsswitch.conf and a scratch library
// directory: installing is idempotent and uninstalling restores the file
// byte for byte.
func TestMakeInstallNSS(t *testing.T) {
	mk := need(t, "make")
	need(t, "gcc")
	dir := t.TempDir()
	conf := filepath.Join(dir, "nsswitch.conf")
	orig := "passwd:         files\nhosts:          files dns\nnetworks:       files\n"
	if err := os.WriteFile(conf, []byte(orig), 0o644); err != nil {
		t.Fatal(err)
	}
	run := func(target string) {
		t.Helper()
		cmd := exec.Command(mk, "-s", "-C", "../..", target, "NSSWITCH="+conf, "NSS_LIBDIR="+dir,
			"NSS_SO="+filepath.Join(dir, "build", "libnss_openvpn.so.2"))
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("make %s: %v\n%s", target, err, out)
		}
	}
	run("install-nss")
	run("install-nss")
	b, _ := os.ReadFile(conf)
	if want := strings.Replace(orig, "files dns", "files openvpn dns", 1); string(b) != want {
		t.Errorf("after install-nss twice:\n%s\nwant\n%s", b, want)
	}
	if _, err := os.Stat(filepath.Join(dir, "libnss_openvpn.so.2")); err != nil {
		t.Errorf("module not installed: %v", err)
	}
	run("uninstall-nss")
	b, _ = os.ReadFile(conf)
	if string(b) != orig {
		t.Errorf("after uninstall-nss:\n%s\nwant\n%s", b, orig)
	}
	if _, err := os.Stat(filepath.Join(dir, "libnss_openvpn.so.2")); !os.IsNotExist(err) {
		t.Errorf("module still installed: %v", err)
	}
}

// BenchmarkGetent: one getent call through the module against 256 status
// files of 3907 devices (a million), with the baseline of the same call
// for a name that the files source answers (process, mount namespace and
// getent without the module's work). Compare with nss's
// BenchmarkLinearScan, the reference module's way.
func BenchmarkGetent(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root for a mount namespace")
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		b.Skip("go not found")
	}
	dir := b.TempDir()
	so := filepath.Join(dir, "libnss_openvpn.so.2")
	if out, err := exec.Command(goBin, "build", "-buildmode=c-shared", "-o", so, ".").CombinedOutput(); err != nil {
		b.Fatalf("%v\n%s", err, out)
	}
	nsswitch := filepath.Join(dir, "nsswitch.conf")
	if err := os.WriteFile(nsswitch, []byte("hosts: files openvpn\n"), 0o644); err != nil {
		b.Fatal(err)
	}
	var last string
	for f := 1; f <= 256; f++ {
		var sb strings.Builder
		sb.WriteString("TITLE,OpenVPN 2.6.14\nTIME,2026-11-25 04:26:21,1795580781\n")
		sb.WriteString("HEADER,ROUTING_TABLE,Virtual Address,Common Name,Real Address,Last Ref,Last Ref (time_t)\n")
		for i := 0; i < 3907; i++ {
			last = fmt.Sprintf("%08x%024x", f, i)
			fmt.Fprintf(&sb, "ROUTING_TABLE,10.%d.%d.%d,%s,198.51.100.1:%d,2026-11-25 04:26:18,1795580778\n", f-1, i>>8, i&0xff, last, 1024+i)
		}
		sb.WriteString("END\n")
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("server-%d.status", f)), []byte(sb.String()), 0o644); err != nil {
			b.Fatal(err)
		}
	}
	env := append(os.Environ(), "LD_LIBRARY_PATH="+dir, "NSS_OPENVPN_STATUS_GLOB="+filepath.Join(dir, "server-*.status"))
	script := fmt.Sprintf("mount --bind %q /etc/nsswitch.conf && exec getent hosts \"$1\"", nsswitch)
	for _, c := range []struct{ name, host string }{{"module", last + ".vpn"}, {"files-only-baseline", "localhost"}} {
		b.Run(c.name, func(b *testing.B) {
			for b.Loop() {
				cmd := exec.Command("unshare", "--mount", "sh", "-c", script, "sh", c.host)
				cmd.Env = env
				if out, err := cmd.CombinedOutput(); err != nil {
					b.Fatalf("%v: %s", err, out)
				}
			}
		})
	}
}
