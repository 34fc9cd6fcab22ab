// Package connectproxy is the HTTP CONNECT proxy through which operators
// and services (balena-proxy, SSH, web terminals) reach ports on devices
// connected to an openBalena VPN: "CONNECT <uuid>.balena:<port>".
//
// [Handler] is an http.Handler that follows the reference system step by
// step: it parses the target ([ParseTarget]), asks the balena API whether
// the caller's key may reach that port (the small interfaces [Authorizer],
// [OnlineChecker] and [Locator], which *balena.Client implements), finds
// the device among the clients of this VPN server ([Resolver], which
// *nss.Resolver implements), and otherwise, once the API says that the
// device is online, forwards the request to the VPN server that holds it,
// with the caller's credentials and a Forwarded header that stops loops.
// It fixes the reference system's defects: forwarded credentials are sent
// as "Basic base64(balena:<key>)", the Forwarded header is sent, bytes
// that arrive with a peer's 200 are kept, and API failures are answered
// 500 and never cached as denials. Unlike the reference, it does not ask
// the API whether a device that is connected to this server is online.
//
// [Server] serves a Handler with what a hijacking proxy needs (request
// head limits, graceful Shutdown that waits for tunnels). Tunnels copy
// between the raw connections through pooled buffers while bytes flow
// (or with splice(2): [Handler].Splice), and idle directions wait in an
// epoll instance without a goroutine; half-closes are passed on.
// [NewMetrics] makes the Prometheus collectors of SPEC §9.
//
// [Dialer] is the client side, for programs that reach devices through
// such a proxy: its DialContext returns a tunnel to "<uuid>.balena:<port>"
// (an http.Transport's DialContext, or golang.org/x/net/proxy's
// proxy.FromURL after [RegisterDialerType]). A Handler forwards to its
// peers with the Dialer's request and handshake.
//
// The package is not a general-purpose forward proxy: it only reaches
// devices by UUID, it does not speak HTTP/2 or TLS itself (serve it behind
// TLS with an http.Server if needed, at the cost of parking idle
// tunnels), and it does not authenticate callers itself: the Authorizer
// does.
package connectproxy
