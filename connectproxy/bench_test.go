package connectproxy

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
)

// sink accepts connections on loopback and reads them to the end with a
// large buffer; each connection's byte count goes to done.
type sink struct {
	l    net.Listener
	done chan int64
	wg   sync.WaitGroup
}

func newSink(tb testing.TB) *sink {
	tb.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	s := &sink{l: l, done: make(chan int64, 16)}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				defer c.Close()
				buf := make([]byte, 256<<10)
				var n int64
				for {
					m, err := c.Read(buf)
					n += int64(m)
					if err != nil {
						break
					}
				}
				s.done <- n
			}()
		}
	}()
	tb.Cleanup(func() { l.Close(); s.wg.Wait() })
	return s
}

func (s *sink) port() uint16 { return uint16(s.l.Addr().(*net.TCPAddr).Port) }

// path opens a connection to the sink: directly, through the proxy or
// through HAProxy.
type path struct {
	name string
	dial func(tb testing.TB) net.Conn
}

func directPath(s *sink) path {
	return path{"direct", func(tb testing.TB) net.Conn {
		c, err := net.Dial("tcp", s.l.Addr().String())
		if err != nil {
			tb.Fatal(err)
		}
		return c
	}}
}

// proxyPath serves a proxy that lets everyone through to the sink.
func proxyPath(tb testing.TB, s *sink) path {
	h := &Handler{Authorizer: AllowAll, Resolver: ResolverFunc(func(string) (netip.Addr, error) {
		return netip.MustParseAddr("127.0.0.1"), nil
	})}
	addr := serve(tb, &Server{Handler: h}, "127.0.0.1:0")
	return path{"proxy", func(tb testing.TB) net.Conn {
		a := connect(tb, addr, target(devUUID, s.port()))
		if a.status != 200 {
			tb.Fatalf("CONNECT: %s", a.line)
		}
		return a.conn
	}}
}

// haproxyPaths runs HAProxy as a TCP relay to the sink, without and with
// splicing, or returns none when haproxy is missing.
func haproxyPaths(tb testing.TB, s *sink) []path {
	bin, err := exec.LookPath("haproxy")
	if err != nil {
		if _, err2 := os.Stat("/usr/sbin/haproxy"); err2 != nil {
			tb.Logf("haproxy not found (%v): no HAProxy baseline", err)
			return nil
		}
		bin = "/usr/sbin/haproxy"
	}
	plain, spliced := freePort(tb), freePort(tb)
	cfg := fmt.Sprintf(`global
	maxconn 4096
defaults
	mode tcp
	timeout connect 5s
	timeout client 60s
	timeout server 60s
listen plain
	bind 127.0.0.1:%d
	server sink 127.0.0.1:%d
listen spliced
	bind 127.0.0.1:%d
	option splice-request
	option splice-response
	server sink 127.0.0.1:%d
`, plain, s.port(), spliced, s.port())
	file := filepath.Join(tb.TempDir(), "haproxy.cfg")
	if err := os.WriteFile(file, []byte(cfg), 0o644); err != nil {
		tb.Fatal(err)
	}
	cmd := exec.Command(bin, "-db", "-f", file)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for _, p := range []int{plain, spliced} {
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			c, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(p))
			if err == nil {
				c.Close()
				<-s.done // HAProxy connected to the sink for that probe
				break
			}
			if time.Now().After(deadline) {
				tb.Fatalf("haproxy does not listen on %d: %v", p, err)
			}
		}
	}
	dial := func(port int) func(tb testing.TB) net.Conn {
		return func(tb testing.TB) net.Conn {
			c, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(port))
			if err != nil {
				tb.Fatal(err)
			}
			return c
		}
	}
	return []path{{"haproxy", dial(plain)}, {"haproxy-splice", dial(spliced)}}
}

func freePort(tb testing.TB) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

var chunk = make([]byte, 1<<20)

