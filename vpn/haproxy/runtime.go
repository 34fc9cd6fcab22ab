package haproxy

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

// Backend and ServerPrefix name the backend whose servers are the OpenVPN
// instances: instance id is server vpn-workers/vpn<id>.
const (
	Backend      = "vpn-workers"
	ServerPrefix = "vpn"
)

// ServerName returns the backend/server name of instance id, such as
// "vpn-workers/vpn1".
func ServerName(id int) string {
	return Backend + "/" + ServerPrefix + strconv.Itoa(id)
}

// Runtime is a client of HAProxy's runtime API on its admin socket
// (stats socket … level admin). Each command uses a connection of its own.
// The zero value needs Socket.
type Runtime struct {
	// Socket is the path of the admin socket.
	Socket string
}

// ErrRefused reports an answer of HAProxy's runtime API that refuses a
// command, such as "No such server.".
var ErrRefused = errors.New("haproxy refused the command")

// ServerState is an administrative state to set on a backend server.
type ServerState string

const (
	// Ready puts the server in rotation.
	Ready ServerState = "ready"
	// Drain takes no new connections but keeps the existing ones.
	Drain ServerState = "drain"
	// Maint takes no connections at all.
	Maint ServerState = "maint"
)

// Command sends one command and returns HAProxy's answer, without the
// blank line that ends it.
func (h *Runtime) Command(ctx context.Context, cmd string) (string, error) {
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
func (h *Runtime) SetServerAddr(ctx context.Context, server string, addr netip.AddrPort) error {
	cmd := fmt.Sprintf("set server %s addr %s port %d", server, addr.Addr(), addr.Port())
	out, err := h.Command(ctx, cmd)
	if err != nil {
		return err
	}
	if !strings.Contains(out, "changed") && !strings.Contains(out, "no need to change") {
		return fmt.Errorf("haproxy: %s: %q: %w", cmd, out, ErrRefused)
	}
	return nil
}

// SetServerState sets the administrative state of backend/server.
func (h *Runtime) SetServerState(ctx context.Context, server string, state ServerState) error {
	cmd := fmt.Sprintf("set server %s state %s", server, state)
	out, err := h.Command(ctx, cmd)
	if err != nil {
		return err
	}
	if out != "" {
		return fmt.Errorf("haproxy: %s: %q: %w", cmd, out, ErrRefused)
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
func (h *Runtime) ServersState(ctx context.Context, backend string) ([]ServerStatus, error) {
	out, err := h.Command(ctx, "show servers state "+backend)
	if err != nil {
		return nil, err
	}
	return parseServersState(out)
}

func parseServersState(out string) ([]ServerStatus, error) {
	sc := bufio.NewScanner(strings.NewReader(out))
	if !sc.Scan() || strings.TrimSpace(sc.Text()) != "1" {
		return nil, fmt.Errorf("haproxy: show servers state: %q: %w", firstLine(out), ErrRefused)
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
