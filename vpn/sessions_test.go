package vpn

import (
	"context"
	"fmt"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/matryer/is"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/obvpn/obvpn/openvpnmgmt"
	"github.com/obvpn/obvpn/openvpnmgmt/mgmttest"
	"github.com/obvpn/obvpn/vpn/internalapi"
)

// heldAuth allows the key "good". It holds its answer for the device
// hold until release is closed, so that a test can show that a slow
// answer holds up no other.
type heldAuth struct {
	hold    string
	release <-chan struct{}
}

func (a heldAuth) Authenticate(ctx context.Context, uuid, key string) (bool, error) {
	if uuid == a.hold {
		select {
		case <-a.release:
		case <-ctx.Done():
			return false, ctx.Err()
		}
	}
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
	release := make(chan struct{})
	s := &Sessions{Auth: heldAuth{hold: "bad1", release: release}, State: state, DelayOnAuthFail: 300 * time.Millisecond, Metrics: m}
	h := s.Handler(1)
	handled := make(chan openvpnmgmt.Event, 64) // each event once the handler has returned
	go func() {
		for ev := range c.Events() {
			h(ctx, c, ev)
			handled <- ev
		}
	}()
	const dev = "0123456789abcdef0123456789abcdef"
	srv.Send(
		">CLIENT:CONNECT,1,0", ">CLIENT:ENV,username=bad1", ">CLIENT:ENV,password=bad", ">CLIENT:ENV,END",
		">CLIENT:CONNECT,2,0", ">CLIENT:ENV,username="+dev, ">CLIENT:ENV,password=good", ">CLIENT:ENV,END",
		">CLIENT:CONNECT,3,0", ">CLIENT:ENV,username="+dev, ">CLIENT:ENV,END", // no password
		">CLIENT:REAUTH,4,1", ">CLIENT:ENV,username="+dev, ">CLIENT:ENV,password=revoked", ">CLIENT:ENV,END",
	)
	// The good device is answered at once, not after the denials' delay,
	// nor after the answer for the device before it, which is held.
	start := time.Now()
	waitCommands(t, srv, "client-auth-nt 2 0")
	is.True(time.Since(start) < 250*time.Millisecond)
	close(release)
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
	waitHandled(t, handled, func(ev openvpnmgmt.Event) bool {
		ce, ok := ev.(*openvpnmgmt.ClientEvent)
		return ok && ce.Kind == openvpnmgmt.ClientDisconnect && ce.CID == 9 // the last one sent
	})
	is.Equal(value(m.RxBytes), 150.0)
	is.Equal(state.snapshot(), []string{"+" + dev + "@1", "+" + dev + "@1"}) // still online: one session left
	is.Equal(value(m.OnlineDevices), 1.0)
	is.Equal(value(m.Devices), 2.0)
	is.Equal(value(m.TxBytes), 70.0)
	s.Forget(1) // the instance died: its last session is gone
	is.Equal(state.snapshot(), []string{"+" + dev + "@1", "+" + dev + "@1", "-" + dev + "@1"})
	is.Equal(value(m.OnlineDevices), 0.0)
	var hm dto.Metric
	is.NoErr(m.SessionDuration.Write(&hm))
	is.Equal(hm.GetHistogram().GetSampleCount(), uint64(2)) // the DISCONNECT's and the forgotten one's
	is.True(hm.GetHistogram().GetSampleSum() >= 90)
	s.Wait()
}

// waitCommands waits until srv has read a command with each of want, and
// fails the test after 10 s.
func waitCommands(t *testing.T, srv *mgmttest.Server, want ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, w := range want {
		if err := srv.WaitCommand(ctx, w); err != nil {
			t.Fatal(err)
		}
	}
}

// waitHandled reads the events that the handler is done with until last
// reports true for one, and fails the test after 10 s.
func waitHandled(t *testing.T, handled <-chan openvpnmgmt.Event, last func(openvpnmgmt.Event) bool) {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case ev := <-handled:
			if last(ev) {
				return
			}
		case <-timeout:
			t.Fatal("the event was not handled within 10 s")
		}
	}
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

