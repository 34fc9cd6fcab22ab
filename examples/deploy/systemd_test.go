package deploy

import (
	"bufio"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/obvpn/obvpn/vpn"
)

// The systemd files, relative to this directory.
const (
	unitPath    = "systemd/open-balena-vpn.service"
	unitEnvPath = "systemd/open-balena-vpn.env"
)

// upgradeTimeout is open-balena-vpn's default VPN_UPGRADE_TIMEOUT: the
// time an upgrade's successor has to be ready, within the unit's
// TimeoutStartSec (which also bounds a reload).
const upgradeTimeout = time.Minute

// unitFile is a systemd unit: the values of each key, by section, in order.
type unitFile map[string]map[string][]string

// readUnit reads a unit file: [Section] lines, Key=Value lines, comments
// starting with # or ;. It fails on anything else, and on a line
// continuation, which the unit does not need.
func readUnit(t *testing.T, path string) unitFile {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	u := unitFile{}
	section := ""
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || line[0] == '#' || line[0] == ';':
		case strings.HasSuffix(line, `\`):
			t.Fatalf("%s:%d: a continued line", path, n)
		case line[0] == '[' && line[len(line)-1] == ']':
			section = line[1 : len(line)-1]
			u[section] = map[string][]string{}
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok || section == "" {
				t.Fatalf("%s:%d: %q is not Key=Value in a section", path, n, line)
			}
			k, v = strings.TrimSpace(k), strings.TrimSpace(v)
			u[section][k] = append(u[section][k], v)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return u
}

// one returns the single value of key in section, or fails.
func (u unitFile) one(t *testing.T, section, key string) string {
	t.Helper()
	vs := u[section][key]
	if len(vs) != 1 {
		t.Errorf("%s: [%s] %s: %d values %q, want one", unitPath, section, key, len(vs), vs)
		return ""
	}
	return vs[0]
}

// readEnvFile reads an EnvironmentFile: KEY=value lines and comments.
func readEnvFile(t *testing.T, path string) map[string]string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	env := map[string]string{}
	for n, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || line[0] == '#' {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok || strings.ContainsAny(v, `"'$\`) {
			t.Fatalf("%s:%d: %q: want KEY=value with no quotes, $ or \\", path, n+1, line)
		}
		if _, dup := env[k]; dup {
			t.Errorf("%s:%d: %s set twice", path, n+1, k)
		}
		env[k] = v
	}
	return env
}

// timeSpan parses a systemd time span of the forms the unit uses: a
// number of seconds, or a number with s, min or ms.
func timeSpan(s string) (time.Duration, error) {
	for _, u := range []struct {
		suffix string
		unit   time.Duration
	}{{"ms", time.Millisecond}, {"min", time.Minute}, {"s", time.Second}, {"", time.Second}} {
		if n, ok := strings.CutSuffix(s, u.suffix); ok {
			v, err := strconv.Atoi(n)
			if err != nil {
				return 0, fmt.Errorf("time span %q: %w", s, err)
			}
			return time.Duration(v) * u.unit, nil
		}
	}
	return 0, fmt.Errorf("time span %q", s)
}

