// Command open-balena-vpn is the VPN server of an openBalena deployment:
// the OpenVPN instances of the configured plan, device authentication
// against the balena API, state reporting, the service instance's
// registration, the internal API and the metrics. It is configured by the
// environment (see the README's table, or vpn.LoadConfig).
//
// SIGTERM or SIGINT stops it: the instances drain, their devices are
// reported offline, and it exits 0; a second signal cuts the drain and the
// reports short, stops the instances and HAProxy at once, and exits 1.
// SIGUSR2 toggles verbose logs. A configuration error is one line on
// standard error and exit status 2.
//
// SIGHUP upgrades it in place (see cmd/internal/upgrade): the executable
// at the path it was started from (os.Args[0]) is started again with the
// same arguments and environment, and inherits the listening sockets of
// the CONNECT proxy, the internal API and the metrics, so that no
// connection is refused. Once the new process has opened them and started
// its parts it says so; the old one then hands over (vpn.Server.Handover:
// the OpenVPN instances keep running for the new process to adopt, the
// tunnels it still carries finish within the drain timeout) and exits 0.
// If the new process does not start, exits, or is not ready within
// VPN_UPGRADE_TIMEOUT (seconds; default 60), the old one keeps
// serving, logs why, and a later SIGHUP may try again. Replacing the
// executable (by a rename, as package managers do) and sending SIGHUP is
// the upgrade.
//
// With -pid-file (or VPN_PID_FILE) the process that serves writes its
// pid there: the first at start, each successor when it is ready. Under
// systemd (NOTIFY_SOCKET, Type=notify) it sends READY=1 and its MAINPID
// once it serves, RELOADING=1 on SIGHUP, READY=1 again from the process
// that serves after it, and STOPPING=1 on SIGTERM or SIGINT; see
// examples/deploy/systemd.
//
// In script mode (VPN_AUTH_MODE=script) OpenVPN runs vpn-auth and
// vpn-client-event, looked for beside this executable, then in PATH.
//
// Tracing is OpenTelemetry's, configured by the standard OTEL_* variables
// (see cmd/internal/otelsetup): with OTEL_EXPORTER_OTLP_ENDPOINT set,
// spans are exported over OTLP/HTTP; without it none are, but every call
// to the balena API still carries a W3C traceparent. Buffered spans are
// flushed on exit.
//
// Errors go to Sentry when SENTRY_DSN (or VPN_SENTRY_DSN) is set (see
// cmd/internal/sentrysetup): the failures that the server logs with a
// fingerprint (vpn.FingerprintKey, connectproxy.FingerprintKey), without
// keys or tokens, released as this executable's version, in the
// environment that PRODUCTION_MODE names. They are flushed on exit.
// Without a DSN nothing is sent.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lmittmann/tint"

	"github.com/obvpn/obvpn/cmd/internal/otelsetup"
	"github.com/obvpn/obvpn/cmd/internal/sdnotify"
	"github.com/obvpn/obvpn/cmd/internal/sentrysetup"
	"github.com/obvpn/obvpn/cmd/internal/signals"
	"github.com/obvpn/obvpn/cmd/internal/upgrade"
	"github.com/obvpn/obvpn/vpn"
)

// flushTimeout bounds the export of the spans, and of the error events,
// still buffered on exit.
const flushTimeout = 5 * time.Second

func main() {
	os.Exit(run())
}

