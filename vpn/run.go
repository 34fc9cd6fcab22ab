package vpn

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/net/netutil"

	"github.com/obvpn/obvpn/connectproxy"
	"github.com/obvpn/obvpn/nss"
	"github.com/obvpn/obvpn/vpn/balena"
	"github.com/obvpn/obvpn/vpn/bandwidth"
	"github.com/obvpn/obvpn/vpn/haproxy"
	"github.com/obvpn/obvpn/vpn/internalapi"
)

// The zero values of Server.ShutdownTimeout and Server.ReadHeaderTimeout.
const (
	defaultShutdownTimeout   = 5 * time.Second
	defaultReadHeaderTimeout = 10 * time.Second
)

// run is one run of a Server: the parts that Run builds, in the order of
// its phases (build, listen, start, wait, stop).
type run struct {
	s   *Server
	cfg *Config
	n   int // instances

	hooks    ScriptHooks
	api      BalenaAPI
	reg      *prometheus.Registry
	metrics  *Metrics
	auth     *Authenticator
	reporter *Reporter
	resolver *nss.Resolver
	conns    *Connections
	sessions *Sessions
	limiters []*bandwidth.Limiter // by instance id; nil entries without limits
	internal *internalapi.Server

	servers []*httpServer // the internal API's and the metrics'
	serving sync.WaitGroup
	apiURLs map[int]string
	proxyL  net.Listener

	ctx       context.Context // the parts'; it ends after the drain
	cancel    context.CancelFunc
	wg        sync.WaitGroup // the parts' goroutines
	fatal     chan error
	instances []*Instance
	hreg      *haproxy.Registrar

	// The CONNECT proxy runs on a context of its own, so that a handover
	// can let its tunnels finish after everything else has stopped.
	proxyCtx     context.Context
	proxyCancel  context.CancelFunc
	proxyWG      sync.WaitGroup
	proxyTimeout time.Duration // its shutdown's; ShutdownTimeout, or Drain.Timeout for a handover

	prev    *handoff // what the process before this one left
	unlock  func()   // releases the run directory's lock
	leaving bool     // Handover: the data plane stays

	readyMu  sync.Mutex
	readySet map[int]bool
}

// Run runs the server until ctx ends, then stops the instances, reports
// their devices offline (within the drain timeout) and returns nil; or it
// returns the error that stopped it.
func (s *Server) Run(ctx context.Context) error {
	s.init()
	r, err := s.build()
	if err != nil {
		return err
	}
	defer func() {
		if !r.leaving {
			r.teardownLimits()
		}
	}()
	defer r.closeListeners()
	if err := r.listen(); err != nil {
		return err
	}
	// The parts run until the drain is over, not merely until ctx ends.
	r.ctx, r.cancel = context.WithCancel(context.WithoutCancel(ctx))
	defer r.cancel()
	r.proxyCtx, r.proxyCancel = context.WithCancel(context.WithoutCancel(ctx))
	defer r.proxyCancel()
	defer func() {
		if r.unlock != nil {
			r.unlock()
		}
	}()
	stop, err := r.start()
	if stop != nil {
		defer func() { stop(r.leaving) }()
	}
	if err != nil {
		r.cancel()
		r.proxyCancel()
		r.wg.Wait()
		r.proxyWG.Wait()
		return err
	}
	runErr := r.wait(ctx)
	r.stop(ctx)
	if runErr != nil && !errors.Is(runErr, context.Canceled) {
		return runErr
	}
	return nil
}

