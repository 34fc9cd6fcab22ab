package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/obvpn/obvpn/vpn/balena/balenatest"
	"github.com/obvpn/obvpn/vpn/vpntest"
)

// BenchmarkBlackBox measures connect-proxy as a user gets it: the command
// built and run as its own process in a private network namespace, with
// its device in this host's status file and an in-memory balena API,
// next to HAProxy as a TCP relay (splice-auto, nbthread 2) and the direct
// path to the device, in one run. make bench-proxy runs it; the
// environment sizes it (defaults in brackets):
//
//	BENCH_PROXY_MIB       MiB per throughput phase and path [512]
//	BENCH_PROXY_ROUNDS    rounds, the paths' order rotated in each [5]
//	BENCH_PROXY_SAMPLES   connections per path and round in the latency phase [500]
//	BENCH_PROXY_TUNNELS   idle tunnels in the memory phase [2000]
//	BENCH_PROXY_BIN       a connect-proxy executable to run [this package, built]
//
// Each round streams the size up (client to device), down (device to
// client) and over 16 streams at once (8 up, 8 down), checking the byte
// count at the receiver; then it times connections to a device service
// that echoes one byte, in a fixed batch per path: connect (and for the
// proxy, CONNECT and its 200) plus the first byte back. The namespace's
// ephemeral port range is widened so that the batches' TIME_WAIT sockets
// do not run it out; dial errors are counted and reported. Last, a fresh
// proxy process (and a fresh HAProxy) holds the idle tunnels, each used
// once and then idle for 3 s, and the delta of its resident memory over
// them is reported per tunnel.
//
// Ratios are the proxy's figure over HAProxy's in the same round; the
// table gives their median and range over the rounds.
func BenchmarkBlackBox(b *testing.B) {
	cfg := bbConfig{
		size:    int64(envInt(b, "BENCH_PROXY_MIB", 512)) << 20,
		rounds:  envInt(b, "BENCH_PROXY_ROUNDS", 5),
		samples: envInt(b, "BENCH_PROXY_SAMPLES", 500),
		tunnels: envInt(b, "BENCH_PROXY_TUNNELS", 2000),
	}
	for range b.N {
		w := newBBWorld(b)
		w.run(b, cfg).report(b, cfg)
	}
}

type bbConfig struct {
	size                     int64
	rounds, samples, tunnels int
}

func envInt(tb testing.TB, name string, def int) int {
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	n, err := strconv.Atoi(s)
	if err != nil || n <= 0 {
		tb.Fatalf("%s=%q: want a positive number", name, s)
	}
	return n
}

// The world: one namespace holding the device's address on loopback, its
// services, the API, the proxy and HAProxy.
const (
	bbDevice    = "198.18.0.2"
	bbSinkPort  = 9000 // reads to the end; the count goes to the bench
	bbSrcPort   = 9001 // sends as many bytes as the client asks for
	bbEchoPort  = 9002 // echoes byte by byte
	bbProxyPort = 3128
	bbHAProxy   = 8000 // + the device port's offset from 9000
	bbOpKey     = "operator-SECRET"
)

type bbWorld struct {
	ns      *vpntest.Netns
	dir     string
	bin     string // connect-proxy
	haproxy string
	api     *balenatest.API
	apiAddr string
	siID    int64
	counts  chan int64 // the sink's byte counts, one per connection
}

func newBBWorld(b *testing.B) *bbWorld {
	paths := vpntest.Require(b, "ip", "haproxy", "sysctl")
	w := &bbWorld{ns: vpntest.NewNetns(b, "bbox"), dir: b.TempDir(), haproxy: paths[1], counts: make(chan int64, 64)}
	w.sh(b, "ip", "addr", "add", bbDevice+"/32", "dev", "lo")
	w.sh(b, "sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=1024 65000")
	// The fixed ports are no ephemeral ones (the API's listener, the
	// proxy's connections to it), so that the next HAProxy can bind them.
	w.sh(b, "sysctl", "-q", "-w", fmt.Sprintf("net.ipv4.ip_local_reserved_ports=%d,%d-%d,%d-%d",
		bbProxyPort, bbHAProxy, bbHAProxy+bbEchoPort-bbSinkPort, bbSinkPort, bbEchoPort))
	w.bin = os.Getenv("BENCH_PROXY_BIN")
	if w.bin == "" {
		w.bin = filepath.Join(w.dir, "connect-proxy")
		gobin, err := exec.LookPath("go")
		if err != nil {
			b.Fatalf("building connect-proxy: %v", err)
		}
		if out, err := exec.Command(gobin, "build", "-o", w.bin, ".").CombinedOutput(); err != nil {
			b.Fatalf("go build: %v\n%s", err, out)
		}
	}
	w.serve(b, bbSinkPort, w.sink)
	w.serve(b, bbSrcPort, source)
	w.serve(b, bbEchoPort, echoBytes)

	w.api = balenatest.New()
	l, err := w.ns.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	srv := &http.Server{Handler: w.api}
	go srv.Serve(l)
	b.Cleanup(func() { srv.Close() })
	w.apiAddr = l.Addr().String()
	si := w.api.AddServiceInstance(netip.MustParseAddr("127.0.0.1"))
	w.siID = si.ID
	w.api.AddDevice(balenatest.Device{UUID: uuid, Key: "device-SECRET"})
	w.api.Grant(bbOpKey, uuid, bbSinkPort, bbSrcPort, bbEchoPort)
	w.api.SetOnline(uuid, si.ID)
	if err := os.WriteFile(filepath.Join(w.dir, "server-1.status"), []byte(statusFile(uuid, bbDevice)), 0o644); err != nil {
		b.Fatal(err)
	}
	return w
}

