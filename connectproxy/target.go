package connectproxy

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/obvpn/obvpn/vpn/balena/uuid"
)

// Target is the destination of a CONNECT request: a port on a device,
// named "<uuid>.balena:<port>" (also ".resin", deprecated, and ".vpn").
type Target struct {
	// UUID is the device's UUID in lower case, however the caller wrote
	// it: a device's name is the same device in any letter case, and the
	// balena API, the status files and the NSS index know it in lower
	// case.
	UUID string
	// TLD is "balena", "resin" or "vpn".
	TLD string
	// Port is the TCP port on the device; 80 when the target names none.
	Port uint16
}

// DefaultPort is the port of a target that names none.
const DefaultPort = 80

// MaxUUIDLen is the length of the longest device UUID a target may name
// (balena's are 32 or 62 digits).
const MaxUUIDLen = uuid.MaxLen

// ErrInvalidTarget reports a CONNECT target that does not name a device
// port. Such requests are answered 403.
var ErrInvalidTarget = errors.New("connectproxy: invalid target")

// ParseTarget parses a CONNECT target, "<uuid>.<tld>[:<port>]": uuid is
// 1 to 128 hexadecimal digits, tld is "balena", "resin" or "vpn" (in lower
// case), and port is decimal digits, 1 to 65535 (80 when absent). This is
// the reference system's pattern
// ^([a-fA-F0-9]+)\.(balena|resin|vpn)(?::([0-9]+))?$ with the lengths
// checked. The error wraps [ErrInvalidTarget] and quotes s.
func ParseTarget(s string) (Target, error) {
	bad := func(why string) (Target, error) {
		return Target{}, fmt.Errorf("%w %q: %s", ErrInvalidTarget, s, why)
	}
	i := 0
	for i < len(s) && uuid.IsHexDigit(s[i]) {
		i++
	}
	if i == 0 {
		return bad("no device UUID")
	}
	if i > MaxUUIDLen {
		return bad("device UUID too long")
	}
	if i == len(s) || s[i] != '.' {
		return bad("want <uuid>.balena[:<port>]")
	}
	uuid, rest := s[:i], s[i+1:]
	tld, port, hasPort := rest, "", false
	for j := 0; j < len(rest); j++ {
		if rest[j] == ':' {
			tld, port, hasPort = rest[:j], rest[j+1:], true
			break
		}
	}
	switch tld {
	case "balena", "resin", "vpn":
	default:
		return bad("want <uuid>.balena[:<port>]")
	}
	t := Target{UUID: strings.ToLower(uuid), TLD: tld, Port: DefaultPort}
	if hasPort {
		if port == "" {
			return bad("empty port")
		}
		n := 0
		for j := 0; j < len(port); j++ {
			c := port[j]
			if c < '0' || c > '9' {
				return bad("port is not a number")
			}
			if n = n*10 + int(c-'0'); n > 65535 {
				return bad("port out of range")
			}
		}
		if n == 0 {
			return bad("port out of range")
		}
		t.Port = uint16(n)
	}
	return t, nil
}

// String returns the target as "<uuid>.<tld>:<port>".
func (t Target) String() string {
	return t.UUID + "." + t.TLD + ":" + strconv.Itoa(int(t.Port))
}
