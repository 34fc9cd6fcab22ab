package vpn_test

import (
	"errors"
	"fmt"

	"github.com/obvpn/obvpn/vpn"
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
