package vpn

import (
	"net"
	"net/netip"
	"path/filepath"

	"github.com/obvpn/obvpn/vpn/haproxy"
)

// RenderHAProxy returns HAProxy's configuration for the deployment (SPEC
// §7; see [haproxy.Config.Render]): Config.HAProxy's settings, with
// Timeout defaulting to OpenVPN.KeepaliveTimeout, in front of the plan's
// instances, with the run directory's pidfile, and with Metrics.Token
// guarding the monitor frontend's paths, which reach the metrics listener
// (Metrics.Addr) on loopback unless it listens on one address.
func (c *Config) RenderHAProxy() string {
	return c.haproxy().Render(c.haproxySite())
}

// renderHAProxy is RenderHAProxy for fdLimit descriptors.
func (c *Config) renderHAProxy(fdLimit uint64) string {
	return c.haproxy().RenderWithLimit(c.haproxySite(), fdLimit)
}

// haproxy is Config.HAProxy, defaulted (its zero timeout is the keepalive
// timeout).
func (c *Config) haproxy() haproxy.Config { return c.WithDefaults().HAProxy }

// haproxySite is what the deployment's HAProxy fronts.
func (c *Config) haproxySite() haproxy.Site {
	d := c.WithDefaults()
	return haproxy.Site{Instances: c.Plan.Instances, Port: c.Plan.Ports.VPN, PIDFile: filepath.Join(d.RunDir, "haproxy.pid"),
		MonitorToken: c.Metrics.Token, Metrics: c.metricsBackendAddr(), MetricsTimeout: d.Metrics.Timeout}
}

// metricsBackendAddr is where HAProxy reaches the server's metrics
// listener: its address, on loopback when it listens on every address;
// "" when it has no fixed port.
func (c *Config) metricsBackendAddr() string {
	addr := c.Metrics.addr()
	if addr == "" {
		return ""
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil || port == "0" || port == "" {
		return ""
	}
	if ip, err := netip.ParseAddr(host); host == "" || err == nil && ip.IsUnspecified() {
		host = "127.0.0.1"
		if err == nil && ip.Is6() && !ip.Is4In6() {
			host = "::1"
		}
	}
	return net.JoinHostPort(host, port)
}

// MetricsOff is the Metrics.Addr (and VPN_METRICS_ADDR) of a server that
// serves no metrics.
const MetricsOff = "off"

// DefaultMetricsAddr is where metrics are served when Metrics.Addr is
// empty, as the reference does.
const DefaultMetricsAddr = ":8080"

// addr is the metrics listener's address, defaulted; "" when the metrics
// are off.
func (m MetricsConfig) addr() string {
	switch m.Addr {
	case "":
		return DefaultMetricsAddr
	case MetricsOff:
		return ""
	}
	return m.Addr
}

// instanceAddr is where HAProxy reaches instance id: loopback and its
// OpenVPN port.
func instanceAddr(cfg *Config, id int) netip.AddrPort {
	in, _ := cfg.Plan.Instance(id)
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), uint16(in.Port))
}
