// Package uuid checks and normalises balena device UUIDs, the one copy
// that the balena client, the VPN server, the CONNECT proxy and the hooks
// share.
//
// A device UUID, as the balena API issues it, is a run of hexadecimal
// digits (32 or 62 of them in practice). One made of hex digits only is
// safe to put in a URL path or an OData string. Letter case does not make
// another device: [Normalize] gives the lower-case spelling that the API,
// the status files and the NSS index use.
package uuid

import "strings"

// MaxLen is the length of the longest UUID accepted.
const MaxLen = 128

// Valid reports whether s is a device UUID: 1 to MaxLen hexadecimal
// digits, in either case, and nothing else.
func Valid(s string) bool {
	if s == "" || len(s) > MaxLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		if !IsHexDigit(s[i]) {
			return false
		}
	}
	return true
}

// Normalize returns s in lower case and true when s is [Valid], else ""
// and false. It allocates only when s has upper-case digits.
func Normalize(s string) (string, bool) {
	if !Valid(s) {
		return "", false
	}
	return strings.ToLower(s), true
}

// IsHexDigit reports whether c is 0-9, a-f or A-F.
func IsHexDigit(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

// ForLog returns s for a log line when it is a valid UUID, else
// "(malformed)": a username that is not a UUID could be a key typed into
// the wrong field, and must not be logged.
func ForLog(s string) string {
	if Valid(s) {
		return s
	}
	return "(malformed)"
}
