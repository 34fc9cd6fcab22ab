// Command local-fleet runs the whole openBalena VPN deployment on one
// machine: balenatest as the balena API, one or more VPN hosts (each a
// vpn.Server with two OpenVPN instances behind its managed HAProxy, and
// the CONNECT proxy) behind a balancer, and simulated devices, each a real
// openvpn client in a network namespace of its own with a small web
// service on port 80. It fetches every device's page through the CONNECT
// proxy of every host and prints a table of what it found, then stays up
// until Ctrl-C, when it drains the hosts and removes every namespace,
// link, process and file it made.
//
// Everything runs in network namespaces, so nothing touches the machine's
// own network: a "world" namespace is the network (the balena API, the
// balancer, and links to the devices from 198.18.0.0/15 and to the hosts
// from 198.51.100.0/24, no default route), and each VPN host is a
// namespace of its own with a local-fleet process in it that runs the
// server (as cmd/open-balena-vpn would), registered with the API as its
// own service instance. The balancer is HAProxy, leastconn over the
// hosts' own HAProxies (a load balancer in front of pods). The proxy and
// the metrics of host 1 are relayed to the machine's loopback (-proxy,
// -metrics) for a person to try by hand.
//
// With -hosts 2 or more, a CONNECT sent to any host's proxy reaches any
// device: the proxy that does not hold the device forwards to the one
// that does. -kill-host K kills host K after the check (its devices come
// back through the balancer on the others), -drain-host K drains it; both
// check every device again and print the times.
//
// It needs root, openvpn, haproxy and ip (iproute2). make demo runs it.
//
//	local-fleet                 # the devices of devices.json
//	local-fleet -devices 20     # 20 generated devices
//	local-fleet -once           # exit after the check: 0 if every device was reached
//	local-fleet -once -hosts 2 -devices 6 -kill-host 2
//	local-fleet -once -devices 500 -hosts 2 -kill-host 2 -memory-limit 4GiB
//
// It prints the times and what the balena API was asked, and checks them
// against targets (-target-online, -target-reach, -target-back): with
// -once, a missed target is a failure, as is a device that is connected
// to a host while the API says it is offline once the fleet settled.
// -memory-limit runs every process of the fleet in a memory cgroup with
// that limit, counting each page once (summed RSS counts the shared
// libraries once per process), and prints the group's peak.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"slices"
	"syscall"
	"time"

	"github.com/lmittmann/tint"

	"github.com/obvpn/obvpn/vpn/vpntest"
)

