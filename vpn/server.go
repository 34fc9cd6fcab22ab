package vpn

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"

	"github.com/obvpn/obvpn/connectproxy"
	"github.com/obvpn/obvpn/nss"
	"github.com/obvpn/obvpn/openvpnmgmt"
	"github.com/obvpn/obvpn/vpn/haproxy"
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

	// ShutdownTimeout bounds the shutdown of the internal API, the
	// metrics and the CONNECT proxy once the drain is over: requests and
	// tunnels still open then are cut. Zero means 5 s.
	ShutdownTimeout time.Duration

	// ReadHeaderTimeout bounds the reading of a request's head on the
	// internal API and the metrics listener. Zero means 10 s.
	ReadHeaderTimeout time.Duration

	once         sync.Once
	ready        chan struct{}
	started      chan struct{} // closed once the listeners are open and the parts run
	closed       chan struct{} // closed by Close
	closeOnce    sync.Once
	handover     chan struct{} // closed by Handover
	handoverOnce sync.Once
	service      *Service
}

func (s *Server) init() {
	s.once.Do(func() {
		s.ready, s.started, s.closed, s.handover = make(chan struct{}), make(chan struct{}), make(chan struct{}), make(chan struct{})
	})
}

// Started returns a channel that is closed once Run has opened every
// listener (through Listen) and started its parts, before the instances
// are ready. A successor process started for an upgrade says it is ready
// at this point: its instances adopt the running OpenVPN processes only
// once its predecessor has let go of them (see [Server.Handover]).
func (s *Server) Started() <-chan struct{} {
	s.init()
	return s.started
}

// Handover ends Run for an upgrade or a restart in place: the OpenVPN
// instances, their device isolation and bandwidth limits and the managed
// HAProxy keep running for a successor process to adopt, and no device is
// reported offline. Run lets go of the management sessions, stops serving
// the internal API and the metrics (a successor that listens on the same
// sockets takes over), sends the state reports still pending, records
// what the API holds in the run directory for the successor, and returns
// once the CONNECT tunnels still open have ended (within Drain.Timeout).
// Handover does not wait for Run.
func (s *Server) Handover() {
	s.init()
	s.handoverOnce.Do(func() { close(s.handover) })
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

// listen is s.Listen, or net.Listen.
func (s *Server) listen(network, addr string) (net.Listener, error) {
	if s.Listen != nil {
		return s.Listen(network, addr)
	}
	return net.Listen(network, addr)
}

// keepNSSIndex keeps the NSS module's index current from resolver until
// ctx ends (Config.NSSIndex). A failure leaves the NSS module to scan the
// status files.
func (s *Server) keepNSSIndex(ctx context.Context, resolver *nss.Resolver, path string) {
	w := &nss.IndexWriter{Resolver: resolver, Path: path, Logger: s.Logger}
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
func (s *Server) drain(ctx context.Context, cfg *Config, reg *haproxy.Registrar, sessions *Sessions, instances []*Instance) {
	timeout, rate := cfg.Drain.Timeout, cfg.Drain.MinRatePerMinute
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if reg != nil {
		// Every registered instance, at once (the registrar logs a
		// refusal) and kept so while the drain runs.
		reg.SetAll(haproxy.Drain)
		reg.Apply(ctx)
	}
	clients := sessions.sessionList()
	if len(clients) == 0 {
		return
	}
	spacing := min(time.Minute/time.Duration(rate), timeout/time.Duration(len(clients)))
	s.log().Info("draining", "clients", len(clients), "spacing", spacing, "timeout", timeout)
	start := time.Now()
	for i, c := range clients {
		// Client i goes at start + i×spacing: a kill's own round trip is
		// part of the spacing, not added to it, so the rate is the one
		// configured (it was half that with 100 kills a second).
		if wait := time.Until(start.Add(time.Duration(i) * spacing)); i > 0 {
			t := time.NewTimer(max(wait, 0))
			select {
			case <-ctx.Done():
				t.Stop()
				s.log().Warn("drain timeout: the remaining clients go with their instances", "left", len(clients)-i)
				return
			case <-t.C:
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

// startHAProxy runs the managed haproxy, its configuration in the run
// directory, and returns once its admin socket answers: a new haproxy, or
// the one an earlier process left running, adopted (and reloaded in
// place if the configuration changed; see [haproxy.Process.Start]). ctx
// bounds the start only. An exit of haproxy before stop is reported on
// fatal. stop(false) stops haproxy and waits for it to have exited;
// stop(true) lets go of it, running, for a successor to adopt. Only the
// first call of stop counts.
func (s *Server) startHAProxy(ctx context.Context, cfg *Config, fatal chan<- error) (stop func(keep bool), err error) {
	p := &haproxy.Process{Config: cfg.HAProxy, Site: cfg.haproxySite(), File: filepath.Join(cfg.RunDir, "haproxy.cfg"),
		Command: s.Command, Logger: s.log()}
	if err := p.Start(ctx); err != nil {
		return nil, fmt.Errorf("vpn: %w", err)
	}
	quit, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		select {
		case <-p.Done():
			select {
			case fatal <- fmt.Errorf("vpn: haproxy exited: %v", p.Err()):
			case <-quit:
			}
		case <-quit:
		}
	}()
	var once sync.Once
	return func(keep bool) {
		once.Do(func() {
			close(quit)
			<-done
			if keep {
				p.Release()
				s.log().Info("HAProxy left running", "pid", p.Pid())
				return
			}
			if err := p.Stop(context.Background()); err != nil {
				s.log().Warn("stopping HAProxy", "pid", p.Pid(), "err", err)
			}
		})
	}, nil
}
