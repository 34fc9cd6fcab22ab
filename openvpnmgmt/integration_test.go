package openvpnmgmt_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/matryer/is"

	"github.com/obvpn/obvpn/openvpnmgmt"
	"github.com/obvpn/obvpn/vpn/vpntest"
)

const (
	goodUUID = "0123456789abcdef0123456789abcdef"
	badUUID  = "fedcba9876543210fedcba9876543210"
	killUUID = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
)

// TestRealOpenVPN drives a real OpenVPN 2.6 server with
// --management-client-auth through the client: devices are accepted and
// denied, a REAUTH is answered, ESTABLISHED, DISCONNECT and BYTECOUNT_CLI
// arrive with their data, client-kill and kill end sessions, and status 2
// and 3 parse.
func TestRealOpenVPN(t *testing.T) {
	is := is.New(t)
	srv := vpntest.StartServer(t, vpntest.ServerOptions{ClientAuth: true})
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	c, err := openvpnmgmt.Dial(ctx, "unix", srv.Management, openvpnmgmt.Options{})
	is.NoErr(err)
	defer c.Close()
	is.NoErr(c.ByteCount(ctx, 1))
	is.NoErr(c.HoldRelease(ctx))
	_, err = srv.WaitFor(ctx, "Initialization Sequence Completed")
	is.NoErr(err)

	// The event loop answers every CONNECT and REAUTH, and records what it
	// sees for the test.
	var mu sync.Mutex
	seen := map[string][]*openvpnmgmt.ClientEvent{} // "KIND uuid"
	cids := map[string]uint64{}
	bytecount := make(chan uint64, 1) // the first BYTECOUNT_CLI's client
	got := make(chan string, 100)
	loopDone := make(chan struct{})
	defer func() { c.Close(); <-loopDone }() // no answer after the test
	go func() {
		defer close(loopDone)
		for ev := range c.Events() {
			switch ev := ev.(type) {
			case *openvpnmgmt.ClientEvent:
				user := ev.Env.Value("username")
				if user == "" {
					user = ev.Env.Value("common_name")
				}
				mu.Lock()
				seen[string(ev.Kind)+" "+user] = append(seen[string(ev.Kind)+" "+user], ev)
				cids[user] = ev.CID
				mu.Unlock()
				switch ev.Kind {
				case openvpnmgmt.ClientConnect, openvpnmgmt.ClientReauth:
					var err error
					if ev.Env.Value("password") == "good-key" {
						err = c.ClientAuthNT(ctx, ev.CID, ev.KID)
					} else {
						err = c.ClientDeny(ctx, ev.CID, ev.KID, "bad key", "denied by the test")
					}
					if err != nil && !errors.Is(err, openvpnmgmt.ErrClosed) {
						t.Errorf("answering %s: %v", ev.Kind, err)
					}
				}
				select {
				case got <- string(ev.Kind) + " " + user:
				case <-ctx.Done():
				}
			case *openvpnmgmt.ByteCountClientEvent:
				select {
				case bytecount <- ev.CID:
				default:
				}
			}
		}
	}()
	waitEvent := func(want string) {
		t.Helper()
		for {
			select {
			case e := <-got:
				if e == want {
					return
				}
			case <-ctx.Done():
				t.Fatalf("no %q event", want)
			}
		}
	}
	remote := fmt.Sprintf("127.0.0.1:%d", srv.Port)
	good := vpntest.StartClient(t, vpntest.ClientOptions{Netns: srv.Netns, Remote: remote, CA: srv.PKI.CAFile,
		Username: goodUUID, Password: "good-key", Extra: []string{"reneg-sec 3"}})
	bad := vpntest.StartClient(t, vpntest.ClientOptions{Netns: srv.Netns, Remote: remote, CA: srv.PKI.CAFile,
		Username: badUUID, Password: "wrong-key"})

	_, err = good.WaitFor(ctx, "Initialization Sequence Completed")
	is.NoErr(err)
	line, err := bad.WaitFor(ctx, "AUTH_FAILED")
	is.NoErr(err)
	is.True(strings.Contains(line, "denied by the test")) // the client reason reaches the client
	waitEvent("ESTABLISHED " + goodUUID)
	waitEvent("REAUTH " + goodUUID) // reneg-sec 3 on the client
	// Still up after the renegotiation: the client's new key is
	// negotiated (a Control Channel line after its soft reset) in the
	// same session, with no restart.
	_, err = good.WaitFor(ctx, "TLS: soft reset")
	is.NoErr(err)
	from := slices.IndexFunc(good.Lines(), func(l string) bool { return strings.Contains(l, "TLS: soft reset") })
	_, err = good.WaitFrom(ctx, from, "Control Channel:")
	is.NoErr(err)
	for _, l := range good.Lines() {
		if strings.Contains(l, "SIGUSR1") || strings.Contains(l, "AUTH_FAILED") {
			t.Errorf("the good client restarted: %s", l)
		}
	}

	mu.Lock()
	est := seen["ESTABLISHED "+goodUUID][0]
	goodCID := cids[goodUUID]
	mu.Unlock()
	is.Equal(est.Env.Value("common_name"), goodUUID)
	is.True(est.Env.Value("ifconfig_pool_remote_ip") != "")

	// BYTECOUNT_CLI arrives every second for the connected client.
	select {
	case <-bytecount:
	case <-ctx.Done():
		t.Fatal("no BYTECOUNT_CLI event")
	}

	// status 2 and 3 parse and hold the client.
	for _, v := range []int{2, 3} {
		st, err := c.Status(ctx, v)
		is.NoErr(err)
		is.Equal(st.Version, v)
		found := false
		for _, r := range st.Routes {
			found = found || r.CommonName == goodUUID && r.Addr.IsValid()
		}
		is.True(found)
	}
	pid, err := c.PID(ctx)
	is.NoErr(err)
	is.True(pid > 0)
	ver, err := c.Version(ctx)
	is.NoErr(err)
	is.True(strings.Contains(strings.Join(ver, "\n"), "OpenVPN 2."))

	// client-kill ends one session: DISCONNECT with its figures.
	is.NoErr(c.ClientKill(ctx, goodCID, openvpnmgmt.KillHalt))
	waitEvent("DISCONNECT " + goodUUID)
	mu.Lock()
	dis := seen["DISCONNECT "+goodUUID][0]
	mu.Unlock()
	for _, k := range []string{"common_name", "bytes_received", "bytes_sent", "time_duration"} {
		if _, ok := dis.Env.Get(k); !ok {
			t.Errorf("DISCONNECT lacks %s: %v", k, dis.Env)
		}
	}
	select {
	case <-good.Exited(): // HALT ends the client
	case <-ctx.Done():
		t.Fatal("the halted client did not exit")
	}

	// kill <cn> ends every session of a common name.
	vpntest.StartClient(t, vpntest.ClientOptions{Netns: srv.Netns, Remote: remote, CA: srv.PKI.CAFile,
		Username: killUUID, Password: "good-key", Extra: []string{"connect-retry-max 1"}})
	waitEvent("ESTABLISHED " + killUUID)
	is.NoErr(c.Kill(ctx, killUUID))
	waitEvent("DISCONNECT " + killUUID)
	err = c.Kill(ctx, "nobody-by-that-name")
	var se *openvpnmgmt.ServerError
	is.True(errors.As(err, &se))
}