// build makes the parts of a run: the balena client, the metrics, auth,
// state reports, the sessions, the bandwidth limiters and the internal
// API. Nothing runs yet.
func (s *Server) build() (*run, error) {
	if s.Config == nil {
		return nil, errors.New("vpn: Server without a Config")
	}
	defaulted := s.Config.WithDefaults()
	cfg := &defaulted
	n, err := cfg.Plan.Len()
	if err != nil {
		return nil, fmt.Errorf("vpn: %w", err)
	}
	r := &run{s: s, cfg: cfg, n: n, hooks: s.Hooks, api: s.API, reg: s.Registry, readySet: map[int]bool{},
		proxyTimeout: orDefault(s.ShutdownTimeout, defaultShutdownTimeout)}
	if cfg.Auth.Mode == AuthScript {
		if err := r.prepareHooks(); err != nil {
			return nil, err
		}
	}
	if r.api == nil {
		roots, err := cfg.Balena.RootCAs()
		if err != nil {
			return nil, err
		}
		r.api = &balena.Client{BaseURL: cfg.Balena.BaseURL(), ServiceKey: cfg.Balena.ServiceAPIKey,
			GuestKey: cfg.Balena.GuestAPIKey, RootCAs: roots, Logger: s.Logger,
			TracerProvider: s.TracerProvider, Propagator: s.Propagator}
	}
	if r.reg == nil {
		r.reg = prometheus.NewRegistry()
	}
	if r.metrics, err = NewMetrics(r.reg); err != nil {
		return nil, fmt.Errorf("vpn: metrics: %w", err)
	}
	var addr netip.Addr
	if cfg.Balena.RegisterInterface != "" {
		if addr, err = InterfaceIPv4(cfg.Balena.RegisterInterface); err != nil {
			s.log().Warn("no address to register", "interface", cfg.Balena.RegisterInterface, "err", err)
		}
	}
	r.auth = &Authenticator{API: r.api, CacheTimeout: cfg.Auth.CacheTimeout, MaxInFlight: cfg.Auth.MaxWorkers, Logger: s.Logger,
		TracerProvider: s.TracerProvider}
	conns := &Connections{}
	r.conns = conns
	s.service = &Service{API: r.api, Addr: addr, Logger: s.Logger, TracerProvider: s.TracerProvider}
	r.reporter = &Reporter{API: r.api, ServiceID: s.service.ID, BatchSize: cfg.Balena.StateBatchSize, Logger: s.Logger,
		TracerProvider: s.TracerProvider}
	// One view of where the devices are, for the proxy and the NSS index:
	// the status files, and what the management interface says before
	// the next status write.
	r.resolver = &nss.Resolver{Globs: []string{filepath.Join(cfg.RunDir, "server-*.status")}}
	statusFiles := make([]string, n+1) // by instance id, for each connect and disconnect
	for id := 1; id <= n; id++ {
		statusFiles[id] = cfg.Paths(id).Status
	}
	r.sessions = &Sessions{Auth: r.auth, Connections: conns, State: r.reporter, DelayOnAuthFail: cfg.Auth.DelayOnFail,
		Metrics: r.metrics, Script: cfg.Auth.Mode == AuthScript, Logger: s.Logger,
		Addresses: r.resolver, StatusFile: func(id int) string {
			if id > 0 && id < len(statusFiles) {
				return statusFiles[id]
			}
			return cfg.Paths(id).Status
		}}
	r.buildLimiters()
	r.internal = &internalapi.Server{Auth: r.auth, Instances: n,
		Clients:         &ScriptClients{Connections: conns, Metrics: r.metrics, State: r.reporter, Sessions: r.sessions},
		Denied:          r.metrics.AuthFailures.Inc,
		DelayOnAuthFail: cfg.Auth.DelayOnFail, TrustProxy: cfg.TrustProxy,
		ControlDir: r.hooks.ControlDir, Logger: s.Logger, TracerProvider: s.TracerProvider, Propagator: s.Propagator}
	return r, nil
}

// prepareHooks checks that OpenVPN's user may run the script-mode hooks
// and makes the directory of their auth control files.
func (r *run) prepareHooks() error {
	user, group := r.cfg.OpenVPN.account()
	if err := r.hooks.CheckHooks(user); err != nil {
		return err
	}
	dir, err := internalapi.PrepareControlDir(filepath.Join(r.cfg.RunDir, "openvpn-tmp"), "/tmp", user, group)
	if dir == "" {
		return err
	}
	if err != nil {
		r.s.log().Warn("OpenVPN's temporary files and auth control files go to /tmp", "reason", err)
	}
	r.hooks.ControlDir = dir
	return nil
}

// buildLimiters makes an instance's bandwidth limiter when limits are set.
func (r *run) buildLimiters() {
	cfg := r.cfg
	r.limiters = make([]*bandwidth.Limiter, r.n+1)
	if cfg.Bandwidth.Down == 0 || cfg.Bandwidth.Up == 0 {
		return
	}
	cmdf := r.s.Command
	if cmdf == nil {
		cmdf = exec.CommandContext
	}
	tc := func(ctx context.Context, name string, args ...string) ([]byte, error) {
		return cmdf(ctx, name, args...).CombinedOutput()
	}
	for id := 1; id <= r.n; id++ {
		in, _ := cfg.Plan.Instance(id)
		r.limiters[id] = &bandwidth.Limiter{Dev: "tun" + strconv.Itoa(id), IFB: "obvpnifb" + strconv.Itoa(id),
			Subnet: in.Subnet, Down: cfg.Bandwidth.Down, Up: cfg.Bandwidth.Up, Run: tc}
	}
	r.sessions.Limits = func(id int) *bandwidth.Limiter { return r.limiters[id] }
}

