// Command local-fleet runs the whole openBalena VPN deployment on one
// machine: balenatest as the balena API, the VPN server (vpn.Server with
// two OpenVPN instances behind a managed HAProxy, and the CONNECT proxy),
// and simulated devices, each a real openvpn client in a network namespace
// of its own with a small web service on port 80. It fetches every
// device's page through the CONNECT proxy and prints a table of what it
// found, then stays up until Ctrl-C, when it drains the server and removes
// every namespace, link, process and file it made.
//
// The server runs in a "world" namespace of its own (loopback plus the
// links to the devices, no default route), so nothing it does touches the
// host's network; the proxy and the metrics are relayed to the host's
// loopback (-proxy, -metrics) for a person to try by hand.
//
// It needs root, openvpn, haproxy and ip (iproute2). make demo runs it.
//
//	local-fleet                 # the devices of devices.json
//	local-fleet -devices 20     # 20 generated devices
//	local-fleet -once           # exit after the check: 0 if every device was reached
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
	"syscall"
	"time"

	"github.com/lmittmann/tint"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("local-fleet", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o options
	fs.IntVar(&o.devices, "devices", 0, fmt.Sprintf("generate this many devices (1-%d); 0 takes -devices-file", maxDevices))
	fs.StringVar(&o.devicesFile, "devices-file", "", "a JSON list of {\"uuid\",\"key\"} devices; empty means the example's devices.json")
	fs.BoolVar(&o.once, "once", false, "exit after the check, with status 0 only if every device was reached")
	fs.DurationVar(&o.timeout, "timeout", 3*time.Minute, "how long devices have to come online and be reached")
	fs.StringVar(&o.proxyAddr, "proxy", "127.0.0.1:3128", "where the host reaches the CONNECT proxy (not with -once)")
	fs.StringVar(&o.metricsAddr, "metrics", "127.0.0.1:8080", "where the host reaches the metrics (not with -once)")
	verbose := fs.Bool("v", false, "log what the server does (info level; warnings otherwise)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "local-fleet: unexpected arguments %q\n", fs.Args())
		return 2
	}
	if err := prerequisites(); err != nil {
		fmt.Fprintf(stderr, "local-fleet: %v\n", err)
		return 1
	}
	level := slog.LevelWarn
	if *verbose {
		level = slog.LevelInfo
	}
	var h slog.Handler = tint.NewHandler(stderr, &tint.Options{Level: level, TimeFormat: time.TimeOnly})
	if !*verbose {
		h = quietOpenVPN{h}
	}
	o.log = slog.New(h)
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
