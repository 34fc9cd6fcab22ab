package vpn

import (
	"testing"

	"github.com/matryer/is"
)

// TestZeroValuesAreTheDocumentedDefaults: a hand-built Config's empty
// fields mean what their documentation says on the server's own paths,
// not only after LoadConfig.
func TestZeroValuesAreTheDocumentedDefaults(t *testing.T) {
	is := is.New(t)
	var c Config
	is.Equal(c.HAProxy.mode(), HAProxyManaged)
	is.Equal(c.HAProxy.socket(), "/run/haproxy.sock")
	is.Equal(c.Metrics.addr(), ":8080")
	is.Equal(c.metricsBackendAddr(), "127.0.0.1:8080")
	is.Equal(c.metricsTimeout(), DefaultMetricsTimeout)
	c.Metrics.Addr = MetricsOff
	is.Equal(c.Metrics.addr(), "")
	is.Equal(c.metricsBackendAddr(), "")

	cfg, err := loader(serverEnv("VPN_METRICS_ADDR", "off")).Config()
	is.NoErr(err)
	is.Equal(cfg.Metrics.Addr, MetricsOff)
}
