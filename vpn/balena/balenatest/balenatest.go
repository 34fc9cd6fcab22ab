// Package balenatest is an in-memory balena API that serves the endpoints
// of package balena, for tests, examples and demos: devices with their ids,
// UUIDs, API keys and ports, keys granted ports on devices, VPN service
// instances, and which device is online on which instance. It records what
// it was asked (every request, device authentications, state reports,
// access checks), tells waiters when that changes ([API.Changed],
// [API.WaitFor]), and fails or delays the next calls of an endpoint on
// demand.
//
// [New] returns an [*API], an http.Handler that can be served on any
// listener; [NewServer] serves one on a loopback httptest server for the
// length of a test, as net/http/httptest does. It is a fake of the parts of
// the balena API that the VPN uses, faithful in paths, query strings,
// bodies and status codes; it is not a model of balena's permissions.
package balenatest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/obvpn/obvpn/vpn/balena"
)

// Default keys of an API made by [New].
const (
	DefaultServiceKey = "service-key"
	DefaultGuestKey   = "guest-key"
)

// Endpoint names one of the API's endpoints, for fault injection and
// counting.
type Endpoint string

// The endpoints the API serves.
const (
	DeviceAuth      Endpoint = "device-auth"      // GET /services/vpn/auth/<uuid>
	StateReport     Endpoint = "state-report"     // POST /services/vpn/client-connect, /client-disconnect
	RegisterService Endpoint = "register-service" // POST /v7/service_instance
	Heartbeat       Endpoint = "heartbeat"        // PATCH /v7/service_instance(<id>)
	CanAccess       Endpoint = "can-access"       // POST /v7/device(uuid=@uuid)/canAccess
	DeviceOnline    Endpoint = "device-online"    // GET /v7/device(@id)
	LocateDevice    Endpoint = "locate-device"    // GET /v7/service_instance?$filter=manages__device/…
	Unknown         Endpoint = "unknown"          // anything else: 404 or 405
)

// Device is a device the API knows.
type Device struct {
	// ID is the device's id. [API.AddDevice] assigns one when it is zero.
	ID int64
	// UUID is the device's UUID, hexadecimal digits.
	UUID string
	// Key is the device's API key, with which it authenticates to the VPN.
	Key string
	// PublicPorts may be tunnelled to by every key the API knows, the
	// guest key included.
	PublicPorts []uint16
	// ConnectedToVPN and ServiceInstance are the device's VPN state, as
	// state reports set them: whether it is connected and the id of the
	// service instance that manages it (0 for none).
	ConnectedToVPN  bool
	ServiceInstance int64
}

// ServiceInstance is a VPN server registered with the API.
type ServiceInstance struct {
	ID int64
	// IPAddress is the registered address; the zero Addr is none (null).
	IPAddress netip.Addr
	// Heartbeats counts the heartbeats received.
	Heartbeats int
}

// Request is a request the API received.
type Request struct {
	Endpoint Endpoint
	Method   string
	// URI is the request target as sent: path and query, escaped.
	URI string
	// Key is the bearer key of the Authorization header; empty for none.
	Key string
	// Body is the request body.
	Body string
	// Header holds the request's headers as received (W3C traceparent
	// among them, when the caller traces).
	Header http.Header
	// Status is the status code of the answer.
	Status int
}

// AuthCheck is a device authentication (DeviceAuth) the API answered.
type AuthCheck struct {
	UUID, Key string
	Status    int
}

// AccessCheck is a canAccess query the API answered.
type AccessCheck struct {
	UUID    string
	Key     string
	Actions []string
	Allowed bool
}

// Report is a client-connect or client-disconnect report the API
// accepted.
type Report struct {
	ServiceID int64
	UUIDs     []string
	Connected bool
}

