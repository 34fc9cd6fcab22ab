package vpn

import (
	"time"

	"github.com/obvpn/obvpn/vpn/hook"
)

// ScriptClients is the server's session accounting for the client events
// of script mode, which the internal API hands it
// (internalapi.Clients): each connect and disconnect counts in
// Connections, moves vpn_online_devices in Metrics, goes to State when the
// device comes online or goes offline, and a disconnect ends the session
// in Sessions with its byte counts. Every field may be nil but
// Connections, whose nil is a Connections of its own.
type ScriptClients struct {
	Connections *Connections
	Metrics     *Metrics
	State       StateSetter
	Sessions    *Sessions

	own Connections
}

// StateSetter learns each new session of a device, and the end of its
// last one; *Reporter implements it.
type StateSetter interface {
	Set(uuid string, s DeviceState)
}

func (c *ScriptClients) conns() *Connections {
	if c.Connections == nil {
		return &c.own
	}
	return c.Connections
}

// Connected counts a new session of ev.CommonName on instance.
func (c *ScriptClients) Connected(instance int, ev hook.ClientEvent) {
	connectSession(c.conns(), c.Metrics, c.State, ev.CommonName, instance)
}

// Disconnected ends a session of ev.CommonName on instance and returns the
// device's count of sessions before it.
func (c *ScriptClients) Disconnected(instance int, ev hook.ClientEvent) int {
	before := disconnectSession(c.conns(), c.Metrics, c.State, ev.CommonName, instance)
	if before >= 1 && c.Sessions != nil {
		// A session ended, whether or not the device stays online.
		c.Sessions.ScriptDisconnect(instance, ev.CommonName, ev.BytesReceived, ev.BytesSent,
			time.Duration(ev.TimeDuration)*time.Second)
	}
	return before
}
