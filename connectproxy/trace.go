package connectproxy

import (
	"context"
	"net"
	"net/http"
	"net/netip"
	"slices"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	"golang.org/x/net/http/httpguts"
)

// The spans of a CONNECT, named short and stable:
//
//	connectproxy.connect   the request, from its head to the tunnel's start or the refusal (server span)
//	connectproxy.access    the Authorizer's answer, through the cache (connectproxy.cache: hit, miss, shared)
//	connectproxy.online    the OnlineChecker's answer
//	connectproxy.lookup    the Resolver's answer (connectproxy.found)
//	connectproxy.locate    the Locator's answer
//	connectproxy.forward   the CONNECT to the peer server that holds the device (client span)
//	connectproxy.dial      a dial, of the device or of a peer (client span)
//
// The forward carries the trace to the peer as a traceparent header of
// its CONNECT request, and the handler continues the trace of an
// incoming one. A refusal is an error of the span only when it is a 500
// (a denied caller or an offline device is an answer).
const tracerName = "github.com/obvpn/obvpn/connectproxy"

var (
	attrUUID    = attribute.Key("connectproxy.uuid")
	attrPort    = attribute.Key("connectproxy.port")
	attrStatus  = attribute.Key("http.response.status_code")
	attrCache   = attribute.Key("connectproxy.cache")
	attrAllowed = attribute.Key("connectproxy.allowed")
	attrOnline  = attribute.Key("connectproxy.online")
	attrFound   = attribute.Key("connectproxy.found")
	attrService = attribute.Key("connectproxy.service_instance")
	attrPeer    = attribute.Key("server.address")
	attrVia     = attribute.Key("connectproxy.via")
)

func (h *Handler) tracer() trace.Tracer {
	tp := h.TracerProvider
	if tp == nil {
		tp = otel.GetTracerProvider()
	}
	return tp.Tracer(tracerName)
}

func (h *Handler) propagator() propagation.TextMapPropagator {
	if h.Propagator != nil {
		return h.Propagator
	}
	return otel.GetTextMapPropagator()
}

// startConnect starts the span of a CONNECT request, in the trace that
// the request carries, if any, and returns the request with it.
func (h *Handler) startConnect(r *http.Request) (*http.Request, trace.Span) {
	ctx := h.propagator().Extract(r.Context(), propagation.HeaderCarrier(r.Header))
	ctx, span := h.tracer().Start(ctx, "connectproxy.connect", trace.WithSpanKind(trace.SpanKindServer))
	return r.WithContext(ctx), span
}

// endSpan records err (if any) on span, with status Error, and ends it.
func endSpan(span trace.Span, err error) {
	if err != nil {
		span.RecordError(err)
		span.SetStatus(codes.Error, err.Error())
	}
	span.End()
}

// refused records on the request's span the answer to a refused request;
// only a 500 is an error.
func refused(r *http.Request, code int, err error) {
	span := trace.SpanFromContext(r.Context())
	span.SetAttributes(attrStatus.Int(code))
	if code >= 500 && code != http.StatusServiceUnavailable && err != nil {
		span.RecordError(err)
		span.SetStatus(codes.Error, err.Error())
	}
}

// checkAccess is canAccess in a span.
func (h *Handler) checkAccess(ctx context.Context, t Target, key string) (int64, bool, error) {
	ctx, span := h.tracer().Start(ctx, "connectproxy.access")
	id, ok, err := h.canAccess(ctx, t, key)
	span.SetAttributes(attrAllowed.Bool(ok))
	endSpan(span, err)
	return id, ok, err
}

// cacheAnswer records on the access span whether the cache answered.
func cacheAnswer(ctx context.Context, how string) {
	trace.SpanFromContext(ctx).SetAttributes(attrCache.String(how))
}

// hitOrShared says how the cache answered a caller who found an entry:
// from a finished answer, or by waiting for the question in flight.
func hitOrShared(finished bool) string {
	if finished {
		return "hit"
	}
	return "shared"
}

// online asks the OnlineChecker, in a span.
func (h *Handler) online(ctx context.Context, deviceID int64) (bool, error) {
	ctx, span := h.tracer().Start(ctx, "connectproxy.online")
	ok, err := h.Online.DeviceOnline(ctx, deviceID)
	span.SetAttributes(attrOnline.Bool(ok))
	endSpan(span, err)
	return ok, err
}

// locate asks the Locator, in a span.
func (h *Handler) locate(ctx context.Context, uuid, key string) (int64, netip.Addr, bool, error) {
	ctx, span := h.tracer().Start(ctx, "connectproxy.locate")
	sid, addr, known, err := h.Locator.LocateDevice(ctx, uuid, key)
	if err == nil && known {
		span.SetAttributes(attrService.Int64(sid))
	}
	endSpan(span, err)
	return sid, addr, known, err
}

// dial dials addr, in a span.
func (h *Handler) dial(ctx context.Context, addr string) (net.Conn, error) {
	ctx, span := h.tracer().Start(ctx, "connectproxy.dial", trace.WithSpanKind(trace.SpanKindClient),
		trace.WithAttributes(attrPeer.String(addr)))
	c, err := h.dialConn(ctx, addr)
	endSpan(span, err)
	return c, err
}

// traceHeader returns the header fields that carry ctx's trace to a peer
// (traceparent, …), without those that a request cannot carry.
func (h *Handler) traceHeader(ctx context.Context) http.Header {
	hdr := http.Header{}
	h.propagator().Inject(ctx, propagation.HeaderCarrier(hdr))
	for k, vs := range hdr {
		vs = slices.DeleteFunc(vs, func(v string) bool { return !httpguts.ValidHeaderFieldValue(v) })
		if len(vs) == 0 || !httpguts.ValidHeaderFieldName(k) {
			delete(hdr, k)
			continue
		}
		hdr[k] = vs
	}
	return hdr
}

// startForward starts the span of a forward to service instance sid.
func (h *Handler) startForward(ctx context.Context, sid int64, addr netip.Addr) (context.Context, trace.Span) {
	return h.tracer().Start(ctx, "connectproxy.forward", trace.WithSpanKind(trace.SpanKindClient),
		trace.WithAttributes(attrService.Int64(sid), attrPeer.String(addr.String())))
}
