package connectproxy

import (
	"context"
	"errors"
	"log/slog"
	"net"
)

// FingerprintKey is the key of the log attribute that marks a record as a
// failure that an error tracker should hear of; its value, one of the
// Fingerprint constants, names the kind of failure so that the tracker
// groups the records by it (cmd/internal/sentrysetup turns such records
// into Sentry events with that fingerprint). The record's "err"
// attribute holds the error.
//
// A record without it is not an error in this sense: a refusal (400,
// 403, 407, a device offline or found nowhere, a loop, too many
// tunnels), a device port that cannot be dialled, a peer that answers
// with something other than 200 or hangs up, and a caller that went
// away are the callers' business, as they are for the reference proxy.
const FingerprintKey = "fingerprint"

// The fingerprints of the Handler's failures, the reference proxy's own.
const (
	// FingerprintTunnel: the access check could not be answered (the
	// Authorizer failed); the request is answered 500.
	FingerprintTunnel = "proxy-tunnel-error"

	// FingerprintConnect: a tunnel could not be set up once the device
	// was reached (the caller's connection could not be taken over).
	FingerprintConnect = "proxy-connect-error"

	// FingerprintForward: the proxy of the peer VPN server that holds the
	// device could not be reached, or its connection failed before it
	// answered.
	FingerprintForward = "proxy-forward-error"

	// FingerprintDeviceLookup: the OnlineChecker could not say whether
	// the device is online.
	FingerprintDeviceLookup = "device-lookup-error"

	// FingerprintVPNHostLookup: the Locator could not say which VPN
	// server holds the device.
	FingerprintVPNHostLookup = "device-vpn-host-lookup-error"
)

// marked is an error that the Handler reports with a fingerprint. It is
// only ever the outermost error that ServeHTTP sees; fail unwraps it
// before the error is logged or handed to the ErrorHandler.
type marked struct {
	fingerprint string
	err         error
}

func (e *marked) Error() string { return e.err.Error() }
func (e *marked) Unwrap() error { return e.err }

// mark gives err the fingerprint, unless the request's context ended: a
// caller that went away, or a Shutdown, is not a failure.
func mark(ctx context.Context, fingerprint string, err error) error {
	if err == nil || ctx.Err() != nil {
		return err
	}
	return &marked{fingerprint, err}
}

// unmark returns err's fingerprint attribute (or an empty one) and err
// without its mark.
func unmark(err error) (slog.Attr, error) {
	if m, ok := err.(*marked); ok {
		return slog.String(FingerprintKey, m.fingerprint), m.err
	}
	return slog.Attr{}, err
}

// netFailure reports whether err is a failure of the network (a refused,
// reset or timed-out connection) rather than an answer.
func netFailure(err error) bool {
	var op *net.OpError
	return errors.As(err, &op)
}