// TestSystemdUnit checks the systemd unit of a host install: systemd
// follows the server's own notifications (Type=notify, NotifyAccess=all
// for an upgrade's successor), reload is SIGHUP to the main process, the
// pid file is the one the server writes, a crash leaves OpenVPN and
// HAProxy running for Restart=always (KillMode=process), the stop timeout
// covers the drain of the environment file, which loads with vpn.Loader
// and sets only variables that it reads. With systemd-analyze, the unit
// also verifies.
func TestSystemdUnit(t *testing.T) {
	u := readUnit(t, unitPath)
	want := map[string]string{
		"Type":         "notify",
		"NotifyAccess": "all",
		"ExecReload":   "/bin/kill -HUP $MAINPID",
		"KillMode":     "process",
		"Restart":      "always",
	}
	for _, k := range slices.Sorted(maps.Keys(want)) {
		if got := u.one(t, "Service", k); got != want[k] {
			t.Errorf("%s: %s=%s, want %s", unitPath, k, got, want[k])
		}
	}
	execStart := strings.Fields(u.one(t, "Service", "ExecStart"))
	if len(execStart) != 3 || filepath.Base(execStart[0]) != "open-balena-vpn" || !filepath.IsAbs(execStart[0]) || execStart[1] != "-pid-file" {
		t.Fatalf("%s: ExecStart=%q, want /…/open-balena-vpn -pid-file <PIDFile>", unitPath, execStart)
	}
	if pid := u.one(t, "Service", "PIDFile"); pid != execStart[2] {
		t.Errorf("%s: PIDFile=%s, but the server writes %s", unitPath, pid, execStart[2])
	}
	if n, err := strconv.Atoi(u.one(t, "Service", "LimitNOFILE")); err != nil || n < 65536 {
		t.Errorf("%s: LimitNOFILE=%d (%v), want a number of at least 65536", unitPath, n, err)
	}
	if _, ok := u["Service"]["RuntimeDirectory"]; ok {
		t.Errorf("%s: RuntimeDirectory= is emptied on a stop or a crash, and with it what a new process finds the running OpenVPN by", unitPath)
	}
	if got := u.one(t, "Install", "WantedBy"); got != "multi-user.target" {
		t.Errorf("%s: WantedBy=%s, want multi-user.target", unitPath, got)
	}

	if got := u.one(t, "Service", "EnvironmentFile"); got != "/etc/open-balena-vpn/"+filepath.Base(unitEnvPath) {
		t.Errorf("%s: EnvironmentFile=%s, want /etc/open-balena-vpn/%s (installed from %s)", unitPath, got, filepath.Base(unitEnvPath), unitEnvPath)
	}
	env := readEnvFile(t, unitEnvPath)
	known := map[string]bool{}
	for _, v := range vpn.Variables() {
		known[v] = true
	}
	for _, k := range slices.Sorted(maps.Keys(env)) {
		if !known[k] {
			t.Errorf("%s: %s is not a variable that vpn.Loader reads", unitEnvPath, k)
		}
	}
	for k, v := range requiredTestValues(t) {
		if _, ok := env[k]; !ok {
			t.Errorf("%s: the required %s is missing", unitEnvPath, k)
		}
		if strings.HasPrefix(env[k], "replace-with-") {
			env[k] = v // a placeholder for the operator's value
		}
	}
	cfg, err := loadConfig(t, env, 0)
	if err != nil {
		t.Fatalf("%s: does not load: %v", unitEnvPath, err)
	}

	stop, err := timeSpan(u.one(t, "Service", "TimeoutStopSec"))
	if err != nil {
		t.Errorf("%s: TimeoutStopSec: %v", unitPath, err)
	} else if stop < cfg.Drain.Timeout+drainMargin {
		t.Errorf("%s: TimeoutStopSec %v, want at least DEFAULT_SIGTERM_TIMEOUT %v + %v", unitPath, stop, cfg.Drain.Timeout, drainMargin)
	}
	start, err := timeSpan(u.one(t, "Service", "TimeoutStartSec"))
	if err != nil {
		t.Errorf("%s: TimeoutStartSec: %v", unitPath, err)
	} else if start <= upgradeTimeout {
		t.Errorf("%s: TimeoutStartSec %v, want more than the %v an upgrade's successor has to be ready", unitPath, start, upgradeTimeout)
	}

	verifyUnit(t, execStart[0])
}

// verifyUnit runs systemd-analyze verify on a copy of the unit whose
// ExecStart names an executable that exists (verify wants one), if
// systemd-analyze is there; any message it prints fails the test, since it
// reports unknown keys and bad values as warnings.
func verifyUnit(t *testing.T, bin string) {
	t.Helper()
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Log("systemd-analyze not found: the unit is not verified by systemd")
		return
	}
	data, err := os.ReadFile(unitPath)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	stub := filepath.Join(dir, "open-balena-vpn")
	writeFile(t, stub, "#!/bin/sh\n")
	if err := os.Chmod(stub, 0o755); err != nil {
		t.Fatal(err)
	}
	unit := filepath.Join(dir, filepath.Base(unitPath))
	writeFile(t, unit, strings.ReplaceAll(string(data), bin, stub))
	out, err := exec.Command(analyze, "verify", unit).CombinedOutput()
	if err != nil || len(out) > 0 {
		t.Errorf("systemd-analyze verify %s: %v\n%s", unitPath, err, out)
	}
}
