package haproxy_test

import (
	"fmt"
	"strings"

	"github.com/obvpn/obvpn/vpn/haproxy"
)

// The zero Config is the reference container's HAProxy; here in front of
// two instances whose servers start at port 10000 and are registered at
// run time.
func ExampleConfig_Render() {
	cfg := haproxy.Config{Socket: "/run/obvpn/haproxy.sock"}.RenderWithLimit(haproxy.Site{Instances: 2, Port: 10000}, 0)
	for _, line := range strings.Split(cfg, "\n") {
		if strings.HasPrefix(line, "\tbind ") || strings.HasPrefix(line, "\tserver-template") || strings.HasPrefix(line, "\tstats socket") {
			fmt.Println(strings.TrimSpace(line))
		}
	}
	fmt.Println(haproxy.ServerName(2))
	// Output:
	// stats socket /run/obvpn/haproxy.sock mode 600 level admin
	// bind :80
	// bind :443
	// server-template vpn 1-2 127.0.0.1:10000 disabled
	// vpn-workers/vpn2
}