// TestSessionsScriptMode: in script mode the hooks count the sessions
// through the internal API, and OpenVPN's ESTABLISHED (which it sends in
// both modes, with no DISCONNECT in this one) counts nothing twice: the
// hook's disconnect takes the device offline and ends the session; an
// instance that dies takes its sessions with it, counting only the
// duration of a session whose bytes are unknown.
func TestSessionsScriptMode(t *testing.T) {
	is := is.New(t)
	const dev = "0123456789abcdef0123456789abcdef"
	state := &recordedState{}
	m, _ := NewMetrics(nil)
	conns := &Connections{}
	s := &Sessions{Connections: conns, State: state, Metrics: m, Script: true}
	api := &internalapi.Server{Clients: &ScriptClients{Connections: conns, State: state, Sessions: s, Metrics: m}, Instances: 2}
	h := s.Handler(1)
	call := func(method, body string) int {
		r := httptest.NewRequest(method, "/api/v2/1/clients/", strings.NewReader(body))
		r.RemoteAddr = "127.0.0.1:40000"
		w := httptest.NewRecorder()
		api.ServeHTTP(w, r)
		return w.Code
	}
	established := func(cid uint64) {
		h(context.Background(), nil, &openvpnmgmt.ClientEvent{Kind: openvpnmgmt.ClientEstablished, CID: cid,
			Env: openvpnmgmt.Env{{Name: "common_name", Value: dev}}})
	}

	is.Equal(call("POST", `{"common_name":"`+dev+`"}`), 200) // client-connect hook
	established(2)
	h(context.Background(), nil, &openvpnmgmt.ByteCountClientEvent{CID: 2, Received: 100, Sent: 50})
	is.Equal(state.snapshot(), []string{"+" + dev + "@1"})
	is.Equal(conns.Count(dev), 1)
	is.Equal(value(m.OnlineDevices), 1.0)
	is.Equal(value(m.Devices), 1.0)

	is.Equal(call("DELETE", `{"common_name":"`+dev+`","bytes_received":"150","bytes_sent":"70","time_duration":"90"}`), 200)
	is.Equal(state.snapshot(), []string{"+" + dev + "@1", "-" + dev + "@1"})
	is.Equal(value(m.OnlineDevices), 0.0)
	is.Equal(value(m.RxBytes), 150.0)
	is.Equal(value(m.TxBytes), 70.0)
	is.Equal(len(s.sessionList()), 0) // the session ended with the hook's call

	// Again, and the instance dies: no hook will report the end.
	is.Equal(call("POST", `{"common_name":"`+dev+`"}`), 200)
	established(3)
	s.Forget(1)
	is.Equal(state.snapshot(), []string{"+" + dev + "@1", "-" + dev + "@1", "+" + dev + "@1", "-" + dev + "@1"})
	is.Equal(conns.Count(dev), 0)
	is.Equal(value(m.OnlineDevices), 0.0)
	var d, rate dto.Metric
	is.NoErr(m.SessionDuration.Write(&d))
	is.NoErr(m.SessionRxRate.Write(&rate))
	is.Equal(d.GetHistogram().GetSampleCount(), uint64(2))
	is.Equal(rate.GetHistogram().GetSampleCount(), uint64(0)) // rates are observed at a scrape (TestSessionsBitrates)
}

