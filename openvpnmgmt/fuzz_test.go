package openvpnmgmt

import (
	"bufio"
	"context"
	"net"
	"strings"
	"testing"
	"time"
)

// FuzzReader feeds arbitrary server output to a client: it must never
// panic, every event it delivers must have come from a ">" line, and a
// command must get an answer or an error, never hang.
func FuzzReader(f *testing.F) {
	f.Add(">CLIENT:CONNECT,1,2\r\n>CLIENT:ENV,a=b=c,d\r\n>CLIENT:ENV,END\r\nSUCCESS: ok\r\n")
	f.Add(">CLIENT:ESTABLISHED,x\r\n>LOG:1,I,m\r\nEND\r\nERROR: e\r\n")
	f.Add(">UPDOWN:UP\r\n>UPDOWN:ENV,dev=tun0\r\n>BYTECOUNT_CLI:1,2\r\nSUCCESS: x\r\n")
	f.Add(">CLIENT:CONNECT,1,2\r\nSUCCESS: in the middle of a block\r\n")
	f.Add(strings.Repeat(">", 70000) + "\n")
	f.Fuzz(func(t *testing.T, out string) {
		server, client := net.Pipe()
		c, err := NewClient(context.Background(), client, Options{MaxQueue: 64})
		if err != nil {
			t.Fatal(err)
		}
		go func() {
			br := bufio.NewReader(server)
			_, _ = br.ReadString('\n') // the command
			server.Write([]byte(out))
			server.Close()
		}()
		done := make(chan struct{})
		go func() {
			defer close(done)
			for ev := range c.Events() {
				if ev.Raw() == "" && ev != nil {
					if _, ok := ev.(*UnknownEvent); !ok {
						t.Errorf("an empty event of type %T", ev)
					}
				}
			}
		}()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_, _ = c.Raw(ctx, "status", true)
		if ctx.Err() != nil {
			t.Fatalf("the command hung on %q", out)
		}
		c.Close()
		<-done
	})
}

// FuzzParseEvent: no panic, and unknown kinds keep their line.
func FuzzParseEvent(f *testing.F) {
	for _, s := range []string{"LOG:1,W,x", "STATE:1,CONNECTED", "BYTECOUNT_CLI:1,2,3", "CLIENT:ADDRESS,1,a,1", "X", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, line string) {
		ev := parseEvent(line)
		if ev.Raw() != line {
			t.Fatalf("Raw %q != %q", ev.Raw(), line)
		}
		clientHead(line)
	})
}