func main() {
	raiseFileLimit()
	if os.Getenv(hostEnv) == "1" {
		os.Exit(serveHost()) // one of the fleet's VPN hosts, started by the fleet
	}
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("local-fleet", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o options
	fs.IntVar(&o.devices, "devices", 0, fmt.Sprintf("generate this many devices (1-%d); 0 takes -devices-file", maxDevices))
	fs.StringVar(&o.devicesFile, "devices-file", "", "a JSON list of {\"uuid\",\"key\"} devices; empty means the example's devices.json")
	fs.IntVar(&o.hosts, "hosts", 1, fmt.Sprintf("how many VPN hosts (1-%d), each a server in a namespace of its own behind one balancer", vpntest.MaxHosts))
	fs.IntVar(&o.killHost, "kill-host", 0, "after the check, SIGKILL this host (1-indexed) and check that its devices come back on the others")
	fs.IntVar(&o.drainHost, "drain-host", 0, "after the check, drain this host (SIGTERM) and check that its devices come back on the others")
	fs.BoolVar(&o.once, "once", false, "exit after the check, with status 0 only if every device was reached")
	fs.DurationVar(&o.timeout, "timeout", 3*time.Minute, "how long devices have to come online and be reached")
	fs.StringVar(&o.proxyAddr, "proxy", "127.0.0.1:3128", "where this machine reaches host 1's CONNECT proxy (not with -once)")
	fs.StringVar(&o.metricsAddr, "metrics", "127.0.0.1:8080", "where this machine reaches host 1's metrics (not with -once)")
	fs.StringVar(&o.profile, "profile", string(vpntest.BalenaOS), "the devices' OpenVPN client configuration: balenaos (balenaOS's own resin.conf, comp-lzo), minimal, or mixed (both in turn)")
	fs.DurationVar(&o.targets.online, "target-online", 90*time.Second, "a target: every device online in the API within this time of local-fleet's start (0: none)")
	fs.DurationVar(&o.targets.reach, "target-reach", 30*time.Second, "a target: every device reached through every host's proxy within this time of being online (0: none)")
	fs.DurationVar(&o.targets.back, "target-back", 90*time.Second, "a target: after -kill-host or -drain-host, every device online elsewhere and reached within this time (0: none)")
	fs.Var(&o.memoryLimit, "memory-limit", "run the whole fleet in a memory cgroup with this limit (e.g. 4GiB, 512MiB), and print its peak; empty: none")
	fs.BoolVar(&o.verbose, "v", false, "log what the hosts do, OpenVPN's own lines included (printed at the end)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "local-fleet: unexpected arguments %q\n", fs.Args())
		return 2
	}
	if err := o.validate(); err != nil {
		fmt.Fprintf(stderr, "local-fleet: %v\n", err)
		return 2
	}
	if err := prerequisites(); err != nil {
		fmt.Fprintf(stderr, "local-fleet: %v\n", err)
		return 1
	}
	o.log = slog.New(tint.NewTextHandler(stderr, &tint.Options{Level: slog.LevelInfo, TimeFormat: time.TimeOnly}))
	o.out = stdout

	// The first Ctrl-C drains and cleans up; a second one cuts the drain
	// short (the clean-up still runs).
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := demo(ctx, o); err != nil {
		fmt.Fprintf(stderr, "local-fleet: %v\n", err)
		return 1
	}
	return 0
}

// validate checks the flags that depend on each other.
func (o options) validate() error {
	switch {
	case o.hosts < 1 || o.hosts > vpntest.MaxHosts:
		return fmt.Errorf("-hosts %d: want 1 to %d", o.hosts, vpntest.MaxHosts)
	case o.killHost != 0 && o.drainHost != 0:
		return fmt.Errorf("-kill-host and -drain-host: one at a time")
	case o.profile != "mixed" && !slices.Contains(vpntest.Profiles, vpntest.Profile(o.profile)):
		return fmt.Errorf("-profile %q: want balenaos, minimal or mixed", o.profile)
	}
	for _, f := range []struct {
		name string
		k    int
	}{{"-kill-host", o.killHost}, {"-drain-host", o.drainHost}} {
		switch {
		case f.k == 0:
		case o.hosts == 1:
			return fmt.Errorf("%s %d: with -hosts 1 no host is left to take the devices", f.name, f.k)
		case f.k < 0 || f.k > o.hosts:
			return fmt.Errorf("%s %d: want a host from 1 to %d (-hosts)", f.name, f.k, o.hosts)
		}
	}
	return nil
}

// prerequisites says what is missing to run the fleet, in one line.
func prerequisites() error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("needs root (network namespaces, tun devices): run it with sudo")
	}
	for _, c := range []string{"openvpn", "haproxy", "ip"} {
		if _, err := exec.LookPath(c); err != nil {
			return fmt.Errorf("needs %s: apt-get install openvpn haproxy iproute2", c)
		}
	}
	return nil
}

// raiseFileLimit raises the soft limit on open files to the hard limit,
// for this process and for what it starts (Go raises its own, but gives
// children the original one unless the program sets it): the balancer
// and the hosts' HAProxies hold two sockets per device, the hosts'
// OpenVPN one, and the fleet a pipe and a listener. A failure leaves the
// limit as it was.
func raiseFileLimit() {
	var r syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &r); err != nil || r.Cur >= r.Max {
		return
	}
	r.Cur = r.Max
	_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &r)
}

// quietOpenVPN drops OpenVPN's own log lines (source=openvpn), which the
// server passes on at their level: clients killed by the drain, say, are
// errors to OpenVPN and expected here. The server's own warnings and
// errors (an instance that died, say) still show; -v shows everything.
type quietOpenVPN struct{ slog.Handler }

func (q quietOpenVPN) Handle(ctx context.Context, r slog.Record) error {
	openvpn := false
	r.Attrs(func(a slog.Attr) bool {
		openvpn = a.Key == "source" && a.Value.String() == "openvpn"
		return !openvpn
	})
	if openvpn {
		return nil
	}
	return q.Handler.Handle(ctx, r)
}

func (q quietOpenVPN) WithAttrs(as []slog.Attr) slog.Handler {
	return quietOpenVPN{q.Handler.WithAttrs(as)}
}

func (q quietOpenVPN) WithGroup(name string) slog.Handler {
	return quietOpenVPN{q.Handler.WithGroup(name)}
}