// TestSessionsBitrates: each online device's mean bitrate is observed
// once per scrape while its session lives, from the byte counts OpenVPN
// sends every VPN_BYTECOUNT_INTERVAL, and the stretch up to its end once
// more; a scrape with no new counts observes nothing, and a session that
// went with its instance gives no rate.
func TestSessionsBitrates(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		is := is.New(t)
		reg := prometheus.NewRegistry()
		m, err := NewMetrics(reg)
		is.NoErr(err)
		s := &Sessions{Metrics: m}
		h := s.Handler(1)
		ev := func(e openvpnmgmt.Event) { h(context.Background(), nil, e) }
		const a, b = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
		for i, cn := range []string{a, b} {
			ev(&openvpnmgmt.ClientEvent{Kind: openvpnmgmt.ClientEstablished, CID: uint64(i + 1),
				Env: openvpnmgmt.Env{{Name: "common_name", Value: cn}}})
		}
		// scrape gathers the metrics, as Prometheus does, and returns the
		// count and sum of the rx bitrate histogram.
		scrape := func() (count uint64, sum float64) {
			t.Helper()
			mfs, err := reg.Gather()
			is.NoErr(err)
			for _, mf := range mfs {
				if mf.GetName() == "vpn_session_avg_rx_bitrate" {
					h := mf.GetMetric()[0].GetHistogram()
					return h.GetSampleCount(), h.GetSampleSum()
				}
			}
			t.Fatal("no vpn_session_avg_rx_bitrate")
			return 0, 0
		}
		// The sleeps below run the bubble's clock: the sessions' ages, not
		// waits.
		const minute = 60 * time.Second
		time.Sleep(minute)
		ev(&openvpnmgmt.ByteCountClientEvent{CID: 1, Received: 60 * 1000 / 8, Sent: 0})    // a: 1000 bit/s
		ev(&openvpnmgmt.ByteCountClientEvent{CID: 2, Received: 60 * 50000 / 8, Sent: 600}) // b: 50 kbit/s
		n, sum := scrape()
		is.Equal(n, uint64(2)) // each device once, while its session lives
		is.Equal(sum, 51000.0)
		n, _ = scrape()
		is.Equal(n, uint64(2)) // nothing new: nothing observed

		// Two counts of a before the next scrape: observed once, as
		// their mean; b ends after half a minute at 2 kbit/s.
		time.Sleep(minute)
		ev(&openvpnmgmt.ByteCountClientEvent{CID: 1, Received: 60*1000/8 + 60*3000/8})
		time.Sleep(30 * time.Second)
		ev(&openvpnmgmt.ClientEvent{Kind: openvpnmgmt.ClientDisconnect, CID: 2, Env: openvpnmgmt.Env{
			{Name: "common_name", Value: b}, {Name: "bytes_received", Value: fmt.Sprint(60*50000/8 + 90*2000/8)},
			{Name: "bytes_sent", Value: "600"}, {Name: "time_duration", Value: "150"}}})
		time.Sleep(30 * time.Second)
		ev(&openvpnmgmt.ByteCountClientEvent{CID: 1, Received: 60*1000/8 + 60*3000/8 + 60*5000/8})
		n, sum = scrape()
		is.Equal(n, uint64(4))
		is.Equal(sum, 51000.0+4000+2000) // a: mean(3000, 5000); b: its last stretch

		// a's instance dies: its last counts stand, and no rate is made up.
		s.Forget(1)
		n, _ = scrape()
		is.Equal(n, uint64(4))
		is.Equal(value(m.RxBytes), float64(60*1000/8+60*3000/8+60*5000/8+60*50000/8+90*2000/8))
	})
}

// addressLog is an AddressBook that records its calls.
type addressLog struct {
	mu    sync.Mutex
	calls []string
}

func (a *addressLog) Learn(source, name string, addr netip.Addr) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.calls = append(a.calls, "learn "+source+" "+name+" "+addr.String())
}

func (a *addressLog) Forget(source, name string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.calls = append(a.calls, "forget "+source+" "+name)
}

