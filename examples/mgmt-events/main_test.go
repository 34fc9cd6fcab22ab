package main

import (
	"bytes"
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/obvpn/obvpn/openvpnmgmt/mgmttest"
	"github.com/obvpn/obvpn/vpn/vpntest/leaktest"
)

// TestEvents pushes a CLIENT:CONNECT block, a byte count, a log line and a
// state change from a fake OpenVPN, and checks what the example prints:
// each event on a line of its own, and never the device's password.
func TestEvents(t *testing.T) {
	leaktest.Check(t)
	server := mgmttest.NewServer(t)
	server.SetPassword("mgmt-pw")
	out := newOutput()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, []string{"-addr", server.Addr(), "-password", "mgmt-pw", "-release-hold", "-bytecount", "5"}, out, t.Output())
	}()

	err := server.Send(
		">CLIENT:CONNECT,5,1",
		">CLIENT:ENV,common_name=0123456789abcdef0123456789abcdef",
		">CLIENT:ENV,username=0123456789abcdef0123456789abcdef",
		">CLIENT:ENV,password=secret",
		">CLIENT:ENV,END",
		">BYTECOUNT_CLI:5,100,200",
		">LOG:1795580781,W,a warning",
		">STATE:1795580781,CONNECTED,SUCCESS,10.240.0.1,,,,",
		">SOMETHING:new",
	)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		`CLIENT CONNECT cid=5 kid=1 common_name="0123456789abcdef0123456789abcdef" username="0123456789abcdef0123456789abcdef"`,
		"BYTECOUNT_CLI cid=5 received=100 sent=200",
		"LOG level=W a warning",
		"STATE CONNECTED SUCCESS",
		"UNKNOWN SOMETHING:new",
	}
	out.waitFor(t, want[len(want)-1])
	cancel()
	if code := <-done; code != 0 {
		t.Errorf("exit status %d, want 0", code)
	}
	got := out.String()
	for _, w := range want {
		if !strings.Contains(got, w+"\n") {
			t.Errorf("output lacks the line %q", w)
		}
	}
	if strings.Contains(got, "secret") {
		t.Errorf("output shows the password:\n%s", got)
	}
	cmds := strings.Join(server.Commands(), "|")
	for _, w := range []string{"log on", "state on", "bytecount 5", "hold release"} {
		if !strings.Contains(cmds, w) {
			t.Errorf("commands %q lack %q", cmds, w)
		}
	}
}

// TestServerCloses ends the connection from the server's side: the example
// says so and exits 0.
func TestServerCloses(t *testing.T) {
	leaktest.Check(t)
	server := mgmttest.NewServer(t)
	out := newOutput()
	done := make(chan int, 1)
	go func() { done <- run(context.Background(), []string{"-addr", server.Addr()}, out, t.Output()) }()
	<-server.Connected()
	out.waitFor(t, "INFO:") // the banner: the client is attached
	server.Disconnect()
	select {
	case code := <-done:
		if code != 0 {
			t.Errorf("exit status %d, want 0", code)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the example did not exit when the server closed the connection")
	}
	if !strings.Contains(out.String(), "connection closed\n") {
		t.Errorf("output lacks %q:\n%s", "connection closed", out)
	}
}

func TestBadFlags(t *testing.T) {
	for _, args := range [][]string{{"-nope"}, {"extra"}} {
		if code := run(context.Background(), args, new(bytes.Buffer), new(bytes.Buffer)); code != 2 {
			t.Errorf("%q: exit status %d, want 2", args, code)
		}
	}
}

// output is an io.Writer that tests can wait on.
type output struct {
	mu      sync.Mutex
	b       bytes.Buffer
	changed chan struct{} // closed, and replaced, on every write
}

func newOutput() *output { return &output{changed: make(chan struct{})} }

func (o *output) Write(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	close(o.changed)
	o.changed = make(chan struct{})
	return o.b.Write(p)
}

func (o *output) String() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.b.String()
}

// waitFor waits, for at most 10 s, until the output contains want.
func (o *output) waitFor(t *testing.T, want string) {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		o.mu.Lock()
		got, changed := o.b.String(), o.changed
		o.mu.Unlock()
		if strings.Contains(got, want) {
			return
		}
		select {
		case <-changed:
		case <-timeout:
			t.Fatalf("output lacks %q after 10 s:\n%s", want, got)
		}
	}
}
