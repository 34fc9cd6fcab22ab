package main

import (
	"bufio"
	"fmt"
	"io"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/obvpn/obvpn/nss"
)

const (
	devA = "0123456789abcdef0123456789abcdef"
	devB = "fedcba9876543210fedcba9876543210"
)

// need returns the path of a command, skipping the test without it (a
// failure under OBVPN_E2E=1).
func need(t testing.TB, name string) string {
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

// needRoot skips the test when not root (a failure under OBVPN_E2E=1).
func needRoot(t testing.TB, why string) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("OBVPN_E2E") == "1" {
		t.Fatalf("OBVPN_E2E=1 but not root: %s needs root", why)
	}
	t.Skipf("needs root for %s (set OBVPN_E2E=1 to make this a failure)", why)
}

// buildModule builds the module with "make nss" into a directory of the
// test's, and returns its path.
func buildModule(t testing.TB) string {
	t.Helper()
	mk := need(t, "make")
	need(t, "gcc")
	so := filepath.Join(t.TempDir(), "libnss_openvpn.so.2")
	if out, err := exec.Command(mk, "-s", "-C", "../..", "nss", "NSS_SO="+so).CombinedOutput(); err != nil {
		t.Fatalf("make nss: %v\n%s", err, out)
	}
	return so
}

// buildTool compiles one of testdata's C programs.
func buildTool(t testing.TB, name string) string {
	t.Helper()
	gcc := need(t, "gcc")
	bin := filepath.Join(t.TempDir(), name)
	if out, err := exec.Command(gcc, "-O2", "-Wall", "-o", bin, "testdata/"+name+".c", "-ldl", "-pthread").CombinedOutput(); err != nil {
		t.Fatalf("building %s: %v\n%s", name, err, out)
	}
	return bin
}

type route struct {
	name, addr string
	ref        int64 // Last Ref, Unix seconds
}

// statusFile is a status file of version 1, 2 or 3 with the routes (and
// a client row for each).
func statusFile(version int, routes ...route) string {
	var b strings.Builder
	if version == 1 {
		b.WriteString("OpenVPN CLIENT LIST\nUpdated,2026-11-25 04:26:21\nCommon Name,Real Address,Bytes Received,Bytes Sent,Connected Since\n")
		for i, r := range routes {
			fmt.Fprintf(&b, "%s,192.0.2.1:%d,1,2,2026-11-25 04:26:18\n", r.name, 1000+i)
		}
		b.WriteString("ROUTING TABLE\nVirtual Address,Common Name,Real Address,Last Ref\n")
		for i, r := range routes {
			fmt.Fprintf(&b, "%s,%s,192.0.2.1:%d,%s\n", r.addr, r.name, 1000+i, time.Unix(r.ref, 0).Format(time.DateTime))
		}
		b.WriteString("GLOBAL STATS\nMax bcast/mcast queue length,0\nEND\n")
		return b.String()
	}
	sep := ","
	if version == 3 {
		sep = "\t"
	}
	line := func(f ...string) { b.WriteString(strings.Join(f, sep) + "\n") }
	line("TITLE", "OpenVPN 2.6.14 x86_64-pc-linux-gnu")
	line("TIME", "2026-11-25 04:26:21", "1795580781")
	line("HEADER", "CLIENT_LIST", "Common Name", "Real Address", "Virtual Address", "Virtual IPv6 Address", "Bytes Received", "Bytes Sent", "Connected Since", "Connected Since (time_t)", "Username", "Client ID", "Peer ID", "Data Channel Cipher")
	for i, r := range routes {
		line("CLIENT_LIST", r.name, fmt.Sprintf("192.0.2.1:%d", 1000+i), r.addr, "", "1", "2", "2026-11-25 04:26:18", "1795580778", r.name, fmt.Sprint(i), fmt.Sprint(i), "AES-256-GCM")
	}
	line("HEADER", "ROUTING_TABLE", "Virtual Address", "Common Name", "Real Address", "Last Ref", "Last Ref (time_t)")
	for i, r := range routes {
		line("ROUTING_TABLE", r.addr, r.name, fmt.Sprintf("192.0.2.1:%d", 1000+i), time.Unix(r.ref, 0).Format(time.DateTime), fmt.Sprint(r.ref))
	}
	line("GLOBAL_STATS", "Max bcast/mcast queue length", "0")
	line("GLOBAL_STATS", "dco_enabled", "0")
	b.WriteString("END\n")
	return b.String()
}

