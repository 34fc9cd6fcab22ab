package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// The phases of a round, in order.
var bbPhases = []string{"up", "down", "16 streams"}

const bbStreams = 16

// bbResults are the figures of a run, per round.
type bbResults struct {
	rate      map[string]map[string][]float64 // phase → path → MB/s
	cpu       map[string]map[string][]float64 // phase → relay → CPU ms per GiB relayed
	p50, p99  map[string][]time.Duration      // path → connect plus first byte
	connect   []time.Duration                 // the proxy's p50 to its 200
	dialErrs  map[string]int
	perTunnel map[string]float64 // path → resident bytes per idle connection
	tunnels   int
	tunErrs   int64 // the proxy's vpn_proxy_tunnel_errors
}

func (w *bbWorld) run(b *testing.B, cfg bbConfig) *bbResults {
	res := &bbResults{rate: map[string]map[string][]float64{}, cpu: map[string]map[string][]float64{}, p50: map[string][]time.Duration{},
		p99: map[string][]time.Duration{}, dialErrs: map[string]int{}, perTunnel: map[string]float64{}, tunnels: cfg.tunnels}
	for _, ph := range bbPhases {
		res.rate[ph] = map[string][]float64{}
		res.cpu[ph] = map[string][]float64{}
	}
	proxy, haproxy := w.startProxy(b), w.startHAProxy(b)
	ps := paths(w.ns.Dial)
	for r := range cfg.rounds {
		order := append(slices.Clone(ps[r%len(ps):]), ps[:r%len(ps)]...)
		for _, ph := range bbPhases {
			for _, p := range order {
				relay, ok := map[string]bbProcess{"proxy": proxy, "haproxy": haproxy}[p.name]
				var cpu0 time.Duration
				if ok {
					cpu0 = relay.cpu(b)
				}
				res.rate[ph][p.name] = append(res.rate[ph][p.name], w.stream(b, p, ph, cfg.size))
				if ok {
					ms := float64(relay.cpu(b)-cpu0) / float64(time.Millisecond)
					res.cpu[ph][p.name] = append(res.cpu[ph][p.name], ms/(float64(cfg.size)/(1<<30)))
				}
			}
		}
		w.latencyRound(b, r, cfg.samples, res)
	}
	res.tunErrs = w.tunnelErrors(b)
	proxy.p.Stop()
	haproxy.p.Stop()
	res.perTunnel["proxy"] = w.idleMemory(b, w.startProxy(b), "proxy", cfg.tunnels)
	res.perTunnel["haproxy"] = w.idleMemory(b, w.startHAProxy(b), "haproxy", cfg.tunnels)
	return res
}

// stream moves size bytes through p in phase ph and returns MB/s.
func (w *bbWorld) stream(b *testing.B, p bbPath, ph string, size int64) float64 {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	start := time.Now()
	var err error
	switch ph {
	case "up":
		err = w.upload(ctx, p, size, 1)
	case "down":
		err = download(ctx, p, size)
	default:
		var wg sync.WaitGroup
		errs := make(chan error, bbStreams)
		for i := range bbStreams {
			wg.Go(func() {
				if i%2 == 0 {
					errs <- w.upload(ctx, p, size/bbStreams, 0)
				} else {
					errs <- download(ctx, p, size/bbStreams)
				}
			})
		}
		wg.Wait()
		close(errs)
		err = w.collect(ctx, size/bbStreams, bbStreams/2)
		for e := range errs {
			err = cmpErr(err, e)
		}
	}
	if err != nil {
		b.Fatalf("%s, %s: %v", p.name, ph, err)
	}
	return float64(size) / time.Since(start).Seconds() / 1e6
}

func cmpErr(a, b error) error {
	if a != nil {
		return a
	}
	return b
}

var bbZeros = make([]byte, bbChunk)

// upload sends n bytes to the sink and, when wait > 0, waits for the
// sink's counts of wait connections.
func (w *bbWorld) upload(ctx context.Context, p bbPath, n int64, wait int) error {
	c, err := p.dial(ctx, bbSinkPort, nil)
	if err != nil {
		return err
	}
	defer c.Close()
	for left := n; left > 0; {
		m, err := c.Write(bbZeros[:min(left, bbChunk)])
		if err != nil {
			return err
		}
		left -= int64(m)
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		return err
	}
	if wait > 0 {
		return w.collect(ctx, n, wait)
	}
	return nil
}

