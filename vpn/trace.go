package vpn

import (
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
)

// The spans of package vpn, named short and stable:
//
//	vpn.auth               one Authenticator.Authenticate (vpn.auth.cache, vpn.auth.result)
//	vpn.state.report       one batch of a Reporter pass (vpn.state.uuids, vpn.state.connected)
//	vpn.service.register   one registration attempt of a Service
//	vpn.service.heartbeat  one heartbeat of a Service
//
// The internal API's requests are server spans named by method and
// route ("POST /api/v1/auth/"), and each call to the balena API is a
// client span of the vpn/balena client, a child of the span it serves.
const tracerName = "github.com/obvpn/obvpn/vpn"

// Attributes of the spans. No key, token or password is ever one.
var (
	attrUUID       = attribute.Key("vpn.device.uuid")
	attrAuthCache  = attribute.Key("vpn.auth.cache")  // "hit", "miss" or "shared" (joined a request in flight)
	attrAuthResult = attribute.Key("vpn.auth.result") // "allow", "deny" or "error"
	attrStateUUIDs = attribute.Key("vpn.state.uuids")
	attrStateConn  = attribute.Key("vpn.state.connected")
	attrServiceID  = attribute.Key("vpn.service.id")
)

// tracer returns the package's tracer from tp, or from the global
// provider when tp is nil.
func tracer(tp trace.TracerProvider) trace.Tracer {
	return tracerProvider(tp).Tracer(tracerName)
}

// tracerProvider returns tp, or the global provider when tp is nil.
func tracerProvider(tp trace.TracerProvider) trace.TracerProvider {
	if tp == nil {
		return otel.GetTracerProvider()
	}
	return tp
}

// endSpan records err (if any) on span, with status Error, and ends it.
func endSpan(span trace.Span, err error) {
	if err != nil {
		span.RecordError(err)
		span.SetStatus(codes.Error, err.Error())
	}
	span.End()
}
