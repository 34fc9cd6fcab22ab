package vpn_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
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
	ti := startTestInstance(t, nil)
	cfg, world, pki, ctx, done, ready, downs, wait := ti.cfg, ti.world, ti.pki, ti.ctx, ti.done, ti.ready, ti.downs, ti.wait
	cancel := ti.cancel
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

// testInstance is one instance's real openvpn in a world namespace, whose
// handler answers "good" passwords.
type testInstance struct {
	cfg          *vpn.Config
	world        *vpntest.Netns
	pki          *vpntest.PKI
	ctx          context.Context
	cancel       context.CancelFunc
	done         chan error // Run's result
	ready, downs chan int
	events       chan openvpnmgmt.Event // every event, if there is room
	wait         func(ch <-chan int, what string)
}

// dialFunc dials the management interface.
type dialFunc = func(ctx context.Context, network, addr string) (net.Conn, error)

// startTestInstance starts the instance; wrap, if not nil, wraps the
// world's Dial for the management connection.
func startTestInstance(t *testing.T, wrap func(dialFunc) dialFunc) *testInstance {
	t.Helper()
	vpntest.Require(t, "openvpn", "ip")
	ti := &testInstance{world: vpntest.NewNetns(t, "world"), pki: vpntest.NewPKI(t),
		done: make(chan error, 1), ready: make(chan int, 10), downs: make(chan int, 10), events: make(chan openvpnmgmt.Event, 1000)}
	var err error
	ti.cfg, err = vpn.Loader{Env: map[string]string{
		"VPN_BASE_SUBNET":             "10.240.0.0/16",
		"VPN_INSTANCE_SUBNET_BITMASK": "24",
		"VPN_INSTANCE_COUNT":          "1",
		"VPN_RUN_DIR":                 t.TempDir(),
		"BALENA_API_HOST":             "api.invalid",
		"VPN_SERVICE_API_KEY":         "unused",
		"VPN_OPENVPN_CA_CRT":          string(ti.pki.CACert),
		"VPN_OPENVPN_SERVER_CRT":      string(ti.pki.ServerCert),
		"VPN_OPENVPN_SERVER_KEY":      string(ti.pki.ServerKey),
		"VPN_BYTECOUNT_INTERVAL":      "1",
	}}.Config()
	if err != nil {
		t.Fatal(err)
	}
	dial := dialFunc(ti.world.Dial)
	if wrap != nil {
		dial = wrap(dial)
	}
	inst := &vpn.Instance{
		Config:  ti.cfg,
		ID:      1,
		Command: ti.world.CommandContext,
		Dial:    dial,
		OnReady: func(id int) { ti.ready <- id },
		OnDown:  func(id int) { ti.downs <- id },
		Handler: func(ctx context.Context, c *openvpnmgmt.Client, ev openvpnmgmt.Event) {
			select {
			case ti.events <- ev:
			default:
			}
			if ce, ok := ev.(*openvpnmgmt.ClientEvent); ok && (ce.Kind == openvpnmgmt.ClientConnect || ce.Kind == openvpnmgmt.ClientReauth) {
				if ce.Env.Value("password") == "good" {
					_ = c.ClientAuthNT(ctx, ce.CID, ce.KID)
				} else {
					_ = c.ClientDeny(ctx, ce.CID, ce.KID, "bad key", "")
				}
			}
		},
	}
	ti.ctx, ti.cancel = context.WithCancel(context.Background())
	go func() { ti.done <- inst.Run(ti.ctx) }()
	t.Cleanup(func() {
		ti.cancel()
		<-ti.done
	})
	ti.wait = func(ch <-chan int, what string) {
		t.Helper()
		select {
		case <-ch:
		case err := <-ti.done:
			t.Fatalf("Run returned %v while waiting for %s", err, what)
		case <-time.After(30 * time.Second):
			t.Fatalf("no %s within 30 s", what)
		}
	}
	return ti
}