// collect waits for k counts from the sink, each of which must be n.
func (w *bbWorld) collect(ctx context.Context, n int64, k int) error {
	for range k {
		select {
		case got := <-w.counts:
			if got != n {
				return fmt.Errorf("%w: the device read %d bytes, want %d", errCount, got, n)
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// download asks the source for n bytes and reads them to the end.
func download(ctx context.Context, p bbPath, n int64) error {
	c, err := p.dial(ctx, bbSrcPort, nil)
	if err != nil {
		return err
	}
	defer c.Close()
	var hdr [8]byte
	binary.BigEndian.PutUint64(hdr[:], uint64(n))
	if _, err := c.Write(hdr[:]); err != nil {
		return err
	}
	got, err := io.CopyBuffer(io.Discard, struct{ io.Reader }{c}, make([]byte, bbChunk))
	if err != nil {
		return err
	}
	if got != n {
		return fmt.Errorf("%w: the client read %d bytes, want %d", errCount, got, n)
	}
	return nil
}

// latencyRound times a fixed batch of connections per path, each to the
// echo service, one at a time: connect (and CONNECT) plus one byte there
// and back. It runs on a thread in the namespace, so that the dials cost
// no namespace switch.
func (w *bbWorld) latencyRound(b *testing.B, r, samples int, res *bbResults) {
	var d net.Dialer
	d.Timeout = 5 * time.Second
	ps := paths(d.DialContext)
	order := append(slices.Clone(ps[r%len(ps):]), ps[:r%len(ps)]...)
	err := inNetns(w.ns, func() {
		for _, p := range order {
			ttfb := make([]time.Duration, 0, samples)
			var connect []time.Duration
			one := []byte{1}
			for range samples {
				var connected time.Duration
				start := time.Now()
				c, err := p.dial(context.Background(), bbEchoPort, &connected)
				if err != nil {
					res.dialErrs[p.name]++
					continue
				}
				_, err = c.Write(one)
				if err == nil {
					_, err = io.ReadFull(c, one)
				}
				el := time.Since(start)
				c.Close()
				if err != nil {
					res.dialErrs[p.name]++
					continue
				}
				ttfb = append(ttfb, el)
				if connected > 0 {
					connect = append(connect, connected)
				}
			}
			res.p50[p.name] = append(res.p50[p.name], pct(ttfb, 50))
			res.p99[p.name] = append(res.p99[p.name], pct(ttfb, 99))
			if len(connect) > 0 {
				res.connect = append(res.connect, pct(connect, 50))
			}
		}
	})
	if err != nil {
		b.Fatal(err)
	}
}

func pct(d []time.Duration, p int) time.Duration {
	if len(d) == 0 {
		return 0
	}
	slices.Sort(d)
	return d[min(len(d)-1, len(d)*p/100)]
}

// bbIdle is how long the connections of the memory phase are idle when
// the resident memory is read.
const bbIdle = 3 * time.Second

// idleMemory opens n connections through the process's path, each
// carrying one byte there and back and then left idle for bbIdle, and
// returns the growth of the process's resident memory per connection. Ten such
// connections, opened and closed first, warm the process up.
func (w *bbWorld) idleMemory(b *testing.B, proc bbProcess, name string, n int) float64 {
	defer proc.p.Stop()
	var d net.Dialer
	d.Timeout = 5 * time.Second
	var p bbPath
	for _, q := range paths(d.DialContext) {
		if q.name == name {
			p = q
		}
	}
	var before, after int64
	conns := make([]net.Conn, 0, n)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	var ferr error
	open := func() bool {
		c, err := p.dial(context.Background(), bbEchoPort, nil)
		if err == nil {
			one := []byte{1}
			if _, err = c.Write(one); err == nil {
				_, err = io.ReadFull(c, one)
			}
			conns = append(conns, c)
		}
		ferr = err
		return err == nil
	}
	err := inNetns(w.ns, func() {
		for range 10 {
			if !open() {
				return
			}
		}
		for _, c := range conns {
			c.Close()
		}
		conns = conns[:0]
	})
	if err == nil && ferr == nil {
		before = proc.rss(b)
		err = inNetns(w.ns, func() {
			for range n {
				if !open() {
					return
				}
			}
		})
		// Idle means idle for a while: longer than a tunnel
		// takes to give up its goroutines (a second).
		time.Sleep(bbIdle)
		after = proc.rss(b)
	}
	if err == nil {
		err = ferr
	}
	if err != nil {
		b.Fatalf("%s: idle connections: %v", name, err)
	}
	return float64(after-before) / float64(n)
}

// tunnelErrors reads vpn_proxy_tunnel_errors from the proxy's metrics.
func (w *bbWorld) tunnelErrors(b *testing.B) int64 {
	cl := &http.Client{Transport: &http.Transport{DialContext: w.ns.Dial}, Timeout: 10 * time.Second}
	defer cl.CloseIdleConnections()
	resp, err := cl.Get("http://127.0.0.1:" + strconv.Itoa(bbProxyPort) + "/metrics")
	if err != nil {
		b.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "vpn_proxy_tunnel_errors "); ok {
			n, _ := strconv.ParseFloat(v, 64)
			return int64(n)
		}
	}
	b.Fatal("no vpn_proxy_tunnel_errors in the metrics")
	return 0
}

// medRange returns the median and the range of xs.
func medRange(xs []float64) (med, lo, hi float64) {
	s := slices.Sorted(slices.Values(xs))
	return s[len(s)/2], s[0], s[len(s)-1]
}

func ratios(num, den []float64) []float64 {
	r := make([]float64, len(num))
	for i := range num {
		r[i] = num[i] / den[i]
	}
	return r
}

func micros(ds []time.Duration) []float64 {
	f := make([]float64, len(ds))
	for i, d := range ds {
		f[i] = float64(d) / float64(time.Microsecond)
	}
	return f
}

func (res *bbResults) report(b *testing.B, cfg bbConfig) {
	var sb strings.Builder
	fmt.Fprintf(&sb, "%d rounds of %d MiB, %d latency samples per path and round, %d idle tunnels\n",
		cfg.rounds, cfg.size>>20, cfg.samples, cfg.tunnels)
	fmt.Fprintf(&sb, "%-12s %-22s %-22s %-22s %s\n", "phase", "direct MB/s", "haproxy MB/s", "proxy MB/s", "proxy × haproxy")
	for _, ph := range bbPhases {
		fmt.Fprintf(&sb, "%-12s", ph)
		for _, p := range []string{"direct", "haproxy", "proxy"} {
			m, lo, hi := medRange(res.rate[ph][p])
			fmt.Fprintf(&sb, " %-22s", fmt.Sprintf("%.0f (%.0f–%.0f)", m, lo, hi))
		}
		m, lo, hi := medRange(ratios(res.rate[ph]["proxy"], res.rate[ph]["haproxy"]))
		fmt.Fprintf(&sb, " %.2f (%.2f–%.2f)\n", m, lo, hi)
		b.ReportMetric(m, strings.ReplaceAll(ph, " ", "")+"-×haproxy")
	}
	fmt.Fprintf(&sb, "relay CPU (user+system), ms per GiB:")
	for _, ph := range bbPhases {
		hm, _, _ := medRange(res.cpu[ph]["haproxy"])
		pm, _, _ := medRange(res.cpu[ph]["proxy"])
		fmt.Fprintf(&sb, " %s haproxy %.0f proxy %.0f;", ph, hm, pm)
	}
	fmt.Fprintf(&sb, "\n")
	fmt.Fprintf(&sb, "connect plus first byte, µs: p50 (range over rounds) / p99 (range)\n")
	for _, p := range []string{"direct", "haproxy", "proxy"} {
		m, lo, hi := medRange(micros(res.p50[p]))
		m9, lo9, hi9 := medRange(micros(res.p99[p]))
		fmt.Fprintf(&sb, "  %-8s %.0f (%.0f–%.0f) / %.0f (%.0f–%.0f), dial errors %d\n", p, m, lo, hi, m9, lo9, hi9, res.dialErrs[p])
	}
	m, lo, hi := medRange(ratios(micros(res.p50["proxy"]), micros(res.p50["haproxy"])))
	fmt.Fprintf(&sb, "  proxy p50 × haproxy p50: %.2f (%.2f–%.2f)\n", m, lo, hi)
	b.ReportMetric(m, "p50-×haproxy")
	cm, clo, chi := medRange(micros(res.connect))
	fmt.Fprintf(&sb, "  proxy p50 to its 200: %.0f µs (%.0f–%.0f)\n", cm, clo, chi)
	pm, _, _ := medRange(micros(res.p50["proxy"]))
	b.ReportMetric(pm, "proxy-p50-µs")
	fmt.Fprintf(&sb, "resident memory per idle connection: proxy %.1f KiB, haproxy %.1f KiB (over %d)\n",
		res.perTunnel["proxy"]/1024, res.perTunnel["haproxy"]/1024, res.tunnels)
	b.ReportMetric(res.perTunnel["proxy"]/1024, "proxy-KiB/tunnel")
	fmt.Fprintf(&sb, "proxy tunnel errors: %d\n", res.tunErrs)
	// Printed, not logged: a benchmark's log is cut to ten lines.
	fmt.Print(sb.String())
	errs := res.tunErrs
	for _, n := range res.dialErrs {
		errs += int64(n)
	}
	if errs > 0 {
		b.Errorf("%d errors", errs)
	}
}
