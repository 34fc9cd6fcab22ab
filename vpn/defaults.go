package vpn

import (
	"path/filepath"
	"time"

	"github.com/obvpn/obvpn/subnet"
)

// Defaults of the zero Config, as its fields document them.
const (
	DefaultRunDir             = "/run/openvpn"
	DefaultProto              = "tcp4-server"
	DefaultStatusInterval     = 10 * time.Second
	DefaultKeepaliveFrequency = 10 * time.Second
	DefaultKeepaliveTimeout   = 60 * time.Second
	DefaultOpenVPNUser        = "nobody"
	DefaultOpenVPNGroup       = "nogroup"
	DefaultAuthWorkers        = 20
	DefaultStateBatchSize     = 8000
	DefaultMetricsConns       = 64
	DefaultDrainRatePerMinute = 500
	DefaultDrainTimeout       = 120 * time.Second
	DefaultUpgradeTimeout     = 60 * time.Second
)

// WithDefaults returns c with every zero field set to what its
// documentation says the zero value means, HAProxy's included (see
// [haproxy.Config.WithDefaults]; its zero Timeout is
// OpenVPN.KeepaliveTimeout). It is the one place where defaults are
// filled: the Server and each Instance run on what it returns, so a Config
// built by hand means what its documentation says. Fields whose zero value
// is a setting of its own (Auth.CacheTimeout, Proxy.Port, Metrics.Token,
// OpenVPN.BytecountInterval, …) stay as they are; so does Plan, but for
// its Ports, which are [subnet.ReferencePorts] when all are zero.
func (c Config) WithDefaults() Config {
	if c.Plan.Ports == (subnet.Ports{}) {
		c.Plan.Ports = subnet.ReferencePorts
	}
	if c.RunDir == "" {
		c.RunDir = DefaultRunDir
	}
	if c.NSSIndex == "" {
		c.NSSIndex = filepath.Join(c.RunDir, "nss.index")
	}
	if c.UpgradeTimeout <= 0 {
		c.UpgradeTimeout = DefaultUpgradeTimeout
	}
	c.OpenVPN = c.OpenVPN.withDefaults()
	if c.Auth.Mode == "" {
		c.Auth.Mode = AuthManagement
	}
	if c.Auth.MaxWorkers <= 0 {
		c.Auth.MaxWorkers = DefaultAuthWorkers
	}
	if c.Balena.StateBatchSize <= 0 {
		c.Balena.StateBatchSize = DefaultStateBatchSize
	}
	if c.Proxy.ForwardPort == 0 {
		c.Proxy.ForwardPort = c.Proxy.Port
	}
	if c.HAProxy.Timeout <= 0 {
		c.HAProxy.Timeout = c.OpenVPN.KeepaliveTimeout
	}
	c.HAProxy = c.HAProxy.WithDefaults()
	if c.Metrics.Addr == "" {
		c.Metrics.Addr = DefaultMetricsAddr
	}
	if c.Metrics.Timeout <= 0 {
		c.Metrics.Timeout = DefaultMetricsTimeout
	}
	if c.Metrics.MaxConns <= 0 {
		c.Metrics.MaxConns = DefaultMetricsConns
	}
	if c.Drain.MinRatePerMinute <= 0 {
		c.Drain.MinRatePerMinute = DefaultDrainRatePerMinute
	}
	if c.Drain.Timeout <= 0 {
		c.Drain.Timeout = DefaultDrainTimeout
	}
	return c
}

func (o OpenVPNConfig) withDefaults() OpenVPNConfig {
	if o.Proto == "" {
		o.Proto = DefaultProto
	}
	if o.StatusInterval <= 0 {
		o.StatusInterval = DefaultStatusInterval
	}
	if o.KeepaliveFrequency <= 0 {
		o.KeepaliveFrequency = DefaultKeepaliveFrequency
	}
	if o.KeepaliveTimeout <= 0 {
		o.KeepaliveTimeout = DefaultKeepaliveTimeout
	}
	if o.DataCiphers == "" {
		o.DataCiphers = DefaultDataCiphers
	}
	if o.Compression == "" {
		o.Compression = CompressionMigrate
	}
	if o.User == "" {
		o.User = DefaultOpenVPNUser
	}
	if o.Group == "" {
		o.Group = DefaultOpenVPNGroup
	}
	if o.Isolation == "" {
		o.Isolation = IsolationOn
	}
	return o
}