// TestSessionsLearnAddresses: the address book learns a device's address
// at ESTABLISHED and keeps the newest session's while an older one ends;
// the last end, or the instance's death, forgets it.
func TestSessionsLearnAddresses(t *testing.T) {
	is := is.New(t)
	book := &addressLog{}
	s := &Sessions{Addresses: book, StatusFile: func(id int) string { return fmt.Sprintf("/run/openvpn/server-%d.status", id) }}
	h := s.Handler(1)
	ctx := context.Background()
	const dev = "0123456789abcdef0123456789abcdef"
	ev := func(kind openvpnmgmt.ClientKind, cid uint64, env ...string) {
		e := &openvpnmgmt.ClientEvent{Kind: kind, CID: cid}
		for i := 0; i+1 < len(env); i += 2 {
			e.Env = append(e.Env, openvpnmgmt.EnvVar{Name: env[i], Value: env[i+1]})
		}
		h(ctx, nil, e)
	}
	ev(openvpnmgmt.ClientEstablished, 2, "common_name", dev, "ifconfig_pool_remote_ip", "10.240.0.3")
	ev(openvpnmgmt.ClientEstablished, 5, "common_name", dev, "ifconfig_pool_remote_ip", "10.240.0.9")
	ev(openvpnmgmt.ClientDisconnect, 2, "common_name", dev)
	ev(openvpnmgmt.ClientDisconnect, 5, "common_name", dev)
	ev(openvpnmgmt.ClientEstablished, 6, "common_name", dev) // no address yet
	h(ctx, nil, &openvpnmgmt.ClientAddressEvent{CID: 6, Addr: "10.240.0.4", Primary: true})
	s.Forget(1)
	f := "/run/openvpn/server-1.status " + dev
	is.Equal(book.calls, []string{
		"learn " + f + " 10.240.0.3",
		"learn " + f + " 10.240.0.9",
		"learn " + f + " 10.240.0.9", // the newer session stays
		"forget " + f,
		"forget " + f, // ESTABLISHED without an address
		"learn " + f + " 10.240.0.4",
		"forget " + f,
	})
}

// recordedState records what a StateSetter learns: "+uuid@instance" for
// each new session, "-uuid@instance" for the end of the last.
type recordedState struct {
	mu  sync.Mutex
	log []string
}

func (s *recordedState) Set(uuid string, st DeviceState) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sign := "-"
	if st.Connected {
		sign = "+"
	}
	s.log = append(s.log, fmt.Sprintf("%s%s@%d", sign, uuid, st.Instance))
}

func (s *recordedState) snapshot() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.log...)
}

// gateAuth allows every device once the test lets it: each call says it
// began on entered, then waits for a value on release.
type gateAuth struct {
	entered chan<- struct{}
	release <-chan struct{}
}

func (a gateAuth) Authenticate(ctx context.Context, uuid, key string) (bool, error) {
	a.entered <- struct{}{}
	select {
	case <-a.release:
		return true, nil
	case <-ctx.Done():
		return false, ctx.Err()
	}
}

// TestSessionsSettle: Settle returns at once with nothing in flight,
// waits for a held decision to be answered, and returns ctx's error when
// the decision outlasts it; a decision cut short by the session's end is
// neither answered nor counted as a denial.
func TestSessionsSettle(t *testing.T) {
	is := is.New(t)
	srv := mgmttest.NewServer(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	c, err := openvpnmgmt.Dial(ctx, "tcp", srv.Addr(), openvpnmgmt.Options{})
	is.NoErr(err)
	defer c.Close()
	m, _ := NewMetrics(nil)
	entered, release := make(chan struct{}), make(chan struct{})
	s := &Sessions{Auth: gateAuth{entered: entered, release: release}, Metrics: m}
	is.NoErr(s.Settle(ctx)) // nothing in flight
	sessionCtx, endSession := context.WithCancel(ctx)
	h := s.Handler(1)
	go func() {
		for ev := range c.Events() {
			h(sessionCtx, c, ev)
		}
	}()
	const dev = "0123456789abcdef0123456789abcdef"
	connect := func(cid int) {
		t.Helper()
		is.NoErr(srv.Send(fmt.Sprintf(">CLIENT:CONNECT,%d,0", cid), ">CLIENT:ENV,username="+dev, ">CLIENT:ENV,password=good", ">CLIENT:ENV,END"))
		<-entered // its decision is in flight
	}

	connect(1)
	short, cancelShort := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancelShort()
	is.Equal(s.Settle(short), context.DeadlineExceeded) // held
	settled := make(chan error, 1)
	go func() { settled <- s.Settle(ctx) }()
	release <- struct{}{}
	is.NoErr(<-settled)
	waitCommands(t, srv, "client-auth-nt 1 0")

	// Held again, and the session ends under it: no answer, no denial.
	connect(2)
	endSession()
	is.NoErr(s.Settle(ctx))
	s.Wait()
	is.Equal(value(m.AuthFailures), 0.0)
	for _, cmd := range srv.Commands() {
		is.True(!strings.Contains(cmd, " 2 0")) // nothing said about client 2
	}
}