func (r *run) teardownLimits() {
	for _, l := range r.limiters {
		if l != nil {
			_ = l.Teardown(context.Background())
		}
	}
}

// listen opens the listeners: the internal API on loopback (one port, or
// one an instance), the metrics and the CONNECT proxy's.
func (r *run) listen() error {
	cfg := r.cfg
	r.apiURLs = make(map[int]string)
	// The internal API is for OpenVPN's hooks and the operators of this
	// host: on loopback only, so that nobody else gets an answer at all.
	if cfg.Plan.Ports.SharedAPI {
		if err := r.serve(internalAPIAddr(cfg.Plan.Ports.API), r.internal, 0); err != nil {
			return err
		}
	}
	for id := 1; id <= r.n; id++ {
		in, _ := cfg.Plan.Instance(id)
		if !cfg.Plan.Ports.SharedAPI {
			if err := r.serve(internalAPIAddr(in.APIPort), r.internal, 0); err != nil {
				return err
			}
		}
		r.apiURLs[id] = "http://" + internalAPIAddr(in.APIPort)
	}
	if addr := cfg.Metrics.addr(); addr != "" {
		maxConns := cfg.Metrics.MaxConns
		h := monitorHandler(r.reg, r.sessions, cfg.Metrics.Timeout, cfg.Metrics.Token)
		if err := r.serve(addr, h, maxConns); err != nil {
			return err
		}
	}
	if cfg.Proxy.Port != 0 {
		l, err := r.s.listen("tcp", ":"+strconv.Itoa(cfg.Proxy.Port))
		if err != nil {
			return fmt.Errorf("vpn: %w", err)
		}
		r.proxyL = l
	}
	return nil
}

// serve serves h on addr, with at most maxConns connections (0: no bound).
func (r *run) serve(addr string, h http.Handler, maxConns int) error {
	l, err := r.s.listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("vpn: %w", err)
	}
	if maxConns > 0 {
		l = netutil.LimitListener(l, maxConns)
	}
	srv := newHTTPServer(&http.Server{Handler: h, ReadHeaderTimeout: orDefault(r.s.ReadHeaderTimeout, defaultReadHeaderTimeout)}, l)
	r.servers = append(r.servers, srv)
	r.serving.Add(1)
	go func() {
		defer r.serving.Done()
		srv.serve() // ends with shutdownServers
	}()
	return nil
}

// closeListeners shuts the HTTP servers down, closes the proxy's listener
// and ends the deferred authentications in flight.
func (r *run) closeListeners() {
	r.shutdownServers()
	if r.proxyL != nil {
		r.proxyL.Close()
	}
	r.internal.Close()
}

// shutdownServers shuts the HTTP servers down (the internal API's and the
// metrics'), within ShutdownTimeout.
func (r *run) shutdownServers() {
	sctx, cancel := context.WithTimeout(context.Background(), orDefault(r.s.ShutdownTimeout, defaultShutdownTimeout))
	defer cancel()
	for _, srv := range r.servers {
		srv.shutdown(sctx)
	}
	r.serving.Wait()
}

// start starts the parts: the CONNECT proxy (it serves once the service
// instance is registered), then, once the run directory is this
// process's (see lockRunDir), HAProxy (managed) and the registrar, the
// NSS index, the service instance, the reporter and the instances. stop,
// when not nil, stops the managed HAProxy, or leaves it running (keep).
func (r *run) start() (stop func(keep bool), err error) {
	cfg := r.cfg
	r.fatal = make(chan error, r.n+3)
	r.instances = make([]*Instance, r.n+1)
	if r.proxyL != nil {
		pm, err := connectproxy.NewMetrics(r.reg)
		if err != nil {
			return nil, fmt.Errorf("vpn: proxy metrics: %w", err)
		}
		r.proxyWG.Add(1)
		go func() {
			defer r.proxyWG.Done()
			r.runProxy(r.proxyCtx, pm)
		}()
	}
	close(r.s.started)
	if err := r.takeOver(); err != nil {
		return nil, err
	}
	h := cfg.haproxy()
	if h.Mode != haproxy.Off {
		r.hreg = &haproxy.Registrar{Runtime: &haproxy.Runtime{Socket: h.Socket}, Logger: r.s.log()}
	}
	if h.Mode == haproxy.Managed {
		if stop, err = r.s.startHAProxy(r.ctx, r.cfg, r.fatal); err != nil {
			return nil, err
		}
	}
	if r.hreg != nil {
		r.goRun(r.hreg.Run)
	}
	if cfg.NSSIndex != "off" {
		r.goRun(func(ctx context.Context) { r.s.keepNSSIndex(ctx, r.resolver, cfg.NSSIndex) })
	}
	r.goRun(func(ctx context.Context) { _ = r.s.service.Run(ctx) })
	r.goRun(func(ctx context.Context) { _ = r.reporter.Run(ctx) })
	for id := 1; id <= r.n; id++ {
		r.startInstance(id)
	}
	r.s.log().Info("VPN server running", "instances", r.n, "plan", cfg.Plan.String())
	return stop, nil
}

