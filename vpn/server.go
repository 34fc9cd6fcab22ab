package vpn

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	"golang.org/x/net/netutil"

	"github.com/obvpn/obvpn/connectproxy"
	"github.com/obvpn/obvpn/nss"
	"github.com/obvpn/obvpn/openvpnmgmt"
	"github.com/obvpn/obvpn/vpn/balena"
)

// BalenaAPI is everything the server asks of the balena API, its CONNECT
// proxy included; *balena.Client implements it.
type BalenaAPI interface {
	AuthAPI
	StateAPI
	ServiceAPI
	connectproxy.Authorizer
	connectproxy.OnlineChecker
	connectproxy.Locator
}

// Server is the VPN server: the OpenVPN instances of the plan, device
// authentication, state reporting, the service instance's registration,
// the internal API, the metrics and, with Config.Proxy.Port set, the
// CONNECT proxy to the devices (which starts once the service instance is
// registered, since its id decides forwarding). Configure its fields, then call Run;
// the zero value of each optional field is documented. A Server runs
// once.
type Server struct {
	// Config is the configuration, as LoadConfig returns it.
	Config *Config

	// API is the balena API. Nil means a balena.Client for Config.Balena.
	API BalenaAPI

	// Hooks name the script-mode executables (Config.Auth.Mode ==
	// AuthScript). The server fills in the APIURL of each instance and
	// the ControlDir: openvpn-tmp in the run directory, or /tmp when
	// OpenVPN's user cannot reach the run directory (logged).
	Hooks ScriptHooks

	// Command, Dial and Listen are how the server starts openvpn, reaches
	// a management port and listens (internal API, metrics). Nil means
	// exec.CommandContext, a net.Dialer and net.Listen; tests put them in
	// a network namespace.
	Command func(ctx context.Context, name string, args ...string) *exec.Cmd
	Dial    func(ctx context.Context, network, addr string) (net.Conn, error)
	Listen  func(network, addr string) (net.Listener, error)

	// Registry receives the metrics. Nil means a registry of the server's
	// own.
	Registry *prometheus.Registry

	// Logger receives the server's logs. Nil means discard.
	Logger *slog.Logger

	// TracerProvider makes the spans of every part the server builds:
	// authentication, state reports, the service instance's registration
	// and heartbeats, the internal API's requests, the CONNECT proxy and,
	// when API is nil, the balena API calls. Nil means
	// otel.GetTracerProvider(). A non-nil API is traced as its builder
	// configured it.
	TracerProvider trace.TracerProvider

	// Propagator reads and writes the trace context (W3C traceparent):
	// on the internal API's requests, the CONNECT requests, the forwards
	// to peer servers and, when API is nil, the balena API calls. Nil
	// means otel.GetTextMapPropagator().
	Propagator propagation.TextMapPropagator

	once      sync.Once
	ready     chan struct{}
	closed    chan struct{} // closed by Close
	closeOnce sync.Once
	service   *Service
}

func (s *Server) init() {
	s.once.Do(func() { s.ready, s.closed = make(chan struct{}), make(chan struct{}) })
}

// Close stops the server at once: the drain (or what is left of it) and
// the final state reports are skipped, and Run stops the instances and
// HAProxy and returns, whether or not its context has ended. It is what a
// second SIGTERM asks for. Close does not wait for Run.
func (s *Server) Close() {
	s.init()
	s.closeOnce.Do(func() { close(s.closed) })
}

// unlessClosed returns a context that ends with ctx or with Close; its
// cancel ends the goroutine that watches.
func (s *Server) unlessClosed(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(ctx)
	go func() {
		select {
		case <-s.closed:
			cancel()
		case <-ctx.Done():
		}
	}()
	return ctx, cancel
}

// Ready returns a channel that is closed once every instance has
// released its hold and takes clients.
func (s *Server) Ready() <-chan struct{} {
	s.init()
	return s.ready
}

// ServiceID returns the registered service instance id, or 0.
func (s *Server) ServiceID() int64 {
	if s.service == nil {
		return 0
	}
	return s.service.ID()
}

func (s *Server) log() *slog.Logger {
	if s.Logger != nil {
		return s.Logger
	}
	return slog.New(slog.DiscardHandler)
}