// API is an in-memory balena API. Its methods are safe for concurrent use,
// also while it serves requests. The zero API is not usable: use [New].
//
// The keys it knows are the service key, the guest key, the devices' keys
// and the keys given ports with [API.Grant]; a request with another key or
// none is answered 401, except where noted. What each may do:
//
//   - device auth: 200 for the device's own key (and the service key), 403
//     for another known key, 401 for an unknown key or device;
//   - state reports, service registration and heartbeats: the service key
//     only; a report from an instance marks its devices connected and
//     managed by it, and a disconnect only clears devices that the
//     reporting instance manages, as the real API does;
//   - canAccess: the service key may tunnel anywhere; every known key may
//     tunnel to a device's public ports, and a granted key to its ports;
//     an unknown device is denied ({"d":[]});
//   - device online: any known key sees whether a device is connected;
//   - which instance holds a device: any known key but the guest key,
//     which gets 401 ("cannot tell").
type API struct {
	// ServiceKey is the VPN service's key: it may send state reports,
	// register service instances and send heartbeats, ask whether devices
	// are online and tunnel to every port of every device. New sets
	// [DefaultServiceKey]. Set it before serving.
	ServiceKey string
	// GuestKey is a key that may only tunnel to public ports. New sets
	// [DefaultGuestKey]. Set it before serving.
	GuestKey string

	mu        sync.Mutex
	devices   map[string]*Device // by lower-case UUID
	byID      map[int64]*Device
	nextID    int64
	instances map[int64]*ServiceInstance
	nextSI    int64
	grants    map[string]map[string][]uint16 // key → lower-case UUID → ports; nil ports: any
	requests  []Request
	auths     []AuthCheck
	accesses  []AccessCheck
	reports   []Report
	calls     map[Endpoint]int
	faults    map[Endpoint][]*fault
	changed   chan struct{} // closed at the next change; nil: nobody asked
}

type fault struct {
	n      int // calls left; negative: until cleared
	status int // 0: delay only
	delay  time.Duration
}

// New returns an empty API with the default keys.
func New() *API {
	return &API{
		ServiceKey: DefaultServiceKey,
		GuestKey:   DefaultGuestKey,
		devices:    map[string]*Device{},
		byID:       map[int64]*Device{},
		instances:  map[int64]*ServiceInstance{},
		grants:     map[string]map[string][]uint16{},
		calls:      map[Endpoint]int{},
		faults:     map[Endpoint][]*fault{},
	}
}

// NewClient returns a balena client of the API served at baseURL, with the
// API's service and guest keys. Retries are off, so that every call the
// client makes is one request the API sees.
func (a *API) NewClient(baseURL string) *balena.Client {
	return &balena.Client{BaseURL: baseURL, ServiceKey: a.ServiceKey, GuestKey: a.GuestKey, RetryMax: -1}
}

// AddDevice adds d, or replaces the device with its UUID, and returns it
// with its id.
func (a *API) AddDevice(d Device) Device {
	a.mu.Lock()
	defer a.mu.Unlock()
	k := strings.ToLower(d.UUID)
	if old := a.devices[k]; old != nil {
		delete(a.byID, old.ID)
		if d.ID == 0 {
			d.ID = old.ID
		}
	}
	if d.ID == 0 {
		a.nextID++
		d.ID = a.nextID
	} else if d.ID > a.nextID {
		a.nextID = d.ID
	}
	d.PublicPorts = slices.Clone(d.PublicPorts)
	a.devices[k] = &d
	a.byID[d.ID] = &d
	a.notify()
	return copyDevice(&d)
}

func copyDevice(d *Device) Device {
	c := *d
	c.PublicPorts = slices.Clone(d.PublicPorts)
	return c
}

// Device returns the device uuid and its VPN state.
func (a *API) Device(uuid string) (Device, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	d := a.devices[strings.ToLower(uuid)]
	if d == nil {
		return Device{}, false
	}
	return copyDevice(d), true
}

// Grant lets key tunnel to ports on the device uuid; no ports means every
// port (tunnel-any). The key becomes known to the API.
func (a *API) Grant(key, uuid string, ports ...uint16) {
	a.mu.Lock()
	defer a.mu.Unlock()
	m := a.grants[key]
	if m == nil {
		m = map[string][]uint16{}
		a.grants[key] = m
	}
	k := strings.ToLower(uuid)
	defer a.notify()
	if len(ports) == 0 {
		m[k] = nil
		return
	}
	if old, ok := m[k]; ok && old == nil {
		return // already any port
	}
	m[k] = append(m[k], ports...)
}

// AddServiceInstance registers a VPN service instance with the address
// addr (the zero Addr for none), as POST /v7/service_instance does, and
// returns it.
func (a *API) AddServiceInstance(addr netip.Addr) ServiceInstance {
	a.mu.Lock()
	defer a.mu.Unlock()
	return *a.addInstance(addr)
}

func (a *API) addInstance(addr netip.Addr) *ServiceInstance {
	a.nextSI++
	si := &ServiceInstance{ID: a.nextSI, IPAddress: addr}
	a.instances[si.ID] = si
	a.notify()
	return si
}