// TestInstanceReconnectsManagement: when the management connection drops
// and openvpn lives on, the instance connects again (no restart, no down),
// enables the byte counts again, and answers the next device.
func TestInstanceReconnectsManagement(t *testing.T) {
	conns := make(chan net.Conn, 10)
	ti := startTestInstance(t, func(dial dialFunc) dialFunc {
		return func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := dial(ctx, network, addr)
			if err == nil {
				conns <- c
			}
			return c, err
		}
	})
	ti.wait(ti.ready, "ready")
	first := <-conns
	pidBefore, _ := os.ReadFile(ti.cfg.Paths(1).PID)

	first.Close() // the management connection drops
	select {
	case <-conns:
	case <-time.After(30 * time.Second):
		t.Fatal("no new management connection within 30 s")
	}
	select {
	case id := <-ti.downs:
		t.Fatalf("instance %d went down for a management reconnect", id)
	default:
	}
	if pid, _ := os.ReadFile(ti.cfg.Paths(1).PID); string(pid) != string(pidBefore) {
		t.Errorf("openvpn restarted: pid %s, was %s", pid, pidBefore)
	}

	// A device is answered through the new connection, and its byte
	// counts arrive.
	in, _ := ti.cfg.Plan.Instance(1)
	client := vpntest.StartClient(t, vpntest.ClientOptions{Netns: ti.world, Remote: fmt.Sprintf("127.0.0.1:%d", in.Port),
		CA: ti.pki.CAFile, Username: "0123456789abcdef0123456789abcdef", Password: "good"})
	wctx, wcancel := context.WithTimeout(ti.ctx, 60*time.Second)
	defer wcancel()
	if _, err := client.WaitFor(wctx, "Initialization Sequence Completed"); err != nil {
		t.Fatal(err)
	}
	for {
		select {
		case ev := <-ti.events:
			if _, ok := ev.(*openvpnmgmt.ByteCountClientEvent); ok {
				return
			}
		case <-wctx.Done():
			t.Fatal("no BYTECOUNT_CLI after the reconnect")
		}
	}
}

// errorsHandler is a slog.Handler that sends the "err" of every error
// record to a channel, for tests that wait for a logged error.
type errorsHandler chan string

func (h errorsHandler) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelError }
func (h errorsHandler) WithAttrs([]slog.Attr) slog.Handler           { return h }
func (h errorsHandler) WithGroup(string) slog.Handler                { return h }
func (h errorsHandler) Handle(_ context.Context, r slog.Record) error {
	r.Attrs(func(a slog.Attr) bool {
		if a.Key == "err" {
			select {
			case h <- a.Value.String():
			default:
			}
		}
		return true
	})
	return nil
}

// TestInstanceSaysWhyOpenVPNExits: openvpn that exits at start on a fatal
// error (DH parameters OpenSSL refuses, which the Loader would have
// caught) is reported at error level with its own last lines, not only in
// the debug log.
func TestInstanceSaysWhyOpenVPNExits(t *testing.T) {
	vpntest.Require(t, "openvpn", "ip")
	world, pki := vpntest.NewNetns(t, "world"), vpntest.NewPKI(t)
	cfg, err := vpn.Loader{Env: map[string]string{
		"VPN_BASE_SUBNET": "10.240.0.0/16", "VPN_INSTANCE_SUBNET_BITMASK": "24", "VPN_INSTANCE_COUNT": "1",
		"VPN_RUN_DIR": t.TempDir(), "BALENA_API_HOST": "api.invalid", "VPN_SERVICE_API_KEY": "unused",
		"VPN_OPENVPN_CA_CRT": string(pki.CACert), "VPN_OPENVPN_SERVER_CRT": string(pki.ServerCert),
		"VPN_OPENVPN_SERVER_KEY": string(pki.ServerKey),
	}}.Config()
	if err != nil {
		t.Fatal(err)
	}
	// openssl dhparam 1024: "dh key too small" at OpenSSL's security level 2.
	cfg.OpenVPN.DH = []byte("-----BEGIN DH PARAMETERS-----\n" +
		"MIGHAoGBAK3SXpqdAkl+2FRsW3ukSJoQiCU2ttWqrjbT2IGKJ3W1HGULXhqG5Dr+\n" +
		"Nvq7mb6o56wANn7lBgShcBz42vfd/DMmFGIHgh1cFV3+A2GdIWm4neEQSb2zd/pQ\n" +
		"mkApuMA9iCok3+kQcPaLrUQaui6QlmJvGSkO0XDksclUBED4h/+XAgEC\n" +
		"-----END DH PARAMETERS-----\n")
	errs := make(errorsHandler, 10)
	inst := &vpn.Instance{Config: cfg, ID: 1, Command: world.CommandContext, Dial: world.Dial, Logger: slog.New(errs),
		Handler: func(context.Context, *openvpnmgmt.Client, openvpnmgmt.Event) {}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- inst.Run(ctx) }()
	defer func() { cancel(); <-done }()
	select {
	case err := <-errs:
		if !strings.Contains(err, "openvpn exited: exit status 1") || !strings.Contains(err, "dh key too small") ||
			!strings.Contains(err, "Exiting due to fatal error") {
			t.Errorf("the error does not say why: %s", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("no error logged within 30 s")
	}
}
