// Command open-balena-vpn is the VPN server of an openBalena deployment:
// the OpenVPN instances of the configured plan, device authentication
// against the balena API, state reporting, the service instance's
// registration, the internal API and the metrics. It is configured by the
// environment (see the README's table, or vpn.LoadConfig).
//
// SIGTERM or SIGINT stops it: the instances drain, their devices are
// reported offline, and it exits 0; a second signal cuts the drain and the
// reports short, stops the instances and HAProxy at once, and exits 1. SIGUSR2 toggles verbose logs. A configuration error is one
// line on standard error and exit status 2.
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
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/lmittmann/tint"

	"github.com/obvpn/obvpn/cmd/internal/otelsetup"
	"github.com/obvpn/obvpn/cmd/internal/sentrysetup"
	"github.com/obvpn/obvpn/cmd/internal/signals"
	"github.com/obvpn/obvpn/vpn"
)

// flushTimeout bounds the export of the spans, and of the error events,
// still buffered on exit.
const flushTimeout = 5 * time.Second

func main() {
	os.Exit(run())
}

func run() int {
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

	srv := &vpn.Server{Config: cfg, Logger: log}
	if cfg.Auth.Mode == vpn.AuthScript {
		srv.Hooks.Auth, srv.Hooks.ClientEvent = hook("vpn-auth"), hook("vpn-client-event")
		if srv.Hooks.Auth == "" || srv.Hooks.ClientEvent == "" {
			fmt.Fprintln(os.Stderr, "open-balena-vpn: VPN_AUTH_MODE=\"script\": vpn-auth and vpn-client-event are needed beside this executable or in PATH")
			return 2
		}
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var hard atomic.Bool // a second signal came
	stopSignals := signals.Handler{Level: level, Logger: log,
		Stop: func(os.Signal) { cancel() },
		Hard: func(os.Signal) {
			hard.Store(true)
			srv.Close() // Run stops the instances and HAProxy, then returns
		},
	}.Notify()
	defer stopSignals()
	log.Info("open-balena-vpn starting", "config", cfg, "tracing_export", tel.Endpoint, "errors_to_sentry", errs.Enabled())
	if err := srv.Run(ctx); err != nil {
		log.Error("open-balena-vpn failed", "err", err)
		return 1
	}
	if hard.Load() {
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