// takeOver takes the run directory's lock, waiting while a process
// before this one hands over, and picks up what that one left: its
// service instance, and the devices the API may hold as connected to it.
// From here on the reporter keeps that record for the process after this
// one.
func (r *run) takeOver() error {
	unlock, err := lockRunDir(r.ctx, r.cfg.RunDir, r.s.log())
	if err != nil {
		return err
	}
	r.unlock = unlock
	prev, err := readHandoff(r.cfg.RunDir)
	if err != nil {
		r.s.log().Warn("what the process before this one left is unreadable; its devices are reported anew", "err", err)
	}
	r.prev = prev
	r.s.service.Resume = prev.ServiceID
	r.reporter.Restore(prev.held())
	r.reporter.Record = func(held map[string]DeviceState, maybe []string) {
		if err := writeHandoff(r.cfg.RunDir, r.s.service.ID(), held, maybe); err != nil {
			r.s.log().Warn("could not record the devices online for the next process", "err", err)
		}
	}
	return nil
}

// settle reports offline, once every instance is ready (adopted ones
// resynced), the devices that the process before this one left online in
// the API and that have no session here any more: they left while no
// process watched. When the service instance could not be resumed, the
// new one holds nothing, and every device here is reported to it.
func (r *run) settle(ctx context.Context) {
	held := r.prev.held()
	if len(held) == 0 {
		return
	}
	select {
	case <-r.s.service.Registered():
	case <-ctx.Done():
		return
	}
	if r.s.service.ID() != r.prev.ServiceID {
		for _, u := range r.conns.Online() {
			r.reporter.Set(u, DeviceState{Connected: true})
		}
	}
	gone := 0
	for u := range held {
		if r.conns.Count(u) <= 0 {
			r.reporter.Set(u, DeviceState{Connected: false})
			gone++
		}
	}
	r.s.log().Info("devices taken over from the process before this one", "held", len(held), "left_unwatched", gone)
}

// goRun runs f on a goroutine that the run waits for.
func (r *run) goRun(f func(ctx context.Context)) {
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		f(r.ctx)
	}()
}

// startInstance starts instance id, which registers with HAProxy when it
// is ready and leaves it when its openvpn goes.
func (r *run) startInstance(id int) {
	cfg := r.cfg
	hooks := r.hooks
	hooks.APIURL = r.apiURLs[id]
	inst := &Instance{Config: cfg, ID: id, Hooks: hooks, Handler: r.sessions.Handler(id),
		Resync:  r.sessions.Resync,
		Command: r.s.Command, Dial: r.s.Dial, Logger: r.s.Logger,
		OnReady: func(id int) {
			if r.hreg != nil {
				// Registered at once, or retried until HAProxy takes it.
				r.hreg.SetNow(r.ctx, id, instanceAddr(cfg, id), haproxy.Ready)
			}
			r.readyMu.Lock()
			defer r.readyMu.Unlock()
			if !r.readySet[id] {
				r.readySet[id] = true
				if len(r.readySet) == r.n {
					close(r.s.ready)
					r.goRun(r.settle)
				}
			}
		},
		OnDown: func(id int) {
			if r.hreg != nil {
				r.hreg.SetNow(context.WithoutCancel(r.ctx), id, instanceAddr(cfg, id), haproxy.Maint)
			}
			r.sessions.Forget(id)
			if l := r.limiters[id]; l != nil {
				l.Reset() // its tun device went with its openvpn
			}
		},
	}
	r.instances[id] = inst
	r.goRun(func(ctx context.Context) {
		if err := inst.Run(ctx); err != nil && ctx.Err() == nil {
			r.fatal <- err
		}
	})
}