// ServiceInstance returns the service instance id.
func (a *API) ServiceInstance(id int64) (ServiceInstance, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	si := a.instances[id]
	if si == nil {
		return ServiceInstance{}, false
	}
	return *si, true
}

// SetOnline marks the device uuid as connected to the VPN and managed by
// the service instance serviceID, as a state report from that instance
// does. It reports whether the device exists.
func (a *API) SetOnline(uuid string, serviceID int64) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	d := a.devices[strings.ToLower(uuid)]
	if d == nil {
		return false
	}
	d.ConnectedToVPN, d.ServiceInstance = true, serviceID
	a.notify()
	return true
}

// SetOffline marks the device uuid as not connected to the VPN. It
// reports whether the device exists.
func (a *API) SetOffline(uuid string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	d := a.devices[strings.ToLower(uuid)]
	if d == nil {
		return false
	}
	d.ConnectedToVPN, d.ServiceInstance = false, 0
	a.notify()
	return true
}

// FailNext answers the next n calls of endpoint e with status, before
// looking at them; n < 0 fails every call until [API.ClearFaults]. Faults
// queue up in the order they are added.
func (a *API) FailNext(e Endpoint, n int, status int) {
	a.addFault(e, &fault{n: n, status: status})
}

// DelayNext holds the next n calls of endpoint e for d (or until the
// caller goes away) before answering them as usual; n < 0 delays every
// call until [API.ClearFaults].
func (a *API) DelayNext(e Endpoint, n int, d time.Duration) {
	a.addFault(e, &fault{n: n, delay: d})
}

func (a *API) addFault(e Endpoint, f *fault) {
	if f.n == 0 {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.faults[e] = append(a.faults[e], f)
}

// ClearFaults drops every pending fault.
func (a *API) ClearFaults() {
	a.mu.Lock()
	defer a.mu.Unlock()
	clear(a.faults)
}

// Calls returns how many calls of endpoint e the API received, failed ones
// included.
func (a *API) Calls(e Endpoint) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.calls[e]
}

// Requests returns every request the API received, in order.
func (a *API) Requests() []Request {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.requests)
}

// AuthChecks returns the device authentications the API answered.
func (a *API) AuthChecks() []AuthCheck {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.auths)
}

// AccessChecks returns the canAccess queries the API answered.
func (a *API) AccessChecks() []AccessCheck {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.accesses)
}

// StateReports returns the state reports the API accepted.
func (a *API) StateReports() []Report {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.reports)
}

// Changed returns a channel that is closed at the API's next change: when
// a call arrives (it is counted, see [API.Calls]), when a request has been
// answered (it is recorded, with what it changed, see [API.Requests]), and
// when a method adds or changes devices, grants or service instances. Each
// change closes the channel returned before it; call Changed again for the
// next one. Take the channel before looking at the state, so that no change
// falls between the two. A test waits on it, with its own deadline, instead
// of polling; [API.WaitFor] does that loop.
func (a *API) Changed() <-chan struct{} {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.changed == nil {
		a.changed = make(chan struct{})
	}
	return a.changed
}

// notify wakes the waiters of [API.Changed]. The caller holds a.mu.
func (a *API) notify() {
	if a.changed != nil {
		close(a.changed)
		a.changed = nil
	}
}

// WaitFor returns nil as soon as cond reports true, or ctx's error (wrapped)
// when ctx ends first. It calls cond once at once, and again after each
// change of the API (see [API.Changed]), never while holding the API's lock:
// cond may call the API's methods, but not WaitFor.
func (a *API) WaitFor(ctx context.Context, cond func(*API) bool) error {
	for {
		ch := a.Changed()
		if cond(a) {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("balenatest: waiting for a change of the API: %w", ctx.Err())
		}
	}
}

// Server is an [API] served on a loopback httptest server.
type Server struct {
	*API
	// URL is the base URL of the API, "http://127.0.0.1:<port>", with no
	// trailing slash.
	URL string

	ts *httptest.Server
}

// NewServer starts an empty [API] on a loopback httptest server. When tb
// is not nil the server is closed when the test ends; otherwise the caller
// closes it.
func NewServer(tb testing.TB) *Server {
	a := New()
	ts := httptest.NewServer(a)
	s := &Server{API: a, URL: ts.URL, ts: ts}
	if tb != nil {
		tb.Cleanup(s.Close)
	}
	return s
}

