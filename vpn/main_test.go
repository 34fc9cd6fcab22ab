package vpn_test

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"testing"
	"time"

	"github.com/obvpn/obvpn/vpn/vpntest/leaktest"
)

// TestMain fails the package's run when its tests leave goroutines
// behind: every server, instance, reporter and client they start must
// have ended with them. Run with OBVPN_TEST_FAKE_OPENVPN set, the test
// binary is a stand-in for an openvpn process instead (see
// fakeOpenVPN).
func TestMain(m *testing.M) {
	if mode := os.Getenv("OBVPN_TEST_FAKE_OPENVPN"); mode != "" {
		fakeOpenVPN(mode)
		return
	}
	os.Exit(leaktest.Main(m))
}

// fakeOpenVPN is a process whose command line is an openvpn's (the test
// runs it with Args "openvpn --config <file>"): it says "ready" once its
// signals are set, then waits, for a minute at most. Mode "ignore-term"
// ignores SIGTERM.
func fakeOpenVPN(mode string) {
	if mode == "ignore-term" {
		signal.Ignore(syscall.SIGTERM)
	}
	fmt.Println("ready")
	time.Sleep(time.Minute)
}
