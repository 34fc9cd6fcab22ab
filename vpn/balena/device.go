package balena

import (
	"context"
	"fmt"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
)

// DeviceAuth asks whether the device uuid may connect to the VPN with
// apiKey, its API key: GET /services/vpn/auth/<uuid> with apiKey as bearer.
// It returns true for 200 and false for 401 and 403, answers that may be
// cached. A 503 is an [*APIError] that matches [ErrBusy]: the API is busy,
// the device is denied, and the answer must not be cached. Any other
// answer is an [*APIError] too, with the same meaning. An empty apiKey is
// denied without asking.
//
// The request is sent once, never retried: a retry would hold the
// caller's place among the checks in flight while the device, denied,
// reconnects on its own anyway.
func (c *Client) DeviceAuth(ctx context.Context, uuid, apiKey string) (bool, error) {
	uuid, err := checkUUID(uuid)
	if err != nil {
		return false, err
	}
	if apiKey == "" {
		return false, nil
	}
	req := request{method: http.MethodGet, path: "/services/vpn/auth/" + uuid, key: apiKey}
	status, body, err := c.do(ctx, req)
	if err != nil {
		return false, err
	}
	switch status {
	case http.StatusOK:
		return true, nil
	case http.StatusUnauthorized, http.StatusForbidden:
		return false, nil
	}
	return false, apiError(req, status, body)
}

// CanAccess asks whether the caller with key may open a tunnel to port on
// the device uuid: POST /v7/device(uuid=@uuid)/canAccess?@uuid='<uuid>'
// with {"action":{"or":["tunnel-any","tunnel-<port>"]}}. An empty key
// sends the GuestKey instead (or no key when that is empty too).
//
// It returns the device's id and true when the API answers with exactly
// one device; false for an empty or missing "d", and for 401 and 403 (the
// API does not accept the key). Other answers are an [*APIError]. The
// query changes nothing, so it is retried like a GET.
func (c *Client) CanAccess(ctx context.Context, uuid string, port uint16, key string) (deviceID int64, ok bool, err error) {
	uuid, err = checkUUID(uuid)
	if err != nil {
		return 0, false, err
	}
	if key == "" {
		key = c.GuestKey
	}
	body := map[string]any{"action": map[string]any{"or": []string{"tunnel-any", "tunnel-" + strconv.Itoa(int(port))}}}
	req := request{
		method: http.MethodPost,
		path:   "/v7/device(uuid=@uuid)/canAccess?@uuid='" + uuid + "'",
		key:    key,
		body:   body,
		retry:  true,
	}
	status, b, err := c.do(ctx, req)
	if err != nil {
		return 0, false, err
	}
	switch status {
	case http.StatusOK:
	case http.StatusUnauthorized, http.StatusForbidden:
		return 0, false, nil
	default:
		return 0, false, apiError(req, status, b)
	}
	var answer struct {
		D []struct {
			ID int64 `json:"id"`
		} `json:"d"`
	}
	if err := decode(req, b, &answer); err != nil {
		return 0, false, err
	}
	if len(answer.D) != 1 {
		return 0, false, nil
	}
	return answer.D[0].ID, true, nil
}

// DeviceOnline asks whether the device with the id deviceID is connected
// to a VPN server, with the service key:
// GET /v7/device(@id)?$select=id&$filter=is_connected_to_vpn&@id=<id>.
// {"d":[{"id":…}]} is online, {"d":[]} is not; any status but 200 is an
// [*APIError].
func (c *Client) DeviceOnline(ctx context.Context, deviceID int64) (bool, error) {
	req := request{
		method: http.MethodGet,
		path:   "/v7/device(@id)?$select=id&$filter=is_connected_to_vpn&@id=" + strconv.FormatInt(deviceID, 10),
		key:    c.ServiceKey,
		retry:  true,
	}
	status, b, err := c.do(ctx, req)
	if err != nil {
		return false, err
	}
	if status != http.StatusOK {
		return false, apiError(req, status, b)
	}
	var answer struct {
		D []struct {
			ID int64 `json:"id"`
		} `json:"d"`
	}
	if err := decode(req, b, &answer); err != nil {
		return false, err
	}
	return len(answer.D) > 0, nil
}

// LocateDevice asks which VPN service instance holds the device uuid, with
// the caller's key (the GuestKey, or none, when key is empty):
// GET /v7/service_instance?$select=id,ip_address&$filter=manages__device/any(d:d/uuid eq '<uuid>' and d/is_connected_to_vpn).
//
// It returns the instance's id and address with known true; a zero id when
// no instance holds the device; and known false when the API answers 401,
// which means that it cannot tell with this key. An instance registered
// without an address has the zero addr. Other answers are an [*APIError].
func (c *Client) LocateDevice(ctx context.Context, uuid, key string) (serviceID int64, addr netip.Addr, known bool, err error) {
	uuid, err = checkUUID(uuid)
	if err != nil {
		return 0, netip.Addr{}, false, err
	}
	if key == "" {
		key = c.GuestKey
	}
	filter := "manages__device/any(d:d/uuid eq '" + uuid + "' and d/is_connected_to_vpn)"
	req := request{
		method: http.MethodGet,
		path:   "/v7/service_instance?$select=id,ip_address&$filter=" + escapeQuery(filter),
		key:    key,
		retry:  true,
	}
	status, b, err := c.do(ctx, req)
	if err != nil {
		return 0, netip.Addr{}, false, err
	}
	switch status {
	case http.StatusOK:
	case http.StatusUnauthorized:
		return 0, netip.Addr{}, false, nil
	default:
		return 0, netip.Addr{}, false, apiError(req, status, b)
	}
	var answer struct {
		D []struct {
			ID        int64   `json:"id"`
			IPAddress *string `json:"ip_address"`
		} `json:"d"`
	}
	if err := decode(req, b, &answer); err != nil {
		return 0, netip.Addr{}, false, err
	}
	if len(answer.D) == 0 {
		return 0, netip.Addr{}, true, nil
	}
	si := answer.D[0]
	if si.IPAddress != nil && *si.IPAddress != "" {
		if addr, err = netip.ParseAddr(*si.IPAddress); err != nil {
			return 0, netip.Addr{}, false, fmt.Errorf("balena: %s %s: service instance %d: %w", req.method, req.path, si.ID, err)
		}
	}
	return si.ID, addr, true, nil
}

// escapeQuery escapes what a query value cannot hold as it is (spaces,
// '&', '#', '%', '+'), and keeps the OData punctuation readable, as the
// reference client does.
func escapeQuery(s string) string { return queryEscaper.Replace(s) }

var queryEscaper = strings.NewReplacer("%", "%25", " ", "%20", "&", "%26", "#", "%23", "+", "%2B")
