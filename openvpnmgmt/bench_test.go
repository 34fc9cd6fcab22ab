package openvpnmgmt

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"runtime"
	"testing"
	"time"
)

// stormTranscript is what a server writes when a whole /20 (4092 devices)
// reconnects: a CONNECT and an ESTABLISHED with full ENV blocks each, as
// OpenVPN 2.6 sends them.
func stormTranscript() (data []byte, lines, events int) {
	var b bytes.Buffer
	w := func(format string, args ...any) {
		fmt.Fprintf(&b, format+"\r\n", args...)
		lines++
	}
	for i := range 4092 {
		cn := fmt.Sprintf("%032x", i)
		w(">CLIENT:CONNECT,%d,0", i)
		for _, kv := range []string{"n_clients=%d", "IV_VER=2.6.14", "IV_PLAT=linux", "IV_TCPNL=1", "IV_MTU=1600",
			"IV_NCP=2", "IV_CIPHERS=AES-256-GCM:AES-128-GCM:CHACHA20-POLY1305", "IV_PROTO=990", "untrusted_port=%d",
			"untrusted_ip=198.51.100.7", "common_name=" + cn, "username=" + cn, "password=" + cn + "=key,with,commas",
			"remote_port_1=1194", "local_port_1=10001", "proto_1=tcp-server", "daemon_pid=4242", "daemon_start_time=1795580781",
			"daemon_log_redirect=0", "daemon=0", "verb=3", "config=/run/openvpn/server-1.conf", "ifconfig_local=10.240.0.1",
			"ifconfig_remote=10.240.0.2", "route_net_gateway=10.240.0.1", "script_context=init", "tls_serial_hex_0=",
			"time_ascii=2026-11-25 04:26:18", "time_unix=1795580778"} {
			if bytes.Contains([]byte(kv), []byte("%d")) {
				w(">CLIENT:ENV,"+kv, i)
			} else {
				w(">CLIENT:ENV," + kv)
			}
		}
		w(">CLIENT:ENV,END")
		w(">CLIENT:ESTABLISHED,%d", i)
		for _, kv := range []string{"common_name=" + cn, "username=" + cn, "ifconfig_pool_remote_ip=10.240.%d.%d",
			"trusted_ip=198.51.100.7", "trusted_port=40000", "time_unix=1795580778", "bytes_received=0", "bytes_sent=0",
			"IV_VER=2.6.14", "IV_PLAT=linux", "dev=tun1", "tun_mtu=1500", "link_mtu=1623", "script_type=client-connect"} {
			if bytes.Contains([]byte(kv), []byte("%d")) {
				w(">CLIENT:ENV,"+kv, i>>8, i&0xff)
			} else {
				w(">CLIENT:ENV," + kv)
			}
		}
		w(">CLIENT:ENV,END")
		events += 2
	}
	return b.Bytes(), lines, events
}

// readOnlyConn is a net.Conn that reads from r and discards writes.
type readOnlyConn struct {
	r        io.Reader
	net.Conn // nil: the methods below are the ones the client calls
}

func (c readOnlyConn) Read(b []byte) (int, error) { return c.r.Read(b) }

func (c readOnlyConn) Write(b []byte) (int, error) { return len(b), nil }
func (c readOnlyConn) Close() error                { return nil }
func (c readOnlyConn) SetDeadline(time.Time) error { return nil }

// BenchmarkStorm parses a reconnect storm of 4092 devices through the
// reader and the event queue to the consumer.
func BenchmarkStorm(b *testing.B) {
	data, lines, events := stormTranscript()
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	var total time.Duration
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for b.Loop() {
		start := time.Now()
		c, err := NewClient(context.Background(), readOnlyConn{r: bytes.NewReader(data)}, Options{})
		if err != nil {
			b.Fatal(err)
		}
		n := 0
		for ev := range c.Events() {
			if _, ok := ev.(*ClientEvent); ok {
				n++
			}
		}
		total += time.Since(start)
		c.Close()
		if n != events {
			b.Fatalf("%d events, want %d (%v)", n, events, c.Err())
		}
	}
	runtime.ReadMemStats(&after)
	b.ReportMetric(float64(after.Mallocs-before.Mallocs)/float64(b.N*events), "allocs/event")
	b.ReportMetric(float64(lines)*float64(b.N)/total.Seconds(), "lines/s")
	b.ReportMetric(float64(total.Nanoseconds())/float64(b.N*events), "ns/event")
}