// rewrite rewrites path in place, as OpenVPN does.
func rewrite(t testing.TB, path, content string) {
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

// writeIndex writes the index of the status files that glob matches to
// dir/nss.index, the default place, and returns the resolver.
func writeIndex(t testing.TB, glob string) *nss.Resolver {
	t.Helper()
	r := &nss.Resolver{Globs: []string{glob}, Interval: 1 << 62}
	if err := r.WriteIndex(nss.IndexPathFor(r.Globs)); err != nil {
		t.Fatal(err)
	}
	return r
}

// query runs "nsstool <so> query" with env and returns its answers to
// names.
func query(t testing.TB, tool, so string, env []string, names []string) []string {
	t.Helper()
	cmd := exec.Command(tool, so, "query")
	cmd.Env = env
	cmd.Stdin = strings.NewReader(strings.Join(names, "\n") + "\n")
	out, err := cmd.Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		t.Fatalf("nsstool query: %v\n%s", err, stderr)
	}
	got := strings.Split(strings.TrimSuffix(string(out), "\n"), "\n")
	if len(got) != len(names) {
		t.Fatalf("nsstool query: %d answers for %d names", len(got), len(names))
	}
	return got
}

func envFor(dir string, extra ...string) []string {
	return append(append(os.Environ(), "NSS_OPENVPN_STATUS_GLOB="+filepath.Join(dir, "server-*.status"), "NSS_OPENVPN_INDEX="), extra...)
}

