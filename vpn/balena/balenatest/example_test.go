package balenatest_test

import (
	"context"
	"fmt"
	"net/netip"
	"time"

	"github.com/obvpn/obvpn/vpn/balena/balenatest"
)

// A test seeds the API with devices, lets the code under test call it, and
// reads back what it was told.
func Example() {
	s := balenatest.NewServer(nil) // in a test: balenatest.NewServer(t)
	defer s.Close()
	s.AddDevice(balenatest.Device{UUID: "0123456789abcdef", Key: "device-key"})

	c := s.Client()
	ctx := context.Background()
	ok, _ := c.DeviceAuth(ctx, "0123456789abcdef", "device-key")
	fmt.Println("device allowed:", ok)

	id, _ := c.RegisterService(ctx, netip.MustParseAddr("192.0.2.1"))
	_ = c.ReportState(ctx, id, []string{"0123456789abcdef"}, true)
	d, _ := s.Device("0123456789abcdef")
	fmt.Println("online:", d.ConnectedToVPN, "on instance", d.ServiceInstance)
	fmt.Println("reports:", len(s.StateReports()))
	// Output:
	// device allowed: true
	// online: true on instance 1
	// reports: 1
}

// Fault injection: the next call of an endpoint fails with a status.
func ExampleAPI_FailNext() {
	s := balenatest.NewServer(nil)
	defer s.Close()
	s.AddDevice(balenatest.Device{UUID: "abcdef", Key: "k"})
	s.FailNext(balenatest.DeviceAuth, 1, 503)

	c := s.Client()
	_, err := c.DeviceAuth(context.Background(), "abcdef", "k")
	fmt.Println(err)
	ok, err := c.DeviceAuth(context.Background(), "abcdef", "k")
	fmt.Println(ok, err)
	// Output:
	// balena: GET /services/vpn/auth/abcdef: 503 Service Unavailable: balenatest: injected fault
	// true <nil>
}

// A test waits for what the code under test does to the API, with a
// deadline, instead of polling: here, for a device to come online through
// a state report sent in the background.
func ExampleAPI_WaitFor() {
	s := balenatest.NewServer(nil)
	defer s.Close()
	s.AddDevice(balenatest.Device{UUID: "abcdef", Key: "k"})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	go func() { _ = s.Client().ReportState(ctx, 1, []string{"abcdef"}, true) }()
	err := s.WaitFor(ctx, func(a *balenatest.API) bool {
		d, _ := a.Device("abcdef")
		return d.ConnectedToVPN
	})
	fmt.Println(err)
	// Output:
	// <nil>
}
