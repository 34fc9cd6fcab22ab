package internalapi

import (
	"net/netip"
	"strconv"
	"strings"
)

// TrustProxy says which reverse proxies in front of an HTTP endpoint are
// believed when they name the client in X-Forwarded-For. The zero value
// believes none, which is right when nothing sits in front.
type TrustProxy struct {
	// All believes every proxy (TRUST_PROXY=true).
	All bool
	// Hops believes the nearest Hops proxies (TRUST_PROXY=<n>).
	Hops int
	// Prefixes believes proxies with these addresses
	// (TRUST_PROXY=<addr or prefix>[,…]).
	Prefixes []netip.Prefix
}

// String returns the TRUST_PROXY form: "true", "false", a hop count, or a
// comma-separated list of prefixes.
func (t TrustProxy) String() string {
	switch {
	case t.All:
		return "true"
	case t.Hops > 0:
		return strconv.Itoa(t.Hops)
	case len(t.Prefixes) > 0:
		s := make([]string, len(t.Prefixes))
		for i, p := range t.Prefixes {
			s[i] = p.String()
		}
		return strings.Join(s, ",")
	}
	return "false"
}