// Run runs the server until ctx ends, then stops the instances, reports
// their devices offline (within the drain timeout) and returns nil; or it
// returns the error that stopped it.
func (s *Server) Run(ctx context.Context) error {
	s.init()
	cfg := s.Config
	n, err := cfg.Plan.Len()
	if err != nil {
		return fmt.Errorf("vpn: %w", err)
	}
	hooks := s.Hooks
	if cfg.Auth.Mode == AuthScript {
		user, group := cfg.OpenVPN.account()
		if err := hooks.CheckHooks(user); err != nil {
			return err
		}
		dir, err := prepareTmpDir(filepath.Join(cfg.runDir(), "openvpn-tmp"), "/tmp", user, group)
		if dir == "" {
			return err
		}
		if err != nil {
			s.log().Warn("OpenVPN's temporary files and auth control files go to /tmp", "reason", err)
		}
		hooks.ControlDir = dir
	}
	api := s.API
	if api == nil {
		roots, err := cfg.Balena.RootCAs()
		if err != nil {
			return err
		}
		api = &balena.Client{BaseURL: cfg.Balena.BaseURL(), ServiceKey: cfg.Balena.ServiceAPIKey,
			GuestKey: cfg.Balena.GuestAPIKey, RootCAs: roots, Logger: s.Logger,
			TracerProvider: s.TracerProvider, Propagator: s.Propagator}
	}
	reg := s.Registry
	if reg == nil {
		reg = prometheus.NewRegistry()
	}
	metrics, err := NewMetrics(reg)
	if err != nil {
		return fmt.Errorf("vpn: metrics: %w", err)
	}
	var addr netip.Addr
	if cfg.Balena.RegisterInterface != "" {
		if addr, err = InterfaceIPv4(cfg.Balena.RegisterInterface); err != nil {
			s.log().Warn("no address to register", "interface", cfg.Balena.RegisterInterface, "err", err)
		}
	}
	auth := &Authenticator{API: api, CacheTimeout: cfg.Auth.CacheTimeout, MaxInFlight: cfg.Auth.MaxWorkers, Logger: s.Logger,
		TracerProvider: s.TracerProvider}
	conns := &Connections{}
	s.service = &Service{API: api, Addr: addr, Logger: s.Logger, TracerProvider: s.TracerProvider}
	reporter := &Reporter{API: api, ServiceID: s.service.ID, BatchSize: cfg.Balena.StateBatchSize, Logger: s.Logger,
		TracerProvider: s.TracerProvider}
	// One view of where the devices are, for the proxy and the NSS index:
	// the status files, and what the management interface says before
	// the next status write.
	resolver := &nss.Resolver{Globs: []string{filepath.Join(cfg.runDir(), "server-*.status")}}
	sessions := &Sessions{Auth: auth, Connections: conns, State: reporter, DelayOnAuthFail: cfg.Auth.DelayOnFail,
		Metrics: metrics, Script: cfg.Auth.Mode == AuthScript, Logger: s.Logger,
		Addresses: resolver, StatusFile: func(id int) string { return cfg.Paths(id).Status }}
	limiters := make([]*Limiter, n+1)
	if cfg.Bandwidth.Down != 0 && cfg.Bandwidth.Up != 0 {
		cmdf := s.Command
		if cmdf == nil {
			cmdf = exec.CommandContext
		}
		run := func(ctx context.Context, name string, args ...string) ([]byte, error) {
			return cmdf(ctx, name, args...).CombinedOutput()
		}
		for id := 1; id <= n; id++ {
			in, _ := cfg.Plan.Instance(id)
			limiters[id] = &Limiter{Dev: "tun" + strconv.Itoa(id), IFB: "obvpnifb" + strconv.Itoa(id),
				Subnet: in.Subnet, Down: cfg.Bandwidth.Down, Up: cfg.Bandwidth.Up, Run: run}
		}
		sessions.Limits = func(id int) *Limiter { return limiters[id] }
		defer func() {
			for _, l := range limiters[1:] {
				_ = l.Teardown(context.Background())
			}
		}()
	}
	internal := &InternalAPI{Auth: auth, Connections: conns, State: reporter, Instances: n,
		DelayOnAuthFail: cfg.Auth.DelayOnFail, TrustProxy: cfg.TrustProxy, Sessions: sessions, Metrics: metrics,
		ControlDir: hooks.ControlDir, Logger: s.Logger, TracerProvider: s.TracerProvider, Propagator: s.Propagator}

	listen := s.Listen
	if listen == nil {
		listen = net.Listen
	}
	var servers []*http.Server
	var serving sync.WaitGroup
	serve := func(addr string, h http.Handler, maxConns int) error {
		l, err := listen("tcp", addr)
		if err != nil {
			return fmt.Errorf("vpn: %w", err)
		}
		if maxConns > 0 {
			l = netutil.LimitListener(l, maxConns)
		}
		srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
		servers = append(servers, srv)
		serving.Add(1)
		go func() {
			defer serving.Done()
			_ = srv.Serve(l) // ends with Shutdown below
		}()
		return nil
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		for _, srv := range servers {
			_ = srv.Shutdown(sctx)
		}
		serving.Wait()
		internal.Close() // the deferred authentications in flight
	}()
	apiURLs := make(map[int]string)
	// The internal API is for OpenVPN's hooks and the operators of this
	// host: on loopback only, so that nobody else gets an answer at all.
	if cfg.Plan.Ports.SharedAPI {
		if err := serve(internalAPIAddr(cfg.Plan.Ports.API), internal, 0); err != nil {
			return err
		}
	}
	for id := 1; id <= n; id++ {
		in, _ := cfg.Plan.Instance(id)
		if !cfg.Plan.Ports.SharedAPI {
			if err := serve(internalAPIAddr(in.APIPort), internal, 0); err != nil {
				return err
			}
		}
		apiURLs[id] = "http://" + internalAPIAddr(in.APIPort)
	}
	if cfg.Metrics.Addr != "" {
		maxConns := cfg.Metrics.MaxConns
		if maxConns <= 0 {
			maxConns = 64
		}
		if err := serve(cfg.Metrics.Addr, monitorHandler(reg, sessions, cfg.metricsTimeout(), cfg.Metrics.Token), maxConns); err != nil {
			return err
		}
	}
	var proxyListener net.Listener
	if cfg.Proxy.Port != 0 {
		if proxyListener, err = listen("tcp", ":"+strconv.Itoa(cfg.Proxy.Port)); err != nil {
			return fmt.Errorf("vpn: %w", err)
		}
		defer proxyListener.Close()
	}

	// The parts run until the drain is over, not merely until ctx ends.
	runCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	defer cancel()
	var wg sync.WaitGroup
	fatal := make(chan error, n+3)
	instances := make([]*Instance, n+1)

	var hap *HAProxyRuntime
	var hreg *registrar
	if cfg.HAProxy.Mode != HAProxyOff {
		hap = &HAProxyRuntime{Socket: cfg.HAProxy.Socket}
		hreg = newRegistrar(hap, s.log())
	}
	if cfg.HAProxy.Mode == HAProxyManaged {
		stop, err := s.startHAProxy(runCtx, hap, fatal)
		if err != nil {
			return err
		}
		defer stop()
	}
	if hreg != nil {
		wg.Add(1)
		go func() { defer wg.Done(); hreg.run(runCtx) }()
	}
	if cfg.NSSIndex != "off" {
		wg.Add(1)
		go func() { defer wg.Done(); s.keepNSSIndex(runCtx, resolver) }()
	}
	wg.Add(2)
	go func() { defer wg.Done(); _ = s.service.Run(runCtx) }()
	go func() { defer wg.Done(); _ = reporter.Run(runCtx) }()
	var readyMu sync.Mutex
	readySet := map[int]bool{}
	for id := 1; id <= n; id++ {
		hooks := hooks
		hooks.APIURL = apiURLs[id]
		inst := &Instance{Config: cfg, ID: id, Hooks: hooks, Handler: sessions.Handler(id),
			Command: s.Command, Dial: s.Dial, Logger: s.Logger,
			OnReady: func(id int) {
				if hreg != nil {
					// Registered at once, or retried until HAProxy takes it.
					hreg.setNow(runCtx, id, instanceAddr(cfg, id), StateReady)
				}
				readyMu.Lock()
				defer readyMu.Unlock()
				if !readySet[id] {
					readySet[id] = true
					if len(readySet) == n {
						close(s.ready)
					}
				}
			},
			OnDown: func(id int) {
				if hreg != nil {
					hreg.setNow(context.WithoutCancel(runCtx), id, instanceAddr(cfg, id), StateMaint)
				}
				sessions.Forget(id)
				if l := limiters[id]; l != nil {
					l.Reset() // its tun device went with its openvpn
				}
			},
		}
		instances[id] = inst
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := inst.Run(runCtx); err != nil && runCtx.Err() == nil {
				fatal <- err
			}
		}()
	}
	if proxyListener != nil {
		pm, err := connectproxy.NewMetrics(reg)
		if err != nil {
			return fmt.Errorf("vpn: proxy metrics: %w", err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			select {
			case <-s.service.Registered():
			case <-runCtx.Done():
				return
			}
			proxy := &connectproxy.Server{Logger: s.Logger, Handler: &connectproxy.Handler{
				Authorizer:  api,
				Online:      api,
				Locator:     api,
				Resolver:    resolver,
				DialContext: s.Dial,
				ServiceID:   s.service.ID(),
				ForwardPort: cfg.Proxy.ForwardPort,
				RetryDelay:  cfg.OpenVPN.StatusInterval,
				IdleTimeout: cfg.Proxy.IdleTimeout,
				MaxTunnels:  cfg.Proxy.MaxTunnels,
				Metrics:     pm,
				Logger:      s.Logger,

				TracerProvider: s.TracerProvider,
				Propagator:     s.Propagator,
			}}
			serveDone := make(chan error, 1)
			go func() { serveDone <- proxy.Serve(proxyListener) }()
			s.log().Info("CONNECT proxy serving", "port", cfg.Proxy.Port, "service_id", s.service.ID())
			select {
			case err := <-serveDone:
				if runCtx.Err() == nil {
					fatal <- fmt.Errorf("vpn: CONNECT proxy: %w", err)
				}
			case <-runCtx.Done():
				sctx, cancel := context.WithTimeout(context.WithoutCancel(runCtx), 5*time.Second)
				defer cancel()
				_ = proxy.Shutdown(sctx)
				<-serveDone
			}
		}()
	}
	s.log().Info("VPN server running", "instances", n, "plan", cfg.Plan.String())

	var runErr error
	select {
	case <-ctx.Done():
		dctx, dcancel := s.unlessClosed(runCtx)
		s.drain(dctx, hreg, sessions, instances)
		dcancel()
	case <-s.closed:
	case runErr = <-fatal:
		s.log().Error("VPN server stopping", "err", runErr)
	}
	cancel()
	wg.Wait()
	sessions.Wait()
	auth.Wait()
	// The instances are gone, and their clients with them.
	for id := 1; id <= n; id++ {
		sessions.Forget(id)
	}
	if s.service.ID() != 0 {
		timeout := cfg.Drain.Timeout
		if timeout <= 0 {
			timeout = 120 * time.Second
		}
		fctx, fcancel := context.WithTimeout(context.WithoutCancel(ctx), timeout)
		defer fcancel()
		fctx, ucancel := s.unlessClosed(fctx)
		defer ucancel()
		if err := reporter.Flush(fctx); err != nil {
			fp := slog.String(FingerprintKey, FingerprintStateUpdate)
			if errors.Is(fctx.Err(), context.Canceled) {
				fp = slog.Attr{} // a second signal cut the reports short, as asked
			}
			s.log().Error("could not report every device offline", "err", err, "pending", reporter.Pending(), fp)
		}
	}
	if runErr != nil && !errors.Is(runErr, context.Canceled) {
		return runErr
	}
	return nil
}

