// Package haproxy runs HAProxy in front of a server's OpenVPN instances
// (SPEC §7): [Config.Render] writes its configuration, [Process] runs a
// managed haproxy, [Runtime] speaks its runtime API on the admin socket,
// and [Registrar] keeps each instance's server in the backend registered,
// ready, draining or in maintenance as the server wants it.
//
// Instance id is server [ServerName](id), "vpn-workers/vpn<id>", of
// backend [Backend]; its servers start disabled and are registered at run
// time, so one configuration serves any instance ports.
package haproxy

import (
	"fmt"
	"strings"
	"time"
)

// Mode says how a server works with HAProxy.
type Mode string

const (
	// Managed writes HAProxy's configuration, runs haproxy and stops
	// it on exit. The default.
	Managed Mode = "managed"
	// External only registers instances with a running HAProxy
	// through its runtime API socket.
	External Mode = "external"
	// Off runs no HAProxy: clients use the instance ports.
	Off Mode = "off"
)

// Config is HAProxy as the TCP balancer in front of the instances. Its
// zero value is the reference container's HAProxy: see each field.
type Config struct {
	// Mode is VPN_HAPROXY. Empty means [Managed].
	Mode Mode
	// Port is the public OpenVPN port, HAProxy's frontend (VPN_PORT). Zero
	// means 443.
	Port int
	// Socket is the path of HAProxy's admin socket (VPN_HAPROXY_SOCKET).
	// Empty means /run/haproxy.sock.
	Socket string
	// UseProxyProtocol adds accept-proxy to the frontend's bind, for a
	// balancer in front that speaks the PROXY protocol
	// (VPN_HAPROXY_USEPROXYPROTOCOL).
	UseProxyProtocol bool
	// MonitorAddr is where the managed HAProxy answers GET /ping: 200
	// while an instance takes clients, 503 otherwise
	// (VPN_HAPROXY_MONITOR_ADDR). Empty means ":80", as the reference
	// deployment. With Site.MonitorToken set, the same frontend serves the
	// monitoring paths (see [Config.Render]).
	MonitorAddr string
	// MaxConn is HAProxy's connection limit, for the process and for the
	// VPN frontend (VPN_HAPROXY_MAXCONN). Zero means 10000, as the
	// reference container. Unless FileLimit is set, it is lowered to what
	// the file descriptor limit that haproxy inherits allows (two
	// descriptors a connection), where the reference's haproxy would
	// refuse to start.
	MaxConn int
	// FileLimit is HAProxy's ulimit-n (VPN_HAPROXY_ULIMIT). Zero lets
	// HAProxy derive it from MaxConn. The reference container sets
	// 1048576, which haproxy refuses to start with where the hard limit
	// is lower and it may not raise it (CAP_SYS_RESOURCE).
	FileLimit int
	// Timeout is how long a VPN connection may be idle on the client side
	// and on the instance side before HAProxy closes it
	// (VPN_HAPROXY_TIMEOUT, in seconds, else VPN_KEEPALIVE_TIMEOUT, as
	// the reference container). Zero means 60 s; a vpn.Config fills it
	// with OpenVPN.KeepaliveTimeout. OpenVPN pings every
	// KeepaliveFrequency, so a live connection is never idle that long.
	Timeout time.Duration
	// Threads is HAProxy's nbthread (HAPROXY_NBTHREAD). Zero means 2, as
	// the reference container.
	Threads int
	// CPUMap is HAProxy's cpu-map (HAPROXY_CPU_MAP), such as
	// "auto:1/1-2 0-1". Empty means "auto:1/1-2 0-1", the reference
	// container's; "none" writes no cpu-map.
	CPUMap string
	// NodeExporter and ProcessExporter are the addresses (host:port) of a
	// Prometheus node exporter and process exporter that the monitor
	// frontend routes /metrics/node and /metrics/process to, with
	// Site.MonitorToken set (VPN_NODE_EXPORTER_ADDR,
	// VPN_PROCESS_EXPORTER_ADDR; the reference container runs them on
	// 127.0.0.1:9000 and 127.0.0.1:9001). Empty answers that path 503.
	NodeExporter, ProcessExporter string
}

// Defaults of the HAProxy settings, the reference container's.
const (
	DefaultMaxConn = 10000
	DefaultThreads = 2
	DefaultCPUMap  = "auto:1/1-2 0-1"
)

// More defaults of the zero Config.
const (
	DefaultPort        = 443
	DefaultSocket      = "/run/haproxy.sock"
	DefaultMonitorAddr = ":80"
	DefaultTimeout     = 60 * time.Second
)