// runProxy serves the CONNECT proxy once the service instance is
// registered (its id decides forwarding), until ctx ends.
func (r *run) runProxy(ctx context.Context, pm *connectproxy.Metrics) {
	s, cfg := r.s, r.cfg
	select {
	case <-s.service.Registered():
	case <-ctx.Done():
		return
	}
	proxy := &connectproxy.Server{Logger: s.Logger, Handler: &connectproxy.Handler{
		Authorizer:  r.api,
		Online:      r.api,
		Locator:     r.api,
		Resolver:    r.resolver,
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
	go func() { serveDone <- proxy.Serve(r.proxyL) }()
	s.log().Info("CONNECT proxy serving", "port", cfg.Proxy.Port, "service_id", s.service.ID())
	select {
	case err := <-serveDone:
		if ctx.Err() == nil {
			r.fatal <- fmt.Errorf("vpn: CONNECT proxy: %w", err)
		}
	case <-ctx.Done():
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.proxyTimeout)
		defer cancel()
		_ = proxy.Shutdown(sctx)
		<-serveDone
	}
}

// wait waits for the end: ctx (then the drain), Close or a fatal error,
// which it returns.
func (r *run) wait(ctx context.Context) error {
	select {
	case <-ctx.Done():
		dctx, dcancel := r.s.unlessClosed(r.ctx)
		r.s.drain(dctx, r.cfg, r.hreg, r.sessions, r.instances)
		dcancel()
	case <-r.s.closed:
	case <-r.s.handover:
		r.leaving = true
	case err := <-r.fatal:
		r.s.log().Error("VPN server stopping", "err", err)
		return err
	}
	return nil
}

// stop stops the parts, and reports the devices of the instances, gone
// now, offline within the drain timeout (unless Close was called).
func (r *run) stop(ctx context.Context) {
	if r.leaving {
		r.handOver(ctx)
		return
	}
	r.cancel()
	r.proxyCancel()
	r.wg.Wait()
	r.proxyWG.Wait()
	r.sessions.Wait()
	r.auth.Wait()
	// The instances are gone, and their clients with them.
	for id := 1; id <= r.n; id++ {
		r.sessions.Forget(id)
	}
	if r.s.service.ID() == 0 {
		return
	}
	timeout := r.cfg.Drain.Timeout
	fctx, fcancel := context.WithTimeout(context.WithoutCancel(ctx), timeout)
	defer fcancel()
	fctx, ucancel := r.s.unlessClosed(fctx)
	defer ucancel()
	if err := r.reporter.Flush(fctx); err != nil {
		fp := slog.String(FingerprintKey, FingerprintStateUpdate)
		if errors.Is(fctx.Err(), context.Canceled) {
			fp = slog.Attr{} // a second signal cut the reports short, as asked
		}
		r.s.log().Error("could not report every device offline", "err", err, "pending", r.reporter.Pending(), fp)
	}
}

// handoverSettle bounds how long a handover waits for the device
// authentications in flight to be answered.
const handoverSettle = 10 * time.Second

// handOver stops the run for the process after this one (Handover): the
// internal API and the metrics stop serving (the successor serves their
// sockets), the authentications in flight are answered, the instances let go of their openvpn, the pending reports
// are sent and what the API holds is recorded, the run directory is
// unlocked for the successor, and the CONNECT tunnels still open get
// Drain.Timeout to finish.
func (r *run) handOver(ctx context.Context) {
	r.s.log().Info("handing over to the next process of this server")
	fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.cfg.Drain.Timeout)
	defer cancel()
	r.shutdownServers()
	// A pass under way finishes first, so that no report whose answer was
	// not read is sent twice; what comes after is sent below.
	r.flushForHandover(fctx)
	// The devices being decided get their answer on the sessions that
	// asked: the next process is never asked about them.
	sctx, scancel := context.WithTimeout(fctx, handoverSettle)
	if err := r.sessions.Settle(sctx); err != nil {
		r.s.log().Warn("devices still being authenticated are left unanswered; they dial again after their handshake times out", "err", err)
	}
	scancel()
	for _, inst := range r.instances {
		if inst != nil {
			inst.Leave()
		}
	}
	r.cancel()
	r.wg.Wait()
	r.sessions.Wait()
	r.auth.Wait()
	r.flushForHandover(fctx)
	r.reporter.record(nil)
	if r.unlock != nil {
		r.unlock()
		r.unlock = nil
	}
	r.proxyTimeout = r.cfg.Drain.Timeout
	r.proxyCancel()
	r.proxyWG.Wait()
	r.s.log().Info("handed over")
}

// flushForHandover sends the pending state reports, within ctx; what is
// left goes to the next process through the record.
func (r *run) flushForHandover(ctx context.Context) {
	if r.s.service.ID() == 0 {
		return
	}
	if err := r.reporter.Flush(ctx); err != nil {
		r.s.log().Warn("state reports left to the next process", "err", err, "pending", r.reporter.Pending())
	}
}

// orDefault returns d, or def when d is not positive.
func orDefault(d, def time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return def
}
