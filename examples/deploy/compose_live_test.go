//go:build linux

package deploy

import (
	"context"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/obvpn/obvpn/vpn/vpntest"
)

// TestComposeUp is make compose-test: podman-compose (1.0.3, Debian's)
// brings compose.yaml up as an operator would, with only the host's
// environment set (the required variables, the balena API's address and
// key), in a network namespace of the test's own with a fake balena API
// (balenatest) beside it. /ping answers on the published metrics port, the
// healthcheck passes, a real balenaOS-profile device connects through the
// published VPN port and is reached through the proxy; podman-compose stop,
// with its fixed 10 s, lets the drain finish (exit 0) and down removes the
// container; the test removes the network, which podman-compose 1.0.3
// leaves. Nothing is left behind, as in TestImageLive.
func TestComposeUp(t *testing.T) {
	vpntest.Require(t, "podman", "podman-compose", "nsenter", "openvpn", "ip", "iptables-save")
	conf := podmanConf(t)
	before := snapshotHost(t, conf)
	t.Cleanup(func() { checkNothingLeft(t, conf, before) })

	world := vpntest.NewNetns(t, "world")
	pm := &podman{ns: world, conf: conf}
	svc := composeService(t)
	if _, err := pm.output(context.Background(), "image", "exists", svc.Image); err != nil {
		requireMissing(t, "the image %s is not built (make image): %v", svc.Image, err)
	}
	w := newLiveWorld(t, world, 1)

	project := fmt.Sprintf("obvpn-compose-test-%d", os.Getpid())
	host := requiredTestValues(t)
	host["VPN_SERVICE_API_KEY"] = w.api.ServiceKey
	host["BALENA_API_INTERNAL_HOST"] = w.apiAddr
	host["VPN_INSTANCE_COUNT"] = "2"
	env := []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "CONTAINERS_CONF=" + conf}
	for _, k := range slices.Sorted(maps.Keys(host)) {
		env = append(env, k+"="+host[k])
	}
	compose := func(ctx context.Context, args ...string) (string, error) {
		argv := append([]string{"--net=/var/run/netns/" + world.Name, "podman-compose", "-p", project, "-f", composePath}, args...)
		cmd := exec.CommandContext(ctx, "nsenter", argv...)
		cmd.Env = env
		out, err := cmd.CombinedOutput()
		if err != nil {
			// podman-compose prints the podman commands it runs, the
			// server's key among them: say only how it ended.
			return "", fmt.Errorf("podman-compose %s: %w (last line: %s)", args[0], err, lastLine(redactKeys(string(out), host)))
		}
		return string(out), nil
	}

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	network := project + "_default"
	t.Cleanup(func() {
		// Whatever happened: the stack down, and the network that
		// podman-compose 1.0.3 leaves.
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if _, err := compose(ctx, "down"); err != nil {
			t.Error(err)
		}
		if out, err := pm.output(ctx, "network", "rm", "--force", network); err != nil && !strings.Contains(err.Error(), "network not found") {
			t.Errorf("podman network rm %s: %v: %s", network, err, out)
		}
	})
	if _, err := compose(ctx, "up", "-d"); err != nil {
		t.Fatal(err)
	}
	out, err := pm.output(ctx, "ps", "--all", "--filter", "label=io.podman.compose.project="+project, "--format", "{{.Names}}")
	if err != nil {
		t.Fatal(err)
	}
	names := strings.Fields(out)
	if len(names) != 1 {
		t.Fatalf("podman-compose up made containers %q, want one", names)
	}
	name := names[0]
	logs, err := vpntest.Launch(pm.command(context.Background(), "logs", "--follow", name))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		logs.Stop()
		if t.Failed() {
			t.Logf("container log:\n%s", strings.Join(logs.Lines(), "\n"))
		}
	})
	if _, err := logs.WaitFor(ctx, "VPN server running"); err != nil {
		t.Fatal(err)
	}

	// /ping on the published metrics port (127.0.0.1 of the host).
	hc := &http.Client{Transport: &http.Transport{DialContext: world.Dial}, Timeout: 10 * time.Second}
	metrics := "http://" + net.JoinHostPort("127.0.0.1", strconv.Itoa(publishedPort(t, svc, 8080)))
	resp, err := hc.Get(metrics + "/ping")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("GET /ping: %s %q, want 200", resp.Status, body)
	}
	if out, err := pm.output(ctx, "healthcheck", "run", name); err != nil {
		t.Errorf("podman healthcheck run (compose's healthcheck): %v: %s", err, out)
	}

	w.connect(ctx, t, publishedPort(t, svc, 443))
	w.throughProxy(ctx, t, net.JoinHostPort(w.devices[0].ns.WorldAddr.String(), strconv.Itoa(publishedPort(t, svc, 3128))))

	// podman-compose stop gives podman stop -t 10: the drain ends in it.
	start := time.Now()
	if _, err := compose(ctx, "stop"); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	code, err := pm.output(ctx, "inspect", "--format", "{{.State.ExitCode}}", name)
	if err != nil {
		t.Fatal(err)
	}
	if strings.TrimSpace(code) != "0" {
		t.Errorf("exit status %s after podman-compose stop, want 0", strings.TrimSpace(code))
	}
	if took >= composeStopTimeout {
		t.Errorf("podman-compose stop took %v: podman's SIGKILL after %v, not the drain, ended the server", took, composeStopTimeout)
	}
	if _, err := logs.WaitFor(ctx, "drained"); err != nil {
		t.Errorf("the log has no end of the drain: %v", err)
	}
	w.offline(t)
	t.Logf("podman-compose stop: %v", took.Round(time.Millisecond))
	if _, err := compose(ctx, "down"); err != nil {
		t.Fatal(err)
	}
	if out, _ := pm.output(ctx, "ps", "--all", "--filter", "label=io.podman.compose.project="+project, "--format", "{{.Names}}"); strings.TrimSpace(out) != "" {
		t.Errorf("podman-compose down left containers %q", strings.Fields(out))
	}
}

// redactKeys replaces every value of host that is long enough to be a
// key or certificate in s.
func redactKeys(s string, host map[string]string) string {
	for k, v := range host {
		if len(v) >= 8 && (strings.Contains(k, "KEY") || strings.Contains(k, "CRT")) {
			s = strings.ReplaceAll(s, v, "…")
		}
	}
	return s
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}
