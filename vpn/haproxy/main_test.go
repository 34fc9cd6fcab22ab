package haproxy

import (
	"os"
	"testing"

	"github.com/obvpn/obvpn/vpn/vpntest/leaktest"
)

// TestMain fails the package's run when its tests leave goroutines behind.
func TestMain(m *testing.M) { os.Exit(leaktest.Main(m)) }
