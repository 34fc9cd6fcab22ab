package vpn

import (
	"reflect"
	"testing"
	"time"

	"github.com/matryer/is"

	"github.com/obvpn/obvpn/subnet"
	"github.com/obvpn/obvpn/vpn/haproxy"
	"github.com/obvpn/obvpn/vpn/internalapi"
)

// TestZeroValuesAreTheDocumentedDefaults: a hand-built Config's empty
// fields mean what their documentation says, on the paths the server
// takes (WithDefaults, which Run, each Instance, RenderHAProxy and
// OpenVPNServerConfig use), not only after LoadConfig.
func TestZeroValuesAreTheDocumentedDefaults(t *testing.T) {
	is := is.New(t)
	d := Config{}.WithDefaults()
	is.Equal(d.Plan.Ports, subnet.ReferencePorts)
	is.Equal(d.RunDir, "/run/openvpn")
	is.Equal(d.NSSIndex, "/run/openvpn/nss.index")
	is.Equal(d.OpenVPN, OpenVPNConfig{Proto: "tcp4-server", StatusInterval: 10 * time.Second, KeepaliveFrequency: 10 * time.Second,
		KeepaliveTimeout: 60 * time.Second, DataCiphers: DefaultDataCiphers, Compression: CompressionMigrate,
		User: "nobody", Group: "nogroup", Isolation: IsolationOn})
	is.Equal(d.Auth, AuthConfig{Mode: AuthManagement, MaxWorkers: 20})
	is.Equal(d.Balena, BalenaConfig{StateBatchSize: 8000})
	is.Equal(d.Proxy, ProxyConfig{})
	is.Equal(d.HAProxy, haproxy.Config{Mode: haproxy.Managed, Port: 443, Socket: "/run/haproxy.sock", MonitorAddr: ":80",
		MaxConn: 10000, Timeout: 60 * time.Second, Threads: 2, CPUMap: "auto:1/1-2 0-1"})
	is.Equal(d.Metrics, MetricsConfig{Addr: ":8080", Timeout: 20 * time.Second, MaxConns: 64})
	is.Equal(d.Drain, DrainConfig{MinRatePerMinute: 500, Timeout: 120 * time.Second})
	is.Equal(d.Bandwidth, BandwidthConfig{})
	is.Equal(d.TrustProxy, internalapi.TrustProxy{})

	// Defaults that follow other fields.
	c := Config{RunDir: "/srv/vpn", OpenVPN: OpenVPNConfig{KeepaliveTimeout: 9 * time.Second}, Proxy: ProxyConfig{Port: 3128}}
	d = c.WithDefaults()
	is.Equal(d.NSSIndex, "/srv/vpn/nss.index")
	is.Equal(d.HAProxy.Timeout, 9*time.Second)
	is.Equal(d.Proxy.ForwardPort, 3128)
	is.Equal(c.WithDefaults(), d.WithDefaults()) // idempotent

	// What is set stays; settings whose zero value is a setting of its
	// own stay zero.
	c = Config{Metrics: MetricsConfig{Addr: MetricsOff}, NSSIndex: "off", Auth: AuthConfig{CacheTimeout: 0}}
	d = c.WithDefaults()
	is.Equal(d.Metrics.Addr, MetricsOff)
	is.Equal(d.NSSIndex, "off")
	is.Equal(d.Auth.CacheTimeout, time.Duration(0))
	is.Equal(d.OpenVPN.BytecountInterval, time.Duration(0))
	is.Equal(c.metricsBackendAddr(), "")
	zero := Config{}.WithDefaults()
	is.Equal(zero.metricsBackendAddr(), "127.0.0.1:8080")

	cfg, err := loader(serverEnv("VPN_METRICS_ADDR", "off")).Config()
	is.NoErr(err)
	is.Equal(cfg.Metrics.Addr, MetricsOff)
}

// TestEveryZeroFieldIsDefaultedOrDocumented walks Config: every field that
// WithDefaults leaves zero must document what its zero value does ("Zero
// turns …", "Empty runs …", "Nil trusts …"), so that no zero value is
// silently something other than its documentation.
func TestEveryZeroFieldIsDefaultedOrDocumented(t *testing.T) {
	// The zero fields that are settings of their own, as documented.
	settings := map[string]bool{
		"Plan": true, "Verbose": true, "PIDFile": true, "TrustProxy": true, "Production": true, "Bandwidth": true,
		"OpenVPN.BytecountInterval": true, "OpenVPN.CACert": true, "OpenVPN.ServerCert": true, "OpenVPN.ServerKey": true,
		"OpenVPN.DH": true, "OpenVPN.Providers": true, "OpenVPN.ExplicitExitNotify": true,
		"Auth.CacheTimeout": true, "Auth.DelayOnFail": true,
		"Balena.APIHost": true, "Balena.APIInternalHost": true, "Balena.ServiceAPIKey": true, "Balena.GuestAPIKey": true,
		"Balena.RegisterInterface": true, "Balena.RootCA": true,
		"Proxy.Port": true, "Proxy.ForwardPort": true, "Proxy.IdleTimeout": true, "Proxy.MaxTunnels": true,
		"HAProxy.UseProxyProtocol": true, "HAProxy.FileLimit": true, "HAProxy.NodeExporter": true, "HAProxy.ProcessExporter": true,
		"Metrics.Token": true, "Sentry": true,
	}
	var walk func(prefix string, v reflect.Value)
	walk = func(prefix string, v reflect.Value) {
		for i := range v.NumField() {
			f := v.Type().Field(i)
			if !f.IsExported() {
				continue
			}
			name := prefix + f.Name
			fv := v.Field(i)
			if settings[name] {
				continue
			}
			if fv.Kind() == reflect.Struct && fv.Type() != reflect.TypeFor[subnet.Plan]() && fv.Type() != reflect.TypeFor[time.Duration]() {
				walk(name+".", fv)
				continue
			}
			if fv.IsZero() {
				t.Errorf("%s: WithDefaults leaves it zero, and it is not listed as a setting whose zero value is documented", name)
			}
		}
	}
	walk("", reflect.ValueOf(Config{}.WithDefaults()))
	if t.Failed() {
		t.Log("add the default to WithDefaults, or list the field with its zero value's meaning documented")
	}
}
