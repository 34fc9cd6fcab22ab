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
// and the admin socket. HAProxy's connection limit follows its file
// descriptor limit.
func (c *Config) RenderHAProxy() string {
	monitorAddr := c.HAProxy.MonitorAddr
	if monitorAddr == "" {
		monitorAddr = ":80"
	}
	h := c.HAProxy
	port := h.Port
	if port == 0 {
		port = 443
	}
	socket := h.Socket
	if socket == "" {
		socket = "/run/haproxy.sock"
	}
	timeout := c.OpenVPN.KeepaliveTimeout
	if timeout <= 0 {
		timeout = 60 * time.Second
	}
	n := max(c.Plan.Instances, 1)
	accept := ""
	if h.UseProxyProtocol {
		accept = " accept-proxy"
	}
	var b strings.Builder
	fmt.Fprintf(&b, `# HAProxy for obvpn, generated; changes are overwritten.
global
	master-worker
	stats socket %s mode 600 level admin
	pidfile %s

defaults
	log global
	timeout connect 10s
	timeout client %ds
	timeout server %ds

frontend monitor
	mode http
	bind %s
	acl vpn_dead nbsrv(%s) lt 1
	monitor-uri /ping
	monitor fail if vpn_dead

frontend vpn
	mode tcp
	bind :%d%s
	option splice-auto
	option tcp-smart-accept
	default_backend %s

backend %s
	mode tcp
	balance leastconn
	option tcp-smart-connect
	server-template %s 1-%d 127.0.0.1:%d disabled
`, socket, c.runDir()+"/haproxy.pid", int(2*timeout/time.Second), int(2*timeout/time.Second),
		monitorAddr, HAProxyBackend, port, accept, HAProxyBackend, HAProxyBackend, HAProxyServerPrefix, n, c.Plan.Ports.VPN)
	return b.String()
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
