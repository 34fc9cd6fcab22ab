// Package sentrysetup reports the commands' errors (open-balena-vpn,
// connect-proxy) to Sentry with the official Go SDK, as the reference
// system reports its own.
//
// The library packages know nothing of Sentry: they log the failures an
// operator must hear of with a "fingerprint" attribute
// ([vpn.FingerprintKey], [connectproxy.FingerprintKey]) whose value names
// the kind of failure (vpn.FingerprintAuth, connectproxy.FingerprintForward,
// …), and the error in an "err" attribute. [Reporter.Handler] wraps a
// command's slog.Handler: every record at warn level or above that
// carries a fingerprint becomes a Sentry event with that fingerprint, the
// record's level (warn: warning, error and above: error), its message,
// the error's chain as the exception, its attributes as the "log"
// context and some of them as tags. Records without a fingerprint are
// only passed on. What is sent holds no key, password or token: see
// [Scrubber].
//
// Without a DSN, Setup starts no SDK, Handler returns the handler it is
// given, and nothing is sent. Events are sent in the background;
// [Reporter.Close] flushes them, within its context, when the command
// exits.
//
// It is not for the script-mode hooks, which stay small.
package sentrysetup

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"runtime/debug"
	"slices"

	"github.com/getsentry/sentry-go"
)

// FingerprintKey is the log attribute that marks a record for Sentry, the
// key that package vpn and package connectproxy log.
const FingerprintKey = "fingerprint"

// TagKeys are the attributes that become tags of an event (besides
// "fingerprint"), when a record carries them: the instance, the service
// instance, the device and the HTTP status.
var TagKeys = []string{"instance", "id", "service_instance", "uuid", "status"}

// Options are a command's settings for Setup.
type Options struct {
	// DSN is the Sentry project's DSN. Empty means no reporting: the SDK
	// is not started.
	DSN string

	// Release names the build in the events. Empty means [Release]().
	Release string

	// Environment names the deployment, such as "production".
	Environment string

	// ServerName names the host in the events. Empty means the host
	// name.
	ServerName string

	// Logger names the command in the events ("logger"), such as
	// "open-balena-vpn".
	Logger string

	// Secrets are values that must never appear in an event, such as the
	// service API key and the monitoring token: wherever they appear,
	// they are replaced by "[Filtered]". Values shorter than
	// [MinSecretLen] are ignored. The DSN's own key is always one.
	Secrets []string

	// RootCAs, if not nil, are the roots trusted for the DSN's host
	// instead of the system's (a self-hosted Sentry behind the same
	// private CA as the balena API).
	RootCAs *x509.CertPool

	// HTTPTransport, if not nil, sends the events (tests). Nil means the
	// SDK's own.
	HTTPTransport http.RoundTripper
}

// Reporter sends events to Sentry. The zero Reporter, and the one Setup
// returns without a DSN, sends nothing.
type Reporter struct {
	client *sentry.Client
	scrub  *Scrubber
}

// Setup starts the Sentry SDK's client for o.DSN, or returns a Reporter
// that sends nothing when o.DSN is empty. A malformed DSN is an error
// that does not repeat it. Setup installs nothing globally: the SDK's
// global hub is left alone.
func Setup(o Options) (*Reporter, error) {
	if o.DSN == "" {
		return &Reporter{}, nil
	}
	if _, err := url.Parse(o.DSN); err != nil {
		// url.Parse's error, and the SDK's, would repeat the DSN's key.
		return nil, errors.New("sentrysetup: the DSN is not a URL")
	}
	dsn, err := sentry.NewDsn(o.DSN)
	if err != nil {
		return nil, fmt.Errorf("sentrysetup: the DSN: %w", err)
	}
	secrets := append([]string{dsn.GetPublicKey(), dsn.GetSecretKey()}, o.Secrets...)
	r := &Reporter{scrub: NewScrubber(secrets...)}
	release := o.Release
	if release == "" {
		release = Release()
	}
	c, err := sentry.NewClient(sentry.ClientOptions{
		Dsn:           o.DSN,
		Release:       release,
		Environment:   o.Environment,
		ServerName:    o.ServerName,
		CaCerts:       o.RootCAs,
		HTTPTransport: o.HTTPTransport,
		// Events carry no request, user or IP address of their own; what
		// is sent goes through the scrubber once more.
		SendDefaultPII: false,
		BeforeSend: func(ev *sentry.Event, _ *sentry.EventHint) *sentry.Event {
			return r.scrub.Event(ev)
		},
		// Errors only: no traces (OpenTelemetry has them), no logs, no
		// metrics.
		DisableMetrics: true,
		// No source lines in the stack traces: the SDK would read them
		// from the disk at run time.
		Integrations: func(in []sentry.Integration) []sentry.Integration {
			return slices.DeleteFunc(in, func(i sentry.Integration) bool { return i.Name() == "ContextifyFrames" })
		},
	})
	if err != nil {
		return nil, fmt.Errorf("sentrysetup: starting the SDK: %w", err)
	}
	r.client = c
	return r, nil
}

// Enabled reports whether r sends events.
func (r *Reporter) Enabled() bool { return r != nil && r.client != nil }

// Close sends the events still buffered, waiting until they are sent or
// ctx ends, and stops the SDK. It reports whether every event was sent.
// It returns when ctx ends at the latest, even when the SDK takes longer
// to stop (an endpoint that does not answer). Call it once, when the
// command exits.
func (r *Reporter) Close(ctx context.Context) bool {
	if !r.Enabled() {
		return true
	}
	ok := r.client.FlushWithContext(ctx)
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		r.client.Close() // flushes again, for up to 5 s
	}()
	select {
	case <-stopped:
	case <-ctx.Done():
		ok = false
	}
	return ok
}

// capture sends one event.
func (r *Reporter) capture(ev *sentry.Event) {
	r.client.CaptureEvent(ev, nil, nil)
}

// Release returns the version of the running executable's main module,
// as `go version -m` shows it: the module version of a build from a
// module (go install …@v1.2.3), else the VCS revision that the build
// recorded ("-dirty" when modified), else "devel".
func Release() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "devel"
	}
	if v := bi.Main.Version; v != "" && v != "(devel)" {
		return v
	}
	var rev, modified string
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			modified = s.Value
		}
	}
	if rev == "" {
		return "devel"
	}
	if len(rev) > 12 {
		rev = rev[:12]
	}
	if modified == "true" {
		rev += "-dirty"
	}
	return rev
}

// levelOf maps a record's level onto Sentry's.
func levelOf(l slog.Level) sentry.Level {
	switch {
	case l >= slog.LevelError:
		return sentry.LevelError
	case l >= slog.LevelWarn:
		return sentry.LevelWarning
	case l >= slog.LevelInfo:
		return sentry.LevelInfo
	}
	return sentry.LevelDebug
}
