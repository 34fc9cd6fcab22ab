// Command connect-proxy is openBalena's CONNECT proxy on its own: it lets
// operators and services reach ports on devices connected to this VPN
// server ("CONNECT <uuid>.balena:<port>"), and forwards requests for
// devices on other VPN servers to their proxies. It is configured by the
// environment:
//
//	VPN_CONNECT_PROXY_PORT                  the port to listen on (required)
//	BALENA_API_HOST, BALENA_API_INTERNAL_HOST (or API_HOST, API_INTERNAL_HOST)
//	                                        the balena API (https://, or http:// for the internal host)
//	ROOT_CA                                 base64-encoded PEM trusted for the API besides the system's roots
//	VPN_SERVICE_API_KEY                     the VPN service's key (required)
//	VPN_GUEST_API_KEY                       the key for callers without one
//	VPN_SERVICE_ID                          this server's service instance id
//	VPN_FORWARD_PROXY_PORT                  the peers' proxy port (default: VPN_CONNECT_PROXY_PORT)
//	VPN_STATUS_FILE_WRITE_INTERVAL_SECONDS  how long to wait before looking for a device here again (10)
//	VPN_CONNECT_PROXY_IDLE_TIMEOUT          seconds after which an idle tunnel is closed (0: never)
//	VPN_CONNECT_PROXY_MAX_TUNNELS           tunnels open or being set up at most (10000; 0: no bound)
//	NSS_OPENVPN_STATUS_GLOB                 OpenVPN's status files (default: $VPN_RUN_DIR/server-*.status;
//	                                        several patterns separated by ":")
//	VPN_NSS_INDEX                           the NSS module's index file to keep current, or "off"
//	                                        (default: NSS_OPENVPN_INDEX, else nss.index next to the status files)
//	VPN_VERBOSE_LOGS                        debug logs
//	SENTRY_DSN (or VPN_SENTRY_DSN)          where to report errors (Sentry); PRODUCTION_MODE names the environment
//
// The flag -listen overrides the listen address (":<VPN_CONNECT_PROXY_PORT>",
// every interface), and -nss-index overrides VPN_NSS_INDEX. While it
// runs, the proxy keeps the index file of the NSS module
// (cmd/libnss_openvpn) current from the status files it reads, and
// removes it when it stops; turn that off ("off") where open-balena-vpn
// runs on the same host, since that one writes the index with the
// devices it learns from OpenVPN's management interface. Requests that are not CONNECT are served too: GET /ping
// answers "OK" and GET /metrics the proxy's Prometheus metrics.
//
// Tracing is OpenTelemetry's, configured by the standard OTEL_* variables
// (see cmd/internal/otelsetup): with OTEL_EXPORTER_OTLP_ENDPOINT set,
// spans are exported over OTLP/HTTP; without it none are, but the balena
// API calls and the CONNECTs forwarded to peers still carry a W3C
// traceparent, and an incoming one is continued.
//
// Errors go to Sentry when SENTRY_DSN (or VPN_SENTRY_DSN) is set (see
// cmd/internal/sentrysetup): the proxy's failures that it logs with a
// fingerprint (connectproxy.FingerprintKey), without keys or tokens.
// They are flushed on exit; without a DSN nothing is sent.
//
// SIGTERM or SIGINT stops it: it stops listening, waits up to 10 s for the
// open tunnels, closes the rest and exits 0; a second signal exits at once
// with status 1. SIGUSR2 toggles verbose logs. A configuration error is one
// line on standard error and exit status 2.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/lmittmann/tint"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/obvpn/obvpn/cmd/internal/otelsetup"
	"github.com/obvpn/obvpn/cmd/internal/sentrysetup"
	"github.com/obvpn/obvpn/cmd/internal/signals"
	"github.com/obvpn/obvpn/connectproxy"
	"github.com/obvpn/obvpn/nss"
	"github.com/obvpn/obvpn/vpn"
	"github.com/obvpn/obvpn/vpn/balena"
)

// drainTimeout bounds the wait for open tunnels on SIGTERM; flushTimeout
// the export of the spans, and of the error events, still buffered on
// exit.
const (
	drainTimeout = 10 * time.Second
	flushTimeout = 5 * time.Second
)

func main() {
	level := new(slog.LevelVar)
	log := slog.New(tint.NewTextHandler(os.Stderr, &tint.Options{Level: level, TimeFormat: time.DateTime}))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stopSignals := signals.Handler{Level: level, Logger: log,
		Stop: func(os.Signal) { cancel() },
		Hard: func(os.Signal) { os.Exit(1) }, // the tunnels end with the process
	}.Notify()
	code := run(ctx, os.Args[1:], os.Stderr, log, level, nil)
	stopSignals()
	os.Exit(code)
}

