package balena

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// ReportState tells the API that the devices uuids connected to
// (connected true) or disconnected from the VPN service instance
// serviceID: POST /services/vpn/client-connect or
// /services/vpn/client-disconnect with
// {"serviceId":<id>,"uuids":[…],"connected":<bool>} and the service key.
// Any status but 200 is an [*APIError]. It is sent once: the caller's
// report loop retries it.
func (c *Client) ReportState(ctx context.Context, serviceID int64, uuids []string, connected bool) error {
	path := "/services/vpn/client-disconnect"
	if connected {
		path = "/services/vpn/client-connect"
	}
	uuids = lowerAll(uuids)
	body := struct {
		ServiceID int64    `json:"serviceId"`
		UUIDs     []string `json:"uuids"`
		Connected bool     `json:"connected"`
	}{serviceID, uuids, connected}
	req := request{method: http.MethodPost, path: path, key: c.ServiceKey, body: body}
	status, b, err := c.do(ctx, req)
	if err != nil {
		return err
	}
	if status != http.StatusOK {
		return apiError(req, status, b)
	}
	return nil
}

// RegisterService registers this VPN server as a service instance and
// returns its id: POST /v7/service_instance with {"ip_address":"<addr>"}
// (an empty object when addr is the zero Addr) and the service key. Any
// 2xx answer with an id is a success; another status is an [*APIError].
// It is sent once: the caller retries it.
func (c *Client) RegisterService(ctx context.Context, addr netip.Addr) (id int64, err error) {
	body := map[string]string{}
	if addr.IsValid() {
		body["ip_address"] = addr.String()
	}
	req := request{method: http.MethodPost, path: "/v7/service_instance", key: c.ServiceKey, body: body}
	status, b, err := c.do(ctx, req)
	if err != nil {
		return 0, err
	}
	if status < 200 || status > 299 {
		return 0, apiError(req, status, b)
	}
	var answer struct {
		ID int64 `json:"id"`
	}
	if err := decode(req, b, &answer); err != nil {
		return 0, err
	}
	if answer.ID == 0 {
		return 0, fmt.Errorf("balena: %s %s: %w", req.method, req.path, errNoID)
	}
	return answer.ID, nil
}

var errNoID = errors.New("no service instance id in the answer")

// Heartbeat tells the API that the service instance id is alive:
// PATCH /v7/service_instance(<id>) with {"is_alive":true} and the service
// key. Any 2xx answer is a success; another status is an [*APIError]. The
// call is idempotent and retried like a GET.
func (c *Client) Heartbeat(ctx context.Context, id int64) error {
	req := request{
		method: http.MethodPatch,
		path:   "/v7/service_instance(" + strconv.FormatInt(id, 10) + ")",
		key:    c.ServiceKey,
		body:   map[string]bool{"is_alive": true},
		retry:  true,
	}
	status, b, err := c.do(ctx, req)
	if err != nil {
		return err
	}
	if status < 200 || status > 299 {
		return apiError(req, status, b)
	}
	return nil
}

// lowerAll returns uuids in lower case, never nil: the slice itself when
// it needs no change.
func lowerAll(uuids []string) []string {
	if uuids == nil {
		return []string{}
	}
	for i, u := range uuids {
		if strings.ToLower(u) != u {
			out := slices.Clone(uuids)
			for j := i; j < len(out); j++ {
				out[j] = strings.ToLower(out[j])
			}
			return out
		}
	}
	return uuids
}