// send writes n bytes on a new connection of p, ends it and waits until
// the sink has read them all.
func send(tb testing.TB, p path, s *sink, n int64) {
	c := p.dial(tb)
	defer c.Close()
	for left := n; left > 0; {
		m := min(left, int64(len(chunk)))
		if _, err := c.Write(chunk[:m]); err != nil {
			tb.Fatal(err)
		}
		left -= m
	}
	c.(interface{ CloseWrite() error }).CloseWrite()
	if got := <-s.done; got != n {
		tb.Fatalf("%s: the sink read %d bytes, want %d", p.name, got, n)
	}
}

// BenchmarkThroughput streams through each path on its own: MB/s.
func BenchmarkThroughput(b *testing.B) {
	s := newSink(b)
	paths := append([]path{directPath(s), proxyPath(b, s)}, haproxyPaths(b, s)...)
	for _, p := range paths {
		b.Run(p.name, func(b *testing.B) {
			b.SetBytes(int64(len(chunk)))
			c := p.dial(b)
			defer c.Close()
			b.ResetTimer()
			for range b.N {
				if _, err := c.Write(chunk); err != nil {
					b.Fatal(err)
				}
			}
			c.(interface{ CloseWrite() error }).CloseWrite()
			if got := <-s.done; got != int64(b.N)*int64(len(chunk)) {
				b.Fatalf("the sink read %d bytes, want %d", got, int64(b.N)*int64(len(chunk)))
			}
		})
	}
}

// BenchmarkThroughputRatio streams 64 MiB through every path in turn in
// each iteration, and reports the proxy's throughput as a ratio of the
// direct path's and of HAProxy's, measured in the same run. It is for
// profiling the copy path: the client and the device share the proxy's
// process and HAProxy runs without splice-auto here, so its ratios are not
// what a user of the proxy gets. BenchmarkBlackBox in cmd/connect-proxy
// (make bench-proxy) measures that.
func BenchmarkThroughputRatio(b *testing.B) {
	const n = 64 << 20
	s := newSink(b)
	paths := append([]path{directPath(s), proxyPath(b, s)}, haproxyPaths(b, s)...)
	elapsed := make([]time.Duration, len(paths))
	b.SetBytes(n)
	b.ResetTimer()
	for range b.N {
		for i, p := range paths {
			start := time.Now()
			send(b, p, s, n)
			elapsed[i] += time.Since(start)
		}
	}
	b.StopTimer()
	rate := func(i int) float64 { return float64(n) * float64(b.N) / elapsed[i].Seconds() / 1e6 }
	for i, p := range paths {
		b.ReportMetric(rate(i), p.name+"-MB/s")
	}
	b.ReportMetric(rate(1)/rate(0), "proxy/direct")
	for i, p := range paths[2:] {
		b.ReportMetric(rate(1)/rate(i+2), "proxy/"+p.name)
	}
}

// BenchmarkConnect measures CONNECT set-up with warm caches: a new
// connection, the request, the 200. The "api" variant asks the in-memory
// balena API whether the device is online on every request (as the
// reference system does); canAccess is cached. The baseline is a direct
// TCP connect plus one round trip to the device service.
func BenchmarkConnect(b *testing.B) {
	svc := startService(b, echo)
	latency := func(b *testing.B, do func()) {
		do() // warm up
		d := make([]time.Duration, 0, b.N)
		b.ReportAllocs()
		b.ResetTimer()
		for range b.N {
			start := time.Now()
			do()
			d = append(d, time.Since(start))
		}
		b.StopTimer()
		slices.Sort(d)
		b.ReportMetric(float64(d[len(d)/2].Microseconds()), "p50-µs")
		b.ReportMetric(float64(d[len(d)*99/100].Microseconds()), "p99-µs")
	}
	b.Run("direct", func(b *testing.B) {
		addr := svc.l.Addr().String()
		buf := make([]byte, 1)
		latency(b, func() {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				b.Fatal(err)
			}
			c.Write([]byte{1})
			io.ReadFull(c, buf)
			c.Close()
		})
	})
	connectOnce := func(b *testing.B, addr string) func() {
		tg := target(devUUID, svc.port)
		req := []byte("CONNECT " + tg + " HTTP/1.1\r\nHost: " + tg + "\r\nProxy-Authorization: " + basic("", opKey) + "\r\n\r\n")
		return func() {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				b.Fatal(err)
			}
			c.Write(req)
			br := bufio.NewReader(c)
			line, err := br.ReadString('\n')
			if err != nil || line[9:12] != "200" {
				b.Fatalf("CONNECT: %q %v", line, err)
			}
			c.Close()
		}
	}
	b.Run("proxy", func(b *testing.B) {
		w := newWorld(b, func(w *world) { w.h.Online = nil; w.h.Logger = nil })
		w.addDevice(devUUID, svc.port)
		latency(b, connectOnce(b, w.addr))
	})
	// As the commands run it: an info-level logger, and the SDK's
	// TracerProvider that they install even when nothing is exported.
	b.Run("proxy-as-deployed", func(b *testing.B) {
		tp := sdktrace.NewTracerProvider()
		b.Cleanup(func() { tp.Shutdown(context.Background()) })
		w := newWorld(b, func(w *world) {
			w.h.Online = nil
			w.h.Logger = slog.New(slog.NewJSONHandler(io.Discard, nil))
			w.h.TracerProvider = tp
		})
		w.addDevice(devUUID, svc.port)
		latency(b, connectOnce(b, w.addr))
	})
	b.Run("proxy+api", func(b *testing.B) {
		w := newWorld(b, func(w *world) { w.h.Logger = nil })
		w.addDevice(devUUID, svc.port)
		latency(b, connectOnce(b, w.addr))
	})
}