// Client returns a balena client of the server, ready to use: its keys are
// the API's and its HTTP client is the test server's. Retries are off, so
// that every call the client makes is one request the server sees.
func (s *Server) Client() *balena.Client {
	c := s.NewClient(s.URL)
	c.HTTPClient = s.ts.Client()
	return c
}

// Close shuts the server down and waits for the requests in flight. It
// may be called more than once.
func (s *Server) Close() { s.ts.Close() }

// ServeHTTP serves the API.
func (a *API) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	if err != nil {
		http.Error(w, "reading the body: "+err.Error(), http.StatusBadRequest)
		return
	}
	e, route := a.route(r)
	key, _ := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	rec := Request{Endpoint: e, Method: r.Method, URI: r.RequestURI, Key: key, Body: string(body), Header: r.Header.Clone()}

	status := 0
	if f := a.takeFault(e); f != nil {
		if f.delay > 0 {
			t := time.NewTimer(f.delay)
			select {
			case <-t.C:
			case <-r.Context().Done():
				t.Stop()
			}
		}
		if f.status != 0 {
			status = f.status
			http.Error(w, "balenatest: injected fault", status)
		}
	}
	if status == 0 {
		rw := &statusWriter{ResponseWriter: w}
		route(rw, r, key, body)
		status = rw.status
	}
	rec.Status = status
	a.mu.Lock()
	a.requests = append(a.requests, rec)
	a.notify()
	a.mu.Unlock()
}

// takeFault counts a call of e and returns the fault to apply, if any.
func (a *API) takeFault(e Endpoint) *fault {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.calls[e]++
	a.notify()
	q := a.faults[e]
	if len(q) == 0 {
		return nil
	}
	f := q[0]
	if f.n > 0 {
		f.n--
		if f.n == 0 {
			a.faults[e] = q[1:]
		}
	}
	c := *f
	return &c
}

type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

type routeFunc func(w http.ResponseWriter, r *http.Request, key string, body []byte)

var (
	authPath     = regexp.MustCompile(`^/services/vpn/auth/([^/]+)$`)
	instancePath = regexp.MustCompile(`^/v7/service_instance\(([0-9]+)\)$`)
	locateFilter = regexp.MustCompile(`^manages__device/any\(d:d/uuid eq '([^']*)' and d/is_connected_to_vpn\)$`)
)

// route finds the endpoint of r.
func (a *API) route(r *http.Request) (Endpoint, routeFunc) {
	p := r.URL.Path
	method := func(e Endpoint, m string, f routeFunc) (Endpoint, routeFunc) {
		if r.Method != m {
			return e, func(w http.ResponseWriter, _ *http.Request, _ string, _ []byte) {
				w.Header().Set("Allow", m)
				http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
			}
		}
		return e, f
	}
	switch {
	case authPath.MatchString(p):
		return method(DeviceAuth, http.MethodGet, a.deviceAuth)
	case p == "/services/vpn/client-connect" || p == "/services/vpn/client-disconnect":
		return method(StateReport, http.MethodPost, a.stateReport)
	case p == "/v7/service_instance" && r.Method == http.MethodPost:
		return RegisterService, a.register
	case p == "/v7/service_instance":
		return method(LocateDevice, http.MethodGet, a.locate)
	case instancePath.MatchString(p):
		return method(Heartbeat, http.MethodPatch, a.heartbeat)
	case p == "/v7/device(uuid=@uuid)/canAccess":
		return method(CanAccess, http.MethodPost, a.canAccess)
	case p == "/v7/device(@id)":
		return method(DeviceOnline, http.MethodGet, a.deviceOnline)
	}
	return Unknown, func(w http.ResponseWriter, r *http.Request, _ string, _ []byte) { http.NotFound(w, r) }
}

// knownKey reports whether the API knows key. The caller holds a.mu.
func (a *API) knownKey(key string) bool {
	if key == "" {
		return false
	}
	if key == a.ServiceKey || key == a.GuestKey {
		return true
	}
	if _, ok := a.grants[key]; ok {
		return true
	}
	for _, d := range a.devices {
		if d.Key == key {
			return true
		}
	}
	return false
}

