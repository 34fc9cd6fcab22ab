package vpn

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/obvpn/obvpn/openvpnmgmt"
	"github.com/obvpn/obvpn/openvpnmgmt/mgmttest"
	"github.com/obvpn/obvpn/vpn/balena/balenatest"
)

// BenchmarkAuthStorm answers a reconnect storm of a full /20 (4092
// CONNECTs) through the management interface (mgmttest) against the
// balena API (balenatest) with 20 ms of latency per device check and the
// default concurrency (MAX_API_POST_WORKERS=20). The floor is
// 4092 × 20 ms / 20 = 4.09 s; the reported ratio is the time taken over
// that floor.
func BenchmarkAuthStorm(b *testing.B) {
	const devices, latency, workers = 4092, 20 * time.Millisecond, 20
	api := balenatest.NewServer(b)
	for i := range devices {
		api.AddDevice(balenatest.Device{UUID: fmt.Sprintf("%032x", i), Key: fmt.Sprintf("key-%d", i)})
	}
	var lines []string
	for i := range devices {
		lines = append(lines, fmt.Sprintf(">CLIENT:CONNECT,%d,0", i), fmt.Sprintf(">CLIENT:ENV,username=%032x", i),
			fmt.Sprintf(">CLIENT:ENV,password=key-%d", i), ">CLIENT:ENV,END")
	}
	floor := time.Duration(devices) * latency / workers
	var total time.Duration
	for b.Loop() {
		api.DelayNext(balenatest.DeviceAuth, -1, latency)
		srv := mgmttest.NewServer(b)
		answered := make(chan struct{})
		n := 0
		srv.Handle("client-auth-nt", func(string) []string {
			n++ // the server reads commands one at a time
			if n == devices {
				close(answered)
			}
			return []string{"SUCCESS: client-auth command succeeded"}
		})
		ctx, cancel := context.WithCancel(context.Background())
		c, err := openvpnmgmt.Dial(ctx, "tcp", srv.Addr(), openvpnmgmt.Options{})
		if err != nil {
			b.Fatal(err)
		}
		s := &Sessions{Auth: &Authenticator{API: api.Client(), MaxInFlight: workers}}
		h := s.Handler(1)
		go func() {
			for ev := range c.Events() {
				h(ctx, c, ev)
			}
		}()
		start := time.Now()
		if err := srv.Send(lines...); err != nil {
			b.Fatal(err)
		}
		select {
		case <-answered:
		case <-time.After(2 * time.Minute):
			b.Fatalf("%d of %d answered", n, devices)
		}
		total += time.Since(start)
		if denied := strings.Count(strings.Join(srv.Commands(), "\n"), "client-deny"); denied != 0 {
			b.Fatalf("%d denied", denied)
		}
		cancel()
		c.Close()
		s.Wait()
		srv.Close()
		api.ClearFaults()
	}
	per := total / time.Duration(b.N)
	b.ReportMetric(per.Seconds(), "s/storm")
	b.ReportMetric(float64(per)/float64(floor), "x-floor")
}
