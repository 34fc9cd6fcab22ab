package mgmttest_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/obvpn/obvpn/openvpnmgmt"
	"github.com/obvpn/obvpn/openvpnmgmt/mgmttest"
)

func TestWaitCommand(t *testing.T) {
	s := mgmttest.NewServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := openvpnmgmt.Dial(ctx, "tcp", s.Addr(), openvpnmgmt.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })

	// A command that comes after the call.
	waited := make(chan error, 1)
	go func() { waited <- s.WaitCommand(ctx, "client-deny 7 1") }()
	go func() {
		c.ClientAuthNT(ctx, 6, 0)
		c.ClientDeny(ctx, 7, 1, "bad key", "")
	}()
	if err := <-waited; err != nil {
		t.Fatalf("waiting for a later command: %v", err)
	}
	// One that came before; a client-auth's config lines count too.
	if err := c.ClientAuth(ctx, 8, 0, []string{"push \"route 10.0.0.0 255.0.0.0\""}); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"client-auth-nt 6 0", "route 10.0.0.0"} {
		if err := s.WaitCommand(ctx, want); err != nil {
			t.Fatalf("waiting for %q, which came before: %v", want, err)
		}
	}

	// One that never comes: ctx ends the wait, and then Close does.
	short, cancelShort := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancelShort()
	if err := s.WaitCommand(short, "kill"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %v, want %v", err, context.DeadlineExceeded)
	}
	go func() { waited <- s.WaitCommand(ctx, "kill") }()
	s.Close()
	if err := <-waited; !errors.Is(err, mgmttest.ErrServerClosed) {
		t.Fatalf("got %v, want %v", err, mgmttest.ErrServerClosed)
	}
}