// WithDefaults returns c with every zero field set to what its
// documentation says the zero value means.
func (c Config) WithDefaults() Config {
	if c.Mode == "" {
		c.Mode = Managed
	}
	if c.Port == 0 {
		c.Port = DefaultPort
	}
	if c.Socket == "" {
		c.Socket = DefaultSocket
	}
	if c.MonitorAddr == "" {
		c.MonitorAddr = DefaultMonitorAddr
	}
	if c.MaxConn <= 0 {
		c.MaxConn = DefaultMaxConn
	}
	if c.Timeout <= 0 {
		c.Timeout = DefaultTimeout
	}
	if c.Threads <= 0 {
		c.Threads = DefaultThreads
	}
	if c.CPUMap == "" {
		c.CPUMap = DefaultCPUMap
	}
	return c
}

// Site is what HAProxy fronts, besides its own settings: the instances,
// and the server's files and metrics.
type Site struct {
	// Instances is the number of the backend's servers, vpn1…vpn<n>. Zero
	// means 1.
	Instances int
	// Port is the port the servers start with, before the [Registrar]
	// gives each its instance's (Plan.Ports.VPN).
	Port int
	// PIDFile is haproxy's pidfile, the master's pid in -W mode. Empty
	// renders no pidfile line: a [Process] then passes -p <File>.pid.
	PIDFile string
	// MonitorToken, if set, guards the monitor frontend's paths but /ping
	// (MONITOR_SECRET_TOKEN): see [Config.Render].
	MonitorToken string
	// Metrics is where HAProxy reaches the server's metrics listener for
	// /cluster_metrics and /metrics/openvpn, as host:port; empty routes
	// them nowhere (404).
	Metrics string
	// MetricsTimeout is how long one scrape of Metrics may take. Zero
	// means 20 s.
	MetricsTimeout time.Duration
}

// Render returns HAProxy's configuration for the site: a TCP frontend on
// the public port that balances by least connections over the backend
// [Backend], whose servers vpn1…vpn<count> start disabled and are
// registered by the instances at run time; an HTTP frontend on
// MonitorAddr whose /ping fails while no server is up; and the admin
// socket. The process and the VPN frontend take at most MaxConn
// connections, lowered to what the file descriptor limit of this process
// allows unless FileLimit is set (haproxy inherits the limit, and refuses
// to start with a maxconn that needs more); idle VPN connections are
// closed after Timeout on either side.
//
// With Site.MonitorToken set, the monitor frontend asks for HTTP Basic
// credentials "monitor:<token>" ([MonitorUser]; 401 with WWW-Authenticate
// otherwise) for everything but /ping, and serves /metrics/haproxy
// (HAProxy's own Prometheus exporter), /cluster_metrics and
// /metrics/openvpn (from Site.Metrics), and /metrics/node and
// /metrics/process (from NodeExporter and ProcessExporter; 503 when
// unset). The configuration then holds the token: write it readable by
// its owner only, as [Process] does.
func (c Config) Render(s Site) string {
	return c.RenderWithLimit(s, FileLimit())
}

// What HAProxy needs of the file limit: per connection, two descriptors
// (the client's and the server's) and half a splice pipe's two (maxpipes
// is maxconn/4), so five for every two connections; and some for
// listeners, the sockets and the master.
const (
	fdsPerTwoConns = 5
	fdsSpare       = 100
)

// MaxConnFor returns the connection limit that Render writes where the
// processes this one starts may open fdLimit descriptors (0: no limit
// known), and the limit it was lowered from (0 when it was not).
func (c Config) MaxConnFor(fdLimit uint64) (n, from int) {
	n = c.MaxConn
	if n <= 0 {
		n = DefaultMaxConn
	}
	if c.FileLimit > 0 || fdLimit == 0 || fdLimit <= fdsSpare {
		return n, 0
	}
	if allowed := int((fdLimit - fdsSpare) * 2 / fdsPerTwoConns); allowed < n {
		return allowed, n
	}
	return n, 0
}

