package vpn_test

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/obvpn/obvpn/subnet"
	"github.com/obvpn/obvpn/vpn"
	"github.com/obvpn/obvpn/vpn/haproxy"
)

// A Loader with its own variables, as a test or an embedding program would
// use it; LoadPlan does the same with the process environment.
func ExampleLoader_Plan() {
	plan, err := vpn.Loader{Env: map[string]string{
		"VPN_BASE_SUBNET":             "10.240.0.0/12",
		"VPN_INSTANCE_SUBNET_BITMASK": "20",
		"VPN_INSTANCE_COUNT":          "4",
	}}.Plan()
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(plan)
	in, _ := plan.Instance(2)
	fmt.Println(in.Subnet, in.Port, in.ManagementPort, in.APIPort)
	// Output:
	// 10.240.0.0/12 at /20: 4 of 256 instances, 4092 clients each
	// 10.240.16.0/20 10002 20002 30002
}

// Every configuration error is one line that names the variable.
func ExampleConfigError() {
	_, err := vpn.Loader{Env: map[string]string{
		"VPN_BASE_SUBNET":    "10.240.0.0/12",
		"VPN_BASE_PORT":      "65500",
		"VPN_INSTANCE_COUNT": "40",
	}}.Plan()
	fmt.Println(err)
	var ce *vpn.ConfigError
	if errors.As(err, &ce) {
		fmt.Println(ce.Var)
	}
	// Output:
	// VPN_BASE_PORT="65500": instance 40 would use port 65540, above 65535
	// VPN_BASE_PORT
}

// A Config built by hand, without the environment: the address plan, the
// certificates and the balena API, and where the files go. Every field
// left zero means what its documentation says, as WithDefaults shows; a
// Server runs on exactly that (TestHandBuiltConfig runs this one).
func ExampleConfig_WithDefaults() {
	c := vpn.Config{
		Plan:    subnet.Plan{Base: netip.MustParsePrefix("10.240.0.0/16"), Bits: 24, Instances: 2},
		OpenVPN: vpn.OpenVPNConfig{CACert: caPEM, ServerCert: certPEM, ServerKey: keyPEM},
		Balena:  vpn.BalenaConfig{APIHost: "api.balena.example", ServiceAPIKey: "service-key"},
		RunDir:  "/run/obvpn",
		HAProxy: haproxy.Config{Socket: "/run/obvpn/haproxy.sock"},
	}
	d := c.WithDefaults()
	fmt.Println(d.Plan)
	in, _ := d.Plan.Instance(1)
	fmt.Println("instance 1:", in.Port, in.ManagementPort, in.APIPort)
	fmt.Println("openvpn:", d.OpenVPN.Proto, d.OpenVPN.KeepaliveFrequency, d.OpenVPN.KeepaliveTimeout, d.OpenVPN.User, d.OpenVPN.Compression)
	fmt.Println("auth:", d.Auth.Mode, d.Auth.MaxWorkers)
	fmt.Println("haproxy:", d.HAProxy.Mode, d.HAProxy.Port, d.HAProxy.MonitorAddr, d.HAProxy.MaxConn, d.HAProxy.Timeout)
	fmt.Println("metrics:", d.Metrics.Addr, d.Metrics.Timeout)
	fmt.Println("drain:", d.Drain.MinRatePerMinute, d.Drain.Timeout)
	fmt.Println("nss index:", d.NSSIndex)
	// Output:
	// 10.240.0.0/16 at /24: 2 of 256 instances, 252 clients each
	// instance 1: 10001 20001 30001
	// openvpn: tcp4-server 10s 1m0s nobody migrate
	// auth: management 20
	// haproxy: managed 443 :80 10000 1m0s
	// metrics: :8080 20s
	// drain: 500 2m0s
	// nss index: /run/obvpn/nss.index
}

// Placeholders for the example's PEM data; a real Config has real ones.
var caPEM, certPEM, keyPEM = []byte("-----BEGIN CERTIFICATE-----\n…"), []byte("-----BEGIN CERTIFICATE-----\n…"),
	[]byte("-----BEGIN PRIVATE KEY-----\n…")
