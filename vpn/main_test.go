package vpn_test

import (
	"os"
	"testing"

	"github.com/obvpn/obvpn/vpn/vpntest/leaktest"
)

// TestMain fails the package's run when its tests leave goroutines
// behind: every server, instance, reporter and client they start must
// have ended with them.
func TestMain(m *testing.M) { os.Exit(leaktest.Main(m)) }
