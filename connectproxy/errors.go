package connectproxy

import (
	"errors"
	"fmt"
	"net/http"
)

// Why a CONNECT request was refused. The errors a [Handler] passes to its
// ErrorHandler are [*StatusError] values that wrap one of these, or the
// error of the API, the dialer or the peer.
var (
	// ErrNoTarget: the request names no target (400).
	ErrNoTarget = errors.New("connectproxy: no target")
	// ErrDenied: the API does not let the caller's key (or the guest key)
	// tunnel to the target (407).
	ErrDenied = errors.New("connectproxy: access denied")
	// ErrOffline: the API says the device is not connected to the VPN
	// (503).
	ErrOffline = errors.New("connectproxy: device not connected to the VPN")
	// ErrNotFound: the device is not connected to this server, and no
	// other server could be found that holds it (500).
	ErrNotFound = errors.New("connectproxy: device not found on any VPN server")
	// ErrLoop: the request was already forwarded by this server (500).
	ErrLoop = errors.New("connectproxy: forwarding loop")
	// ErrPeer: the VPN server the request was forwarded to refused it or
	// closed the connection (500).
	ErrPeer = errors.New("connectproxy: the peer VPN server refused the tunnel")
	// ErrUnavailable: the handler is shutting down or has as many tunnels
	// as it may (503).
	ErrUnavailable = errors.New("connectproxy: no more tunnels")
)

// StatusError is a CONNECT request's failure: the status code it is
// answered with, and why.
type StatusError struct {
	Code int
	Err  error
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("%d %s: %v", e.Code, statusText(e.Code), e.Err)
}

func (e *StatusError) Unwrap() error { return e.Err }

// statusText returns the reason phrases of the reference system's answers.
func statusText(code int) string {
	switch code {
	case http.StatusProxyAuthRequired:
		return "Proxy Authorization Required"
	case http.StatusOK:
		return "Connection Established"
	}
	return http.StatusText(code)
}

// statusLine returns the HTTP/1.0 answer with code and no body.
func statusLine(code int) string {
	s := fmt.Sprintf("HTTP/1.0 %d %s\r\n", code, statusText(code))
	if code == http.StatusProxyAuthRequired {
		s += "Proxy-Authenticate: Basic realm=\"balena\"\r\n"
	}
	return s + "\r\n"
}

const answer200 = "HTTP/1.0 200 Connection Established\r\n\r\n"
