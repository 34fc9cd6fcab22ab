package vpn

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"time"
)

// HAProxyBackend and HAProxyServerPrefix name the backend whose servers are
// the OpenVPN instances: instance id is server vpn-workers/vpn<id>.
const (
	HAProxyBackend      = "vpn-workers"
	HAProxyServerPrefix = "vpn"
)

// HAProxyServer returns the backend/server name of instance id, such as
// "vpn-workers/vpn1".
func HAProxyServer(id int) string {
	return HAProxyBackend + "/" + HAProxyServerPrefix + strconv.Itoa(id)
}

// RenderHAProxy returns HAProxy's configuration for the deployment (SPEC
// §7): a TCP frontend on the public port that balances by least
// connections over the backend vpn-workers, whose servers vpn1…vpn<count>
// start disabled and are registered by the instances at run time; an HTTP
// frontend on HAProxy.MonitorAddr whose /ping fails while no server is up;
// and the admin socket. The process and the VPN frontend take at most
// HAProxy.MaxConn connections, lowered to what the file descriptor limit
// of this process allows unless HAProxy.FileLimit is set (haproxy inherits
// the limit, and refuses to start with a maxconn that needs more); idle VPN
// connections are closed after HAProxy.Timeout on either side.
//
// With Metrics.Token set, the monitor frontend asks for HTTP Basic
// credentials "monitor:<token>" (401 with WWW-Authenticate otherwise) for
// everything but /ping, and serves /metrics/haproxy (HAProxy's own
// Prometheus exporter), /cluster_metrics and /metrics/openvpn (from the
// server's metrics listener, Metrics.Addr, reached on loopback unless it
// listens on one address), and /metrics/node and /metrics/process (from
// HAProxy.NodeExporter and HAProxy.ProcessExporter; 503 when unset). The
// configuration then holds the token: write it readable by its owner
// only, as [Server] does.
func (c *Config) RenderHAProxy() string {
	return c.renderHAProxy(fileLimit())
}

// What HAProxy needs of the file limit: per connection, two descriptors
// (the client's and the server's) and half a splice pipe's two (maxpipes
// is maxconn/4), so five for every two connections; and some for
// listeners, the sockets and the master.
const (
	haproxyFDsPerTwoConns = 5
	haproxyFDsSpare       = 100
)

// maxConn returns the connection limit to render, and the limit it was
// lowered from (0 when it was not), for fdLimit descriptors (0: no limit).
func (h HAProxyConfig) maxConn(fdLimit uint64) (n, from int) {
	n = h.MaxConn
	if n <= 0 {
		n = DefaultHAProxyMaxConn
	}
	if h.FileLimit > 0 || fdLimit == 0 || fdLimit <= haproxyFDsSpare {
		return n, 0
	}
	if allowed := int((fdLimit - haproxyFDsSpare) * 2 / haproxyFDsPerTwoConns); allowed < n {
		return allowed, n
	}
	return n, 0
}

