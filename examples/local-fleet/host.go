package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/lmittmann/tint"

	"github.com/obvpn/obvpn/vpn"
	"github.com/obvpn/obvpn/vpn/haproxy"
	"github.com/obvpn/obvpn/vpn/vpntest"
)

// hostEnv is set in the environment of a host process: local-fleet runs
// itself as each VPN host, in the host's namespace.
const hostEnv = "LOCAL_FLEET_HOST"

// The ports of every host, on its address.
const (
	hostVPNPort     = 443  // the host's HAProxy, which the balancer sends devices to
	hostProxyPort   = 3128 // the CONNECT proxy
	hostMetricsPort = 8080 // /cluster_metrics
	hostMonitorPort = 8088 // HAProxy's /ping, which the balancer checks
	apiPort         = 8000 // balenatest, in the world
)

// serveHost is a host process: the VPN server from the environment, as
// cmd/open-balena-vpn runs it. SIGTERM drains it, and it exits 0.
func serveHost() int {
	cfg, err := vpn.LoadConfig()
	if err != nil {
		fmt.Fprintf(os.Stderr, "local-fleet host: %v\n", err)
		return 2
	}
	var h slog.Handler = tint.NewTextHandler(os.Stderr, &tint.Options{Level: slog.LevelInfo, TimeFormat: time.TimeOnly, NoColor: true})
	if !cfg.Verbose {
		h = quietOpenVPN{h}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	srv := &vpn.Server{Config: cfg, Logger: slog.New(h)}
	if err := srv.Run(ctx); err != nil {
		fmt.Fprintf(os.Stderr, "local-fleet host: %v\n", err)
		return 1
	}
	return 0
}

// host is a VPN host of the fleet: a namespace linked to the world, and a
// local-fleet process in it that runs the VPN server.
type host struct {
	id        int
	ns        *vpntest.Device
	dir       string
	proc      *vpntest.Process
	serviceID int64
	gone      bool // killed or drained: no longer expected to serve
}

// name is the host's name in tables and in the balancer.
func (h *host) name() string { return fmt.Sprintf("host%d", h.id) }

func (h *host) proxyAddr() string { return fmt.Sprintf("%s:%d", h.ns.Addr, hostProxyPort) }

// startHost makes host id's namespace and starts its server.
func (f *fleet) startHost(id int) (*host, error) {
	h := &host{id: id, dir: filepath.Join(f.dir, fmt.Sprintf("host-%d", id))}
	f.hosts = append(f.hosts, h)
	var err error
	if h.ns, err = vpntest.MakeHost(f.world); err != nil {
		return nil, err
	}
	run := filepath.Join(h.dir, "run")
	if err := os.MkdirAll(run, 0o700); err != nil {
		return nil, err
	}
	env := map[string]string{
		hostEnv:                                  "1",
		"PATH":                                   os.Getenv("PATH"),
		"VPN_BASE_SUBNET":                        "10.240.0.0/12",
		"VPN_INSTANCE_SUBNET_BITMASK":            "20",
		"VPN_INSTANCE_COUNT":                     "2",
		"VPN_RUN_DIR":                            run,
		"VPN_HAPROXY":                            "managed",
		"VPN_HAPROXY_SOCKET":                     filepath.Join(run, "haproxy.sock"),
		"VPN_HAPROXY_MONITOR_ADDR":               fmt.Sprintf(":%d", hostMonitorPort),
		"VPN_PORT":                               fmt.Sprint(hostVPNPort),
		"BALENA_API_INTERNAL_HOST":               fmt.Sprintf("%s:%d", h.ns.WorldAddr, apiPort),
		"VPN_SERVICE_API_KEY":                    f.api.ServiceKey,
		"VPN_GUEST_API_KEY":                      f.api.GuestKey,
		"VPN_SERVICE_REGISTER_INTERFACE":         h.ns.Iface,
		"VPN_OPENVPN_CA_CRT":                     string(f.pki.CACert),
		"VPN_OPENVPN_SERVER_CRT":                 string(f.pki.ServerCert),
		"VPN_OPENVPN_SERVER_KEY":                 string(f.pki.ServerKey),
		"VPN_API_PORT":                           "8081",
		"VPN_METRICS_ADDR":                       fmt.Sprintf(":%d", hostMetricsPort),
		"VPN_CONNECT_PROXY_PORT":                 fmt.Sprint(hostProxyPort),
		"VPN_STATUS_FILE_WRITE_INTERVAL_SECONDS": "1",
		"VPN_BYTECOUNT_INTERVAL":                 "5",
		"DEFAULT_SIGTERM_TIMEOUT":                "10",
		"MINIMUM_DRAIN_RATE_PER_MINUTE":          "6000", // 10 ms between kills
		"DELAY_ON_AUTH_FAIL":                     "1000",
		"VPN_VERBOSE_LOGS":                       fmt.Sprint(f.o.verbose),
	}
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := h.ns.Command(self)
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	if h.proc, err = vpntest.Launch(cmd); err != nil {
		return nil, err
	}
	return h, nil
}

// waitReady waits until h has registered with the API and its HAProxy
// takes devices.
func (f *fleet) waitReady(ctx context.Context, h *host) error {
	hc := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DialContext: f.world.Dial, DisableKeepAlives: true}}
	ping := fmt.Sprintf("http://%s:%d/ping", h.ns.Addr, hostMonitorPort)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		if h.serviceID == 0 {
			h.serviceID = f.serviceIDOf(h.ns.Addr)
		}
		if h.serviceID != 0 {
			if resp, err := hc.Get(ping); err == nil {
				resp.Body.Close()
				if resp.StatusCode == http.StatusOK {
					return nil
				}
			}
		}
		select {
		case <-h.proc.Exited():
			return fmt.Errorf("%s exited with status %d:\n%s", h.name(), h.proc.ExitCode(), tail(h.proc, 20))
		case <-ctx.Done():
			return fmt.Errorf("%s not ready: %w:\n%s", h.name(), ctx.Err(), tail(h.proc, 20))
		case <-tick.C:
		}
	}
}