func (w *bbWorld) sh(b *testing.B, name string, args ...string) {
	if out, err := w.ns.Command(name, args...).CombinedOutput(); err != nil {
		b.Fatalf("%s %v: %v: %s", name, args, err, out)
	}
}

// serve runs a device service on port until the benchmark ends.
func (w *bbWorld) serve(b *testing.B, port int, handle func(net.Conn)) {
	l, err := w.ns.Listen("tcp", net.JoinHostPort(bbDevice, strconv.Itoa(port)))
	if err != nil {
		b.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	conns := map[net.Conn]bool{}
	wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns[c] = true
			mu.Unlock()
			wg.Go(func() {
				defer func() {
					c.Close()
					mu.Lock()
					delete(conns, c)
					mu.Unlock()
				}()
				handle(c)
			})
		}
	})
	b.Cleanup(func() {
		l.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
}

const bbChunk = 256 << 10

func (w *bbWorld) sink(c net.Conn) {
	buf := make([]byte, bbChunk)
	var n int64
	for {
		m, err := c.Read(buf)
		n += int64(m)
		if err != nil {
			break
		}
	}
	w.counts <- n
}

// source reads a length (8 bytes, big-endian), sends that many bytes and
// ends its side.
func source(c net.Conn) {
	var hdr [8]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		return
	}
	buf := make([]byte, bbChunk)
	for left := int64(binary.BigEndian.Uint64(hdr[:])); left > 0; {
		m, err := c.Write(buf[:min(left, int64(len(buf)))])
		if err != nil {
			return
		}
		left -= int64(m)
	}
	c.(*net.TCPConn).CloseWrite()
	io.Copy(io.Discard, c)
}

func echoBytes(c net.Conn) {
	var b [1]byte
	for {
		if _, err := c.Read(b[:]); err != nil {
			return
		}
		if _, err := c.Write(b[:]); err != nil {
			return
		}
	}
}

// A bbProcess is connect-proxy or HAProxy, running in the namespace.
type bbProcess struct {
	cmd *exec.Cmd
	p   *vpntest.Process
}

// rss returns the process's resident memory in bytes.
func (p bbProcess) rss(b *testing.B) int64 {
	s, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.cmd.Process.Pid))
	if err != nil {
		b.Fatal(err)
	}
	for line := range strings.Lines(string(s)) {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err != nil {
				b.Fatalf("VmRSS %q: %v", v, err)
			}
			return kb << 10
		}
	}
	b.Fatal("no VmRSS")
	return 0
}

// cpu returns the CPU time (user and system) that the process used.
func (p bbProcess) cpu(b *testing.B) time.Duration {
	s, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.cmd.Process.Pid))
	if err != nil {
		b.Fatal(err)
	}
	// The fields after the command's name, which is in parentheses.
	f := strings.Fields(string(s[bytes.LastIndexByte(s, ')')+1:]))
	utime, err1 := strconv.ParseInt(f[11], 10, 64)
	stime, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		b.Fatalf("/proc/%d/stat: %q", p.cmd.Process.Pid, s)
	}
	return time.Duration(utime+stime) * time.Second / 100 // USER_HZ
}

// startProxy runs connect-proxy in the namespace and waits until it
// listens.
func (w *bbWorld) startProxy(b *testing.B) bbProcess {
	cmd := w.ns.Command(w.bin, "-listen", "127.0.0.1:"+strconv.Itoa(bbProxyPort), "-nss-index", "off")
	cmd.Env = []string{
		"PATH=" + os.Getenv("PATH"),
		"VPN_CONNECT_PROXY_PORT=" + strconv.Itoa(bbProxyPort),
		"BALENA_API_INTERNAL_HOST=" + w.apiAddr,
		"VPN_SERVICE_API_KEY=" + w.api.ServiceKey,
		"VPN_GUEST_API_KEY=" + w.api.GuestKey,
		"VPN_SERVICE_ID=" + strconv.FormatInt(w.siID, 10),
		"NSS_OPENVPN_STATUS_GLOB=" + filepath.Join(w.dir, "server-*.status"),
	}
	return w.launch(b, cmd, "connect-proxy listening")
}

