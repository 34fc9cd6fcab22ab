package vpn

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/trace"
)

// ServiceAPI is the part of the balena API that knows the VPN servers:
// POST /v7/service_instance registers one (with its IPv4 address, if any)
// and returns its id; PATCH /v7/service_instance(<id>) with
// {"is_alive":true} is the heartbeat. The vpn/balena client implements it.
type ServiceAPI interface {
	RegisterService(ctx context.Context, addr netip.Addr) (id int64, err error)
	Heartbeat(ctx context.Context, id int64) error
}

// Service registers this VPN server as a service instance of the balena
// API and keeps it alive: [Service.Run] retries the registration every
// Interval until it works, then sends a heartbeat every Interval. The id is
// available from [Service.ID] (0 until registered) and the Registered
// channel closes once it is.
type Service struct {
	// API is the balena API.
	API ServiceAPI

	// Addr is the address registered with the instance. The zero Addr
	// registers none.
	Addr netip.Addr

	// Resume is the id of the service instance that an earlier process of
	// this server registered (a restart or an upgrade in place): Run
	// sends it a heartbeat first and, when the API takes it, goes on with
	// it without registering, since the devices that stayed connected are
	// held by it. Zero, or a heartbeat that fails, means registering a new
	// one.
	Resume int64

	// Interval is the time between registration attempts and between
	// heartbeats. Zero means 10 s.
	Interval time.Duration

	// Logger receives failures. Nil means discard.
	Logger *slog.Logger

	// TracerProvider makes a span of every registration attempt
	// (vpn.service.register) and of every heartbeat
	// (vpn.service.heartbeat). Nil means otel.GetTracerProvider().
	TracerProvider trace.TracerProvider

	id         atomic.Int64
	once       sync.Once
	registered chan struct{}
}

// ID returns the service instance id, or 0 before registration.
func (s *Service) ID() int64 { return s.id.Load() }

// Registered returns a channel that is closed once the service is
// registered.
func (s *Service) Registered() <-chan struct{} {
	s.init()
	return s.registered
}

func (s *Service) init() {
	s.once.Do(func() { s.registered = make(chan struct{}) })
}

// Run registers and then keeps the instance alive until ctx ends, and
// returns ctx's error.
func (s *Service) Run(ctx context.Context) error {
	s.init()
	interval := s.Interval
	if interval <= 0 {
		interval = 10 * time.Second
	}
	log := s.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	if s.Resume > 0 {
		hctx, span := tracer(s.TracerProvider).Start(ctx, "vpn.service.heartbeat", trace.WithAttributes(attrServiceID.Int64(s.Resume)))
		err := s.API.Heartbeat(hctx, s.Resume)
		endSpan(span, err)
		if err == nil {
			s.id.Store(s.Resume)
			close(s.registered)
			log.Info("service instance resumed", "id", s.Resume)
		} else if ctx.Err() == nil {
			log.Warn("the service instance of the process before this one is gone; registering a new one", "id", s.Resume, "err", err)
		}
	}
	for s.ID() == 0 {
		rctx, span := tracer(s.TracerProvider).Start(ctx, "vpn.service.register")
		id, err := s.API.RegisterService(rctx, s.Addr)
		if err == nil && id <= 0 {
			err = fmt.Errorf("the API answered with service instance id %d", id)
		}
		if err == nil {
			span.SetAttributes(attrServiceID.Int64(id))
		}
		endSpan(span, err)
		if err == nil {
			s.id.Store(id)
			close(s.registered)
			log.Info("registered service instance", "id", id, "addr", s.Addr)
			break
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		log.Warn("service instance registration failed; will retry", "err", err, "retry_in", interval,
			slog.String(FingerprintKey, FingerprintServiceRegistration))
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
		hctx, span := tracer(s.TracerProvider).Start(ctx, "vpn.service.heartbeat", trace.WithAttributes(attrServiceID.Int64(s.ID())))
		err := s.API.Heartbeat(hctx, s.ID())
		endSpan(span, err)
		if err != nil && ctx.Err() == nil {
			log.Warn("service instance heartbeat failed", "id", s.ID(), "err", err, slog.String(FingerprintKey, FingerprintServiceHeartbeat))
		}
	}
}

// ErrNoIPv4 reports an interface without an IPv4 address.
var ErrNoIPv4 = errors.New("no IPv4 address")

// InterfaceIPv4 returns the first IPv4 address of the named network
// interface, the address registered with the service instance
// (VPN_SERVICE_REGISTER_INTERFACE).
func InterfaceIPv4(name string) (netip.Addr, error) {
	ifi, err := net.InterfaceByName(name)
	if err != nil {
		return netip.Addr{}, err
	}
	addrs, err := ifi.Addrs()
	if err != nil {
		return netip.Addr{}, fmt.Errorf("interface %s: %w", name, err)
	}
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok {
			if ip, ok := netip.AddrFromSlice(n.IP); ok && ip.Unmap().Is4() {
				return ip.Unmap(), nil
			}
		}
	}
	return netip.Addr{}, fmt.Errorf("interface %s: %w", name, ErrNoIPv4)
}