func (a *API) deviceAuth(w http.ResponseWriter, r *http.Request, key string, _ []byte) {
	uuid := authPath.FindStringSubmatch(r.URL.Path)[1]
	a.mu.Lock()
	d := a.devices[strings.ToLower(uuid)]
	status := http.StatusOK
	switch {
	case d == nil || !a.knownKey(key):
		status = http.StatusUnauthorized
	case key != d.Key && key != a.ServiceKey:
		status = http.StatusForbidden
	}
	a.auths = append(a.auths, AuthCheck{UUID: uuid, Key: key, Status: status})
	a.mu.Unlock()
	w.WriteHeader(status)
}

func (a *API) stateReport(w http.ResponseWriter, r *http.Request, key string, body []byte) {
	connected := r.URL.Path == "/services/vpn/client-connect"
	var req struct {
		ServiceID *int64   `json:"serviceId"`
		UUIDs     []string `json:"uuids"`
	}
	if err := json.Unmarshal(body, &req); err != nil || req.ServiceID == nil || len(req.UUIDs) == 0 {
		http.Error(w, "body must be {\"serviceId\":<number>,\"uuids\":[<string>,…]}", http.StatusBadRequest)
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if key == "" || key != a.ServiceKey {
		w.WriteHeader(http.StatusUnauthorized)
		return
	}
	for _, u := range req.UUIDs {
		d := a.devices[strings.ToLower(u)]
		switch {
		case d == nil:
		case connected:
			d.ConnectedToVPN, d.ServiceInstance = true, *req.ServiceID
		case d.ServiceInstance == *req.ServiceID:
			// Only the instance that manages the device may say it left.
			d.ConnectedToVPN, d.ServiceInstance = false, 0
		}
	}
	a.reports = append(a.reports, Report{ServiceID: *req.ServiceID, UUIDs: slices.Clone(req.UUIDs), Connected: connected})
	w.WriteHeader(http.StatusOK)
}

func (a *API) register(w http.ResponseWriter, _ *http.Request, key string, body []byte) {
	var req struct {
		IPAddress *string `json:"ip_address"`
	}
	if len(body) > 0 {
		if err := json.Unmarshal(body, &req); err != nil {
			http.Error(w, "malformed body", http.StatusBadRequest)
			return
		}
	}
	var addr netip.Addr
	if req.IPAddress != nil && *req.IPAddress != "" {
		var err error
		if addr, err = netip.ParseAddr(*req.IPAddress); err != nil {
			http.Error(w, "malformed ip_address", http.StatusBadRequest)
			return
		}
	}
	a.mu.Lock()
	if key == "" || key != a.ServiceKey {
		a.mu.Unlock()
		w.WriteHeader(http.StatusUnauthorized)
		return
	}
	si := a.addInstance(addr)
	a.mu.Unlock()
	writeJSON(w, http.StatusCreated, map[string]any{"id": si.ID, "ip_address": ipOrNull(si.IPAddress)})
}

func (a *API) heartbeat(w http.ResponseWriter, r *http.Request, key string, body []byte) {
	var req struct {
		IsAlive *bool `json:"is_alive"`
	}
	if err := json.Unmarshal(body, &req); err != nil || req.IsAlive == nil {
		http.Error(w, "body must be {\"is_alive\":true}", http.StatusBadRequest)
		return
	}
	id, _ := strconv.ParseInt(instancePath.FindStringSubmatch(r.URL.Path)[1], 10, 64)
	a.mu.Lock()
	defer a.mu.Unlock()
	if key == "" || key != a.ServiceKey {
		w.WriteHeader(http.StatusUnauthorized)
		return
	}
	// Like the real API, a PATCH of an instance that does not exist
	// changes nothing and succeeds.
	if si := a.instances[id]; si != nil && *req.IsAlive {
		si.Heartbeats++
	}
	w.WriteHeader(http.StatusOK)
}

// odataString returns the string literal s ('…') unquoted.
func odataString(s string) (string, bool) {
	if len(s) < 2 || s[0] != '\'' || s[len(s)-1] != '\'' {
		return "", false
	}
	return strings.ReplaceAll(s[1:len(s)-1], "''", "'"), true
}

func (a *API) canAccess(w http.ResponseWriter, r *http.Request, key string, body []byte) {
	q, err := url.ParseQuery(r.URL.RawQuery)
	if err != nil {
		http.Error(w, "malformed query", http.StatusBadRequest)
		return
	}
	uuid, ok := odataString(q.Get("@uuid"))
	if !ok || len(q) != 1 {
		http.Error(w, "query must be @uuid='<uuid>'", http.StatusBadRequest)
		return
	}
	actions, err := parseActions(body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if !a.knownKey(key) {
		w.WriteHeader(http.StatusUnauthorized)
		return
	}
	d := a.devices[strings.ToLower(uuid)]
	allowed := d != nil && slices.ContainsFunc(actions, func(act string) bool { return a.permits(key, d, act) })
	a.accesses = append(a.accesses, AccessCheck{UUID: uuid, Key: key, Actions: actions, Allowed: allowed})
	answer := []map[string]int64{}
	if allowed {
		answer = append(answer, map[string]int64{"id": d.ID})
	}
	writeJSON(w, http.StatusOK, map[string]any{"d": answer})
}

// parseActions reads {"action": "<action>"} or {"action": {"or": [...]}}.
func parseActions(body []byte) ([]string, error) {
	var req struct {
		Action json.RawMessage `json:"action"`
	}
	if err := json.Unmarshal(body, &req); err != nil || len(req.Action) == 0 {
		return nil, errors.New(`body must be {"action": …}`)
	}
	var one string
	if json.Unmarshal(req.Action, &one) == nil {
		return []string{one}, nil
	}
	var or struct {
		Or []string `json:"or"`
	}
	if err := json.Unmarshal(req.Action, &or); err != nil || len(or.Or) == 0 {
		return nil, errors.New(`action must be a string or {"or": [<string>, …]}`)
	}
	return or.Or, nil
}

// permits reports whether key may do action on d. The caller holds a.mu.
func (a *API) permits(key string, d *Device, action string) bool {
	if key == a.ServiceKey {
		return true
	}
	p, ok := strings.CutPrefix(action, "tunnel-")
	if !ok {
		return false
	}
	ports, granted := a.grants[key][strings.ToLower(d.UUID)]
	if p == "any" {
		return granted && ports == nil
	}
	n, err := strconv.ParseUint(p, 10, 16)
	if err != nil {
		return false
	}
	port := uint16(n)
	return slices.Contains(d.PublicPorts, port) || granted && (ports == nil || slices.Contains(ports, port))
}

func (a *API) deviceOnline(w http.ResponseWriter, r *http.Request, key string, _ []byte) {
	q, err := url.ParseQuery(r.URL.RawQuery)
	if err != nil || q.Get("$select") != "id" || q.Get("$filter") != "is_connected_to_vpn" || len(q) != 3 {
		http.Error(w, "query must be $select=id&$filter=is_connected_to_vpn&@id=<id>", http.StatusBadRequest)
		return
	}
	id, err := strconv.ParseInt(q.Get("@id"), 10, 64)
	if err != nil {
		http.Error(w, "malformed @id", http.StatusBadRequest)
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if !a.knownKey(key) {
		w.WriteHeader(http.StatusUnauthorized)
		return
	}
	answer := []map[string]int64{}
	if d := a.byID[id]; d != nil && d.ConnectedToVPN {
		answer = append(answer, map[string]int64{"id": d.ID})
	}
	writeJSON(w, http.StatusOK, map[string]any{"d": answer})
}

func (a *API) locate(w http.ResponseWriter, r *http.Request, key string, _ []byte) {
	q, err := url.ParseQuery(r.URL.RawQuery)
	if err != nil || q.Get("$select") != "id,ip_address" || len(q) != 2 {
		http.Error(w, "query must be $select=id,ip_address&$filter=…", http.StatusBadRequest)
		return
	}
	m := locateFilter.FindStringSubmatch(q.Get("$filter"))
	if m == nil {
		http.Error(w, "unsupported $filter", http.StatusBadRequest)
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if !a.knownKey(key) || key == a.GuestKey {
		w.WriteHeader(http.StatusUnauthorized)
		return
	}
	answer := []map[string]any{}
	if d := a.devices[strings.ToLower(m[1])]; d != nil && d.ConnectedToVPN {
		if si := a.instances[d.ServiceInstance]; si != nil {
			answer = append(answer, map[string]any{"id": si.ID, "ip_address": ipOrNull(si.IPAddress)})
		}
	}
	writeJSON(w, http.StatusOK, map[string]any{"d": answer})
}

func ipOrNull(a netip.Addr) any {
	if !a.IsValid() {
		return nil
	}
	return a.String()
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		http.Error(w, fmt.Sprint("balenatest: ", err), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(b)
}
