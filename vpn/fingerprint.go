package vpn

import "github.com/obvpn/obvpn/connectproxy"

// FingerprintKey is the key of the log attribute that marks a record as a
// failure that an error tracker should hear of, the same key as
// [connectproxy.FingerprintKey]: its value, one of the Fingerprint
// constants, names the kind of failure, so that the tracker groups the
// records by it (cmd/internal/sentrysetup turns such records into Sentry
// events with that fingerprint). The record's "err" attribute holds the
// error.
//
// Expected refusals carry no fingerprint: a device denied for a wrong or
// malformed key (the API's 401 or 403), a busy API (503, the device is
// denied and retries), a state report held back until the service
// instance is registered, and work cut short because the server stops.
const FingerprintKey = connectproxy.FingerprintKey

// The fingerprints of the server's failures, the reference server's own.
const (
	// FingerprintAuth: a device's credentials could not be checked (the
	// API failed or answered something other than 200, 401, 403 or
	// 503); the device is denied. Logged by [Authenticator].
	FingerprintAuth = "api-auth-error"

	// FingerprintStateUpdate: devices' connected state could not be
	// reported to the API (a state report failed and will be retried, or
	// the devices were not all reported offline on shutdown). Logged by
	// [Reporter] and [Server].
	FingerprintStateUpdate = "device-state-update-error"

	// FingerprintServiceRegistration: the service instance could not be
	// registered with the API (it will be retried). Logged by [Service].
	FingerprintServiceRegistration = "service-registration-error"

	// FingerprintServiceHeartbeat: a heartbeat of the service instance
	// failed. Logged by [Service]. (The reference spells it
	// "service-heartbeart-error"; this is the name the issue gives.)
	FingerprintServiceHeartbeat = "service-heartbeat-error"
)