// RenderWithLimit is Render for processes that may open fdLimit
// descriptors (0: no limit known) instead of what this one's children
// inherit.
func (c Config) RenderWithLimit(s Site, fdLimit uint64) string {
	maxConn, loweredFrom := c.MaxConnFor(fdLimit)
	c = c.WithDefaults()
	timeout := int(c.Timeout / time.Second)
	n := max(s.Instances, 1)
	accept := ""
	if c.UseProxyProtocol {
		accept = " accept-proxy"
	}
	var b strings.Builder
	b.WriteString("# HAProxy for obvpn, generated; changes are overwritten.\n")
	b.WriteString("global\n\tmaster-worker\n")
	if loweredFrom > 0 {
		fmt.Fprintf(&b, "\t# maxconn lowered from %d: the file descriptor limit is %d\n", loweredFrom, fdLimit)
	}
	fmt.Fprintf(&b, "\tmaxconn %d\n", maxConn)
	if c.FileLimit > 0 {
		fmt.Fprintf(&b, "\tulimit-n %d\n", c.FileLimit)
	}
	fmt.Fprintf(&b, "\tnbthread %d\n", c.Threads)
	if c.CPUMap != "none" {
		fmt.Fprintf(&b, "\tcpu-map %s\n", c.CPUMap)
	}
	fmt.Fprintf(&b, "\tstats socket %s mode 600 level admin\n", c.Socket)
	if s.PIDFile != "" {
		fmt.Fprintf(&b, "\tpidfile %s\n", s.PIDFile)
	}
	b.WriteString(`
defaults
	log global
	timeout connect 10s
	timeout client 10s
	timeout server 10s
`)
	c.writeMonitor(&b, s)
	fmt.Fprintf(&b, `
frontend vpn
	mode tcp
	bind :%d%s
	maxconn %d
	timeout client %ds
	option splice-auto
	option tcp-smart-accept
	default_backend %s

backend %s
	mode tcp
	balance leastconn
	option tcp-smart-connect
	timeout server %ds
	server-template %s 1-%d 127.0.0.1:%d disabled
`, c.Port, accept, maxConn, timeout, Backend, Backend, timeout, ServerPrefix, n, s.Port)
	return b.String()
}

// writeMonitor writes the monitor frontend, which answers /ping: with
// MONITOR_SECRET_TOKEN set, everything else needs the monitoring
// credentials and is routed to HAProxy's own exporter, the server's
// metrics and the node and process exporters (503 for one that is not
// configured), after which come the backends of those routes.
func (c Config) writeMonitor(b *strings.Builder, s Site) {
	token := s.MonitorToken
	if token != "" {
		// Single quotes: HAProxy takes everything up to the next one as
		// is (vpn's loader refuses tokens with a single quote).
		fmt.Fprintf(b, "\nuserlist %s\n\tuser %s insecure-password '%s'\n", MonitorRealm, MonitorUser, token)
	}
	fmt.Fprintf(b, `
frontend monitor
	mode http
	bind %s
	acl vpn_dead nbsrv(%s) lt 1
	monitor-uri /ping
	monitor fail if vpn_dead
`, c.MonitorAddr, Backend)
	if token == "" {
		return
	}
	var backends strings.Builder
	fmt.Fprintf(b, "\tacl monitor_auth http_auth(%s)\n", MonitorRealm)
	fmt.Fprintf(b, "\thttp-request auth realm %s unless monitor_auth\n", MonitorRealm)
	b.WriteString("\thttp-request use-service prometheus-exporter if { path /metrics/haproxy }\n")
	routes := []struct{ path, backend, addr string }{
		{"/metrics/node", "node-exporter", c.NodeExporter},
		{"/metrics/process", "process-exporter", c.ProcessExporter},
		{"/cluster_metrics /metrics/openvpn", "vpn-metrics", s.Metrics},
	}
	paths := "/metrics/haproxy"
	for _, e := range routes {
		paths += " " + e.path
		if e.addr == "" {
			fmt.Fprintf(b, "\thttp-request return status 503 content-type text/plain string \"%s: not configured\" if { path %s }\n", e.backend, e.path)
		}
	}
	fmt.Fprintf(b, "\thttp-request return status 404 content-type text/plain string \"not found\" unless { path %s }\n", paths)
	scrape := s.MetricsTimeout
	if scrape <= 0 {
		scrape = 20 * time.Second
	}
	for _, e := range routes {
		if e.addr == "" {
			continue
		}
		fmt.Fprintf(b, "\tuse_backend %s if { path %s }\n", e.backend, e.path)
		fmt.Fprintf(&backends, "\nbackend %s\n\tmode http\n", e.backend)
		if e.backend == "vpn-metrics" {
			// A scrape may take MetricsTimeout.
			fmt.Fprintf(&backends, "\ttimeout server %ds\n", int(scrape/time.Second)+5)
		}
		fmt.Fprintf(&backends, "\tserver %s %s\n", strings.ReplaceAll(e.backend, "-", "_"), e.addr)
	}
	b.WriteString(backends.String())
}

// MonitorUser is the user name of the monitoring credentials, with
// MONITOR_SECRET_TOKEN as the password.
const MonitorUser = "monitor"

// MonitorRealm names HAProxy's userlist of the monitoring credentials, and
// the realm that it and the server's metrics listener ask for.
const MonitorRealm = "obvpn-monitor"
