package vpn_test

import (
	"github.com/obvpn/obvpn/vpn"
	"github.com/obvpn/obvpn/vpn/balena"
)

// The balena API client is what the server's parts talk to.
var (
	_ vpn.AuthAPI    = (*balena.Client)(nil)
	_ vpn.StateAPI   = (*balena.Client)(nil)
	_ vpn.ServiceAPI = (*balena.Client)(nil)
	_ vpn.BalenaAPI  = (*balena.Client)(nil)
)