// keepNSSIndex keeps the NSS module's index current from resolver until
// ctx ends (Config.NSSIndex). A failure leaves the NSS module to scan the
// status files.
func (s *Server) keepNSSIndex(ctx context.Context, resolver *nss.Resolver) {
	w := &nss.IndexWriter{Resolver: resolver, Path: s.Config.NSSIndex, Logger: s.Logger}
	if err := w.Run(ctx); err != nil {
		s.log().Warn("no NSS index", "err", err)
	}
}

// internalAPIAddr is where the internal API listens for port.
func internalAPIAddr(port int) string {
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
}

// drain lets the devices go before the server stops (SPEC §2): every
// instance is set to drain in HAProxy, so that no new device comes, then
// the connected clients are killed one by one (they reconnect, through the
// balancer, to another server), spaced by min(1 min / the minimum drain
// rate, the drain timeout / the number of clients), all within the drain
// timeout.
func (s *Server) drain(ctx context.Context, reg *registrar, sessions *Sessions, instances []*Instance) {
	cfg := s.Config
	timeout := cfg.Drain.Timeout
	if timeout <= 0 {
		timeout = 120 * time.Second
	}
	rate := cfg.Drain.MinRatePerMinute
	if rate <= 0 {
		rate = 500
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if reg != nil {
		// Every registered instance, at once (the registrar logs a
		// refusal) and kept so while the drain runs.
		reg.setAll(StateDrain)
		reg.apply(ctx)
	}
	clients := sessions.sessionList()
	if len(clients) == 0 {
		return
	}
	spacing := min(time.Minute/time.Duration(rate), timeout/time.Duration(len(clients)))
	s.log().Info("draining", "clients", len(clients), "spacing", spacing, "timeout", timeout)
	start := time.Now()
	for i, c := range clients {
		if i > 0 {
			select {
			case <-ctx.Done():
				s.log().Warn("drain timeout: the remaining clients go with their instances", "left", len(clients)-i)
				return
			case <-time.After(spacing):
			}
		}
		if m := instances[c.instance].Management(); m != nil {
			if err := m.ClientKill(ctx, c.cid, openvpnmgmt.KillDefault); err != nil {
				s.log().Debug("client-kill during the drain", "instance", c.instance, "cid", c.cid, "err", err)
			}
		}
	}
	s.log().Info("drained", "clients", len(clients), "took", time.Since(start))
}

// startHAProxy writes HAProxy's configuration into the run directory, runs
// haproxy (master-worker, in the foreground) until ctx ends, and returns
// once its admin socket answers. An exit while ctx runs is reported on
// fatal. stop waits for haproxy to have exited.
func (s *Server) startHAProxy(ctx context.Context, hap *HAProxyRuntime, fatal chan<- error) (stop func(), err error) {
	cfg := s.Config
	file := filepath.Join(cfg.runDir(), "haproxy.cfg")
	if err := os.MkdirAll(cfg.runDir(), 0o755); err != nil {
		return nil, fmt.Errorf("vpn: %w", err)
	}
	// 0600: with MONITOR_SECRET_TOKEN set, the file holds the token.
	if err := writeFile0600(file, []byte(cfg.RenderHAProxy())); err != nil {
		return nil, fmt.Errorf("vpn: %w", err)
	}
	if n, from := cfg.HAProxy.maxConn(fileLimit()); from > 0 {
		s.log().Warn("HAProxy's maxconn lowered to what the file descriptor limit allows", "maxconn", n, "wanted", from, "file_limit", fileLimit())
	}
	_ = os.Remove(cfg.HAProxy.Socket) // a stale socket from an earlier run
	cmdf := s.Command
	if cmdf == nil {
		cmdf = exec.CommandContext
	}
	cmd := cmdf(ctx, "haproxy", "-W", "-db", "-f", file)
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 5 * time.Second
	out := &lineLogger{log: s.log().With("source", "haproxy")}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("vpn: starting haproxy: %w", err)
	}
	exited := make(chan struct{})
	go func() {
		err := cmd.Wait()
		if ctx.Err() == nil {
			fatal <- fmt.Errorf("vpn: haproxy exited: %v", err)
		}
		close(exited)
	}()
	stop = func() { <-exited }
	deadline := time.Now().Add(10 * time.Second)
	for {
		qctx, cancel := context.WithTimeout(ctx, time.Second)
		_, err := hap.Command(qctx, "show info")
		cancel()
		if err == nil {
			s.log().Info("HAProxy running", "pid", cmd.Process.Pid, "port", cfg.HAProxy.Port, "monitor", cfg.HAProxy.MonitorAddr)
			return stop, nil
		}
		select {
		case <-exited:
			return nil, fmt.Errorf("vpn: haproxy exited at start (see its log)")
		case <-ctx.Done():
			<-exited
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			<-exited
			return nil, fmt.Errorf("vpn: haproxy's admin socket %s did not answer within 10 s: %w", cfg.HAProxy.Socket, err)
		}
	}
}

// lineLogger logs what a child process writes, line by line, at debug
// level.
type lineLogger struct {
	log *slog.Logger
	mu  sync.Mutex
	buf []byte
}

func (l *lineLogger) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf = append(l.buf, p...)
	for {
		i := bytes.IndexByte(l.buf, '\n')
		if i < 0 {
			break
		}
		l.log.Debug(string(l.buf[:i]))
		l.buf = l.buf[i+1:]
	}
	return len(p), nil
}
