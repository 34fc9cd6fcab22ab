package balenatest_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/matryer/is"

	"github.com/obvpn/obvpn/vpn"
	"github.com/obvpn/obvpn/vpn/balena"
	"github.com/obvpn/obvpn/vpn/balena/balenatest"
)

// The client implements the interfaces that package vpn declares.
var (
	_ vpn.AuthAPI    = (*balena.Client)(nil)
	_ vpn.StateAPI   = (*balena.Client)(nil)
	_ vpn.ServiceAPI = (*balena.Client)(nil)
)

const (
	dev1 = "0123456789abcdef0123456789abcdef"
	dev2 = "fedcba9876543210fedcba9876543210"
)

func TestDeviceAuth(t *testing.T) {
	is := is.New(t)
	s := balenatest.NewServer(t)
	s.AddDevice(balenatest.Device{UUID: dev1, Key: "k1"})
	s.AddDevice(balenatest.Device{UUID: dev2, Key: "k2"})
	c := s.Client()
	ctx := context.Background()

	ok, err := c.DeviceAuth(ctx, dev1, "k1")
	is.NoErr(err)
	is.True(ok)
	ok, err = c.DeviceAuth(ctx, strings.ToUpper(dev1), "k1") // UUIDs in any case
	is.NoErr(err)
	is.True(ok)
	ok, err = c.DeviceAuth(ctx, dev1, "k2") // another device's key: 403
	is.NoErr(err)
	is.True(!ok)
	ok, err = c.DeviceAuth(ctx, dev1, "nobody") // unknown key: 401
	is.NoErr(err)
	is.True(!ok)
	ok, err = c.DeviceAuth(ctx, "abcabc", "k1") // unknown device: 401
	is.NoErr(err)
	is.True(!ok)

	checks := s.AuthChecks()
	is.Equal(len(checks), 5)
	is.Equal(checks[0], balenatest.AuthCheck{UUID: dev1, Key: "k1", Status: 200})
	is.Equal(checks[2].Status, 403)
	is.Equal(checks[3].Status, 401)
	is.Equal(checks[4].Status, 401)

	// A 503 is an error, not a denial.
	s.FailNext(balenatest.DeviceAuth, 1, http.StatusServiceUnavailable)
	_, err = c.DeviceAuth(ctx, dev1, "k1")
	var ae *balena.APIError
	is.True(errors.As(err, &ae))
	is.Equal(ae.StatusCode, 503)
	is.Equal(s.Calls(balenatest.DeviceAuth), 6)
}

// TestStateAndLocation follows a device across two VPN servers: state
// reports set where it is online, and a stale disconnect from the server
// it left changes nothing.
func TestStateAndLocation(t *testing.T) {
	is := is.New(t)
	s := balenatest.NewServer(t)
	d := s.AddDevice(balenatest.Device{UUID: dev1, Key: "k1"})
	s.Grant("user", dev1)
	c := s.Client()
	ctx := context.Background()

	id1, err := c.RegisterService(ctx, netip.MustParseAddr("192.0.2.1"))
	is.NoErr(err)
	id2, err := c.RegisterService(ctx, netip.Addr{})
	is.NoErr(err)
	is.True(id1 != id2)
	is.NoErr(c.Heartbeat(ctx, id1))
	is.NoErr(c.Heartbeat(ctx, id1))
	si, ok := s.ServiceInstance(id1)
	is.True(ok)
	is.Equal(si.Heartbeats, 2)
	is.Equal(si.IPAddress, netip.MustParseAddr("192.0.2.1"))

	online, err := c.DeviceOnline(ctx, d.ID)
	is.NoErr(err)
	is.True(!online)
	sid, _, known, err := c.LocateDevice(ctx, dev1, "user")
	is.NoErr(err)
	is.True(known)
	is.Equal(sid, int64(0))

	is.NoErr(c.ReportState(ctx, id1, []string{dev1, "abab"}, true)) // unknown UUIDs are ignored
	online, err = c.DeviceOnline(ctx, d.ID)
	is.NoErr(err)
	is.True(online)
	sid, addr, known, err := c.LocateDevice(ctx, dev1, "user")
	is.NoErr(err)
	is.True(known)
	is.Equal(sid, id1)
	is.Equal(addr, netip.MustParseAddr("192.0.2.1"))

	// The device moves to server 2; server 1's late disconnect is ignored.
	is.NoErr(c.ReportState(ctx, id2, []string{dev1}, true))
	is.NoErr(c.ReportState(ctx, id1, []string{dev1}, false))
	got, _ := s.Device(dev1)
	is.True(got.ConnectedToVPN)
	is.Equal(got.ServiceInstance, id2)
	sid, addr, _, err = c.LocateDevice(ctx, dev1, "user")
	is.NoErr(err)
	is.Equal(sid, id2)
	is.True(!addr.IsValid())

	is.NoErr(c.ReportState(ctx, id2, []string{dev1}, false))
	got, _ = s.Device(dev1)
	is.True(!got.ConnectedToVPN)
	is.Equal(len(s.StateReports()), 4)
	is.Equal(s.StateReports()[0], balenatest.Report{ServiceID: id1, UUIDs: []string{dev1, "abab"}, Connected: true})

	// The guest key and unknown keys cannot tell where a device is.
	_, _, known, err = c.LocateDevice(ctx, dev1, "")
	is.NoErr(err)
	is.True(!known)
	_, _, known, err = c.LocateDevice(ctx, dev1, "nobody")
	is.NoErr(err)
	is.True(!known)

	// Only the service key reports.
	other := s.Client()
	other.ServiceKey = "not-the-service"
	var ae *balena.APIError
	is.True(errors.As(other.ReportState(ctx, id1, []string{dev1}, true), &ae))
	is.Equal(ae.StatusCode, 401)
	_, err = other.RegisterService(ctx, netip.Addr{})
	is.True(errors.As(err, &ae))
	is.True(errors.As(other.Heartbeat(ctx, id1), &ae))
}

