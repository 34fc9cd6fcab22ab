// Package obvpn is the map of the obvpn SDK: a Go reimplementation of the
// openBalena VPN deployment, in which IoT devices dial in with OpenVPN using
// their UUID and API key, and operators reach services on those devices
// through an HTTP CONNECT proxy.
//
// This package holds no code. The SDK is a set of small packages, each with
// one job, that compose into the full server:
//
//   - [github.com/obvpn/obvpn/subnet] is the address and port plan: it
//     splits a base prefix such as 10.240.0.0/12 into one subnet per OpenVPN
//     instance and derives each instance's gateway, peer, address pool,
//     ports and client capacity. Pure functions over net/netip, no I/O.
//   - [github.com/obvpn/obvpn/openvpnmgmt] speaks OpenVPN's management
//     protocol over one connection: typed real-time events (client connects,
//     byte counts, state changes) and typed commands (client-auth,
//     client-kill, status, …). openvpnmgmt/mgmttest is a scripted fake
//     management server for tests.
//   - [github.com/obvpn/obvpn/nss] parses OpenVPN status files (versions 1, 2
//     and 3) and resolves "<uuid>.vpn" names to the virtual address of a
//     connected device from an index that is refreshed only when a file
//     changes. cmd/libnss_openvpn exposes the same lookup to every program on
//     the host as a glibc NSS module.
//   - [github.com/obvpn/obvpn/connectproxy] is the HTTP CONNECT proxy
//     ("CONNECT <uuid>.balena:<port>") as an embeddable http.Handler. It
//     declares the small interfaces it needs (who may access a device, where
//     a device is, how to dial) and forwards to the VPN server that holds a
//     device when it is not connected locally.
//   - [github.com/obvpn/obvpn/vpn/balena] is the typed client of the balena
//     API endpoints the VPN uses (device authentication, state reports,
//     service instances, proxy authorisation); vpn/balena/balenatest is an
//     in-memory balena API for tests, examples and the demo.
//   - [github.com/obvpn/obvpn/vpn] composes all of the above: [vpn.Config]
//     loaded from the environment by [vpn.LoadConfig], supervised OpenVPN
//     instances, device authentication, state reporting, the internal API,
//     HAProxy, bandwidth limits, metrics and graceful drain. vpn/vpntest is
//     the test kit: a throw-away PKI, real openvpn servers and clients, and
//     network-namespace devices; vpn/vpntest/otlptest an in-process
//     OTLP/HTTP receiver for tests of the tracing.
//
// Dependencies point one way: cmd and examples import vpn, which imports
// connectproxy, nss, openvpnmgmt, subnet and vpn/balena; those import no other
// obvpn package except that openvpnmgmt uses nss to parse status output.
//
// The reference commands are thin mains over these packages:
// cmd/open-balena-vpn (the full server), cmd/connect-proxy (the proxy alone),
// cmd/vpn-auth and cmd/vpn-client-event (OpenVPN script-mode hooks),
// cmd/libnss_openvpn (the NSS module) and cmd/obvpnctl (the operator's
// command line: plan, lookup, clients, …). The library packages trace with
// OpenTelemetry through the trace.TracerProvider they are given (nil means
// the global one); only open-balena-vpn and connect-proxy install the SDK,
// from the standard OTEL_* variables (cmd/internal/otelsetup). The
// examples directory holds small programs to copy and examples/local-fleet,
// which runs the whole deployment on one machine.
package obvpn