// startHAProxy runs HAProxy in the namespace as a TCP relay to each
// device service, and waits until it listens.
func (w *bbWorld) startHAProxy(b *testing.B) bbProcess {
	cfg := "global\n\tnbthread 2\n\tmaxconn 4500\n\tulimit-n 19000\ndefaults\n\tmode tcp\n\toption splice-auto\n" +
		"\ttimeout connect 5s\n\ttimeout client 300s\n\ttimeout server 300s\n"
	for _, p := range []int{bbSinkPort, bbSrcPort, bbEchoPort} {
		cfg += fmt.Sprintf("listen relay%d\n\tbind 127.0.0.1:%d\n\tserver device %s:%d\n", p, bbHAProxy+p-bbSinkPort, bbDevice, p)
	}
	file := filepath.Join(w.dir, "haproxy.cfg")
	if err := os.WriteFile(file, []byte(cfg), 0o644); err != nil {
		b.Fatal(err)
	}
	p := w.launch(b, w.ns.Command(w.haproxy, "-db", "-f", file), "")
	for deadline := time.Now().Add(10 * time.Second); ; {
		c, err := w.ns.Dial(context.Background(), "tcp", "127.0.0.1:"+strconv.Itoa(bbHAProxy+bbEchoPort-bbSinkPort))
		if err == nil {
			c.Close()
			return p
		}
		if time.Now().After(deadline) {
			b.Fatalf("haproxy does not listen: %v", err)
		}
		time.Sleep(10 * time.Millisecond) // HAProxy has no readiness line in -db mode
	}
}

func (w *bbWorld) launch(b *testing.B, cmd *exec.Cmd, ready string) bbProcess {
	p, err := vpntest.Launch(cmd)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		p.Stop()
		if b.Failed() {
			b.Logf("output of %s:\n%s", filepath.Base(cmd.Args[4]), strings.Join(p.Lines(), "\n"))
		}
	})
	if ready != "" {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if _, err := p.WaitFor(ctx, ready); err != nil {
			b.Fatal(err)
		}
	}
	return bbProcess{cmd, p}
}

// A path reaches a device port: directly, through HAProxy, or through the
// proxy.
type bbPath struct {
	name string
	// dial connects to the device's port; connected, when not nil, is
	// told how long the proxy took to answer 200.
	dial func(ctx context.Context, port int, connected *time.Duration) (net.Conn, error)
}

// paths returns the three paths, dialling with dial: the namespace's
// Dial, or a net.Dialer on a thread that entered the namespace.
func paths(dial func(ctx context.Context, network, addr string) (net.Conn, error)) []bbPath {
	direct := func(ctx context.Context, port int, _ *time.Duration) (net.Conn, error) {
		return dial(ctx, "tcp", net.JoinHostPort(bbDevice, strconv.Itoa(port)))
	}
	haproxy := func(ctx context.Context, port int, _ *time.Duration) (net.Conn, error) {
		return dial(ctx, "tcp", "127.0.0.1:"+strconv.Itoa(bbHAProxy+port-bbSinkPort))
	}
	proxy := func(ctx context.Context, port int, connected *time.Duration) (net.Conn, error) {
		start := time.Now()
		c, err := dial(ctx, "tcp", "127.0.0.1:"+strconv.Itoa(bbProxyPort))
		if err != nil {
			return nil, err
		}
		if err := connectHandshake(c, port); err != nil {
			c.Close()
			return nil, err
		}
		if connected != nil {
			*connected = time.Since(start)
		}
		return c, nil
	}
	return []bbPath{{"direct", direct}, {"haproxy", haproxy}, {"proxy", proxy}}
}

var bbAuth = "Proxy-Authorization: Basic " + base64.StdEncoding.EncodeToString([]byte("balena:"+bbOpKey)) + "\r\n"

// connectHandshake asks for a tunnel to the device's port and reads the
// answer's head, as a client that knows the device speaks second.
func connectHandshake(c net.Conn, port int) error {
	tg := uuid + ".balena:" + strconv.Itoa(port)
	if _, err := io.WriteString(c, "CONNECT "+tg+" HTTP/1.1\r\nHost: "+tg+"\r\n"+bbAuth+"\r\n"); err != nil {
		return err
	}
	var head []byte
	buf := make([]byte, 128)
	for !bytes.HasSuffix(head, []byte("\r\n\r\n")) {
		n, err := c.Read(buf)
		head = append(head, buf[:n]...)
		if err != nil {
			return fmt.Errorf("CONNECT: %q: %w", head, err)
		}
		if len(head) > 1024 {
			return fmt.Errorf("CONNECT: answer too long: %q", head)
		}
	}
	if !bytes.HasPrefix(head, []byte("HTTP/1.0 200 ")) {
		return fmt.Errorf("CONNECT: %q", head)
	}
	return nil
}

// inNetns runs f on a thread that entered the namespace: the sockets that
// f makes are the namespace's. The thread stays locked and ends with f's
// goroutine.
func inNetns(ns *vpntest.Netns, f func()) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		fd, err := unix.Open("/var/run/netns/"+ns.Name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			done <- err
			return
		}
		err = unix.Setns(fd, unix.CLONE_NEWNET)
		unix.Close(fd)
		if err != nil {
			done <- fmt.Errorf("entering %s: %w", ns.Name, err)
			return
		}
		f()
		done <- nil
	}()
	return <-done
}

var errCount = errors.New("wrong byte count")
