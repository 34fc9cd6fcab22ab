package balena_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/netip"

	"github.com/obvpn/obvpn/vpn/balena"
	"github.com/obvpn/obvpn/vpn/balena/balenatest"
)

// The CONNECT proxy's three questions, asked of an in-memory API.
func ExampleClient() {
	api := balenatest.NewServer(nil)
	defer api.Close()
	dev := api.AddDevice(balenatest.Device{UUID: "0123456789abcdef", Key: "dk", PublicPorts: []uint16{80}})
	api.Grant("operator-key", dev.UUID, 22222)
	si := api.AddServiceInstance(netip.MustParseAddr("192.0.2.1"))
	api.SetOnline(dev.UUID, si.ID)

	c := &balena.Client{BaseURL: api.URL, ServiceKey: api.ServiceKey, GuestKey: api.GuestKey}
	ctx := context.Background()

	id, ok, _ := c.CanAccess(ctx, dev.UUID, 22222, "operator-key")
	fmt.Println("operator may reach port 22222:", ok)
	_, ok, _ = c.CanAccess(ctx, dev.UUID, 22222, "") // the guest key
	fmt.Println("guest may reach port 22222:", ok)
	online, _ := c.DeviceOnline(ctx, id)
	fmt.Println("online:", online)
	sid, _, known, _ := c.LocateDevice(ctx, dev.UUID, "operator-key")
	fmt.Println("held by service instance", sid, known)
	// Output:
	// operator may reach port 22222: true
	// guest may reach port 22222: false
	// online: true
	// held by service instance 1 true
}

// Unexpected answers are *APIError values.
func ExampleAPIError() {
	api := balenatest.NewServer(nil)
	defer api.Close()
	api.FailNext(balenatest.DeviceOnline, 1, http.StatusBadGateway)

	c := api.Client()
	_, err := c.DeviceOnline(context.Background(), 1)
	var ae *balena.APIError
	if errors.As(err, &ae) {
		fmt.Println(ae.StatusCode, ae.Path)
	}
	// Output:
	// 502 /v7/device(@id)?$select=id&$filter=is_connected_to_vpn&@id=1
}
