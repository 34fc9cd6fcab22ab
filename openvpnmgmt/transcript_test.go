package openvpnmgmt

import (
	"bufio"
	"context"
	"errors"
	"net"
	"os"
	"strings"
	"testing"
	"time"
)

// TestTranscript replays what OpenVPN 2.6.14 sent to a management client
// (testdata/*.transcript, recorded with verb 4, so that >LOG lines come
// between commands and their answers). Lines "# sent: <command>" mark
// where the client sent a command; the replay sends the server's lines up
// to a mark, then waits for that command.
func TestTranscript(t *testing.T) {
	data, err := os.ReadFile("testdata/openvpn-2.6.14-server.transcript")
	if err != nil {
		t.Fatal(err)
	}
	type step struct {
		command string // "" for the first chunk
		output  string
	}
	steps := []step{{}}
	for _, line := range strings.SplitAfter(string(data), "\n") {
		if cmd, ok := strings.CutPrefix(line, "# sent: "); ok {
			steps = append(steps, step{command: strings.TrimSpace(cmd)})
			continue
		}
		steps[len(steps)-1].output += line
	}
	server, conn := net.Pipe()
	go func() {
		defer server.Close()
		br := bufio.NewReader(server)
		for i, s := range steps {
			if i > 0 {
				got, err := br.ReadString('\n')
				if err != nil || strings.TrimSpace(got) != s.command {
					t.Errorf("step %d: the client sent %q (%v), want %q", i, got, err, s.command)
					return
				}
			}
			if _, err := server.Write([]byte(s.output)); err != nil {
				return
			}
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := NewClient(ctx, conn, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	counts := map[string]int{}
	var connect, disconnect *ClientEvent
	eventsDone := make(chan struct{})
	go func() {
		defer close(eventsDone)
		for ev := range c.Events() {
			switch ev := ev.(type) {
			case *ClientEvent:
				counts[string(ev.Kind)]++
				switch ev.Kind {
				case ClientConnect:
					connect = ev
				case ClientDisconnect:
					disconnect = ev
				}
			case *LogEvent:
				counts["LOG"]++
			case *ByteCountClientEvent:
				counts["BYTECOUNT_CLI"]++
			case *UnknownEvent:
				t.Errorf("unknown event %q", ev.Raw())
			}
		}
	}()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(c.Log(ctx, true))
	must(c.ByteCount(ctx, 1))
	must(c.HoldRelease(ctx))
	must(c.ClientAuthNT(ctx, 0, 1))
	st2, err := c.Status(ctx, 2)
	must(err)
	st3, err := c.Status(ctx, 3)
	must(err)
	if len(st2.Clients) != 1 || len(st3.Clients) != 1 || st2.Routes[0].Addr.String() != "10.8.0.2" || st3.Version != 3 {
		t.Errorf("status: %+v / %+v", st2, st3)
	}
	v, err := c.Version(ctx)
	must(err)
	if !strings.HasPrefix(v[0], "OpenVPN Version: OpenVPN 2.6.14") {
		t.Errorf("version %q", v)
	}
	must(c.ClientKill(ctx, 0, KillDefault))
	var se *ServerError
	if err := c.Kill(ctx, "nobody"); !errors.As(err, &se) {
		t.Errorf("kill nobody: %v", err)
	}
	<-eventsDone // the transcript ends, the connection with it
	if counts["CONNECT"] != 1 || counts["ESTABLISHED"] != 1 || counts["DISCONNECT"] != 1 || counts["BYTECOUNT_CLI"] == 0 || counts["LOG"] < 50 {
		t.Errorf("events: %v", counts)
	}
	if connect == nil || connect.Env.Value("password") != "k=e,y,with=signs" {
		t.Errorf("CONNECT's password: %+v", connect)
	}
	if disconnect == nil || disconnect.Env.Value("bytes_received") == "" || disconnect.Env.Value("time_duration") == "" {
		t.Errorf("DISCONNECT: %+v", disconnect)
	}
}
