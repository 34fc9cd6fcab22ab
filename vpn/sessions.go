package vpn

import (
	"context"
	"log/slog"
	"net/netip"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	devuuid "github.com/obvpn/obvpn/vpn/balena/uuid"

	"github.com/obvpn/obvpn/nss"
	"github.com/obvpn/obvpn/openvpnmgmt"
	"github.com/obvpn/obvpn/vpn/bandwidth"
)

// DeviceAuthenticator decides whether a device may connect; *Authenticator
// implements it.
type DeviceAuthenticator interface {
	Authenticate(ctx context.Context, uuid, apiKey string) (bool, error)
}

// Sessions decides, in management mode, who may connect, and keeps track
// of who is connected, for every instance of a server. Its
// [Sessions.Handler] is an instance's EventHandler:
//
//   - CONNECT and REAUTH are decided asynchronously (many in flight, as
//     many as Auth allows): allowed devices get client-auth-nt, denied ones
//     client-deny after DelayOnAuthFail, without holding up others; a
//     denied REAUTH also gets client-kill, since denying it only drops the
//     new key. A missing username or password is a denial.
//   - ESTABLISHED counts a session for its common name and reports it to
//     State (every session, so that a device that came back from another
//     server is claimed again: see [Reporter]); DISCONNECT of an
//     established session uncounts it, and its last reports it offline.
//
// The zero value needs Auth.
type Sessions struct {
	// Auth decides. Errors count as denials.
	Auth DeviceAuthenticator

	// Connections counts the sessions. Nil means a Connections of the
	// Sessions' own.
	Connections *Connections

	// State learns the devices that go online and offline. Nil means
	// nobody.
	State StateSetter

	// DelayOnAuthFail delays the answer to a denied device.
	DelayOnAuthFail time.Duration

	// Metrics, if set, counts devices, auth failures, bytes and sessions.
	Metrics *Metrics

	// Limits, if set, returns the bandwidth limiter of an instance (nil
	// for none): each client's address, as CLIENT:ADDRESS gives it, is
	// limited until the client goes.
	Limits func(instance int) *bandwidth.Limiter

	// Addresses, if set, learns each device's virtual address the moment
	// OpenVPN assigns it (CLIENT:ESTABLISHED, CLIENT:ADDRESS), and forgets
	// it the moment the device goes (CLIENT:DISCONNECT), so that the
	// CONNECT proxy and the NSS index find a device before the next status
	// file is written, and stop finding it at once. StatusFile names the
	// status file of each instance, the source the addresses stand for.
	Addresses  AddressBook
	StatusFile func(instance int) string

	// Script says that OpenVPN runs the script-mode hooks (AuthScript):
	// they count each device's sessions through the internal API (package vpn/internalapi), and
	// OpenVPN sends ESTABLISHED but neither DISCONNECT nor ADDRESS. The
	// Sessions then keep the established sessions for the drain and the
	// byte counts only, and [Sessions.ScriptDisconnect] ends them.
	Script bool

	// Logger receives denials and anomalies. Nil means discard.
	Logger *slog.Logger

	mu          sync.Mutex
	established map[sessionKey]established
	byName      map[nameKey][]uint64      // the client ids of each name, oldest first
	addrs       map[sessionKey]netip.Addr // limited addresses
	conns       Connections
	wg          sync.WaitGroup

	pendingMu sync.Mutex
	pending   int           // decisions in flight
	idle      chan struct{} // closed when pending next falls to 0; nil if nobody waits
}

type sessionKey struct {
	instance int
	cid      uint64
}

// nameKey is a common name (lower-cased) on an instance.
type nameKey struct {
	instance int
	cn       string
}

// AddressBook learns and forgets where devices are, on behalf of a
// status file; *nss.Resolver implements it. A learned address stands until
// the status file is rewritten, which then holds the truth.
type AddressBook interface {
	Learn(source, name string, addr netip.Addr)
	Forget(source, name string)
}

type established struct {
	cn    string
	addr  netip.Addr // the virtual address, once known
	since time.Time
	rx    uint64    // bytes at the last BYTECOUNT_CLI, for the deltas
	tx    uint64    //
	at    time.Time // when rx and tx were counted; since before the first
}

