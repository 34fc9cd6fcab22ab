package openvpnmgmt

import (
	"strconv"
	"strings"
	"time"
)

// An Event is a real-time message of the management interface: a line that
// starts with ">", with the lines of its ENV block for the kinds that have
// one. Its dynamic type is one of the *XxxEvent types of this package;
// kinds this package does not know are *UnknownEvent.
type Event interface {
	// Raw returns the event's first line, as received (without ">" nor
	// the line end).
	Raw() string
}

// raw is embedded in every event.
type raw struct{ line string }

func (r raw) Raw() string { return r.line }

// EnvVar is one variable of a CLIENT or UPDOWN event's ENV block.
type EnvVar struct{ Name, Value string }

// Env is an ENV block, in the order received. Values may contain "," and
// "=": a line is split at its first "=" only.
type Env []EnvVar

// Get returns the value of the first variable named name, and whether
// there is one.
func (e Env) Get(name string) (string, bool) {
	for _, v := range e {
		if v.Name == name {
			return v.Value, true
		}
	}
	return "", false
}

// Value returns the value of the variable named name, or "".
func (e Env) Value(name string) string {
	v, _ := e.Get(name)
	return v
}

// ClientKind is the kind of a CLIENT event that has an ENV block.
type ClientKind string

// The kinds of ClientEvent.
const (
	ClientConnect     ClientKind = "CONNECT"
	ClientReauth      ClientKind = "REAUTH"
	ClientEstablished ClientKind = "ESTABLISHED"
	ClientDisconnect  ClientKind = "DISCONNECT"
	ClientCRResponse  ClientKind = "CR_RESPONSE"
)

// ClientEvent is >CLIENT:CONNECT, REAUTH, ESTABLISHED, DISCONNECT or
// CR_RESPONSE with its ENV block. CONNECT and REAUTH must be answered with
// client-auth, client-auth-nt, client-deny or client-pending-auth for CID
// and KID under --management-client-auth.
type ClientEvent struct {
	raw
	Kind ClientKind
	CID  uint64 // client id
	KID  uint64 // key id; CONNECT, REAUTH and CR_RESPONSE only
	// Response is CR_RESPONSE's base64 response.
	Response string
	Env      Env
}

// ClientAddressEvent is >CLIENT:ADDRESS: the server learned a virtual
// address (or subnet) for a client.
type ClientAddressEvent struct {
	raw
	CID     uint64
	Addr    string // an address, or a subnet "a.b.c.d/nn"
	Primary bool
}

// ByteCountEvent is >BYTECOUNT (client mode): the totals so far.
type ByteCountEvent struct {
	raw
	Received, Sent uint64
}

// ByteCountClientEvent is >BYTECOUNT_CLI (server mode): one client's
// totals so far.
type ByteCountClientEvent struct {
	raw
	CID            uint64
	Received, Sent uint64
}

// LogLevel is the flag of a >LOG line.
type LogLevel string

// Log levels as OpenVPN flags them.
const (
	LogInfo    LogLevel = "I"
	LogFatal   LogLevel = "F"
	LogError   LogLevel = "N" // non-fatal error
	LogWarning LogLevel = "W"
	LogDebug   LogLevel = "D"
)

// LogEvent is a >LOG line.
type LogEvent struct {
	raw
	Time    time.Time
	Level   LogLevel // empty for a plain message
	Message string
}

// StateEvent is a >STATE line.
type StateEvent struct {
	raw
	Time        time.Time
	State       string // CONNECTING, WAIT, AUTH, GET_CONFIG, ASSIGN_IP, ADD_ROUTES, CONNECTED, RECONNECTING, EXITING, …
	Description string
	// The remaining fields, as given (most are empty on a server).
	LocalIP, RemoteIP, RemotePort, LocalAddr, LocalPort, LocalIPv6 string
}

// HoldEvent is >HOLD: OpenVPN waits for "hold release".
type HoldEvent struct {
	raw
	Message string
}

// InfoEvent is >INFO, such as the banner sent on connect.
type InfoEvent struct {
	raw
	Message string
}

// FatalEvent is >FATAL: OpenVPN is about to exit.
type FatalEvent struct {
	raw
	Message string
}

// EchoEvent is >ECHO.
type EchoEvent struct {
	raw
	Time    time.Time
	Message string
}

// PasswordEvent is >PASSWORD: a password is needed, or verification
// failed.
type PasswordEvent struct {
	raw
	Message string
}

// NeedOKEvent is >NEED-OK and NeedStrEvent >NEED-STR: OpenVPN asks the
// management client to confirm, or to supply a string.
type NeedOKEvent struct {
	raw
	Message string
}

// NeedStrEvent is >NEED-STR.
type NeedStrEvent struct {
	raw
	Message string
}

// InfoMsgEvent is >INFOMSG.
type InfoMsgEvent struct {
	raw
	Message string
}

// UpDownEvent is >UPDOWN:UP or DOWN with its ENV block.
type UpDownEvent struct {
	raw
	Up  bool
	Env Env
}

