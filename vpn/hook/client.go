// Package hook is the client side of the VPN server's internal API, as
// OpenVPN's script-mode hooks call it: device authentication (at once, or
// deferred through OpenVPN's auth_control_file) and client connect and
// disconnect events. It is small on purpose: cmd/vpn-auth and
// cmd/vpn-client-event, which OpenVPN runs on every connection, link this
// package and not the server (package vpn/internalapi answers).
package hook

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
)

// Client calls the server's internal API (internalapi.Server), as OpenVPN's
// script-mode hooks do (cmd/vpn-auth and cmd/vpn-client-event).
type Client struct {
	// BaseURL is the internal API's URL, such as "http://127.0.0.1:30001",
	// without a trailing slash.
	BaseURL string

	// HTTPClient sends the requests. Nil means http.DefaultClient; the
	// context of each call bounds it.
	HTTPClient *http.Client
}

// ErrDenied reports an answer that refuses the request: 401 for
// authentication, 400 for a client event the API dropped.
var ErrDenied = errors.New("denied by the internal API")

// Auth asks whether the device may connect: nil when allowed, an error
// wrapping [ErrDenied] when refused, another error when the API could not
// be asked.
func (c *Client) Auth(ctx context.Context, username, password string) error {
	return c.send(ctx, http.MethodPost, "/api/v1/auth/", map[string]string{"username": username, "password": password})
}

// AuthDeferred asks as Auth does, and hands the API controlFile, the
// auth_control_file of OpenVPN's deferred authentication, to write the
// decision into ("1" or "0") once it has it. deferred is true when the API
// took it (202): the hook then exits 2 and OpenVPN reads the file. When
// the API answers at once instead (a server without deferral), deferred
// is false and err is Auth's. When it refuses the file (400), AuthDeferred
// asks again as Auth does.
func (c *Client) AuthDeferred(ctx context.Context, username, password, controlFile string) (deferred bool, err error) {
	body := map[string]string{"username": username, "password": password, "auth_control_file": controlFile}
	status, err := c.do(ctx, http.MethodPost, "/api/v1/auth/", body)
	switch {
	case err != nil:
		return false, err
	case status == http.StatusAccepted:
		return true, nil
	case status == http.StatusBadRequest:
		return false, c.Auth(ctx, username, password)
	}
	return false, answer(http.MethodPost, "/api/v1/auth/", status)
}

// ClientEvent is a client's connect or disconnect, as OpenVPN's
// client-connect and client-disconnect scripts see it in their environment.
type ClientEvent struct {
	CommonName    string `json:"common_name"`
	BytesReceived uint64 `json:"bytes_received,omitempty"`
	BytesSent     uint64 `json:"bytes_sent,omitempty"`
	TimeDuration  uint64 `json:"time_duration,omitempty"` // seconds
}

// Connected reports that the device ev.CommonName connected to instance.
func (c *Client) Connected(ctx context.Context, instance int, ev ClientEvent) error {
	return c.send(ctx, http.MethodPost, fmt.Sprintf("/api/v2/%d/clients/", instance), ev)
}

// Disconnected reports that the device ev.CommonName disconnected from
// instance.
func (c *Client) Disconnected(ctx context.Context, instance int, ev ClientEvent) error {
	return c.send(ctx, http.MethodDelete, fmt.Sprintf("/api/v2/%d/clients/", instance), ev)
}

func (c *Client) send(ctx context.Context, method, path string, body any) error {
	status, err := c.do(ctx, method, path, body)
	if err != nil {
		return err
	}
	return answer(method, path, status)
}

// answer is the error for an answer's status: nil for 200.
func answer(method, path string, status int) error {
	switch {
	case status == http.StatusOK:
		return nil
	case status == http.StatusUnauthorized && path == "/api/v1/auth/", status == http.StatusBadRequest:
		return fmt.Errorf("%s %s: %d %s: %w", method, path, status, http.StatusText(status), ErrDenied)
	}
	return fmt.Errorf("%s %s: %d %s", method, path, status, http.StatusText(status))
}

// do sends a request and returns the answer's status.
func (c *Client) do(ctx context.Context, method, path string, body any) (int, error) {
	b, err := json.Marshal(body)
	if err != nil {
		return 0, err
	}
	req, err := http.NewRequestWithContext(ctx, method, strings.TrimSuffix(c.BaseURL, "/")+path, bytes.NewReader(b))
	if err != nil {
		return 0, err
	}
	req.Header.Set("Content-Type", "application/json")
	hc := c.HTTPClient
	if hc == nil {
		hc = http.DefaultClient
	}
	resp, err := hc.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<16))
	return resp.StatusCode, nil
}
