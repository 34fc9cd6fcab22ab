package vpn_test

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"

	"github.com/obvpn/obvpn/openvpnmgmt"
	"github.com/obvpn/obvpn/vpn"
	"github.com/obvpn/obvpn/vpn/balena/balenatest"
	"github.com/obvpn/obvpn/vpn/internalapi"
)

// moveHost is one VPN server of the move test: its sessions as OpenVPN
// (management mode) or the hooks (script mode) report them, and the
// Reporter that tells the balena API.
type moveHost struct {
	name     string
	id       int64 // service instance id
	reporter *vpn.Reporter
	connect  func(uuid string, instance int, cid uint64)
	end      func(uuid string, instance int, cid uint64)
}

func newMoveHost(t *testing.T, api *balenatest.Server, name string, script bool) *moveHost {
	si := api.AddServiceInstance(netip.Addr{})
	h := &moveHost{name: name, id: si.ID}
	h.reporter = &vpn.Reporter{API: api.Client(), ServiceID: func() int64 { return si.ID }}
	if script {
		ia := &internalapi.Server{Clients: &vpn.ScriptClients{State: h.reporter}, Instances: 2}
		call := func(method, uuid string, instance int) {
			r := httptest.NewRequest(method, fmt.Sprintf("/api/v2/%d/clients/", instance),
				strings.NewReader(`{"common_name":"`+uuid+`"}`))
			r.RemoteAddr = "127.0.0.1:40000"
			w := httptest.NewRecorder()
			ia.ServeHTTP(w, r)
			if w.Code != http.StatusOK && !(method == http.MethodDelete && w.Code == http.StatusBadRequest) {
				t.Fatalf("%s %s: %d", method, r.URL, w.Code)
			}
		}
		h.connect = func(uuid string, instance int, _ uint64) { call(http.MethodPost, uuid, instance) }
		h.end = func(uuid string, instance int, _ uint64) { call(http.MethodDelete, uuid, instance) }
		return h
	}
	s := &vpn.Sessions{State: h.reporter}
	ev := func(kind openvpnmgmt.ClientKind, uuid string, instance int, cid uint64) {
		s.Handler(instance)(context.Background(), nil, &openvpnmgmt.ClientEvent{Kind: kind, CID: cid,
			Env: openvpnmgmt.Env{{Name: "common_name", Value: uuid}}})
	}
	h.connect = func(uuid string, instance int, cid uint64) { ev(openvpnmgmt.ClientEstablished, uuid, instance, cid) }
	h.end = func(uuid string, instance int, cid uint64) { ev(openvpnmgmt.ClientDisconnect, uuid, instance, cid) }
	return h
}

// moveSession is one session of the device: on which host and instance.
type moveSession struct {
	host     int
	instance int
}

// moveEvent is the start (end false) or the end of session i.
type moveEvent struct {
	i   int
	end bool
}

// moveOrders calls f with every order of the sessions' starts and ends in
// which a session ends after it starts, and with every choice of sessions
// that never end.
func moveOrders(n int, f func([]moveEvent)) {
	var rec func(seq []moveEvent, started, ended []bool, endMask int)
	rec = func(seq []moveEvent, started, ended []bool, endMask int) {
		progressed := false
		for i := range n {
			switch {
			case !started[i]:
				started[i] = true
				rec(append(seq, moveEvent{i, false}), started, ended, endMask)
				started[i] = false
				progressed = true
			case !ended[i] && endMask&(1<<i) != 0:
				ended[i] = true
				rec(append(seq, moveEvent{i, true}), started, ended, endMask)
				ended[i] = false
				progressed = true
			}
		}
		if !progressed {
			f(append([]moveEvent(nil), seq...))
		}
	}
	for mask := range 1 << n {
		rec(nil, make([]bool, n), make([]bool, n), mask)
	}
}

// TestDeviceMovesAcrossServers: a device's sessions start and end on two
// servers in every order (A → B → A among them, with A still counting its
// old session when the device comes back), each report reaching the
// balena API before the next event, as the reporters send within a second.
// At the end the API holds the truth: a device whose newest session is
// live is connected and managed by that session's server; a device with no
// live session is offline; and the API never names a server that has no
// session of the device. (A device whose newest session ended while an
// older one lingers on another server, a session its client has left and
// that OpenVPN ends after ping-exit, may be held either way.)
func TestDeviceMovesAcrossServers(t *testing.T) {
	layouts := map[string][]moveSession{
		"A1 B1 A2": {{0, 1}, {1, 1}, {0, 2}}, // back to A on another instance
		"A1 B1 A1": {{0, 1}, {1, 1}, {0, 1}}, // back to A on the same instance
		"A1 B1 B2": {{0, 1}, {1, 1}, {1, 2}},
	}
	for _, mode := range []string{"management", "script"} {
		t.Run(mode, func(t *testing.T) {
			api := balenatest.NewServer(t)
			hosts := []*moveHost{newMoveHost(t, api, "A", mode == "script"), newMoveHost(t, api, "B", mode == "script")}
			ctx := context.Background()
			devices, checked := 0, 0
			for name, sessions := range layouts {
				moveOrders(len(sessions), func(seq []moveEvent) {
					devices++
					uuid := fmt.Sprintf("%032x", devices)
					api.AddDevice(balenatest.Device{UUID: uuid, Key: "k"})
					live := make([]bool, len(sessions))
					newest := -1
					for _, e := range seq {
						s := sessions[e.i]
						h := hosts[s.host]
						cid := uint64(e.i + 1)
						if e.end {
							h.end(uuid, s.instance, cid)
							live[e.i] = false
						} else {
							h.connect(uuid, s.instance, cid)
							live[e.i] = true
							newest = e.i
						}
						if err := h.reporter.Flush(ctx); err != nil {
							t.Fatal(err)
						}
					}
					d, _ := api.Device(uuid)
					describe := func() string {
						var b strings.Builder
						for _, e := range seq {
							s := sessions[e.i]
							fmt.Fprintf(&b, " %s%s%d", map[bool]string{false: "+", true: "-"}[e.end], hosts[s.host].name, s.instance)
						}
						return fmt.Sprintf("%s:%s: API connected=%v instance=%d", name, b.String(), d.ConnectedToVPN, d.ServiceInstance)
					}
					anyLive := false
					for _, l := range live {
						anyLive = anyLive || l
					}
					switch {
					case live[newest]:
						checked++
						if !d.ConnectedToVPN || d.ServiceInstance != hosts[sessions[newest].host].id {
							t.Errorf("%s; want connected to %s", describe(), hosts[sessions[newest].host].name)
						}
					case !anyLive:
						checked++
						if d.ConnectedToVPN {
							t.Errorf("%s; want offline", describe())
						}
					}
					if d.ConnectedToVPN {
						held := false
						for i, s := range sessions {
							held = held || live[i] && hosts[s.host].id == d.ServiceInstance
						}
						if !held {
							t.Errorf("%s; the API names a server without a session", describe())
						}
					}
				})
			}
			t.Logf("%d orders, %d with a definite truth", devices, checked)
		})
	}
}