func TestCanAccess(t *testing.T) {
	s := balenatest.NewServer(t)
	d := s.AddDevice(balenatest.Device{UUID: dev1, Key: "k1", PublicPorts: []uint16{80}})
	s.AddDevice(balenatest.Device{UUID: dev2, Key: "k2"})
	s.Grant("ssh-only", dev1, 22)
	s.Grant("admin", dev1)
	ctx := context.Background()
	c := s.Client()
	noGuest := s.Client()
	noGuest.GuestKey = ""

	tests := []struct {
		name  string
		c     *balena.Client
		uuid  string
		port  uint16
		key   string
		allow bool
	}{
		{"public port, guest key", c, dev1, 80, "", true},
		{"public port, no key", noGuest, dev1, 80, "", false},
		{"public port, any known key", c, dev1, 80, "ssh-only", true},
		{"private port, guest key", c, dev1, 22, "", false},
		{"private port, granted", c, dev1, 22, "ssh-only", true},
		{"other private port", c, dev1, 8080, "ssh-only", false},
		{"tunnel-any grant", c, dev1, 8080, "admin", true},
		{"grant is per device", c, dev2, 22, "admin", false},
		{"unknown key", c, dev1, 80, "nobody", false},
		{"unknown device", c, "abcdef", 80, "admin", false},
		{"service key", c, dev2, 1234, s.ServiceKey, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			is := is.New(t)
			id, ok, err := tt.c.CanAccess(ctx, tt.uuid, tt.port, tt.key)
			is.NoErr(err)
			is.Equal(ok, tt.allow)
			if tt.allow && tt.uuid == dev1 {
				is.Equal(id, d.ID)
			}
		})
	}
	checks := s.AccessChecks()
	if len(checks) == 0 || checks[0].Key != s.GuestKey || !checks[0].Allowed {
		t.Fatalf("first access check %+v, want the guest key allowed", checks[0])
	}
}

func TestFaults(t *testing.T) {
	is := is.New(t)
	s := balenatest.NewServer(t)
	s.AddDevice(balenatest.Device{UUID: dev1, Key: "k1", PublicPorts: []uint16{80}})
	c := s.Client()
	ctx := context.Background()

	s.FailNext(balenatest.CanAccess, 2, http.StatusInternalServerError)
	for range 2 {
		_, _, err := c.CanAccess(ctx, dev1, 80, "")
		var ae *balena.APIError
		is.True(errors.As(err, &ae))
		is.Equal(ae.StatusCode, 500)
	}
	_, ok, err := c.CanAccess(ctx, dev1, 80, "")
	is.NoErr(err)
	is.True(ok)
	is.Equal(s.Calls(balenatest.CanAccess), 3)
	is.Equal(s.Requests()[0].Status, 500)

	// Until cleared.
	s.FailNext(balenatest.DeviceOnline, -1, http.StatusServiceUnavailable)
	for range 3 {
		_, err := c.DeviceOnline(ctx, 1)
		is.True(err != nil)
	}
	s.ClearFaults()
	_, err = c.DeviceOnline(ctx, 1)
	is.NoErr(err)

	// A delay holds the call, and ends early when the caller gives up.
	s.DelayNext(balenatest.DeviceAuth, 1, time.Hour)
	cctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	_, err = c.DeviceAuth(cctx, dev1, "k1")
	is.True(errors.Is(err, context.DeadlineExceeded))
	ok, err = c.DeviceAuth(ctx, dev1, "k1")
	is.NoErr(err)
	is.True(ok)
}