// NotifyEvent is >NOTIFY.
type NotifyEvent struct {
	raw
	Message string
}

// UnknownEvent is a real-time message of a kind this package does not
// know; Raw has the whole line.
type UnknownEvent struct {
	raw
}

// parseEvent parses a real-time line (without ">") that has no ENV block
// of its own: every kind but CLIENT CONNECT/REAUTH/ESTABLISHED/DISCONNECT/
// CR_RESPONSE and UPDOWN, which the reader assembles. It never fails:
// what does not parse is an *UnknownEvent.
func parseEvent(line string) Event {
	kind, payload, ok := strings.Cut(line, ":")
	if !ok {
		return &UnknownEvent{raw{line}}
	}
	r := raw{line}
	switch kind {
	case "BYTECOUNT":
		f := strings.Split(payload, ",")
		if len(f) == 2 {
			rx, err1 := strconv.ParseUint(f[0], 10, 64)
			tx, err2 := strconv.ParseUint(f[1], 10, 64)
			if err1 == nil && err2 == nil {
				return &ByteCountEvent{r, rx, tx}
			}
		}
	case "BYTECOUNT_CLI":
		f := strings.Split(payload, ",")
		if len(f) == 3 {
			cid, err0 := strconv.ParseUint(f[0], 10, 64)
			rx, err1 := strconv.ParseUint(f[1], 10, 64)
			tx, err2 := strconv.ParseUint(f[2], 10, 64)
			if err0 == nil && err1 == nil && err2 == nil {
				return &ByteCountClientEvent{r, cid, rx, tx}
			}
		}
	case "CLIENT":
		if rest, ok := strings.CutPrefix(payload, "ADDRESS,"); ok {
			f := strings.Split(rest, ",")
			if len(f) == 3 {
				cid, err := strconv.ParseUint(f[0], 10, 64)
				if err == nil {
					return &ClientAddressEvent{r, cid, f[1], f[2] == "1"}
				}
			}
		}
	case "LOG":
		f := strings.SplitN(payload, ",", 3)
		if len(f) == 3 {
			return &LogEvent{r, unixTime(f[0]), LogLevel(f[1]), f[2]}
		}
	case "STATE":
		f := strings.Split(payload, ",")
		if len(f) >= 2 {
			ev := &StateEvent{raw: r, Time: unixTime(f[0]), State: f[1]}
			for i, dst := range []*string{&ev.Description, &ev.LocalIP, &ev.RemoteIP, &ev.RemotePort, &ev.LocalAddr, &ev.LocalPort, &ev.LocalIPv6} {
				if 2+i < len(f) {
					*dst = f[2+i]
				}
			}
			return ev
		}
	case "ECHO":
		if t, msg, ok := strings.Cut(payload, ","); ok {
			return &EchoEvent{r, unixTime(t), msg}
		}
	case "HOLD":
		return &HoldEvent{r, payload}
	case "INFO":
		return &InfoEvent{r, payload}
	case "FATAL":
		return &FatalEvent{r, payload}
	case "PASSWORD":
		return &PasswordEvent{r, payload}
	case "NEED-OK":
		return &NeedOKEvent{r, payload}
	case "NEED-STR":
		return &NeedStrEvent{r, payload}
	case "INFOMSG":
		return &InfoMsgEvent{r, payload}
	case "NOTIFY":
		return &NotifyEvent{r, payload}
	}
	return &UnknownEvent{r}
}

// clientHead parses the first line of a CLIENT event with an ENV block:
// "CLIENT:CONNECT,{CID},{KID}" and the like. ok is false for other lines.
func clientHead(line string) (ev *ClientEvent, ok bool) {
	payload, ok := strings.CutPrefix(line, "CLIENT:")
	if !ok {
		return nil, false
	}
	kind, rest, _ := strings.Cut(payload, ",")
	f := strings.Split(rest, ",")
	ev = &ClientEvent{raw: raw{line}, Kind: ClientKind(kind)}
	var err error
	switch ev.Kind {
	case ClientConnect, ClientReauth:
		if len(f) != 2 {
			return nil, false
		}
		if ev.CID, err = strconv.ParseUint(f[0], 10, 64); err == nil {
			ev.KID, err = strconv.ParseUint(f[1], 10, 64)
		}
	case ClientEstablished, ClientDisconnect:
		if len(f) != 1 {
			return nil, false
		}
		ev.CID, err = strconv.ParseUint(f[0], 10, 64)
	case ClientCRResponse:
		if len(f) != 3 {
			return nil, false
		}
		if ev.CID, err = strconv.ParseUint(f[0], 10, 64); err == nil {
			ev.KID, err = strconv.ParseUint(f[1], 10, 64)
		}
		ev.Response = f[2]
	default:
		return nil, false
	}
	return ev, err == nil
}

func unixTime(s string) time.Time {
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n <= 0 {
		return time.Time{}
	}
	return time.Unix(n, 0)
}