// Handler returns the event handler of instance id.
func (s *Sessions) Handler(id int) EventHandler {
	return func(ctx context.Context, c *openvpnmgmt.Client, ev openvpnmgmt.Event) {
		switch ev := ev.(type) {
		case *openvpnmgmt.ClientEvent:
			switch ev.Kind {
			case openvpnmgmt.ClientConnect, openvpnmgmt.ClientReauth:
				s.begin()
				go func() {
					defer s.end()
					s.decide(ctx, c, id, ev)
				}()
			case openvpnmgmt.ClientEstablished:
				s.onEstablished(id, ev)
			case openvpnmgmt.ClientDisconnect:
				s.onDisconnect(id, ev)
			}
		case *openvpnmgmt.ByteCountClientEvent:
			s.onByteCount(id, ev)
		case *openvpnmgmt.ClientAddressEvent:
			s.onAddress(ctx, id, ev)
		}
	}
}

// Wait waits for the decisions in flight.
func (s *Sessions) Wait() { s.wg.Wait() }

// Settle waits, until ctx ends, for a moment when no decision is in
// flight, and returns ctx's error if none came. A server that hands over
// to its successor settles before it lets go of the management sessions:
// OpenVPN asks about a device once, on the session it has when the device
// connects, and never again on the next one, so a decision cut short by
// the session's end leaves the device waiting until its TLS hand-window
// runs out (60 s on a device) before it dials again.
func (s *Sessions) Settle(ctx context.Context) error {
	s.pendingMu.Lock()
	if s.pending == 0 {
		s.pendingMu.Unlock()
		return nil
	}
	if s.idle == nil {
		s.idle = make(chan struct{})
	}
	idle := s.idle
	s.pendingMu.Unlock()
	select {
	case <-idle:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// begin and end count a decision in flight.
func (s *Sessions) begin() {
	s.wg.Add(1)
	s.pendingMu.Lock()
	s.pending++
	s.pendingMu.Unlock()
}

func (s *Sessions) end() {
	s.pendingMu.Lock()
	s.pending--
	if s.pending == 0 && s.idle != nil {
		close(s.idle)
		s.idle = nil
	}
	s.pendingMu.Unlock()
	s.wg.Done()
}

func (s *Sessions) log() *slog.Logger {
	if s.Logger != nil {
		return s.Logger
	}
	return slog.New(slog.DiscardHandler)
}

func (s *Sessions) counts() *Connections {
	if s.Connections != nil {
		return s.Connections
	}
	return &s.conns
}

// decide answers one CONNECT or REAUTH.
func (s *Sessions) decide(ctx context.Context, c *openvpnmgmt.Client, id int, ev *openvpnmgmt.ClientEvent) {
	user, pass := ev.Env.Value("username"), ev.Env.Value("password")
	ok := false
	var err error
	if user != "" && pass != "" && s.Auth != nil {
		ok, err = s.Auth.Authenticate(ctx, user, pass)
	}
	if ctx.Err() != nil {
		// The session ended (a stop, a handover, a lost connection): no
		// answer can reach OpenVPN, which holds the device until it gives
		// up on its handshake and dials again.
		s.log().Warn("a device's authentication was cut short by the end of the management session; it is answered when it dials again",
			"instance", id, "uuid", devuuid.ForLog(user), "kind", ev.Kind)
		return
	}
	if ok {
		if err := c.ClientAuthNT(ctx, ev.CID, ev.KID); err != nil {
			s.log().Warn("client-auth-nt failed", "instance", id, "cid", ev.CID, "err", err)
		}
		return
	}
	if s.Metrics != nil {
		s.Metrics.AuthFailures.Inc()
	}
	s.log().Info("device denied", "instance", id, "uuid", devuuid.ForLog(user), "kind", ev.Kind, "err", err)
	if s.DelayOnAuthFail > 0 {
		t := time.NewTimer(s.DelayOnAuthFail)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return
		}
	}
	if err := c.ClientDeny(ctx, ev.CID, ev.KID, "device authentication failed", ""); err != nil {
		s.log().Warn("client-deny failed", "instance", id, "cid", ev.CID, "err", err)
	}
	if ev.Kind == openvpnmgmt.ClientReauth {
		// A denied REAUTH only drops the new key: end the session.
		if err := c.ClientKill(ctx, ev.CID, openvpnmgmt.KillDefault); err != nil {
			s.log().Warn("client-kill after a denied REAUTH failed", "instance", id, "cid", ev.CID, "err", err)
		}
	}
}

func (s *Sessions) onEstablished(id int, ev *openvpnmgmt.ClientEvent) {
	cn := ev.Env.Value("common_name")
	if cn == "" {
		return
	}
	s.mu.Lock()
	if s.established == nil {
		s.established = make(map[sessionKey]established)
	}
	now := time.Now()
	addr, _ := netip.ParseAddr(ev.Env.Value("ifconfig_pool_remote_ip"))
	if !addr.Is4() {
		addr = netip.Addr{}
	}
	s.established[sessionKey{id, ev.CID}] = established{cn: cn, addr: addr, since: now, at: now}
	if s.byName == nil {
		s.byName = make(map[nameKey][]uint64)
	}
	k := nameKey{id, strings.ToLower(cn)}
	s.byName[k] = append(s.byName[k], ev.CID)
	s.publishAddr(id, cn)
	s.mu.Unlock()
	if s.Metrics != nil {
		s.Metrics.Devices.Inc()
	}
	if s.Script {
		return // the client-connect hook counts it
	}
	connectSession(s.counts(), s.Metrics, s.State, cn, id)
}

func (s *Sessions) onByteCount(id int, ev *openvpnmgmt.ByteCountClientEvent) {
	now := time.Now()
	s.mu.Lock()
	e, ok := s.established[sessionKey{id, ev.CID}]
	if ok {
		next := e // e keeps the counts before, for the deltas below
		next.rx, next.tx, next.at = ev.Received, ev.Sent, now
		s.established[sessionKey{id, ev.CID}] = next
	}
	s.mu.Unlock()
	if ok && s.Metrics != nil && ev.Received >= e.rx && ev.Sent >= e.tx {
		s.Metrics.RxBytes.Add(float64(ev.Received - e.rx))
		s.Metrics.TxBytes.Add(float64(ev.Sent - e.tx))
		s.rate(e, ev.Received, ev.Sent, now)
	}
}

// minRateSpan is the shortest stretch of a session whose mean rate is
// recorded: the few bytes of a session's last fraction of a second say
// nothing of its rate.
const minRateSpan = time.Second

// rate records session e's mean bitrates from its last counts to rx and tx
// at now.
func (s *Sessions) rate(e established, rx, tx uint64, now time.Time) {
	span := now.Sub(e.at).Seconds()
	if span < minRateSpan.Seconds() {
		return
	}
	s.Metrics.DeviceRate(strings.ToLower(e.cn), float64(rx-e.rx)*8/span, float64(tx-e.tx)*8/span)
}

// publishAddr tells Addresses where cn is on instance id now: the address
// of its newest session there that has one, or nowhere. s.mu is held, so
// that what Addresses learns keeps the order of the events.
func (s *Sessions) publishAddr(id int, cn string) {
	if s.Addresses == nil || s.StatusFile == nil {
		return
	}
	cids := s.byName[nameKey{id, strings.ToLower(cn)}]
	for i := len(cids) - 1; i >= 0; i-- {
		if e := s.established[sessionKey{id, cids[i]}]; e.addr.IsValid() {
			s.Addresses.Learn(s.StatusFile(id), cn, e.addr)
			return
		}
	}
	s.Addresses.Forget(s.StatusFile(id), cn)
}

// onAddress learns a client's primary address, and limits it when limits
// are on.
func (s *Sessions) onAddress(ctx context.Context, id int, ev *openvpnmgmt.ClientAddressEvent) {
	if !ev.Primary {
		return
	}
	a, err := netip.ParseAddr(ev.Addr)
	if err != nil || !a.Is4() {
		return
	}
	s.mu.Lock()
	if e, ok := s.established[sessionKey{id, ev.CID}]; ok && e.addr != a {
		e.addr = a
		s.established[sessionKey{id, ev.CID}] = e
		s.publishAddr(id, e.cn)
	}
	s.mu.Unlock()
	if s.Limits == nil {
		return
	}
	l := s.Limits(id)
	if l == nil {
		return
	}
	if err := l.Add(ctx, a); err != nil {
		s.log().Error("could not limit a client's bandwidth", "instance", id, "cid", ev.CID, "addr", a, "err", err)
		return
	}
	s.mu.Lock()
	if s.addrs == nil {
		s.addrs = make(map[sessionKey]netip.Addr)
	}
	s.addrs[sessionKey{id, ev.CID}] = a
	s.mu.Unlock()
}

func (s *Sessions) onDisconnect(id int, ev *openvpnmgmt.ClientEvent) {
	key := sessionKey{id, ev.CID}
	s.mu.Lock()
	e, ok := s.established[key]
	delete(s.established, key)
	if ok {
		s.unname(id, e.cn, ev.CID)
		s.publishAddr(id, e.cn)
	}
	addr, limited := s.addrs[key]
	delete(s.addrs, key)
	s.mu.Unlock()
	if limited && s.Limits != nil {
		if l := s.Limits(id); l != nil {
			// The address may already be another client's: the pool hands
			// it out again only after this DISCONNECT, so removing is safe.
			if err := l.Remove(context.Background(), addr); err != nil {
				s.log().Warn("could not lift a client's bandwidth limit", "instance", id, "addr", addr, "err", err)
			}
		}
	}
	if !ok {
		return // a client that never got through: nothing was counted
	}
	rx, rxErr := strconv.ParseUint(ev.Env.Value("bytes_received"), 10, 64)
	tx, txErr := strconv.ParseUint(ev.Env.Value("bytes_sent"), 10, 64)
	d := time.Duration(-1)
	if secs, err := strconv.ParseInt(ev.Env.Value("time_duration"), 10, 64); err == nil {
		d = time.Duration(secs) * time.Second
	}
	s.ended(e, rx, tx, rxErr == nil && txErr == nil, d)
	disconnectSession(s.counts(), s.Metrics, s.State, e.cn, id)
}

// unname drops client id cid from the names' index. s.mu is held.
func (s *Sessions) unname(id int, cn string, cid uint64) {
	k := nameKey{id, strings.ToLower(cn)}
	cids := s.byName[k]
	for i, c := range cids {
		if c == cid {
			cids = append(cids[:i:i], cids[i+1:]...)
			break
		}
	}
	if len(cids) == 0 {
		delete(s.byName, k)
	} else {
		s.byName[k] = cids
	}
}

// ended counts the end of session e in the metrics: rx and tx are its
// byte totals when known, and the stretch since its last counts gives a
// last rate; without them (the session went with its instance) the last
// byte counts stand for them. A negative d means "since it began".
func (s *Sessions) ended(e established, rx, tx uint64, known bool, d time.Duration) {
	if s.Metrics == nil {
		return
	}
	if !known {
		rx, tx = e.rx, e.tx
	}
	if rx >= e.rx && tx >= e.tx {
		s.Metrics.RxBytes.Add(float64(rx - e.rx))
		s.Metrics.TxBytes.Add(float64(tx - e.tx))
		if known {
			s.rate(e, rx, tx, time.Now()) // the stretch since the last counts
		}
	}
	if d < 0 {
		d = time.Since(e.since)
	}
	s.Metrics.SessionEnded(d)
}

// ScriptDisconnect ends the oldest established session of commonName on
// instance id, as the client-disconnect hook reports it in script mode
// (the hook's call to the internal API counts the device's sessions): its
// byte counts and duration go to the metrics. It reports whether there
// was such a session.
func (s *Sessions) ScriptDisconnect(id int, commonName string, rx, tx uint64, d time.Duration) bool {
	s.mu.Lock()
	k := nameKey{id, strings.ToLower(commonName)}
	cids := s.byName[k]
	if len(cids) == 0 {
		s.mu.Unlock()
		return false
	}
	key := sessionKey{id, cids[0]}
	e := s.established[key]
	delete(s.established, key)
	s.unname(id, commonName, cids[0])
	s.publishAddr(id, commonName)
	s.mu.Unlock()
	s.ended(e, rx, tx, true, d)
	return true
}

// Resync makes the sessions of instance id those of clients: the list
// (status 3) of a running openvpn whose events this process missed, an
// adopted one or one whose management session dropped and came back. A
// client not known is counted as ESTABLISHED and ADDRESS would count it,
// its byte counts and connect time those of the list, except that its
// device is reported online only if the API does not already hold it so
// (see [Resumer]); a known session missing from the list ended unwatched
// and is counted as DISCONNECT would, with its last byte counts. In
// script mode the hooks of those sessions went to an earlier process, so
// the sessions are counted here.
func (s *Sessions) Resync(ctx context.Context, id int, clients []nss.Client) {
	now := time.Now()
	live := make(map[uint64]bool, len(clients))
	var added []nss.Client
	s.mu.Lock()
	if s.established == nil {
		s.established = make(map[sessionKey]established)
	}
	if s.byName == nil {
		s.byName = make(map[nameKey][]uint64)
	}
	for _, c := range clients {
		if c.CommonName == "" || c.ClientID < 0 {
			continue // not through authentication yet
		}
		cid := uint64(c.ClientID)
		live[cid] = true
		if _, ok := s.established[sessionKey{id, cid}]; ok {
			continue
		}
		since := c.ConnectedSince
		if since.IsZero() {
			since = now
		}
		s.established[sessionKey{id, cid}] = established{cn: c.CommonName, since: since, rx: c.BytesReceived, tx: c.BytesSent, at: now}
		k := nameKey{id, strings.ToLower(c.CommonName)}
		s.byName[k] = append(s.byName[k], cid)
		added = append(added, c)
	}
	var gone []uint64
	for k := range s.established {
		if k.instance == id && !live[k.cid] {
			gone = append(gone, k.cid)
		}
	}
	s.mu.Unlock()
	for _, cid := range gone {
		s.onDisconnect(id, &openvpnmgmt.ClientEvent{Kind: openvpnmgmt.ClientDisconnect, CID: cid})
	}
	for _, c := range added {
		if s.Metrics != nil {
			s.Metrics.Devices.Inc()
		}
		resumeSession(s.counts(), s.Metrics, s.State, c.CommonName, id)
		if c.VirtualAddress.Is4() {
			s.onAddress(ctx, id, &openvpnmgmt.ClientAddressEvent{CID: uint64(c.ClientID), Addr: c.VirtualAddress.String(), Primary: true})
		}
	}
	if len(added)+len(gone) > 0 {
		s.log().Info("sessions taken over from a running openvpn", "instance", id, "running", len(live), "new", len(added), "ended_unwatched", len(gone))
	}
}

// sessionList lists the established sessions, by instance and client id.
func (s *Sessions) sessionList() []sessionKey {
	s.mu.Lock()
	defer s.mu.Unlock()
	keys := make([]sessionKey, 0, len(s.established))
	for k := range s.established {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		if keys[i].instance != keys[j].instance {
			return keys[i].instance < keys[j].instance
		}
		return keys[i].cid < keys[j].cid
	})
	return keys
}

// Forget drops the sessions of instance id, as when its openvpn died: they
// are gone with it. Their devices are disconnected as by DISCONNECT.
func (s *Sessions) Forget(id int) {
	s.mu.Lock()
	var gone []uint64
	for k := range s.established {
		if k.instance == id {
			gone = append(gone, k.cid)
		}
	}
	for k := range s.addrs {
		if k.instance == id {
			delete(s.addrs, k) // gone with the tun device
		}
	}
	s.mu.Unlock()
	for _, cid := range gone {
		s.onDisconnect(id, &openvpnmgmt.ClientEvent{Kind: openvpnmgmt.ClientDisconnect, CID: cid})
	}
}