func (c *Config) renderHAProxy(fdLimit uint64) string {
	h := c.HAProxy
	monitorAddr := h.MonitorAddr
	if monitorAddr == "" {
		monitorAddr = ":80"
	}
	port := h.Port
	if port == 0 {
		port = 443
	}
	socket := h.socket()
	timeout := h.Timeout
	if timeout <= 0 {
		timeout = c.OpenVPN.KeepaliveTimeout
	}
	if timeout <= 0 {
		timeout = 60 * time.Second
	}
	threads := h.Threads
	if threads <= 0 {
		threads = DefaultHAProxyThreads
	}
	cpuMap := h.CPUMap
	if cpuMap == "" {
		cpuMap = DefaultHAProxyCPUMap
	}
	maxConn, loweredFrom := h.maxConn(fdLimit)
	n := max(c.Plan.Instances, 1)
	accept := ""
	if h.UseProxyProtocol {
		accept = " accept-proxy"
	}
	var b strings.Builder
	b.WriteString("# HAProxy for obvpn, generated; changes are overwritten.\n")
	b.WriteString("global\n\tmaster-worker\n")
	if loweredFrom > 0 {
		fmt.Fprintf(&b, "\t# maxconn lowered from %d: the file descriptor limit is %d\n", loweredFrom, fdLimit)
	}
	fmt.Fprintf(&b, "\tmaxconn %d\n", maxConn)
	if h.FileLimit > 0 {
		fmt.Fprintf(&b, "\tulimit-n %d\n", h.FileLimit)
	}
	fmt.Fprintf(&b, "\tnbthread %d\n", threads)
	if cpuMap != "none" {
		fmt.Fprintf(&b, "\tcpu-map %s\n", cpuMap)
	}
	fmt.Fprintf(&b, "\tstats socket %s mode 600 level admin\n\tpidfile %s\n", socket, c.runDir()+"/haproxy.pid")
	b.WriteString(`
defaults
	log global
	timeout connect 10s
	timeout client 10s
	timeout server 10s
`)
	c.writeMonitor(&b, monitorAddr)
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
`, port, accept, maxConn, int(timeout/time.Second), HAProxyBackend, HAProxyBackend, int(timeout/time.Second),
		HAProxyServerPrefix, n, c.Plan.Ports.VPN)
	return b.String()
}

// writeMonitor writes the monitor frontend, which answers /ping: with
// MONITOR_SECRET_TOKEN set, everything else needs the monitoring
// credentials and is routed to HAProxy's own exporter, the server's
// metrics and the node and process exporters (503 for one that is not
// configured), after which come the backends of those routes.
func (c *Config) writeMonitor(b *strings.Builder, monitorAddr string) {
	h := c.HAProxy
	token := c.Metrics.Token
	if token != "" {
		// Single quotes: HAProxy takes everything up to the next one as
		// is (the loader refuses tokens with a single quote).
		fmt.Fprintf(b, "\nuserlist %s\n\tuser %s insecure-password '%s'\n", monitorUserlist, MonitorUser, token)
	}
	fmt.Fprintf(b, `
frontend monitor
	mode http
	bind %s
	acl vpn_dead nbsrv(%s) lt 1
	monitor-uri /ping
	monitor fail if vpn_dead
`, monitorAddr, HAProxyBackend)
	if token == "" {
		return
	}
	var backends strings.Builder
	fmt.Fprintf(b, "\tacl monitor_auth http_auth(%s)\n", monitorUserlist)
	fmt.Fprintf(b, "\thttp-request auth realm %s unless monitor_auth\n", monitorUserlist)
	b.WriteString("\thttp-request use-service prometheus-exporter if { path /metrics/haproxy }\n")
	routes := []struct{ path, backend, addr string }{
		{"/metrics/node", "node-exporter", h.NodeExporter},
		{"/metrics/process", "process-exporter", h.ProcessExporter},
		{"/cluster_metrics /metrics/openvpn", "vpn-metrics", c.metricsBackendAddr()},
	}
	paths := "/metrics/haproxy"
	for _, e := range routes {
		paths += " " + e.path
		if e.addr == "" {
			fmt.Fprintf(b, "\thttp-request return status 503 content-type text/plain string \"%s: not configured\" if { path %s }\n", e.backend, e.path)
		}
	}
	fmt.Fprintf(b, "\thttp-request return status 404 content-type text/plain string \"not found\" unless { path %s }\n", paths)
	for _, e := range routes {
		if e.addr == "" {
			continue
		}
		fmt.Fprintf(b, "\tuse_backend %s if { path %s }\n", e.backend, e.path)
		fmt.Fprintf(&backends, "\nbackend %s\n\tmode http\n", e.backend)
		if e.backend == "vpn-metrics" {
			// A scrape may take METRICS_TIMEOUT.
			fmt.Fprintf(&backends, "\ttimeout server %ds\n", int(c.metricsTimeout()/time.Second)+5)
		}
		fmt.Fprintf(&backends, "\tserver %s %s\n", strings.ReplaceAll(e.backend, "-", "_"), e.addr)
	}
	b.WriteString(backends.String())
}

// MonitorUser is the user name of the monitoring credentials, with
// MONITOR_SECRET_TOKEN as the password.
const MonitorUser = "monitor"

// monitorUserlist names HAProxy's userlist of the monitoring credentials,
// and the realm it asks for.
const monitorUserlist = "obvpn-monitor"

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

// socket is Socket, defaulted.
func (h HAProxyConfig) socket() string {
	if h.Socket == "" {
		return "/run/haproxy.sock"
	}
	return h.Socket
}

// mode is Mode, defaulted.
func (h HAProxyConfig) mode() HAProxyMode {
	if h.Mode == "" {
		return HAProxyManaged
	}
	return h.Mode
}

// metricsTimeout is Metrics.Timeout, defaulted.
func (c *Config) metricsTimeout() time.Duration {
	if c.Metrics.Timeout > 0 {
		return c.Metrics.Timeout
	}
	return DefaultMetricsTimeout
}

// HAProxyRuntime is a client of HAProxy's runtime API on its admin socket
// (stats socket … level admin). Each command uses a connection of its own.
// The zero value needs Socket.
type HAProxyRuntime struct {
	// Socket is the path of the admin socket.
	Socket string
}

// ErrHAProxy reports an answer of HAProxy's runtime API that refuses a
// command, such as "No such server.".
var ErrHAProxy = errors.New("haproxy refused the command")

// ServerState is an administrative state to set on a backend server.
type ServerState string

const (
	// StateReady puts the server in rotation.
	StateReady ServerState = "ready"
	// StateDrain takes no new connections but keeps the existing ones.
	StateDrain ServerState = "drain"
	// StateMaint takes no connections at all.
	StateMaint ServerState = "maint"
)

// Command sends one command and returns HAProxy's answer, without the
// blank line that ends it.
func (h *HAProxyRuntime) Command(ctx context.Context, cmd string) (string, error) {
	if strings.ContainsAny(cmd, "\r\n;") {
		return "", fmt.Errorf("haproxy: command %q: newlines and semicolons are not allowed", cmd)
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", h.Socket)
	if err != nil {
		return "", fmt.Errorf("haproxy: %w", err)
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if _, err := io.WriteString(conn, cmd+"\n"); err != nil {
		return "", fmt.Errorf("haproxy: %s: %w", cmd, err)
	}
	b, err := io.ReadAll(io.LimitReader(conn, 16<<20))
	if err != nil {
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		return "", fmt.Errorf("haproxy: %s: %w", cmd, err)
	}
	return strings.TrimRight(string(b), "\n"), nil
}

// SetServerAddr points backend/server (such as "vpn-workers/vpn1") at
// addr.
func (h *HAProxyRuntime) SetServerAddr(ctx context.Context, server string, addr netip.AddrPort) error {
	cmd := fmt.Sprintf("set server %s addr %s port %d", server, addr.Addr(), addr.Port())
	out, err := h.Command(ctx, cmd)
	if err != nil {
		return err
	}
	if !strings.Contains(out, "changed") && !strings.Contains(out, "no need to change") {
		return fmt.Errorf("haproxy: %s: %q: %w", cmd, out, ErrHAProxy)
	}
	return nil
}

// SetServerState sets the administrative state of backend/server.
func (h *HAProxyRuntime) SetServerState(ctx context.Context, server string, state ServerState) error {
	cmd := fmt.Sprintf("set server %s state %s", server, state)
	out, err := h.Command(ctx, cmd)
	if err != nil {
		return err
	}
	if out != "" {
		return fmt.Errorf("haproxy: %s: %q: %w", cmd, out, ErrHAProxy)
	}
	return nil
}

// ServerStatus is one row of "show servers state".
type ServerStatus struct {
	Backend string
	Name    string
	Addr    netip.AddrPort
	// Up says whether HAProxy sends connections to the server: it is
	// running and neither in maintenance nor draining.
	Up bool
	// Draining and Maint report the administrative state.
	Draining, Maint bool
}

// Server admin state bits of "show servers state" (srv_admin_state).
const (
	adminMaintMask = 0x01 | 0x02 | 0x20 | 0x40 // forced, inherited, resolution, health maintenance
	adminDrainMask = 0x08 | 0x10               // forced, inherited drain
)

// ServersState returns the servers of backend, from "show servers state",
// parsed by the column names of its header.
func (h *HAProxyRuntime) ServersState(ctx context.Context, backend string) ([]ServerStatus, error) {
	out, err := h.Command(ctx, "show servers state "+backend)
	if err != nil {
		return nil, err
	}
	return parseServersState(out)
}

func parseServersState(out string) ([]ServerStatus, error) {
	sc := bufio.NewScanner(strings.NewReader(out))
	if !sc.Scan() || strings.TrimSpace(sc.Text()) != "1" {
		return nil, fmt.Errorf("haproxy: show servers state: %q: %w", firstLine(out), ErrHAProxy)
	}
	var cols map[string]int
	var servers []ServerStatus
	for sc.Scan() {
		line := sc.Text()
		if h, ok := strings.CutPrefix(line, "# "); ok {
			cols = make(map[string]int)
			for i, name := range strings.Fields(h) {
				cols[name] = i
			}
			continue
		}
		f := strings.Fields(line)
		if len(f) == 0 || cols == nil {
			continue
		}
		get := func(name string) string {
			if i, ok := cols[name]; ok && i < len(f) {
				return f[i]
			}
			return ""
		}
		op, err1 := strconv.Atoi(get("srv_op_state"))
		admin, err2 := strconv.Atoi(get("srv_admin_state"))
		port, err3 := strconv.ParseUint(get("srv_port"), 10, 16)
		addr, err4 := netip.ParseAddr(get("srv_addr"))
		if err := errors.Join(err1, err2, err3, err4); err != nil {
			return nil, fmt.Errorf("haproxy: show servers state: row %q: %w", line, err)
		}
		s := ServerStatus{
			Backend:  get("be_name"),
			Name:     get("srv_name"),
			Addr:     netip.AddrPortFrom(addr, uint16(port)),
			Maint:    admin&adminMaintMask != 0,
			Draining: admin&adminDrainMask != 0,
		}
		s.Up = op == 2 && !s.Maint && !s.Draining
		servers = append(servers, s)
	}
	return servers, nil
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return line
}
