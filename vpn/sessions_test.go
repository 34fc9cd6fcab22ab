package vpn

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/matryer/is"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/obvpn/obvpn/openvpnmgmt"
	"github.com/obvpn/obvpn/openvpnmgmt/mgmttest"
)

type slowAuth struct{ delay time.Duration }

func (a slowAuth) Authenticate(ctx context.Context, uuid, key string) (bool, error) {
	time.Sleep(a.delay)
	return key == "good", nil
}

func TestSessions(t *testing.T) {
	is := is.New(t)
	srv := mgmttest.NewServer(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	c, err := openvpnmgmt.Dial(ctx, "tcp", srv.Addr(), openvpnmgmt.Options{})
	is.NoErr(err)
	defer c.Close()
	state := &recordedState{}
	m, _ := NewMetrics(nil)
	s := &Sessions{Auth: slowAuth{10 * time.Millisecond}, State: state, DelayOnAuthFail: 300 * time.Millisecond, Metrics: m}
	h := s.Handler(1)
	go func() {
		for ev := range c.Events() {
			h(ctx, c, ev)
		}
	}()
	const dev = "0123456789abcdef0123456789abcdef"
	srv.Send(
		">CLIENT:CONNECT,1,0", ">CLIENT:ENV,username=bad1", ">CLIENT:ENV,password=bad", ">CLIENT:ENV,END",
		">CLIENT:CONNECT,2,0", ">CLIENT:ENV,username="+dev, ">CLIENT:ENV,password=good", ">CLIENT:ENV,END",
		">CLIENT:CONNECT,3,0", ">CLIENT:ENV,username="+dev, ">CLIENT:ENV,END", // no password
		">CLIENT:REAUTH,4,1", ">CLIENT:ENV,username="+dev, ">CLIENT:ENV,password=revoked", ">CLIENT:ENV,END",
	)
	// The good device is answered at once, not after the denials' delay.
	start := time.Now()
	waitCommands(t, srv, "client-auth-nt 2 0")
	is.True(time.Since(start) < 250*time.Millisecond)
	waitCommands(t, srv, `client-deny 1 0 "device authentication failed"`)
	waitCommands(t, srv, `client-deny 3 0 "device authentication failed"`)
	waitCommands(t, srv, `client-deny 4 1 "device authentication failed"`, "client-kill 4")
	is.Equal(value(m.AuthFailures), 3.0)

	// Sessions: two of the same device, then their ends.
	srv.Send(">CLIENT:ESTABLISHED,2", ">CLIENT:ENV,common_name="+dev, ">CLIENT:ENV,END",
		">CLIENT:ESTABLISHED,5", ">CLIENT:ENV,common_name="+dev, ">CLIENT:ENV,END",
		">BYTECOUNT_CLI:2,100,50",
		">CLIENT:DISCONNECT,2", ">CLIENT:ENV,common_name="+dev, ">CLIENT:ENV,bytes_received=150", ">CLIENT:ENV,bytes_sent=70", ">CLIENT:ENV,time_duration=90", ">CLIENT:ENV,END",
		">CLIENT:DISCONNECT,9", ">CLIENT:ENV,common_name=never-established", ">CLIENT:ENV,END",
	)
	waitFor(t, func() bool { return value(m.RxBytes) == 150 })
	is.Equal(state.snapshot(), []string{"+" + dev}) // still online: one session left
	is.Equal(value(m.OnlineDevices), 1.0)
	is.Equal(value(m.Devices), 2.0)
	is.Equal(value(m.TxBytes), 70.0)
	s.Forget(1) // the instance died: its last session is gone
	is.Equal(state.snapshot(), []string{"+" + dev, "-" + dev})
	is.Equal(value(m.OnlineDevices), 0.0)
	var hm dto.Metric
	is.NoErr(m.SessionDuration.Write(&hm))
	is.Equal(hm.GetHistogram().GetSampleCount(), uint64(2)) // the DISCONNECT's and the forgotten one's
	is.True(hm.GetHistogram().GetSampleSum() >= 90)
	s.Wait()
}

func waitCommands(t *testing.T, srv *mgmttest.Server, want ...string) {
	t.Helper()
	waitFor(t, func() bool {
		have := strings.Join(srv.Commands(), "\n")
		for _, w := range want {
			if !strings.Contains(have, w) {
				return false
			}
		}
		return true
	})
}

// value reads a gauge's or a counter's value.
func value(m prometheus.Metric) float64 {
	var d dto.Metric
	if err := m.Write(&d); err != nil {
		panic(err)
	}
	if d.Gauge != nil {
		return d.GetGauge().GetValue()
	}
	return d.GetCounter().GetValue()
}