// BenchmarkIdleTunnelMemory opens 1,000 idle tunnels and reports the Go
// memory (live heap and goroutine stacks) that each costs the proxy: the
// memory of 1,000 proxied connections less that of 1,000 direct ones,
// measured in the same run. Kernel memory (socket buffers, the splice
// pipes) is not counted.
func BenchmarkIdleTunnelMemory(b *testing.B) {
	const n = 1000
	// The device service holds connections without a goroutine.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	var held []net.Conn
	var mu sync.Mutex
	accepted := make(chan struct{}, n)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			held = append(held, c)
			mu.Unlock()
			accepted <- struct{}{}
		}
	}()
	port := uint16(l.Addr().(*net.TCPAddr).Port)
	closed := make(chan TunnelInfo, 4096)
	h := &Handler{Authorizer: AllowAll, Resolver: ResolverFunc(func(string) (netip.Addr, error) {
		return netip.MustParseAddr("127.0.0.1"), nil
	}), OnTunnelClosed: func(ti TunnelInfo) { closed <- ti }}
	addr := serve(b, &Server{Handler: h}, "127.0.0.1:0")

	mem := func() uint64 {
		var ms runtime.MemStats
		runtime.GC()
		runtime.GC()
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc + ms.StackInuse
	}
	closeAll := func(cs []net.Conn) {
		for _, c := range cs {
			c.Close()
		}
		mu.Lock()
		for _, c := range held {
			c.Close()
		}
		held = nil
		mu.Unlock()
	}
	var direct, proxied float64
	for range b.N {
		clients := make([]net.Conn, 0, n)
		m0 := mem()
		for range n {
			c, err := net.Dial("tcp", l.Addr().String())
			if err != nil {
				b.Fatal(err)
			}
			clients = append(clients, c)
			<-accepted
		}
		m1 := mem()
		closeAll(clients)
		direct = float64(m1-m0) / n

		clients = clients[:0]
		m2 := mem()
		for range n {
			a := connect(b, addr, target(devUUID, port))
			if a.status != 200 {
				b.Fatal(a.line)
			}
			clients = append(clients, a.conn)
			<-accepted
		}
		m3 := mem()
		proxied = float64(m3-m2) / n
		if h.Tunnels() != n {
			b.Fatalf("%d tunnels open, want %d", h.Tunnels(), n)
		}
		closeAll(clients)
		for range len(clients) {
			select {
			case <-closed:
			case <-time.After(10 * time.Second):
				b.Fatalf("%d tunnels still open 10 s after their clients closed", h.Tunnels())
			}
		}
	}
	b.ReportMetric(direct, "direct-B/conn")
	b.ReportMetric(proxied, "proxied-B/conn")
	b.ReportMetric(proxied-direct, "proxy-B/tunnel")
}

var _ = context.Background