// TestModule builds the module with make, and runs getent with it in a
// mount namespace of its own whose /etc/nsswitch.conf says "hosts: files
// openvpn": the host's configuration is never touched. It checks the
// answers with the index, after the devices moved (the index is stale),
// and with no index.
func TestModule(t *testing.T) {
	needRoot(t, "a mount namespace")
	unshare := need(t, "unshare")
	need(t, "getent")
	so := buildModule(t)
	dir := filepath.Dir(so)
	nsswitch := filepath.Join(dir, "nsswitch.conf")
	if err := os.WriteFile(nsswitch, []byte("passwd: files\ngroup: files\nhosts: files openvpn\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	status := filepath.Join(dir, "server-1.status")
	rewrite(t, status, statusFile(2, route{devA, "10.240.0.3", 100}, route{strings.ToUpper(devB), "10.240.0.4", 100}))
	glob := filepath.Join(dir, "server-*.status")
	env := append(os.Environ(), "LD_LIBRARY_PATH="+dir, "NSS_OPENVPN_STATUS_GLOB="+glob)

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
	run := func(stage string) {
		t.Helper()
		for _, tt := range tests {
			out, code := getent(tt.args...)
			if code != tt.code || out != tt.out {
				t.Errorf("%s: getent %v = %q, exit %d; want %q, exit %d", stage, tt.args, out, code, tt.out, tt.code)
			}
		}
	}
	run("no index")
	writeIndex(t, glob)
	if _, err := os.Stat(filepath.Join(dir, "nss.index")); err != nil {
		t.Fatal(err)
	}
	run("index")

	// Staleness: rewritten in place after the index was written; the
	// index is not rewritten. The device that moved resolves to its new
	// address, the one that left no longer resolves.
	rewrite(t, status, statusFile(2, route{devA, "10.240.0.9", 100}))
	if out, _ := getent("hosts", devA+".vpn"); out != "10.240.0.9 "+devA+".vpn" {
		t.Errorf("after the move: %q", out)
	}
	if _, code := getent("hosts", devB+".vpn"); code != 2 {
		t.Errorf("a device gone from the file still resolves")
	}
	// A new status file that the index does not name is read too; one as
	// OpenVPN 2.6.14 wrote it (captured in nss/testdata).
	real, err := os.ReadFile("../../nss/testdata/openvpn-2.6-v2.status")
	if err != nil {
		t.Fatal(err)
	}
	rewrite(t, filepath.Join(dir, "server-2.status"), string(real))
	if out, _ := getent("hosts", "FEDCBA9876543210fedcba9876543210.vpn"); out != "10.240.32.4 FEDCBA9876543210fedcba9876543210.vpn" {
		t.Errorf("from OpenVPN's own file: %q", out)
	}
	// OpenVPN's file routes devA too, with a later Last Ref: it wins.
	writeIndex(t, glob)
	if out, _ := getent("hosts", devA+".vpn"); out != "10.240.32.3 "+devA+".vpn" {
		t.Errorf("after the index was rewritten: %q", out)
	}
}

// TestEntryPoints calls the entry points directly: tiny buffers (ERANGE),
// the address family, short names; with the index and without.
func TestEntryPoints(t *testing.T) {
	so := buildModule(t)
	check := buildTool(t, "nsscheck")
	dir := filepath.Dir(so)
	rewrite(t, filepath.Join(dir, "server-1.status"), statusFile(2, route{devA, "10.240.0.9", 100}, route{"ab", "10.240.0.10", 100}))
	for _, withIndex := range []bool{false, true} {
		if withIndex {
			writeIndex(t, filepath.Join(dir, "server-*.status"))
		}
		// Status -2 with errno 34 is NSS_STATUS_TRYAGAIN with ERANGE; 0
		// with errno 2 is NSS_STATUS_NOTFOUND with ENOENT.
		for _, c := range []struct {
			name, af, buflen, want string
		}{
			{devA + ".vpn", "4", "1024", "1 0 0 10.240.0.9"},
			{devA + ".vpn", "4", "0", "-2 34 -1 -"},
			{devA + ".vpn", "4", "8", "-2 34 -1 -"},
			{devA + ".vpn", "4", "40", "-2 34 -1 -"},
			{devA + ".vpn", "4", "100", "1 0 0 10.240.0.9"},
			{devA + ".vpn", "6", "1024", "0 2 1 -"},
			{"ab.vpn", "4", "1024", "1 0 0 10.240.0.10"},
			{"AB.VPN", "4", "1024", "1 0 0 10.240.0.10"},
			{"", "4", "1024", "0 2 1 -"},
			{"a", "4", "1024", "0 2 1 -"},
			{"vpn", "4", "1024", "0 2 1 -"},
			{".vpn", "4", "1024", "0 2 1 -"},
			{"x.vpn", "4", "1024", "0 2 1 -"},
			{strings.Repeat("a", 5000) + ".vpn", "4", "8192", "0 2 1 -"},
		} {
			cmd := exec.Command(check, so, c.name, c.af, c.buflen)
			cmd.Env = envFor(dir)
			out, err := cmd.CombinedOutput()
			if got := strings.TrimSpace(string(out)); err != nil || got != c.want {
				t.Errorf("index %v: nsscheck %.20q af %s buflen %s = %q (%v), want %q", withIndex, c.name, c.af, c.buflen, got, err, c.want)
			}
		}
	}
}

// TestLinksOnlyLibc: the module needs libc and nothing else, and exports
// only its three entry points.
func TestLinksOnlyLibc(t *testing.T) {
	so := buildModule(t)
	readelf := need(t, "readelf")
	out, err := exec.Command(readelf, "-d", "-W", so).Output()
	if err != nil {
		t.Fatal(err)
	}
	var needed []string
	for _, l := range strings.Split(string(out), "\n") {
		if strings.Contains(l, "(NEEDED)") {
			needed = append(needed, l[strings.Index(l, "[")+1:strings.Index(l, "]")])
		}
	}
	if len(needed) != 1 || needed[0] != "libc.so.6" {
		t.Errorf("NEEDED %v, want only libc.so.6", needed)
	}
	out, err = exec.Command(need(t, "nm"), "-D", "--defined-only", so).Output()
	if err != nil {
		t.Fatal(err)
	}
	var syms []string
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if f := strings.Fields(l); len(f) == 3 {
			syms = append(syms, f[2])
		}
	}
	if strings.Join(syms, " ") != "_nss_openvpn_gethostbyname2_r _nss_openvpn_gethostbyname3_r _nss_openvpn_gethostbyname_r" {
		t.Errorf("exports %v", syms)
	}
	// The environment is read with secure_getenv only; no thread is
	// started, no heap memory taken (glob(3) aside, for patterns with
	// wildcards in their directories).
	out, err = exec.Command(need(t, "nm"), "-D", "--undefined-only", so).Output()
	if err != nil {
		t.Fatal(err)
	}
	imports := map[string]bool{}
	for _, l := range strings.Split(string(out), "\n") {
		if f := strings.Fields(l); len(f) == 2 {
			imports[strings.SplitN(f[1], "@", 2)[0]] = true
		}
	}
	if !imports["secure_getenv"] {
		t.Errorf("secure_getenv not used: %v", imports)
	}
	for _, bad := range []string{"getenv", "pthread_create", "malloc", "calloc", "realloc", "fopen", "opendir"} {
		if imports[bad] {
			t.Errorf("the module imports %s", bad)
		}
	}
}

// corpus generates status files of odd names (random case, 1 to 300
// bytes, bytes outside ASCII, names in two files with different Last
// Refs, routing rows that are no address) over versions 1, 2 and 3, and
// returns the names to ask for: each name in several spellings, and names
// that are absent.
func corpus(t *testing.T, dir string, seed uint64) []string {
	rng := rand.New(rand.NewPCG(seed, 7))
	const alphabet = "abcdefABCDEF0123456789-_.xyzXYZ é!~\x01"
	seen := map[string]bool{"undef": true}
	var names []string
	for i := 0; len(names) < 1500; i++ {
		var n []byte
		switch {
		case i%3 == 0:
			n = []byte(fmt.Sprintf("%016x%016x", rng.Uint64(), rng.Uint64()))
		case i%10 == 1:
			n = make([]byte, 1+rng.IntN(300))
		default:
			n = make([]byte, 1+rng.IntN(40))
		}
		if i%3 != 0 {
			for j := range n {
				n[j] = alphabet[rng.IntN(len(alphabet))]
			}
		}
		if i%5 == 0 {
			n = []byte(strings.ToUpper(string(n)))
		}
		key := strings.Map(func(r rune) rune {
			if 'A' <= r && r <= 'Z' {
				return r + 'a' - 'A'
			}
			return r
		}, string(n))
		if seen[key] {
			continue
		}
		seen[key] = true
		names = append(names, string(n))
	}
	files := make([][]route, 3)
	for i, n := range names {
		addr := fmt.Sprintf("10.%d.%d.%d", i>>16, i>>8&255, i&255)
		ref := int64(1795580000 + rng.IntN(1000))
		f := i % 3
		files[f] = append(files[f], route{n, addr, ref})
		switch i % 7 {
		case 0: // in another file too, with another Last Ref
			other := ref + 1 + int64(rng.IntN(3)) // never a tie: which wins a tie is not said
			if i%2 == 0 {
				other = ref - 1 - int64(rng.IntN(3))
			}
			files[(f+1)%3] = append(files[(f+1)%3], route{n, fmt.Sprintf("10.200.%d.%d", i>>8&255, i&255), other})
		case 1: // rows that are no address
			for _, bad := range []string{addr + "C", "10.9.0.0/24", "2001:db8::5", "aa:bb:cc:dd:ee:ff@3", "010.1.1.1", "1.2.3"} {
				files[f] = append(files[f], route{n, bad, ref + 5})
			}
		case 2: // twice in its file: the later row wins
			files[f] = append(files[f], route{n, fmt.Sprintf("10.201.%d.%d", i>>8&255, i&255), ref + 2})
		case 3: // only rows that are no address
			files[f][len(files[f])-1].addr = addr + "C"
		}
	}
	files[0] = append(files[0], route{"UNDEF", "10.1.1.1", 1})
	for f, routes := range files {
		rewrite(t, filepath.Join(dir, fmt.Sprintf("server-%d.status", f+1)), statusFile(f+1, routes...))
	}
	var q []string
	for _, n := range names {
		q = append(q, n+".vpn", strings.ToUpper(n)+".VPN", n+"x.vpn", n[:len(n)/2]+".vpn")
	}
	return append(q, "undef.vpn", "UNDEF.vpn", ".vpn", "x", "")
}

// TestSameAnswers: the C module and the Go resolver answer the same for
// the same files, over a generated corpus: with a fresh index, with no
// index (the module scans), and with an index that two of three files
// have outgrown (the module takes the third from the index and scans the
// two).
func TestSameAnswers(t *testing.T) {
	so := buildModule(t)
	tool := buildTool(t, "nsstool")
	dir := t.TempDir()
	glob := filepath.Join(dir, "server-*.status")
	names := corpus(t, dir, 1)
	compare := func(stage string, env []string) {
		t.Helper()
		r := &nss.Resolver{Globs: []string{glob}}
		got := query(t, tool, so, env, names)
		bad := 0
		for i, n := range names {
			want := "-"
			if a, err := r.Lookup(n); err == nil && len(n) > 4 && strings.EqualFold(n[len(n)-4:], ".vpn") {
				want = a.String() // the module answers only .vpn names
			}
			// Find is the scan in Go; it must agree too (checked on a
			// sample: it reads every file for every name).
			if i%9 == 0 && stage == "no index" {
				if a, err := nss.Find([]string{glob}, n); want != "-" && (err != nil || a.String() != want) {
					t.Errorf("%s: %q: Find %v %v, resolver %s", stage, n, a, err, want)
				}
			}
			if got[i] != want {
				if bad++; bad < 10 {
					t.Errorf("%s: %q: module %s, resolver %s", stage, n, got[i], want)
				}
			}
		}
		if bad > 0 {
			t.Errorf("%s: %d of %d answers differ", stage, bad, len(names))
		}
	}
	compare("no index", envFor(dir))
	writeIndex(t, glob)
	compare("index", envFor(dir))
	compare("index named by NSS_OPENVPN_INDEX", envFor(dir, "NSS_OPENVPN_INDEX="+filepath.Join(dir, "nss.index")))
	// The files rewritten with other devices and addresses: stale. Then
	// two of them rewritten as they were: the index answers for those.
	old := [3]string{}
	var mtimes [3]time.Time
	for i := range old {
		p := filepath.Join(dir, fmt.Sprintf("server-%d.status", i+1))
		old[i] = mustRead(t, p)
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		mtimes[i] = fi.ModTime()
	}
	names = append(names, corpus(t, dir, 2)...)
	compare("stale index", envFor(dir))
	// Same inode, size and modification time as indexed: fresh again.
	for _, i := range []int{0, 2} {
		p := filepath.Join(dir, fmt.Sprintf("server-%d.status", i+1))
		rewrite(t, p, old[i])
		if err := os.Chtimes(p, mtimes[i], mtimes[i]); err != nil {
			t.Fatal(err)
		}
	}
	compare("index partly stale", envFor(dir))
}

func mustRead(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestPartlyStale: one file of three changed after the index was written:
// names of the unchanged files come from the index, names of the changed
// one from its scan, and a name in both competes by Last Ref.
func TestPartlyStale(t *testing.T) {
	so := buildModule(t)
	tool := buildTool(t, "nsstool")
	dir := t.TempDir()
	glob := filepath.Join(dir, "server-*.status")
	s := func(i int) string { return filepath.Join(dir, fmt.Sprintf("server-%d.status", i)) }
	rewrite(t, s(1), statusFile(2, route{"a", "10.0.1.1", 100}, route{"both", "10.0.1.2", 100}))
	rewrite(t, s(2), statusFile(2, route{"b", "10.0.2.1", 100}, route{"both", "10.0.2.2", 50}, route{"moved", "10.0.2.3", 100}))
	rewrite(t, s(3), statusFile(3, route{"c", "10.0.3.1", 100}))
	writeIndex(t, glob)
	names := []string{"a.vpn", "b.vpn", "c.vpn", "both.vpn", "moved.vpn", "new.vpn", "gone.vpn"}
	is := func(stage string, want ...string) {
		t.Helper()
		if got := query(t, tool, so, envFor(dir), names); strings.Join(got, " ") != strings.Join(want, " ") {
			t.Errorf("%s: got %v, want %v", stage, got, want)
		}
	}
	is("fresh", "10.0.1.1", "10.0.2.1", "10.0.3.1", "10.0.1.2", "10.0.2.3", "-", "-")
	// server-2 changes: "both" gets a later Last Ref there, "moved" moves,
	// "new" comes, "b" goes.
	rewrite(t, s(2), statusFile(2, route{"both", "10.0.2.2", 200}, route{"moved", "10.0.2.30", 100}, route{"new", "10.0.2.4", 100}))
	is("server-2 changed", "10.0.1.1", "-", "10.0.3.1", "10.0.2.2", "10.0.2.30", "10.0.2.4", "-")
	// server-1 goes: its names with it.
	if err := os.Remove(s(1)); err != nil {
		t.Fatal(err)
	}
	is("server-1 gone", "-", "-", "10.0.3.1", "10.0.2.2", "10.0.2.30", "10.0.2.4", "-")
}

// TestLearned: a device the resolver learned (from the management
// interface) before its status file says so resolves through the module,
// from the index; once the file is rewritten without it, the module
// scans that file and the device no longer resolves, as the resolver
// says too.
func TestLearned(t *testing.T) {
	so := buildModule(t)
	tool := buildTool(t, "nsstool")
	dir := t.TempDir()
	glob := filepath.Join(dir, "server-*.status")
	status := filepath.Join(dir, "server-1.status")
	rewrite(t, status, statusFile(2, route{devA, "10.240.0.3", 100}))
	r := &nss.Resolver{Globs: []string{glob}, Interval: -1}
	r.Learn(status, devB, netip.MustParseAddr("10.240.0.4"))
	r.Forget(status, devA)
	if err := r.WriteIndex(nss.IndexPathFor(r.Globs)); err != nil {
		t.Fatal(err)
	}
	names := []string{devA + ".vpn", devB + ".vpn"}
	if got := strings.Join(query(t, tool, so, envFor(dir), names), " "); got != "- 10.240.0.4" {
		t.Errorf("learned: %s", got)
	}
	future := time.Now().Add(time.Second)
	rewrite(t, status, statusFile(2, route{devA, "10.240.0.3", 100}))
	if err := os.Chtimes(status, future, future); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(query(t, tool, so, envFor(dir), names), " "); got != "10.240.0.3 -" {
		t.Errorf("after the status file was rewritten: %s", got)
	}
	for i, want := range []string{"10.240.0.3", "-"} {
		a, err := r.Lookup(names[i])
		if (err == nil) != (want != "-") || (err == nil && a.String() != want) {
			t.Errorf("resolver %s: %v %v, want %s", names[i], a, err, want)
		}
	}
}

// TestTwoSpellings: the default globs name each file twice (/run and
// /var/run, a link to it); such globs answer as one.
func TestTwoSpellings(t *testing.T) {
	so := buildModule(t)
	tool := buildTool(t, "nsstool")
	dir := t.TempDir()
	link := filepath.Join(t.TempDir(), "run")
	if err := os.Symlink(dir, link); err != nil {
		t.Fatal(err)
	}
	globs := []string{filepath.Join(dir, "server-*.status"), filepath.Join(link, "server-*.status")}
	env := append(os.Environ(), "NSS_OPENVPN_STATUS_GLOB="+strings.Join(globs, ":"), "NSS_OPENVPN_INDEX=")
	status := filepath.Join(dir, "server-1.status")
	rewrite(t, status, statusFile(2, route{devA, "10.240.0.3", 100}))
	names := []string{devA + ".vpn", devB + ".vpn"}
	check := func(stage, want string) {
		t.Helper()
		if got := strings.Join(query(t, tool, so, env, names), " "); got != want {
			t.Errorf("%s: %s, want %s", stage, got, want)
		}
	}
	check("no index", "10.240.0.3 -")
	r := &nss.Resolver{Globs: globs}
	if err := r.WriteIndex(nss.IndexPathFor(globs)); err != nil {
		t.Fatal(err)
	}
	if ix, err := nss.ReadIndex(nss.IndexPathFor(globs)); err != nil || len(ix.Sources()) != 1 || ix.Stale(globs) {
		t.Fatalf("index: %v", err)
	}
	check("index", "10.240.0.3 -")
	rewrite(t, status, statusFile(2, route{devB, "10.240.0.4", 100}))
	check("stale", "- 10.240.0.4")
}

// TestCorruptIndex: an index cut short, or with bytes changed in its
// header, sources, slots or records, gives the scan's answers; the module
// does not crash.
func TestCorruptIndex(t *testing.T) {
	so := buildModule(t)
	tool := buildTool(t, "nsstool")
	dir := t.TempDir()
	glob := filepath.Join(dir, "server-*.status")
	rewrite(t, filepath.Join(dir, "server-1.status"), statusFile(2, route{devA, "10.240.0.3", 100}, route{devB, "10.240.0.4", 100}))
	path := filepath.Join(dir, "nss.index")
	writeIndex(t, glob)
	good := mustRead(t, path)
	// Only the index can say this: a learned device that the status file
	// does not hold yet. A corrupted index must not answer it, nor
	// anything else the scan would not.
	r := &nss.Resolver{Globs: []string{glob}}
	r.Learn(filepath.Join(dir, "server-1.status"), "learned", netip.MustParseAddr("10.240.0.5"))
	if err := r.WriteIndex(path); err != nil {
		t.Fatal(err)
	}
	learned := mustRead(t, path)
	names := []string{devA + ".vpn", devB + ".vpn", "learned.vpn", "x.vpn"}
	if got := strings.Join(query(t, tool, so, envFor(dir), names), " "); got != "10.240.0.3 10.240.0.4 10.240.0.5 -" {
		t.Fatalf("with the learned entry: %s", got)
	}
	scan := "10.240.0.3 10.240.0.4 - -"
	variants := map[string]string{"empty": "", "header only": learned[:80]}
	for _, n := range []int{1, 79, 81, len(learned) / 2, len(learned) - 1} {
		variants[fmt.Sprintf("cut at %d", n)] = learned[:n]
	}
	for i := 0; i < len(learned); i += 3 {
		b := []byte(learned)
		b[i] ^= 0x5a
		variants[fmt.Sprintf("byte %d changed", i)] = string(b)
	}
	variants["another index's header"] = good[:80] + learned[80:]
	for what, content := range variants {
		if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		got := strings.Join(query(t, tool, so, envFor(dir), names), " ")
		// A change that leaves the learned record and what leads to it
		// intact may still answer it: any answer is the scan's or the
		// index's, never another address.
		if got != scan && got != "10.240.0.3 10.240.0.4 10.240.0.5 -" {
			t.Errorf("%s: %s", what, got)
		}
		if _, err := nss.ParseIndex([]byte(content)); err != nil && got != scan {
			t.Errorf("%s: Go refuses the index (%v) but the module answered %s", what, err, got)
		}
	}
}

// TestSanitized runs the module built with AddressSanitizer and
// UndefinedBehaviorSanitizer over the generated corpus, with no index, a
// good one, and corrupted or cut ones: no read out of bounds, no
// undefined behaviour, whatever the files say.
func TestSanitized(t *testing.T) {
	gcc := need(t, "gcc")
	dir := t.TempDir()
	so, tool := filepath.Join(dir, "libnss_openvpn.so.2"), filepath.Join(dir, "nsstool")
	san := []string{"-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"}
	for _, c := range [][]string{
		append(san, "-shared", "-fPIC", "-o", so, "csrc/libnss_openvpn.c"),
		append(san, "-o", tool, "testdata/nsstool.c", "-ldl", "-pthread"),
	} {
		if out, err := exec.Command(gcc, c...).CombinedOutput(); err != nil {
			t.Fatalf("gcc %v: %v\n%s", c, err, out)
		}
	}
	status := t.TempDir()
	names := corpus(t, status, 3)[:2000]
	query(t, tool, so, envFor(status), names)
	writeIndex(t, filepath.Join(status, "server-*.status"))
	path := filepath.Join(status, "nss.index")
	good := mustRead(t, path)
	query(t, tool, so, envFor(status), names)
	rng := rand.New(rand.NewPCG(5, 5))
	for i := range 20 {
		b := []byte(good)
		if i%4 == 0 {
			b = b[:rng.IntN(len(b))]
		} else {
			for range 1 + rng.IntN(4) {
				b[rng.IntN(len(b))] = byte(rng.IntN(256))
			}
		}
		if err := os.WriteFile(path, b, 0o644); err != nil {
			t.Fatal(err)
		}
		query(t, tool, so, envFor(status), names[:200])
	}
}

// TestFork: a process looks a device up (so it maps the index), the
// status file changes, then the process forks while a thread of its keeps
// looking up: every child looks up again, gets the new address and
// exits; none hangs.
func TestFork(t *testing.T) {
	so := buildModule(t)
	tool := buildTool(t, "nsstool")
	dir := t.TempDir()
	glob := filepath.Join(dir, "server-*.status")
	status := filepath.Join(dir, "server-1.status")
	rewrite(t, status, statusFile(2, route{devA, "10.240.0.3", 100}))
	writeIndex(t, glob)
	cmd := exec.Command(tool, so, "fork", devA+".vpn", "20")
	cmd.Env = envFor(dir)
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	sc := bufio.NewScanner(stdout)
	if !sc.Scan() || sc.Text() != "10.240.0.3" {
		t.Fatalf("first lookup: %q", sc.Text())
	}
	rewrite(t, status, statusFile(2, route{devA, "10.240.0.7", 100}))
	io.WriteString(stdin, "go\n")
	n := 0
	for sc.Scan() {
		if sc.Text() != "10.240.0.7" {
			t.Errorf("child %d: %q", n, sc.Text())
		}
		n++
	}
	if err := cmd.Wait(); err != nil || n != 20 {
		t.Errorf("nsstool fork: %v, %d children answered", err, n)
	}
}

// TestSetuid: a set-uid program ignores NSS_OPENVPN_STATUS_GLOB and
// NSS_OPENVPN_INDEX (secure_getenv), while the same program without the
// bit follows them.
func TestSetuid(t *testing.T) {
	needRoot(t, "a set-uid program of another user")
	so := buildModule(t)
	check := buildTool(t, "nsscheck")
	dir := t.TempDir()
	rewrite(t, filepath.Join(dir, "server-1.status"), statusFile(2, route{devA, "10.240.0.3", 100}))
	writeIndex(t, filepath.Join(dir, "server-*.status"))
	// The set-uid program runs as nobody: it must reach the module
	// through directories that others may enter.
	pub, err := os.MkdirTemp("", "nss-setuid-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(pub) })
	if err := os.Chmod(pub, 0o755); err != nil {
		t.Fatal(err)
	}
	suid := filepath.Join(pub, "nsscheck-suid")
	for src, dst := range map[string]string{check: suid, so: filepath.Join(pub, "libnss_openvpn.so.2")} {
		if out, err := exec.Command("cp", src, dst).CombinedOutput(); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
	}
	so = filepath.Join(pub, "libnss_openvpn.so.2")
	if err := os.Chown(suid, 65534, 65534); err != nil { // nobody
		t.Fatal(err)
	}
	if err := os.Chmod(suid, 0o755|os.ModeSetuid); err != nil {
		t.Fatal(err)
	}
	run := func(bin string) string {
		cmd := exec.Command(bin, so, devA+".vpn", "4", "1024")
		cmd.Env = envFor(dir, "NSS_OPENVPN_INDEX="+filepath.Join(dir, "nss.index"))
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%s: %v: %s", bin, err, out)
		}
		return strings.TrimSpace(string(out))
	}
	if got := run(check); got != "1 0 0 10.240.0.3" {
		t.Errorf("plain: %q", got)
	}
	if got := run(suid); got != "0 2 1 -" {
		t.Errorf("set-uid: %q, want NOTFOUND (the environment ignored)", got)
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