// TestWireFaithful checks the request targets the API understands, as the
// reference client sends them, and what it answers to others.
func TestWireFaithful(t *testing.T) {
	s := balenatest.NewServer(t)
	s.AddDevice(balenatest.Device{UUID: dev1, Key: "k1"})
	for _, tt := range []struct {
		method, uri, key, body string
		status                 int
		answer                 string
	}{
		{"GET", "/v7/device(@id)?$select=id&$filter=is_connected_to_vpn&@id=1", "service-key", "", 200, `{"d":[]}`},
		{"GET", "/v7/device(@id)?$select=id,uuid&$filter=is_connected_to_vpn&@id=1", "service-key", "", 400, ""},
		{"POST", "/v7/device(uuid=@uuid)/canAccess?@uuid=%27" + dev1 + "%27", "service-key", `{"action":"tunnel-22"}`, 200, `{"d":[{"id":1}]}`},
		{"POST", "/v7/device(uuid=@uuid)/canAccess?@uuid=" + dev1, "service-key", `{"action":"tunnel-22"}`, 400, ""},
		{"POST", "/v7/device(uuid=@uuid)/canAccess?@uuid='" + dev1 + "'", "service-key", `{}`, 400, ""},
		{"GET", "/v7/service_instance?$select=id,ip_address&$filter=manages__device/any(d:d/uuid%20eq%20'" + dev1 + "'%20and%20d/is_connected_to_vpn)", "service-key", "", 200, `{"d":[]}`},
		{"GET", "/v7/service_instance?$select=id&$filter=manages__device/any(d:d/uuid%20eq%20'" + dev1 + "'%20and%20d/is_connected_to_vpn)", "service-key", "", 400, ""},
		{"POST", "/services/vpn/client-connect", "service-key", `{"serviceId":1,"uuids":[]}`, 400, ""},
		{"POST", "/services/vpn/client-connect", "service-key", `{"uuids":["aa"]}`, 400, ""},
		{"GET", "/services/vpn/client-connect", "service-key", ``, 405, ""},
		{"PATCH", "/v7/service_instance(1)", "service-key", `{}`, 400, ""},
		{"GET", "/v7/application", "service-key", ``, 404, ""},
	} {
		req, _ := http.NewRequest(tt.method, s.URL+tt.uri, strings.NewReader(tt.body))
		req.Header.Set("Authorization", "Bearer "+tt.key)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tt.status || tt.answer != "" && string(b) != tt.answer {
			t.Errorf("%s %s: got %d %s, want %d %s", tt.method, tt.uri, resp.StatusCode, b, tt.status, tt.answer)
		}
	}
}

// TestNewOnListener serves an API made by New on a listener of one's own,
// as a demo does.
func TestNewOnListener(t *testing.T) {
	is := is.New(t)
	api := balenatest.New()
	api.AddDevice(balenatest.Device{UUID: dev1, Key: "k1"})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	is.NoErr(err)
	srv := &http.Server{Handler: api}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	defer func() {
		is.NoErr(srv.Shutdown(context.Background()))
		is.Equal(<-done, http.ErrServerClosed)
	}()
	ok, err := api.NewClient("http://"+l.Addr().String()).DeviceAuth(context.Background(), dev1, "k1")
	is.NoErr(err)
	is.True(ok)
}

// TestChanged: every kind of change closes the channel taken before it,
// and only that one.
func TestChanged(t *testing.T) {
	s := balenatest.NewServer(t)
	c := s.Client()
	ctx := context.Background()
	for _, tc := range []struct {
		name   string
		change func()
	}{
		{"AddDevice", func() { s.AddDevice(balenatest.Device{UUID: dev1, Key: "k1"}) }},
		{"Grant", func() { s.Grant("other", dev1, 80) }},
		{"AddServiceInstance", func() { s.AddServiceInstance(netip.Addr{}) }},
		{"SetOnline", func() { s.SetOnline(dev1, 1) }},
		{"SetOffline", func() { s.SetOffline(dev1) }},
		{"a request", func() { _, _ = c.DeviceAuth(ctx, dev1, "k1") }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ch := s.Changed()
			select {
			case <-ch:
				t.Fatal("closed before the change")
			default:
			}
			tc.change()
			select {
			case <-ch:
			default:
				t.Fatal("not closed after the change")
			}
			select {
			case <-s.Changed():
				t.Fatal("the next channel is closed already")
			default:
			}
		})
	}
}

// TestWaitFor: a waiter wakes for the change it waits for, made by a
// request in flight, and gives up with ctx's error.
func TestWaitFor(t *testing.T) {
	is := is.New(t)
	s := balenatest.NewServer(t)
	s.AddDevice(balenatest.Device{UUID: dev1, Key: "k1"})
	c := s.Client()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	s.DelayNext(balenatest.StateReport, 1, 50*time.Millisecond)
	done := make(chan error, 1)
	go func() { done <- c.ReportState(ctx, 7, []string{dev1}, true) }()
	is.NoErr(s.WaitFor(ctx, func(a *balenatest.API) bool { return a.Calls(balenatest.StateReport) == 1 }))
	d, _ := s.Device(dev1)
	is.True(!d.ConnectedToVPN) // the call is held: it has arrived, changed nothing yet
	is.NoErr(s.WaitFor(ctx, func(a *balenatest.API) bool { d, _ := a.Device(dev1); return d.ConnectedToVPN }))
	is.NoErr(<-done)

	short, cancelShort := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancelShort()
	err := s.WaitFor(short, func(*balenatest.API) bool { return false })
	is.True(errors.Is(err, context.DeadlineExceeded))
}
