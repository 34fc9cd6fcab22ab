package openvpnmgmt_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/matryer/is"
	"golang.org/x/sys/unix"

	"github.com/obvpn/obvpn/openvpnmgmt"
	"github.com/obvpn/obvpn/openvpnmgmt/mgmttest"
	"github.com/obvpn/obvpn/vpn/vpntest/leaktest"
)

func dial(t *testing.T, s *mgmttest.Server, opts openvpnmgmt.Options) *openvpnmgmt.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := openvpnmgmt.Dial(ctx, "tcp", s.Addr(), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// next returns the next event that is not the connect banner.
func next(t *testing.T, c *openvpnmgmt.Client) openvpnmgmt.Event {
	t.Helper()
	for {
		select {
		case ev, ok := <-c.Events():
			if !ok {
				t.Fatalf("events closed: %v", c.Err())
			}
			if info, ok := ev.(*openvpnmgmt.InfoEvent); ok && strings.HasPrefix(info.Message, "OpenVPN Management Interface") {
				continue
			}
			return ev
		case <-time.After(5 * time.Second):
			t.Fatal("no event within 5 s")
		}
	}
}

func TestEvents(t *testing.T) {
	is := is.New(t)
	s := mgmttest.NewServer(t)
	c := dial(t, s, openvpnmgmt.Options{})
	is.NoErr(s.Send(
		">CLIENT:CONNECT,5,1",
		">CLIENT:ENV,untrusted_ip=192.0.2.9",
		">CLIENT:ENV,username=0123456789abcdef0123456789abcdef",
		">CLIENT:ENV,password=k=e,y",
		">CLIENT:ENV,END",
		">CLIENT:ADDRESS,5,10.240.0.3,1",
		">CLIENT:ESTABLISHED,5",
		">CLIENT:ENV,common_name=0123456789abcdef0123456789abcdef",
		">CLIENT:ENV,END",
		">BYTECOUNT_CLI:5,100,200",
		">BYTECOUNT:1,2",
		">LOG:1795580781,W,warning, with a comma",
		">STATE:1795580781,CONNECTED,SUCCESS,10.8.0.2,192.0.2.1,1194,,",
		">HOLD:Waiting for hold release:0",
		">FATAL:cannot open tun",
		">ECHO:1795580781,hello",
		">PASSWORD:Need 'Auth' username/password",
		">NEED-OK:Need 'token-insertion-request' confirmation MSG:Please insert",
		">NEED-STR:Need 'name' input MSG:Please specify",
		">INFOMSG:WEB_AUTH::https://example.com",
		">UPDOWN:UP",
		">UPDOWN:ENV,dev=tun0",
		">UPDOWN:ENV,END",
		">NOTIFY:info,remote-exit,EXIT",
		">CLIENT:REAUTH,5,2",
		">CLIENT:ENV,END",
		">CLIENT:DISCONNECT,5",
		">CLIENT:ENV,bytes_received=100",
		">CLIENT:ENV,bytes_sent=200",
		">CLIENT:ENV,time_duration=3",
		">CLIENT:ENV,END",
		">CLIENT:CR_RESPONSE,5,2,cmVzcG9uc2U=",
		">CLIENT:ENV,END",
		">SOMETHING-NEW:payload",
		">LOG:garbage",
	))
	ev := next(t, c).(*openvpnmgmt.ClientEvent)
	is.Equal(ev.Kind, openvpnmgmt.ClientConnect)
	is.Equal(ev.CID, uint64(5))
	is.Equal(ev.KID, uint64(1))
	is.Equal(ev.Env.Value("password"), "k=e,y") // split at the first "=" only
	is.Equal(len(ev.Env), 3)
	addr := next(t, c).(*openvpnmgmt.ClientAddressEvent)
	is.Equal(addr.Addr, "10.240.0.3")
	is.True(addr.Primary)
	est := next(t, c).(*openvpnmgmt.ClientEvent)
	is.Equal(est.Kind, openvpnmgmt.ClientEstablished)
	is.Equal(est.Env.Value("common_name"), "0123456789abcdef0123456789abcdef")
	bc := next(t, c).(*openvpnmgmt.ByteCountClientEvent)
	is.Equal([3]uint64{bc.CID, bc.Received, bc.Sent}, [3]uint64{5, 100, 200})
	is.Equal(next(t, c).(*openvpnmgmt.ByteCountEvent).Sent, uint64(2))
	log := next(t, c).(*openvpnmgmt.LogEvent)
	is.Equal(log.Level, openvpnmgmt.LogWarning)
	is.Equal(log.Message, "warning, with a comma")
	is.Equal(log.Time.Unix(), int64(1795580781))
	st := next(t, c).(*openvpnmgmt.StateEvent)
	is.Equal(st.State, "CONNECTED")
	is.Equal(st.RemoteIP, "192.0.2.1")
	is.Equal(next(t, c).(*openvpnmgmt.HoldEvent).Message, "Waiting for hold release:0")
	is.Equal(next(t, c).(*openvpnmgmt.FatalEvent).Message, "cannot open tun")
	is.Equal(next(t, c).(*openvpnmgmt.EchoEvent).Message, "hello")
	is.True(strings.HasPrefix(next(t, c).(*openvpnmgmt.PasswordEvent).Message, "Need 'Auth'"))
	_ = next(t, c).(*openvpnmgmt.NeedOKEvent)
	_ = next(t, c).(*openvpnmgmt.NeedStrEvent)
	is.Equal(next(t, c).(*openvpnmgmt.InfoMsgEvent).Message, "WEB_AUTH::https://example.com")
	ud := next(t, c).(*openvpnmgmt.UpDownEvent)
	is.True(ud.Up)
	is.Equal(ud.Env.Value("dev"), "tun0")
	is.Equal(next(t, c).(*openvpnmgmt.NotifyEvent).Message, "info,remote-exit,EXIT")
	is.Equal(next(t, c).(*openvpnmgmt.ClientEvent).Kind, openvpnmgmt.ClientReauth)
	dis := next(t, c).(*openvpnmgmt.ClientEvent)
	is.Equal(dis.Kind, openvpnmgmt.ClientDisconnect)
	is.Equal(dis.Env.Value("time_duration"), "3")
	cr := next(t, c).(*openvpnmgmt.ClientEvent)
	is.Equal(cr.Response, "cmVzcG9uc2U=")
	is.Equal(next(t, c).(*openvpnmgmt.UnknownEvent).Raw(), "SOMETHING-NEW:payload")
	is.Equal(next(t, c).(*openvpnmgmt.UnknownEvent).Raw(), "LOG:garbage")
}

func TestRepliesInOrderWithInterleavedEvents(t *testing.T) {
	is := is.New(t)
	s := mgmttest.NewServer(t)
	s.Handle("pid", func(string) []string { return []string{">LOG:1,I,in between", "SUCCESS: pid=4242"} })
	s.Handle("status", func(string) []string {
		return []string{"TITLE,OpenVPN 2.6.14", ">LOG:2,I,inside a multi-line reply", "TIME,2026-11-25 04:26:21,1795580781",
			"HEADER,ROUTING_TABLE,Virtual Address,Common Name,Real Address,Last Ref,Last Ref (time_t)",
			"ROUTING_TABLE,10.240.0.3,0123456789abcdef0123456789abcdef,192.0.2.1:1,x,1795580778", "END"}
	})
	s.Handle("version", func(string) []string { return []string{"ERROR: no version for you"} })
	c := dial(t, s, openvpnmgmt.Options{})
	ctx := context.Background()
	pid, err := c.PID(ctx)
	is.NoErr(err)
	is.Equal(pid, 4242)
	st, err := c.Status(ctx, 2)
	is.NoErr(err)
	is.Equal(st.Routes[0].Addr.String(), "10.240.0.3")
	_, err = c.Version(ctx) // a multi-line command answered with one ERROR line
	var se *openvpnmgmt.ServerError
	is.True(errors.As(err, &se))
	is.Equal(se.Message, "no version for you")
	is.Equal(se.Command, "version")
	is.Equal(next(t, c).(*openvpnmgmt.LogEvent).Message, "in between")
	is.Equal(next(t, c).(*openvpnmgmt.LogEvent).Message, "inside a multi-line reply")
	_, err = c.Raw(ctx, "frobnicate", false)
	is.True(errors.As(err, &se))
}

func TestCommandsOnTheWire(t *testing.T) {
	is := is.New(t)
	s := mgmttest.NewServer(t)
	s.Handle("load-stats", func(string) []string { return []string{"SUCCESS: nclients=3,bytesin=10,bytesout=20"} })
	c := dial(t, s, openvpnmgmt.Options{})
	ctx := context.Background()
	is.NoErr(c.HoldRelease(ctx))
	is.NoErr(c.ByteCount(ctx, 5))
	is.NoErr(c.ClientAuth(ctx, 7, 1, []string{`push "route 10.0.0.0 255.0.0.0"`}))
	is.NoErr(c.ClientAuthNT(ctx, 7, 1))
	is.NoErr(c.ClientDeny(ctx, 7, 1, `bad "key"`, "auth failed, try again"))
	is.NoErr(c.ClientPendingAuth(ctx, 7, 1, "WEB_AUTH::https://example.com/a b", 60))
	is.NoErr(c.ClientKill(ctx, 7, openvpnmgmt.KillHalt))
	is.NoErr(c.Kill(ctx, "0123456789abcdef0123456789abcdef"))
	is.NoErr(c.KillAddr(ctx, "tcp:192.0.2.1:40000"))
	is.NoErr(c.Signal(ctx, "SIGUSR1"))
	is.NoErr(c.Log(ctx, true))
	is.NoErr(c.State(ctx, false))
	is.NoErr(c.Echo(ctx, true))
	is.NoErr(c.EnvFilter(ctx, 0))
	ls, err := c.LoadStats(ctx)
	is.NoErr(err)
	is.Equal(ls, openvpnmgmt.LoadStats{Clients: 3, BytesIn: 10, BytesOut: 20})
	is.Equal(s.Commands(), []string{
		"hold release",
		"bytecount 5",
		"client-auth 7 1\npush \"route 10.0.0.0 255.0.0.0\"",
		"client-auth-nt 7 1",
		`client-deny 7 1 "bad \"key\"" "auth failed, try again"`,
		`client-pending-auth 7 1 "WEB_AUTH::https://example.com/a b" 60`,
		"client-kill 7 HALT",
		"kill 0123456789abcdef0123456789abcdef",
		"kill tcp:192.0.2.1:40000",
		"signal SIGUSR1",
		"log on",
		"state off",
		"echo on",
		"env-filter 0",
		"load-stats",
	})
}

func TestRefusedCommands(t *testing.T) {
	is := is.New(t)
	s := mgmttest.NewServer(t)
	c := dial(t, s, openvpnmgmt.Options{})
	ctx := context.Background()
	_, err := c.Raw(ctx, "echo "+strings.Repeat("a", 1019), false)
	is.True(errors.Is(err, openvpnmgmt.ErrLineTooLong)) // 1025 bytes with its line end
	err = c.Kill(ctx, strings.Repeat("a", openvpnmgmt.MaxArgLength+1))
	is.True(errors.Is(err, openvpnmgmt.ErrArgTooLong))
	err = c.ClientAuth(ctx, 1, 1, []string{"push \"setenv X " + strings.Repeat("b", 800) + "\""})
	is.True(errors.Is(err, openvpnmgmt.ErrLineTooLong)) // too long to pipeline inside a block
	err = c.ClientDeny(ctx, 1, 1, "line\nbreak", "")
	is.True(errors.Is(err, openvpnmgmt.ErrBadArgument))
	err = c.ClientAuth(ctx, 1, 1, []string{"END"})
	is.True(errors.Is(err, openvpnmgmt.ErrBadArgument))
	_, err = c.Raw(ctx, "echo \x00", false)
	is.True(errors.Is(err, openvpnmgmt.ErrBadArgument))
	is.Equal(len(s.Commands()), 0) // nothing reached the server
	is.NoErr(c.Kill(ctx, strings.Repeat("a", openvpnmgmt.MaxArgLength)))
	_, err = c.Raw(ctx, "echo "+strings.Repeat("a", 1018), false) // 1024 bytes with its line end
	is.NoErr(err)
}

func TestHandlerSendsCommands(t *testing.T) {
	is := is.New(t)
	s := mgmttest.NewServer(t)
	c := dial(t, s, openvpnmgmt.Options{})
	// Many CONNECTs, each answered from the event loop, while more arrive.
	const n = 200
	go func() {
		for i := range n {
			s.Send(fmt.Sprintf(">CLIENT:CONNECT,%d,0", i), ">CLIENT:ENV,username=x", ">CLIENT:ENV,END")
		}
	}()
	for i := 0; i < n; {
		ev := next(t, c)
		if ce, ok := ev.(*openvpnmgmt.ClientEvent); ok && ce.Kind == openvpnmgmt.ClientConnect {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			is.NoErr(c.ClientAuthNT(ctx, ce.CID, ce.KID))
			cancel()
			i++
		}
	}
	is.Equal(len(s.Commands()), n)
}

func TestSlowConsumerDoesNotBlockReplies(t *testing.T) {
	is := is.New(t)
	s := mgmttest.NewServer(t)
	c := dial(t, s, openvpnmgmt.Options{})
	<-s.Connected()
	lines := make([]string, 20000)
	for i := range lines {
		lines[i] = fmt.Sprintf(">BYTECOUNT_CLI:%d,1,2", i)
	}
	is.NoErr(s.Send(lines...))
	// Nobody reads the events, yet the command is answered.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	is.NoErr(c.HoldRelease(ctx))
	// And no event was lost.
	count := 0
	for count < len(lines) {
		if _, ok := next(t, c).(*openvpnmgmt.ByteCountClientEvent); ok {
			count++
		}
	}
}

func TestQueueOverflow(t *testing.T) {
	s := mgmttest.NewServer(t)
	c := dial(t, s, openvpnmgmt.Options{MaxQueue: 10})
	lines := make([]string, 50)
	for i := range lines {
		lines[i] = ">BYTECOUNT:1,2"
	}
	s.Send(lines...)
	select {
	case <-c.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("no overflow")
	}
	if !errors.Is(c.Err(), openvpnmgmt.ErrQueueOverflow) {
		t.Fatalf("Err = %v", c.Err())
	}
}

func TestPassword(t *testing.T) {
	s := mgmttest.NewServer(t)
	s.SetPassword("s3cret")
	c := dial(t, s, openvpnmgmt.Options{Password: "s3cret"})
	if err := c.HoldRelease(context.Background()); err != nil {
		t.Fatal(err)
	}
	c.Close()
	s.Disconnect()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := openvpnmgmt.Dial(ctx, "tcp", s.Addr(), openvpnmgmt.Options{Password: "wrong"}); !errors.Is(err, openvpnmgmt.ErrBadPassword) {
		t.Fatalf("wrong password: %v", err)
	}
}

func TestCloseEndsEverything(t *testing.T) {
	leaktest.Check(t)
	for range 20 {
		s := mgmttest.NewServer(t)
		c := dial(t, s, openvpnmgmt.Options{})
		s.Handle("status", func(string) []string { return nil }) // never answers
		done := make(chan error, 1)
		go func() { _, err := c.Status(context.Background(), 2); done <- err }()
		c.Close()
		if err := <-done; !errors.Is(err, openvpnmgmt.ErrClosed) {
			t.Fatalf("pending command after Close: %v", err)
		}
		for range c.Events() {
		}
		if err := c.HoldRelease(context.Background()); !errors.Is(err, openvpnmgmt.ErrClosed) {
			t.Fatalf("command after Close: %v", err)
		}
		c.Close()
		s.Close()
	}
}

func TestCommandContext(t *testing.T) {
	is := is.New(t)
	s := mgmttest.NewServer(t)
	late := make(chan struct{})
	s.Handle("pid", func(string) []string { <-late; return []string{"SUCCESS: pid=1"} })
	c := dial(t, s, openvpnmgmt.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	_, err := c.PID(ctx)
	is.True(errors.Is(err, context.DeadlineExceeded))
	close(late)
	// The late reply is matched to the abandoned command, not to the next.
	s.Handle("load-stats", func(string) []string { return []string{"SUCCESS: nclients=9,bytesin=0,bytesout=0"} })
	ls, err := c.LoadStats(context.Background())
	is.NoErr(err)
	is.Equal(ls.Clients, 9)
}

func TestServerGoesAway(t *testing.T) {
	s := mgmttest.NewServer(t)
	c := dial(t, s, openvpnmgmt.Options{})
	<-s.Connected()
	s.Disconnect()
	select {
	case <-c.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the client did not notice")
	}
	if c.Err() == nil || errors.Is(c.Err(), openvpnmgmt.ErrClosed) {
		t.Fatalf("Err = %v", c.Err())
	}
}

// TestLongLineGoesAlone checks that a line too long to share OpenVPN's
// read with another is written only when no command is waiting for its
// reply, and that nothing follows it before its reply.
func TestLongLineGoesAlone(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := openvpnmgmt.Dial(ctx, "tcp", l.Addr().String(), openvpnmgmt.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	conn, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	br := bufio.NewReader(conn)
	readLine := func() string {
		t.Helper()
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("reading a command: %v", err)
		}
		return strings.TrimSuffix(line, "\n")
	}
	// nothingFor fails if a line arrives within d: the negative check.
	nothingFor := func(d time.Duration) {
		t.Helper()
		conn.SetReadDeadline(time.Now().Add(d))
		if line, err := br.ReadString('\n'); err == nil {
			t.Fatalf("got %q while a command was in flight", line)
		}
	}
	answer := func(s string) {
		t.Helper()
		if _, err := io.WriteString(conn, "SUCCESS: "+s+"\r\n"); err != nil {
			t.Fatal(err)
		}
	}
	run := func(line string) chan error {
		done := make(chan error, 1)
		go func() { _, err := c.Raw(ctx, line, false); done <- err }()
		return done
	}
	long := "echo " + strings.Repeat("a", 900)

	first := run("echo one")
	if got := readLine(); got != "echo one" {
		t.Fatalf("got %q, want echo one", got)
	}
	second := run(long)
	nothingFor(100 * time.Millisecond) // the long line waits for "echo one"
	answer("one")
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	if got := readLine(); got != long {
		t.Fatalf("got %q, want the long line", got)
	}
	third := run("echo three")
	nothingFor(100 * time.Millisecond) // nothing follows the long line
	answer("long")
	if err := <-second; err != nil {
		t.Fatal(err)
	}
	if got := readLine(); got != "echo three" {
		t.Fatalf("got %q, want echo three", got)
	}
	answer("three")
	if err := <-third; err != nil {
		t.Fatal(err)
	}
}

// TestReplyWhileAWriteBlocks: OpenVPN stops reading commands while its own
// output waits, so a write can block; a reply that arrives meanwhile must
// still reach its command (the reader never waits for a writer).
func TestReplyWhileAWriteBlocks(t *testing.T) {
	conn, srv := unixPair(t)
	nc := &writeNotifier{Conn: conn, writing: make(chan struct{}, 8)}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := openvpnmgmt.NewClient(ctx, nc, openvpnmgmt.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	first := make(chan error, 1)
	go func() { _, err := c.Raw(ctx, "echo one", false); first <- err }()
	srv.SetReadDeadline(time.Now().Add(5 * time.Second))
	if line, err := bufio.NewReader(srv).ReadString('\n'); err != nil || line != "echo one\n" {
		t.Fatalf("got %q, %v; want echo one", line, err)
	}
	<-nc.writing // echo one's
	// From now on the server reads nothing, and the send buffer is full:
	// the next writer blocks.
	fillSendBuffer(t, conn)
	blocked := make(chan struct{})
	go func() { defer close(blocked); c.Raw(ctx, "echo "+strings.Repeat("x", 700), false) }()
	defer func() { <-blocked }()
	defer c.Close() // before the wait: unblocks the writer
	select {
	case <-nc.writing:
	case <-time.After(5 * time.Second):
		t.Fatal("the second command did not start writing")
	}
	if _, err := io.WriteString(srv, "SUCCESS: one\r\n"); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-first:
		if err != nil {
			t.Fatalf("echo one: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the reply did not reach its command while a write blocked")
	}
}

// TestHistoryAndRestart: the "all" forms answer with lines up to END, and
// client-kill takes RESTART.
func TestHistoryAndRestart(t *testing.T) {
	is := is.New(t)
	s := mgmttest.NewServer(t)
	s.Handle("log", func(string) []string {
		return []string{"1700000000,I,first line", "1700000001,W,second, with a comma", "END"}
	})
	s.Handle("state", func(string) []string { return []string{"1700000000,CONNECTED,SUCCESS,10.8.0.1,,,,", "END"} })
	s.Handle("echo", func(string) []string { return []string{"END"} })
	c := dial(t, s, openvpnmgmt.Options{})
	ctx := context.Background()
	logs, err := c.LogHistory(ctx)
	is.NoErr(err)
	is.Equal(logs, []string{"1700000000,I,first line", "1700000001,W,second, with a comma"})
	states, err := c.StateHistory(ctx)
	is.NoErr(err)
	is.Equal(len(states), 1)
	echoes, err := c.EchoHistory(ctx)
	is.NoErr(err)
	is.Equal(len(echoes), 0)
	is.NoErr(c.ClientKill(ctx, 9, openvpnmgmt.KillRestart))
	is.Equal(s.Commands(), []string{"log all", "state all", "echo all", "client-kill 9 RESTART"})
}

// writeNotifier is a connection that reports each Write before it starts:
// the event that a command holds the write lock.
type writeNotifier struct {
	net.Conn
	writing chan struct{} // buffered
}

func (c *writeNotifier) Write(b []byte) (int, error) {
	select {
	case c.writing <- struct{}{}:
	default:
	}
	return c.Conn.Write(b)
}

// unixPair returns the two ends of a connection over a unix socket, with
// a small send buffer on the client's end. On a unix socket, unlike TCP,
// the send buffer frees only when the server reads, so fillSendBuffer
// makes every later write block until then.
func unixPair(t *testing.T) (client *net.UnixConn, server net.Conn) {
	t.Helper()
	l, err := net.Listen("unix", t.TempDir()+"/mgmt.sock")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	accepted := make(chan net.Conn, 1)
	go func() {
		s, err := l.Accept()
		if err != nil {
			close(accepted)
			return
		}
		accepted <- s
	}()
	c, err := net.Dial("unix", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	server = <-accepted
	if server == nil {
		t.Fatal("no connection")
	}
	t.Cleanup(func() { server.Close() })
	client = c.(*net.UnixConn)
	if err := client.SetWriteBuffer(4096); err != nil {
		t.Fatal(err)
	}
	return client, server
}

// fillSendBuffer writes empty lines, which OpenVPN would ignore, to conn
// until the kernel takes no more.
func fillSendBuffer(t *testing.T, conn *net.UnixConn) {
	t.Helper()
	rc, err := conn.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	filled := 0
	var werr error
	err = rc.Write(func(fd uintptr) bool {
		nl := bytes.Repeat([]byte("\n"), 512)
		for {
			n, err := unix.Write(int(fd), nl)
			if err == unix.EAGAIN {
				return true
			}
			if err != nil {
				werr = err
				return true
			}
			filled += n
		}
	})
	if err != nil || werr != nil || filled == 0 {
		t.Fatalf("filling the send buffer: %v, %v, %d bytes", err, werr, filled)
	}
}

// answer makes srv answer "SUCCESS: <line>" to each non-empty line, and
// returns the lines it answered.
func answer(srv net.Conn) <-chan string {
	lines := make(chan string, 16)
	go func() {
		defer close(lines)
		br := bufio.NewReader(srv)
		for {
			line, err := br.ReadString('\n')
			if err != nil {
				return
			}
			if line = strings.TrimSuffix(line, "\n"); line == "" {
				continue
			}
			lines <- line
			if _, err := io.WriteString(srv, "SUCCESS: "+line+"\r\n"); err != nil {
				return
			}
		}
	}()
	return lines
}

// TestWriteHonoursContext: OpenVPN does not read, so writes block. A
// command's ctx ends the wait for the write lock and the write itself, in
// time; a command of which nothing was written leaves the client usable.
func TestWriteHonoursContext(t *testing.T) {
	conn, srv := unixPair(t)
	fillSendBuffer(t, conn) // OpenVPN does not read: every write blocks
	nc := &writeNotifier{Conn: conn, writing: make(chan struct{}, 8)}
	c, err := openvpnmgmt.NewClient(context.Background(), nc, openvpnmgmt.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })

	// A holds the write lock, blocked in its write until cancelled.
	ctxA, cancelA := context.WithCancel(context.Background())
	defer cancelA()
	errA := make(chan error, 1)
	go func() { _, err := c.Raw(ctxA, "echo a", false); errA <- err }()
	select {
	case <-nc.writing:
	case <-time.After(5 * time.Second):
		t.Fatal("command a did not start writing")
	}

	// B waits for the lock and gives up when its ctx ends.
	const short = 100 * time.Millisecond
	inTime := func(name string, err error, want error, took time.Duration) {
		t.Helper()
		if !errors.Is(err, want) {
			t.Fatalf("%s: got %v, want %v", name, err, want)
		}
		if took > short+2*time.Second {
			t.Fatalf("%s: returned after %v, its ctx ended after %v", name, took, short)
		}
	}
	ctxB, cancelB := context.WithTimeout(context.Background(), short)
	defer cancelB()
	start := time.Now()
	_, err = c.Raw(ctxB, "echo b", false)
	inTime("b, waiting for the lock", err, context.DeadlineExceeded, time.Since(start))
	if len(nc.writing) != 0 {
		t.Fatal("b wrote while a held the lock")
	}

	// A's write ends with its ctx.
	cancelA()
	select {
	case err := <-errA:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("a: got %v, want %v", err, context.Canceled)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a's write did not end with its ctx")
	}

	// C blocks in its write until its deadline.
	ctxC, cancelC := context.WithTimeout(context.Background(), short)
	defer cancelC()
	start = time.Now()
	_, err = c.Raw(ctxC, "echo c", false)
	inTime("c, writing", err, context.DeadlineExceeded, time.Since(start))
	if len(nc.writing) != 1 {
		t.Fatal("c did not write")
	}
	<-nc.writing

	// Nothing of a or c reached the stream: the client is still usable.
	if err := c.Err(); err != nil {
		t.Fatalf("the client ended: %v", err)
	}
	lines := answer(srv)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	got, err := c.Raw(ctx, "echo d", false)
	if err != nil || len(got) != 1 || got[0] != "echo d" {
		t.Fatalf("got %q, %v; want the reply to echo d", got, err)
	}
	if line := <-lines; line != "echo d" {
		t.Fatalf("the server read %q first, want echo d", line)
	}
}

// TestWriteCutCloses: a command's ctx that ends in the middle of its write
// closes the client, with ErrWriteCut.
func TestWriteCutCloses(t *testing.T) {
	client, server := net.Pipe() // a write returns when the reader has taken all of it
	t.Cleanup(func() { server.Close() })
	c, err := openvpnmgmt.NewClient(context.Background(), client, openvpnmgmt.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	took := make(chan []byte, 1)
	go func() {
		b := make([]byte, 5)
		n, _ := server.Read(b) // the first 5 bytes, then nothing
		took <- b[:n]
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err = c.Raw(ctx, "echo partial", false)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %v, want %v", err, context.DeadlineExceeded)
	}
	if b := <-took; string(b) != "echo " {
		t.Fatalf("the server read %q", b)
	}
	select {
	case <-c.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the client did not close")
	}
	if !errors.Is(c.Err(), openvpnmgmt.ErrWriteCut) {
		t.Fatalf("Err = %v, want %v", c.Err(), openvpnmgmt.ErrWriteCut)
	}
	if err := c.HoldRelease(context.Background()); !errors.Is(err, openvpnmgmt.ErrClosed) {
		t.Fatalf("a command after the cut: %v, want %v", err, openvpnmgmt.ErrClosed)
	}
}
