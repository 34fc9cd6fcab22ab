// Package vpn composes the obvpn server: the configuration of a deployment
// ([Config], loaded from the environment by [LoadConfig]), supervised OpenVPN
// instances, device authentication against the balena API, state reporting,
// the internal API, HAProxy, bandwidth limits, metrics and graceful drain.
//
// Today the package holds the configuration. Its variables are those of the
// reference system, openBalena VPN, under both their old and their new
// names; [Loader] maps them onto [Config] in one place, and every malformed
// or missing value fails with a one-line [*ConfigError] that names the
// variable. Programs call [LoadConfig] (or [LoadConnectProxyConfig] for the
// proxy alone, [LoadPlan] for the address plan alone); tests and embedders
// fill a [Loader] with their own variables.
//
// The address and port arithmetic lives in package
// [github.com/obvpn/obvpn/subnet]; Config.Plan is a subnet.Plan.
package vpn
