package haproxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/matryer/is"
)

// requireCommand returns the path of a command the test needs; it skips the
// test when the command is missing, or fails it under OBVPN_E2E=1.
func requireCommand(t *testing.T, name string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err == nil {
		return path
	}
	if os.Getenv("OBVPN_E2E") == "1" {
		t.Fatalf("OBVPN_E2E=1 but %s is missing: %v", name, err)
	}
	t.Skipf("%s is not installed (set OBVPN_E2E=1 to make this a failure)", name)
	return ""
}

// freePort returns a loopback TCP port that was free a moment ago.
// testConfig is HAProxy in front of two instances on ports 10001 and
// 10002 (see instanceAddr), on free loopback ports, its socket in dir.
func testConfig(t *testing.T, dir string) (Config, Site) {
	t.Helper()
	return Config{Port: freePort(t), Socket: filepath.Join(dir, "admin.sock"), MonitorAddr: fmt.Sprintf("127.0.0.1:%d", freePort(t))},
		Site{Instances: 2, Port: 10000, PIDFile: filepath.Join(dir, "haproxy.pid")}
}

// instanceAddr is where testConfig's instance id listens.
func instanceAddr(id int) netip.AddrPort {
	return netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(10000+id))
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// startHAProxy runs haproxy on cfg in the foreground until the test ends,
// and returns once its worker runs.
func startHAProxy(t *testing.T, bin, cfg string) { startHAProxyStoppable(t, bin, cfg) }

// startHAProxyStoppable is startHAProxy that returns a func that stops
// haproxy before the test ends (and waits for it).
func startHAProxyStoppable(t *testing.T, bin, cfg string) (stop func()) {
	t.Helper()
	cmd := exec.Command(bin, "-W", "-db", "-f", cfg)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout = cmd.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	var once sync.Once
	stop = func() {
		once.Do(func() {
			_ = cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-exited:
			case <-time.After(5 * time.Second):
				_ = cmd.Process.Kill()
				<-exited
			}
		})
	}
	t.Cleanup(stop)
	ready := make(chan struct{})
	var log strings.Builder
	go func() {
		defer close(exited)
		sc := bufio.NewScanner(stderr)
		once := false
		for sc.Scan() {
			log.WriteString(sc.Text() + "\n")
			if !once && strings.Contains(sc.Text(), "New worker") {
				once = true
				close(ready)
			}
		}
		_ = cmd.Wait()
	}()
	select {
	case <-ready:
	case <-exited:
		t.Fatalf("haproxy exited:\n%s", log.String())
	case <-time.After(10 * time.Second):
		t.Fatal("haproxy did not start its worker within 10 s")
	}
	return stop
}

func TestHAProxyRuntime(t *testing.T) {
	bin := requireCommand(t, "haproxy")
	is := is.New(t)
	dir := t.TempDir()
	monitor := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	c, site := testConfig(t, dir)
	c.MonitorAddr = monitor
	cfg := filepath.Join(dir, "cfg")
	is.NoErr(os.WriteFile(cfg, []byte(c.Render(site)), 0o600))
	out, err := exec.Command(bin, "-c", "-f", cfg).CombinedOutput()
	is.NoErr(err) // the configuration is valid
	t.Logf("haproxy -c: %s", strings.TrimSpace(string(out)))
	startHAProxy(t, bin, cfg)

	ping := func() int {
		resp, err := http.Get("http://" + monitor + "/ping")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	h := &Runtime{Socket: c.Socket}
	ctx := context.Background()

	servers, err := h.ServersState(ctx, Backend)
	is.NoErr(err)
	is.Equal(len(servers), 2)
	is.Equal(servers[0].Name, "vpn1")
	is.True(!servers[0].Up && servers[0].Maint) // disabled until registered
	is.Equal(ping(), 503)                       // no server up

	is.NoErr(h.SetServerAddr(ctx, ServerName(1), instanceAddr(1)))
	is.NoErr(h.SetServerState(ctx, ServerName(1), Ready))
	servers, err = h.ServersState(ctx, Backend)
	is.NoErr(err)
	is.Equal(servers[0].Addr.String(), "127.0.0.1:10001")
	is.True(servers[0].Up)
	is.Equal(ping(), 200)

	is.NoErr(h.SetServerState(ctx, ServerName(1), Drain))
	servers, _ = h.ServersState(ctx, Backend)
	is.True(servers[0].Draining && !servers[0].Up)
	is.Equal(ping(), 503)

	is.NoErr(h.SetServerState(ctx, ServerName(1), Maint))
	servers, _ = h.ServersState(ctx, Backend)
	is.True(servers[0].Maint && !servers[0].Up)

	err = h.SetServerState(ctx, ServerName(9), Ready)
	is.True(errors.Is(err, ErrRefused))
	is.True(strings.Contains(err.Error(), "No such server."))
	err = h.SetServerAddr(ctx, "nope/vpn1", netip.MustParseAddrPort("127.0.0.1:1"))
	is.True(errors.Is(err, ErrRefused))
	_, err = h.ServersState(ctx, "nope")
	is.True(errors.Is(err, ErrRefused))
	_, err = h.Command(ctx, "show info; shutdown frontend vpn")
	is.True(err != nil) // no command smuggling
}

func TestHAProxyRuntimeNoSocket(t *testing.T) {
	h := &Runtime{Socket: filepath.Join(t.TempDir(), "none.sock")}
	if _, err := h.Command(context.Background(), "show info"); err == nil {
		t.Fatal("no error without a socket")
	}
}

func TestParseServersState(t *testing.T) {
	is := is.New(t)
	// An answer with the columns in another order and an extra one, as a
	// later HAProxy might give.
	out := "1\n# srv_name be_name srv_addr srv_port srv_op_state srv_admin_state extra\n" +
		"vpn1 vpn-workers 127.0.0.1 10001 2 4 x\nvpn2 vpn-workers 127.0.0.1 10000 0 5 x\n"
	s, err := parseServersState(out)
	is.NoErr(err)
	is.Equal(len(s), 2)
	is.True(s[0].Up)
	is.True(!s[1].Up && s[1].Maint)
	_, err = parseServersState("1\n# srv_name srv_addr srv_port srv_op_state srv_admin_state\nvpn1 notanip 1 2 0\n")
	is.True(err != nil)
	_, err = parseServersState("Can't find backend.")
	is.True(errors.Is(err, ErrRefused))
}

// FuzzParseServersState: whatever HAProxy's socket answers, the parser
// returns servers or an error, never panics, and a server it returns has
// the state bits it was given.
func FuzzParseServersState(f *testing.F) {
	f.Add("1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_port\n3 vpn-workers 1 vpn1 127.0.0.1 2 0 10001\n")
	f.Add("1\n# be_name srv_name srv_addr srv_op_state srv_admin_state srv_port\nvpn-workers vpn1 127.0.0.1 2 8 x\n")
	f.Add("No such backend.\n")
	f.Add("1\n3 vpn-workers 1 vpn1\n")
	f.Fuzz(func(t *testing.T, out string) {
		servers, err := parseServersState(out)
		if err != nil {
			return
		}
		for _, s := range servers {
			if s.Up && (s.Maint || s.Draining) {
				t.Fatalf("%+v: up while in maintenance or draining", s)
			}
		}
	})
}
