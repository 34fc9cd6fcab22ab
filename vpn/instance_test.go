package vpn_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/obvpn/obvpn/openvpnmgmt"
	"github.com/obvpn/obvpn/vpn"
	"github.com/obvpn/obvpn/vpn/vpntest"
)

// TestInstanceSupervisesOpenVPN runs an instance's real openvpn in a world
// namespace: it writes its files with mode 0600, answers devices through
// the handler, and after a SIGKILL starts openvpn again, to which the
// device reconnects; cancelling the context stops it.
func TestInstanceSupervisesOpenVPN(t *testing.T) {
	vpntest.Require(t, "openvpn", "ip")
	world := vpntest.NewNetns(t, "world")
	pki := vpntest.NewPKI(t)
	run := t.TempDir()
	cfg, err := vpn.Loader{Env: map[string]string{
		"VPN_BASE_SUBNET":             "10.240.0.0/16",
		"VPN_INSTANCE_SUBNET_BITMASK": "24",
		"VPN_INSTANCE_COUNT":          "1",
		"VPN_RUN_DIR":                 run,
		"BALENA_API_HOST":             "api.invalid",
		"VPN_SERVICE_API_KEY":         "unused",
		"VPN_OPENVPN_CA_CRT":          string(pki.CACert),
		"VPN_OPENVPN_SERVER_CRT":      string(pki.ServerCert),
		"VPN_OPENVPN_SERVER_KEY":      string(pki.ServerKey),
		"VPN_BYTECOUNT_INTERVAL":      "1",
	}}.Config()
	if err != nil {
		t.Fatal(err)
	}
	ready := make(chan int, 10)
	downs := make(chan int, 10)
	inst := &vpn.Instance{
		Config:  cfg,
		ID:      1,
		Command: world.CommandContext,
		Dial:    world.Dial,
		OnReady: func(id int) { ready <- id },
		OnDown:  func(id int) { downs <- id },
		Handler: func(ctx context.Context, c *openvpnmgmt.Client, ev openvpnmgmt.Event) {
			if ce, ok := ev.(*openvpnmgmt.ClientEvent); ok && (ce.Kind == openvpnmgmt.ClientConnect || ce.Kind == openvpnmgmt.ClientReauth) {
				if ce.Env.Value("password") == "good" {
					_ = c.ClientAuthNT(ctx, ce.CID, ce.KID)
				} else {
					_ = c.ClientDeny(ctx, ce.CID, ce.KID, "bad key", "")
				}
			}
		},
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- inst.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	wait := func(ch <-chan int, what string) {
		t.Helper()
		select {
		case <-ch:
		case err := <-done:
			t.Fatalf("Run returned %v while waiting for %s", err, what)
		case <-time.After(30 * time.Second):
			t.Fatalf("no %s within 30 s", what)
		}
	}
	wait(ready, "ready")

	paths := cfg.Paths(1)
	for _, f := range []string{paths.Config, paths.CA, paths.Cert, paths.Key} {
		fi, err := os.Stat(f)
		if err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: %v, mode %v", f, err, fi.Mode().Perm())
		}
	}

	in, _ := cfg.Plan.Instance(1)
	client := vpntest.StartClient(t, vpntest.ClientOptions{Netns: world, Remote: fmt.Sprintf("127.0.0.1:%d", in.Port),
		CA: pki.CAFile, Username: "0123456789abcdef0123456789abcdef", Password: "good"})
	wctx, wcancel := context.WithTimeout(ctx, 60*time.Second)
	defer wcancel()
	if _, err := client.WaitFor(wctx, "Initialization Sequence Completed"); err != nil {
		t.Fatal(err)
	}

	// SIGKILL the openvpn process: the instance starts it again and the
	// device comes back.
	b, err := os.ReadFile(paths.PID)
	if err != nil {
		t.Fatal(err)
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	before := len(client.Lines())
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	wait(downs, "down")
	wait(ready, "ready again")
	if _, err := client.WaitFrom(wctx, before, "Initialization Sequence Completed"); err != nil {
		t.Fatalf("the device did not come back: %v", err)
	}

	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("Run = %v", err)
	}
	done <- nil // for the cleanup
	b, _ = os.ReadFile(paths.PID)
	pid, _ = strconv.Atoi(strings.TrimSpace(string(b)))
	if pid > 0 && syscall.Kill(pid, 0) == nil {
		if st, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); !strings.Contains(string(st), ") Z") {
			t.Errorf("openvpn %d still runs after Run returned", pid)
		}
	}
}
