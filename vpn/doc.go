// Package vpn composes the obvpn server: the configuration of a deployment
// ([Config], loaded from the environment by [LoadConfig]), supervised OpenVPN
// instances, device authentication against the balena API, state reporting,
// the internal API, HAProxy, bandwidth limits, metrics and graceful drain.
//
// [Server] runs it all: configure it with a [Config] and call Run, as
// cmd/open-balena-vpn does. Its parts are usable on their own:
//
//   - [Config] and [Loader]: every variable of the reference system, under
//     its old and new names, mapped in one place; a malformed or missing
//     value fails with a one-line [*ConfigError] naming the variable.
//     Programs call [LoadConfig] ([LoadConnectProxyConfig] for the proxy
//     alone, [LoadPlan] for the address plan alone).
//   - [Instance]: one supervised OpenVPN process of the plan and its
//     management session; [Config.OpenVPNServerConfig] renders its
//     configuration.
//   - [Sessions]: the management-mode decisions (who may connect) and the
//     tracking of established sessions.
//   - [Authenticator]: device authentication against an [AuthAPI], with the
//     balena API's cache, sharing and concurrency rules.
//   - [Connections] and [Reporter]: session counts per device, and the
//     batched, retried reports to a [StateAPI] of which devices are online.
//   - [Service]: the service instance's registration and heartbeat with a
//     [ServiceAPI].
//   - [ScriptClients]: the session accounting of script mode, which the
//     internal API (package vpn/internalapi) hands the hooks' client
//     events to; the hooks (cmd/vpn-auth, cmd/vpn-client-event) call it
//     through the small client of package vpn/hook.
//   - [Metrics] and [Config.RenderHAProxy]: the Prometheus metrics, and
//     HAProxy's configuration for the deployment.
//
// Jobs that stand alone are packages of their own: vpn/haproxy (HAProxy's
// configuration, process, runtime API and registrar), vpn/bandwidth
// (per-device limits with tc), vpn/internalapi and vpn/hook (the internal
// API's server and its client), vpn/balena (the balena API).
//
// The balena API is reached through the small interfaces this package
// declares ([AuthAPI], [StateAPI], [ServiceAPI]); package vpn/balena
// implements them. The address arithmetic lives in package
// [github.com/obvpn/obvpn/subnet]; Config.Plan is a subnet.Plan.
package vpn