// serviceIDOf returns the id of the service instance registered with
// addr, or 0.
func (f *fleet) serviceIDOf(addr netip.Addr) int64 {
	for id := int64(1); ; id++ {
		si, ok := f.api.ServiceInstance(id)
		if !ok {
			return 0
		}
		if si.IPAddress == addr {
			return id
		}
	}
}

// hostOf returns the host of a service instance id, or nil.
func (f *fleet) hostOf(serviceID int64) *host {
	for _, h := range f.hosts {
		if h.serviceID == serviceID && serviceID != 0 {
			return h
		}
	}
	return nil
}

func tail(p *vpntest.Process, n int) string {
	lines := p.Lines()
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// startBalancer runs the fleet's TCP balancer in the world: HAProxy on
// vpnPort, leastconn over the hosts' HAProxies, each checked on its
// monitor's /ping, with a retry on another host when one refuses.
func (f *fleet) startBalancer() error {
	f.balancerSocket = filepath.Join(f.dir, "balancer.sock")
	var servers strings.Builder
	for _, h := range f.hosts {
		fmt.Fprintf(&servers, "    server %s %s:%d\n", h.name(), h.ns.Addr, hostVPNPort)
	}
	conf := fmt.Sprintf(`global
    stats socket %s mode 600 level admin

defaults
    mode tcp
    timeout connect 2s
    timeout client 1h
    timeout server 1h
    retries 3
    option redispatch

frontend vpn
    bind :%d
    default_backend hosts

backend hosts
    balance leastconn
    option httpchk GET /ping
    default-server check port %d inter 500ms fall 2 rise 1
%s`, f.balancerSocket, vpnPort, hostMonitorPort, servers.String())
	file := filepath.Join(f.dir, "balancer.cfg")
	if err := os.WriteFile(file, []byte(conf), 0o600); err != nil {
		return err
	}
	bin, err := exec.LookPath("haproxy")
	if err != nil {
		return err
	}
	if f.balancer, err = vpntest.Launch(f.world.Command(bin, "-db", "-f", file)); err != nil {
		return err
	}
	// Ready when the admin socket answers.
	rt := &haproxy.Runtime{Socket: f.balancerSocket}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := rt.Command(context.Background(), "show info"); err == nil {
			return nil
		}
		select {
		case <-f.balancer.Exited():
			return fmt.Errorf("the balancer exited:\n%s", tail(f.balancer, 10))
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return errors.New("the balancer's admin socket did not answer within 10 s")
		}
	}
}

// killHost kills host k's server and everything it started (openvpn,
// haproxy) at once, as a host that fails does.
func (f *fleet) killHost(h *host) {
	h.gone = true
	_ = h.proc.Kill()
	killAll(h.ns.Netns)
	<-h.proc.Exited()
}

// drainHost takes host k out of the balancer, as a load balancer does
// with a terminating pod, and sends its server SIGTERM; it returns the
// server's exit status once it has drained and exited.
func (f *fleet) drainHost(ctx context.Context, h *host) (int, error) {
	h.gone = true
	rt := &haproxy.Runtime{Socket: f.balancerSocket}
	if err := rt.SetServerState(ctx, "hosts/"+h.name(), haproxy.Drain); err != nil {
		return -1, err
	}
	if err := h.proc.Signal(syscall.SIGTERM); err != nil {
		return -1, err
	}
	select {
	case <-h.proc.Exited():
		return h.proc.ExitCode(), nil
	case <-ctx.Done():
		return -1, fmt.Errorf("%s did not exit after SIGTERM: %w", h.name(), ctx.Err())
	}
}