func run() int {
	flags := flag.NewFlagSet("open-balena-vpn", flag.ContinueOnError)
	pidFile := flags.String("pid-file", "", "write the pid of the process that serves to `path` (default $VPN_PID_FILE)")
	if err := flags.Parse(os.Args[1:]); err != nil {
		if err == flag.ErrHelp {
			return 0
		}
		return 2
	}
	notifier := sdnotify.FromEnv()
	level := new(slog.LevelVar)
	log := slog.New(tint.NewTextHandler(os.Stderr, &tint.Options{Level: level, TimeFormat: time.DateTime}))
	// The loader warns of variables set under two names that disagree,
	// and of the reference container's variables that obvpn does not use.
	cfg, err := vpn.Loader{Logger: log}.Config()
	if err != nil {
		fmt.Fprintf(os.Stderr, "open-balena-vpn: %v\n", err)
		return 2
	}
	if cfg.Verbose {
		level.Set(slog.LevelDebug)
	}
	if *pidFile == "" {
		*pidFile = cfg.PIDFile
	}
	tel, err := otelsetup.Setup(context.Background(), otelsetup.Options{ServiceName: "open-balena-vpn", Logger: log})
	if err != nil {
		fmt.Fprintf(os.Stderr, "open-balena-vpn: %v\n", err)
		return 2
	}
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), flushTimeout)
		defer cancel()
		if err := tel.Shutdown(ctx); err != nil {
			log.Warn("spans lost on exit", "err", err)
		}
	}()

	roots, err := cfg.Balena.RootCAs()
	if err != nil {
		fmt.Fprintf(os.Stderr, "open-balena-vpn: %v\n", err)
		return 2
	}
	errs, err := sentrysetup.Setup(sentrysetup.Options{
		DSN: cfg.Sentry.DSN, Environment: cfg.Sentry.Environment, RootCAs: roots,
		Secrets: []string{cfg.Balena.ServiceAPIKey, cfg.Balena.GuestAPIKey, cfg.Metrics.Token},
	})
	if err != nil {
		fmt.Fprintf(os.Stderr, "open-balena-vpn: %v\n", err)
		return 2
	}
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), flushTimeout)
		defer cancel()
		if !errs.Close(ctx) {
			log.Warn("error events lost on exit")
		}
	}()
	log = slog.New(errs.Handler(log.Handler(), "open-balena-vpn"))

	upg, err := upgrade.New(upgrade.Options{PIDFile: *pidFile, Timeout: cfg.WithDefaults().UpgradeTimeout, Notifier: notifier, Logger: log})
	if err != nil {
		fmt.Fprintf(os.Stderr, "open-balena-vpn: %v\n", err)
		return 2
	}
	defer upg.Stop()

	srv := &vpn.Server{Config: cfg, Logger: log, Listen: upg.Listen}
	if cfg.Auth.Mode == vpn.AuthScript {
		srv.Hooks.Auth, srv.Hooks.ClientEvent = hook("vpn-auth"), hook("vpn-client-event")
		if srv.Hooks.Auth == "" || srv.Hooks.ClientEvent == "" {
			fmt.Fprintln(os.Stderr, "open-balena-vpn: VPN_AUTH_MODE=\"script\": vpn-auth and vpn-client-event are needed beside this executable or in PATH")
			return 2
		}
	}
	log.Info("open-balena-vpn starting", "config", cfg, "tracing_export", tel.Endpoint, "errors_to_sentry", errs.Enabled(),
		"upgraded_from_parent", upg.HasParent(), "pid", os.Getpid(), "pid_file", *pidFile, "systemd_notify", notifier.Enabled())
	return serve(srv, upg, level, log)
}

// serve runs srv until a signal stops it or an upgrade hands it over, and
// returns the exit status.
func serve(srv *vpn.Server, upg *upgrade.Upgrader, level *slog.LevelVar, log *slog.Logger) int {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var hard atomic.Bool // a second signal came
	var upgrades sync.WaitGroup
	stopSignals := signals.Handler{Level: level, Logger: log,
		Stop: func(os.Signal) {
			upg.Stopping()
			cancel()
		},
		Hard: func(os.Signal) {
			hard.Store(true)
			srv.Close() // Run stops the instances and HAProxy, then returns
		},
		// The upgrade waits for the successor: off the signal loop, so
		// that a SIGTERM meanwhile interrupts it. Upgrade runs one at a
		// time.
		Reload: func(os.Signal) {
			upgrades.Go(func() {
				if upg.Upgrade() == nil {
					srv.Handover() // Run returns once the tunnels still open end
				}
			})
		},
	}.Notify()
	defer stopSignals()

	// The process says it serves once the listeners are open and the parts
	// run, not once the instances are ready: a successor's instances
	// adopt the running OpenVPN processes only after its predecessor has
	// let go of their management sessions.
	runDone := make(chan struct{})
	var readyFailed atomic.Bool
	var readiness sync.WaitGroup
	readiness.Go(func() {
		select {
		case <-srv.Started():
			err := upg.Ready()
			switch {
			case err == nil:
			case upg.HasParent():
				// The predecessor still serves, and keeps the data plane:
				// leave it to it.
				log.Error("open-balena-vpn cannot say it is ready; leaving the service to its predecessor", "err", err)
				readyFailed.Store(true)
				srv.Handover()
			default:
				log.Error("open-balena-vpn cannot say it is ready; stopping", "err", err)
				readyFailed.Store(true)
				cancel()
			}
		case <-runDone:
		}
	})
	err := srv.Run(ctx)
	close(runDone)
	readiness.Wait()
	stopSignals()
	upg.Stop() // interrupts an upgrade under way
	upgrades.Wait()
	switch {
	case err != nil:
		log.Error("open-balena-vpn failed", "err", err)
		return 1
	case readyFailed.Load():
		return 1
	case upg.HandedOver():
		log.Info("open-balena-vpn handed over to its successor", "pid", os.Getpid())
		return 0
	case hard.Load():
		log.Warn("open-balena-vpn stopped without draining")
		return 1
	}
	log.Info("open-balena-vpn stopped")
	return 0
}

// hook finds a script-mode executable beside this one, else in PATH.
func hook(name string) string {
	if self, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(self), name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p
		}
	}
	p, _ := exec.LookPath(name)
	return p
}
