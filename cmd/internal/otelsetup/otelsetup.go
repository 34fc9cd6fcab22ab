// Package otelsetup installs the OpenTelemetry SDK for the commands
// (open-balena-vpn, connect-proxy), configured only by the standard
// OTEL_* environment variables, as the reference system's Node SDK is:
//
//   - OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)
//     set: spans are exported over OTLP/HTTP (protobuf) by a batch
//     processor; the exporter reads its other OTEL_EXPORTER_OTLP_*
//     settings (headers, timeout, compression, certificates) itself.
//   - Neither set: nothing is exported, but an SDK TracerProvider is
//     still installed, so that spans have valid, sampled contexts and the
//     balena API calls carry a W3C traceparent.
//   - OTEL_SERVICE_NAME names the service (default: the command's
//     ServiceName), OTEL_RESOURCE_ATTRIBUTES adds resource attributes,
//     OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG choose the sampler
//     (default parentbased_always_on), OTEL_BSP_* tune the batch
//     processor.
//   - OTEL_SDK_DISABLED=true installs no SDK: the global provider stays
//     a no-op one (an incoming trace is still passed on).
//   - OTEL_TRACES_EXPORTER=none turns the export off; otlp (the default)
//     is the only exporter. OTEL_EXPORTER_OTLP_PROTOCOL must be
//     http/protobuf (the default) if set.
//
// In every case the W3C TraceContext and Baggage propagators are
// installed globally. The library packages take a trace.TracerProvider
// and a propagation.TextMapPropagator whose nil values mean these
// globals; only the commands call Setup. It is not for the script-mode
// hooks, which stay small.
package otelsetup

import (
	"context"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"strconv"
	"strings"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
)

// Options are a command's settings for Setup; the environment does the
// rest.
type Options struct {
	// ServiceName is the service.name resource attribute when
	// OTEL_SERVICE_NAME is unset. Empty means "open-balena-vpn".
	ServiceName string

	// Logger receives the SDK's errors (an export that failed), at warn
	// level. Nil means discard.
	Logger *slog.Logger
}

// Telemetry is what Setup installed.
type Telemetry struct {
	// TracerProvider is the installed global provider: an SDK provider,
	// or the no-op one when OTEL_SDK_DISABLED is true.
	TracerProvider trace.TracerProvider

	// Exporting reports whether spans are exported; Endpoint is where
	// to (the endpoint variable's value, a password in it masked), for
	// logs.
	Exporting bool
	Endpoint  string

	sdk *sdktrace.TracerProvider
}

// Shutdown exports the spans still buffered and stops the SDK, within
// ctx. Call it once, when the command exits.
func (t *Telemetry) Shutdown(ctx context.Context) error {
	if t.sdk == nil {
		return nil
	}
	if err := t.sdk.Shutdown(ctx); err != nil {
		return fmt.Errorf("otelsetup: flushing the spans: %w", err)
	}
	return nil
}

// Setup installs the global propagator and, unless OTEL_SDK_DISABLED is
// true, an SDK TracerProvider as the global one, with an OTLP/HTTP
// exporter when an endpoint is set. A malformed OTEL_* value is an error
// naming the variable.
func Setup(ctx context.Context, o Options) (*Telemetry, error) {
	otel.SetTextMapPropagator(propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{}))
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	otel.SetErrorHandler(otel.ErrorHandlerFunc(func(err error) { log.Warn("OpenTelemetry", "err", err) }))

	if v := os.Getenv("OTEL_SDK_DISABLED"); v != "" {
		off, err := strconv.ParseBool(v)
		if err != nil {
			return nil, fmt.Errorf("OTEL_SDK_DISABLED=%q: want true or false", v)
		}
		if off {
			return &Telemetry{TracerProvider: otel.GetTracerProvider()}, nil
		}
	}
	name := o.ServiceName
	if name == "" {
		name = "open-balena-vpn"
	}
	// Later detectors win: the environment's OTEL_SERVICE_NAME and
	// OTEL_RESOURCE_ATTRIBUTES over the default name.
	res, err := resource.New(ctx, resource.WithTelemetrySDK(), resource.WithHost(),
		resource.WithAttributes(attribute.String("service.name", name)), resource.WithFromEnv())
	if err != nil {
		return nil, fmt.Errorf("OTEL_RESOURCE_ATTRIBUTES=%q: %w", os.Getenv("OTEL_RESOURCE_ATTRIBUTES"), err)
	}

	t := &Telemetry{}
	opts := []sdktrace.TracerProviderOption{sdktrace.WithResource(res)}
	endpoint, err := exportEndpoint()
	if err != nil {
		return nil, err
	}
	if endpoint != "" {
		exp, err := otlptracehttp.New(ctx)
		if err != nil {
			return nil, fmt.Errorf("OTEL_EXPORTER_OTLP_ENDPOINT=%q: %w", endpoint, err)
		}
		opts = append(opts, sdktrace.WithBatcher(exp))
		t.Exporting, t.Endpoint = true, redact(endpoint)
	}
	t.sdk = sdktrace.NewTracerProvider(opts...) // reads OTEL_TRACES_SAMPLER and OTEL_BSP_*
	t.TracerProvider = t.sdk
	otel.SetTracerProvider(t.sdk)
	return t, nil
}

// redact masks the password of a URL with one.
func redact(endpoint string) string {
	u, err := url.Parse(endpoint)
	if err != nil || u.User == nil {
		return endpoint
	}
	return u.Redacted()
}

// exportEndpoint returns the endpoint that spans are exported to, or ""
// when they are not, from OTEL_TRACES_EXPORTER, the endpoint variables
// and the protocol variables.
func exportEndpoint() (string, error) {
	switch v := strings.TrimSpace(os.Getenv("OTEL_TRACES_EXPORTER")); v {
	case "", "otlp":
	case "none":
		return "", nil
	default:
		return "", fmt.Errorf("OTEL_TRACES_EXPORTER=%q: want otlp or none", v)
	}
	endpoint := os.Getenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
	if endpoint == "" {
		endpoint = os.Getenv("OTEL_EXPORTER_OTLP_ENDPOINT")
	}
	if endpoint == "" {
		return "", nil
	}
	for _, k := range []string{"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"} {
		if v := os.Getenv(k); v != "" && v != "http/protobuf" {
			return "", fmt.Errorf("%s=%q: only http/protobuf is supported", k, v)
		}
	}
	return endpoint, nil
}