// run runs the proxy until ctx ends. ready, if not nil, is called with the
// listen address once it listens.
func run(ctx context.Context, args []string, stderr io.Writer, log *slog.Logger, level *slog.LevelVar, ready func(net.Addr)) int {
	fs := flag.NewFlagSet("connect-proxy", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", "", `listen address (default ":<VPN_CONNECT_PROXY_PORT>")`)
	indexFlag := fs.String("nss-index", "", `the NSS index file to keep current, or "off" (default: VPN_NSS_INDEX, NSS_OPENVPN_INDEX, else nss.index next to the status files)`)
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintln(stderr, "usage: connect-proxy [-listen address] [-nss-index path|off]")
		return 2
	}
	cfg, err := vpn.Loader{Logger: log}.ConnectProxyConfig()
	if err != nil {
		fmt.Fprintf(stderr, "connect-proxy: %v\n", err)
		return 2
	}
	if cfg.Verbose {
		level.Set(slog.LevelDebug)
	}
	tel, err := otelsetup.Setup(ctx, otelsetup.Options{ServiceName: "open-balena-vpn", Logger: log})
	if err != nil {
		fmt.Fprintf(stderr, "connect-proxy: %v\n", err)
		return 2
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), flushTimeout)
		defer cancel()
		if err := tel.Shutdown(sctx); err != nil {
			log.Warn("connect-proxy: spans lost on exit", "err", err)
		}
	}()
	addr := *listen
	if addr == "" {
		addr = ":" + strconv.Itoa(cfg.Proxy.Port)
	}

	resolver := &nss.Resolver{Globs: strings.Split(cfg.StatusGlob, ":")}
	roots, err := cfg.Balena.RootCAs()
	if err != nil {
		fmt.Fprintf(stderr, "connect-proxy: %v\n", err)
		return 2
	}
	errs, err := sentrysetup.Setup(sentrysetup.Options{
		DSN: cfg.Sentry.DSN, Environment: cfg.Sentry.Environment, RootCAs: roots,
		Secrets: []string{cfg.Balena.ServiceAPIKey, cfg.Balena.GuestAPIKey},
	})
	if err != nil {
		fmt.Fprintf(stderr, "connect-proxy: %v\n", err)
		return 2
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), flushTimeout)
		defer cancel()
		if !errs.Close(sctx) {
			log.Warn("connect-proxy: error events lost on exit")
		}
	}()
	log = slog.New(errs.Handler(log.Handler(), "connect-proxy"))
	api := &balena.Client{
		BaseURL:    cfg.Balena.BaseURL(),
		ServiceKey: cfg.Balena.ServiceAPIKey,
		GuestKey:   cfg.Balena.GuestAPIKey,
		RootCAs:    roots,
		Logger:     log,
	}
	h, err := newHandler(cfg, api, resolver, log)
	if err != nil {
		log.Error("connect-proxy: metrics", "err", err)
		return 1
	}
	srv := &connectproxy.Server{Handler: h, Logger: log}

	l, err := net.Listen("tcp", addr)
	if err != nil {
		log.Error("connect-proxy: cannot listen", "err", err)
		return 1
	}
	log.Info("connect-proxy listening", "addr", l.Addr().String(), "balena", cfg.Balena,
		"service_id", cfg.ServiceID, "forward_port", cfg.Proxy.ForwardPort, "status_glob", cfg.StatusGlob,
		"tracing_export", tel.Endpoint, "errors_to_sentry", errs.Enabled())
	if ready != nil {
		ready(l.Addr())
	}
	stopIndex := keepIndex(ctx, resolver, nssIndexPath(*indexFlag, resolver.Globs), log)
	defer stopIndex()
	return serve(ctx, srv, l, log)
}

// newHandler is the proxy's handler, with /ping and /metrics (its own
// registry) for requests that are not CONNECT.
func newHandler(cfg *vpn.ConnectProxyConfig, api *balena.Client, resolver *nss.Resolver, log *slog.Logger) (*connectproxy.Handler, error) {
	reg := prometheus.NewRegistry()
	metrics, err := connectproxy.NewMetrics(reg)
	if err != nil {
		return nil, err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /ping", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "OK") })
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	return &connectproxy.Handler{
		Authorizer:  api,
		Online:      api,
		Locator:     api,
		Resolver:    resolver,
		ServiceID:   cfg.ServiceID,
		ForwardPort: cfg.Proxy.ForwardPort,
		RetryDelay:  cfg.StatusFileWriteInterval,
		IdleTimeout: cfg.Proxy.IdleTimeout,
		MaxTunnels:  cfg.Proxy.MaxTunnels,
		Metrics:     metrics,
		Logger:      log,
		Next:        mux,
	}, nil
}

// serve serves the proxy on l until ctx ends, then shuts it down within
// drainTimeout; it returns the exit code.
func serve(ctx context.Context, srv *connectproxy.Server, l net.Listener, log *slog.Logger) int {
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	select {
	case err := <-done:
		log.Error("connect-proxy failed", "err", err)
		return 1
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), drainTimeout)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		log.Warn("connect-proxy: tunnels closed at the deadline", "err", err)
	}
	if err := <-done; !errors.Is(err, http.ErrServerClosed) {
		log.Error("connect-proxy failed", "err", err)
		return 1
	}
	log.Info("connect-proxy stopped")
	return 0
}

// nssIndexPath returns the index file to write: the flag, else
// VPN_NSS_INDEX, else NSS_OPENVPN_INDEX (where the NSS module looks),
// else nss.IndexPathFor(globs); "off" means none.
func nssIndexPath(flagPath string, globs []string) string {
	for _, p := range []string{flagPath, os.Getenv("VPN_NSS_INDEX"), os.Getenv("NSS_OPENVPN_INDEX")} {
		if p != "" {
			return p
		}
	}
	return nss.IndexPathFor(globs)
}

// keepIndex runs an nss.IndexWriter for resolver until ctx ends or the
// returned function is called, which waits for it (and so for the index
// file's removal). A path of "off" runs nothing; a writer that cannot
// write is logged and leaves the proxy running: the NSS module then reads
// the status files itself.
func keepIndex(ctx context.Context, resolver *nss.Resolver, path string, log *slog.Logger) func() {
	if path == "off" {
		log.Info("connect-proxy: no NSS index (off)")
		return func() {}
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		w := &nss.IndexWriter{Resolver: resolver, Path: path, Logger: log}
		log.Info("connect-proxy: keeping the NSS index current", "path", path)
		if err := w.Run(ctx); err != nil {
			log.Warn("connect-proxy: no NSS index", "path", path, "err", err)
		}
	}()
	return func() {
		cancel()
		<-done
	}
}
