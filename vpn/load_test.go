package vpn

import (
	"encoding/base64"
	"errors"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/matryer/is"

	"github.com/obvpn/obvpn/subnet"
	"github.com/obvpn/obvpn/vpn/haproxy"
)

// Throw-away PEM blocks: the loader checks the framing and the block type,
// not the cryptography, but for the size of the DH prime (openssl dhparam
// 2048 and 1024).
const (
	testCert = "-----BEGIN CERTIFICATE-----\nTUlJQg==\n-----END CERTIFICATE-----\n"
	testKey  = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1ieXRlcw==\n-----END PRIVATE KEY-----\n"
	testDH   = "-----BEGIN DH PARAMETERS-----\nMIIBCAKCAQEAnUZ+ltRhHppK1wbRh/a3ZsEpDah72NkYoCDldaw0YroQIiKF6qS9\nKKPhpGAVTMsuL/2jQyhP7z5e8/EfAa3CsT4fm4/9dMEUWGxP6Zq1v3rgc1DDm9AI\nEHZDDign4ADdvVRBwHuIfMrpL5dBxNq4gXLulPk7S+vSg97veVOKUk2k7nZ/ssji\ni5tdRybcKc11ImGuigflDRBn5rXr7/sbxXL1TeYk9ocMyu9AqxrqZMNcUBAWfkdi\nGmmSz71me+d3xCPL1iQtkCkcZPxSJJqTWXALzp390NFXt756/Wssn0bucOlM0qmP\nk85uBw0C63mxd2UXpTX14UbFn5yWEJ00ZwIBAg==\n-----END DH PARAMETERS-----\n"
	smallDH  = "-----BEGIN DH PARAMETERS-----\nMIGHAoGBAK3SXpqdAkl+2FRsW3ukSJoQiCU2ttWqrjbT2IGKJ3W1HGULXhqG5Dr+\nNvq7mb6o56wANn7lBgShcBz42vfd/DMmFGIHgh1cFV3+A2GdIWm4neEQSb2zd/pQ\nmkApuMA9iCok3+kQcPaLrUQaui6QlmJvGSkO0XDksclUBED4h/+XAgEC\n-----END DH PARAMETERS-----\n"
)

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

// serverEnv is a complete environment for the full server, with the seed's
// network.
func serverEnv(extra ...string) map[string]string {
	m := map[string]string{
		"VPN_BASE_SUBNET":             "10.240.0.0/12",
		"VPN_INSTANCE_SUBNET_BITMASK": "20",
		"VPN_INSTANCE_COUNT":          "2",
		"BALENA_API_HOST":             "api.example.com",
		"VPN_SERVICE_API_KEY":         "s3rv1ce-key",
		"VPN_OPENVPN_CA_CRT":          b64(testCert),
		"VPN_OPENVPN_SERVER_CRT":      b64(testCert),
		"VPN_OPENVPN_SERVER_KEY":      b64(testKey),
	}
	for i := 0; i+1 < len(extra); i += 2 {
		m[extra[i]] = extra[i+1]
	}
	return m
}

// loader is a Loader that touches nothing of the machine's.
func loader(env map[string]string) Loader {
	return Loader{Env: env, CPURequestFile: "/nonexistent/cpu_request", NumCPU: func() int { return 3 }}
}

func TestLoadConfigDefaults(t *testing.T) {
	is := is.New(t)
	c, err := loader(serverEnv()).Config()
	is.NoErr(err)
	is.Equal(c.Plan, subnet.Plan{
		Base:      netip.MustParsePrefix("10.240.0.0/12"),
		Bits:      20,
		Ports:     subnet.Ports{VPN: 10000, Management: 20000, API: 30000},
		Instances: 2,
	})
	is.Equal(c.OpenVPN.Proto, "tcp4-server")
	is.Equal(c.OpenVPN.StatusInterval, 10*time.Second)
	is.Equal(c.OpenVPN.KeepaliveFrequency, 10*time.Second)
	is.Equal(c.OpenVPN.KeepaliveTimeout, 60*time.Second)
	is.Equal(c.OpenVPN.DataCiphers, DefaultDataCiphers)
	is.Equal(c.OpenVPN.BytecountInterval, 60*time.Second) // the reference container's
	is.Equal(c.OpenVPN.Compression, CompressionMigrate)
	is.Equal(c.OpenVPN.User, "nobody")
	is.Equal(c.OpenVPN.Group, "nogroup")
	is.Equal(c.OpenVPN.Providers, "")
	is.Equal(c.OpenVPN.ExplicitExitNotify, 0)
	is.Equal(c.OpenVPN.Isolation, IsolationOn)
	is.Equal(c.NSSIndex, "")
	is.Equal(string(c.OpenVPN.CACert), testCert)
	is.Equal(string(c.OpenVPN.ServerKey), testKey)
	is.True(c.OpenVPN.DH == nil) // dh none
	is.Equal(c.Auth, AuthConfig{Mode: AuthManagement, CacheTimeout: time.Minute, MaxWorkers: 80, DelayOnFail: 10 * time.Second})
	is.Equal(c.Balena, BalenaConfig{APIHost: "api.example.com", ServiceAPIKey: "s3rv1ce-key", StateBatchSize: 8000})
	is.Equal(c.Balena.BaseURL(), "https://api.example.com")
	is.Equal(c.Proxy, ProxyConfig{MaxTunnels: DefaultMaxTunnels})
	is.Equal(c.HAProxy, haproxy.Config{Mode: haproxy.Managed, Port: 443, Socket: "/run/haproxy.sock", MonitorAddr: ":80",
		MaxConn: 10000, Timeout: 60 * time.Second, Threads: 2, CPUMap: "auto:1/1-2 0-1"})
	is.Equal(c.Bandwidth, BandwidthConfig{})
	is.Equal(c.Metrics, MetricsConfig{Addr: ":8080", Timeout: 20 * time.Second})
	is.Equal(c.Production, false)
	is.Equal(c.Drain, DrainConfig{MinRatePerMinute: 500, Timeout: 120 * time.Second})
	is.Equal(c.RunDir, "/run/openvpn")
	is.Equal(c.Verbose, false)
	is.Equal(c.TrustProxy.String(), "false")
}

func TestLoadConfigEverything(t *testing.T) {
	is := is.New(t)
	dir := t.TempDir()
	caFile := filepath.Join(dir, "ca.crt")
	is.NoErr(os.WriteFile(caFile, []byte(testCert), 0o600))
	c, err := loader(serverEnv(
		"VPN_BASE_SUBNET", "100.64.0.0/10",
		"VPN_INSTANCE_SUBNET_BITMASK", "12", // clamped to /16
		"VPN_INSTANCE_COUNT", "4",
		"VPN_GATEWAY", "100.64.0.1",
		"VPN_BASE_PORT", "1000",
		"VPN_BASE_MANAGEMENT_PORT", "2000",
		"VPN_API_PORT", "3000",
		"VPN_OPENVPN_PROTO", "TCP6",
		"VPN_STATUS_FILE_WRITE_INTERVAL_SECONDS", "5",
		"VPN_KEEPALIVE_FREQUENCY", "3",
		"VPN_KEEPALIVE_TIMEOUT", "9",
		"VPN_DATA_CIPHERS", "AES-256-GCM",
		"VPN_BYTECOUNT_INTERVAL", "7",
		"VPN_OPENVPN_CA_CRT", "",
		"VPN_OPENVPN_CA_CRT_FILE", caFile,
		"VPN_OPENVPN_SERVER_KEY", testKey, // plain PEM works too
		"VPN_OPENVPN_SERVER_DH", b64(testDH),
		"VPN_AUTH_MODE", "management", // script mode takes no rate limits
		"VPN_AUTH_CACHE_TIMEOUT", "0",
		"MAX_API_POST_WORKERS", "5",
		"DELAY_ON_AUTH_FAIL", "250",
		"BALENA_API_INTERNAL_HOST", "api:81",
		"VPN_GUEST_API_KEY", "guest",
		"API_DEVICE_STATE_POST_BATCH_SIZE", "100",
		"VPN_SERVICE_REGISTER_INTERFACE", "eth0",
		"VPN_CONNECT_PROXY_PORT", "3128",
		"VPN_HAPROXY", "External",
		"VPN_PORT", "1194",
		"VPN_HAPROXY_SOCKET", "/tmp/h.sock",
		"VPN_HAPROXY_USEPROXYPROTOCOL", "true",
		"VPN_DOWNRATE", "10mbit",
		"VPN_UPRATE", "512kbit",
		"VPN_METRICS_ADDR", "127.0.0.1:9090",
		"METRICS_TIMEOUT", "1500",
		"MINIMUM_DRAIN_RATE_PER_MINUTE", "60",
		"DEFAULT_SIGTERM_TIMEOUT", "30",
		"VPN_RUN_DIR", "/var/run/obvpn/",
		"DEFAULT_VERBOSE_LOGS", "true",
		"TRUST_PROXY", "10.0.0.0/8, 192.0.2.7",
		"VPN_CONNECT_PROXY_IDLE_TIMEOUT", "900",
		"VPN_CONNECT_PROXY_MAX_TUNNELS", "0",
		"VPN_HAPROXY_MAXCONN", "50000",
		"VPN_HAPROXY_ULIMIT", "200000",
		"VPN_HAPROXY_TIMEOUT", "45",
		"HAPROXY_NBTHREAD", "4",
		"HAPROXY_CPU_MAP", "none",
		"VPN_NODE_EXPORTER_ADDR", "127.0.0.1:9000",
		"VPN_PROCESS_EXPORTER_ADDR", "[::1]:9001",
		"MONITOR_SECRET_TOKEN", "t0k3n",
		"PRODUCTION_MODE", "true",
		"ROOT_CA", b64(testRootCA),
	)).Config()
	is.NoErr(err)
	is.Equal(c.Plan, subnet.Plan{
		Base:      netip.MustParsePrefix("100.64.0.0/10"),
		Bits:      16,
		Gateway:   netip.MustParseAddr("100.64.0.1"),
		Ports:     subnet.Ports{VPN: 1000, Management: 2000, API: 3000, SharedAPI: true},
		Instances: 4,
	})
	is.Equal(c.OpenVPN.Proto, "tcp6-server")
	is.Equal(c.OpenVPN.StatusInterval, 5*time.Second)
	is.Equal(c.OpenVPN.KeepaliveFrequency, 3*time.Second)
	is.Equal(c.OpenVPN.KeepaliveTimeout, 9*time.Second)
	is.Equal(c.OpenVPN.DataCiphers, "AES-256-GCM")
	is.Equal(c.OpenVPN.BytecountInterval, 7*time.Second)
	is.Equal(string(c.OpenVPN.CACert), testCert)
	is.Equal(string(c.OpenVPN.ServerKey), testKey)
	is.Equal(string(c.OpenVPN.DH), testDH)
	is.Equal(c.Auth, AuthConfig{Mode: AuthManagement, CacheTimeout: 0, MaxWorkers: 5, DelayOnFail: 250 * time.Millisecond})
	is.Equal(c.Balena.BaseURL(), "http://api:81")
	is.Equal(c.Balena.GuestAPIKey, "guest")
	is.Equal(c.Balena.StateBatchSize, 100)
	is.Equal(c.Balena.RegisterInterface, "eth0")
	is.Equal(c.Proxy, ProxyConfig{Port: 3128, ForwardPort: 3128, IdleTimeout: 15 * time.Minute})
	is.Equal(c.HAProxy, haproxy.Config{Mode: haproxy.External, Port: 1194, Socket: "/tmp/h.sock", UseProxyProtocol: true, MonitorAddr: ":80",
		MaxConn: 50000, FileLimit: 200000, Timeout: 45 * time.Second, Threads: 4, CPUMap: "none",
		NodeExporter: "127.0.0.1:9000", ProcessExporter: "[::1]:9001"})
	is.Equal(c.Bandwidth, BandwidthConfig{Down: 10_000_000, Up: 512_000})
	is.Equal(c.Metrics, MetricsConfig{Addr: "127.0.0.1:9090", Timeout: 1500 * time.Millisecond, Token: "t0k3n"})
	is.True(c.Production)
	is.Equal(string(c.Balena.RootCA), testRootCA)
	roots, err := c.Balena.RootCAs()
	is.NoErr(err)
	is.True(roots != nil)
	is.Equal(c.Drain, DrainConfig{MinRatePerMinute: 60, Timeout: 30 * time.Second})
	is.Equal(c.RunDir, "/var/run/obvpn")
	is.True(c.Verbose)
	is.Equal(c.TrustProxy.String(), "10.0.0.0/8,192.0.2.7/32")

	// Without HAProxy the public port is not listened on, so it may be an
	// instance's; a metrics port 0 is any free port.
	_, err = loader(serverEnv("VPN_HAPROXY", "off", "VPN_PORT", "10001", "VPN_METRICS_ADDR", "127.0.0.1:0")).Config()
	is.NoErr(err)
}

func TestOldAndNewNames(t *testing.T) {
	tests := []struct {
		name  string
		env   []string
		check func(*is.I, *Config)
		err   string
		warn  string // in the one warning wanted; none when empty
	}{
		{name: "old gateway", env: []string{"BALENA_VPN_GATEWAY", "10.240.0.1"},
			check: func(is *is.I, c *Config) { is.Equal(c.Plan.Gateway, netip.MustParseAddr("10.240.0.1")) }},
		{name: "new gateway", env: []string{"VPN_GATEWAY", "10.240.0.1"},
			check: func(is *is.I, c *Config) { is.Equal(c.Plan.Gateway, netip.MustParseAddr("10.240.0.1")) }},
		{name: "both gateways, same", env: []string{"VPN_GATEWAY", "10.240.0.1", "BALENA_VPN_GATEWAY", "10.240.0.1"},
			check: func(is *is.I, c *Config) { is.Equal(c.Plan.Gateway, netip.MustParseAddr("10.240.0.1")) }},
		{name: "both gateways, different", env: []string{"VPN_GATEWAY", "10.240.0.1", "BALENA_VPN_GATEWAY", "10.240.0.9"},
			check: func(is *is.I, c *Config) { is.Equal(c.Plan.Gateway, netip.MustParseAddr("10.240.0.1")) },
			warn:  "taken=VPN_GATEWAY value=10.240.0.1 ignored=BALENA_VPN_GATEWAY ignored_value=10.240.0.9"},
		{name: "old gateway malformed names the old variable", env: []string{"BALENA_VPN_GATEWAY", "10.240.0"},
			err: `BALENA_VPN_GATEWAY="10.240.0": ParseAddr("10.240.0"): IPv4 address too short`},
		{name: "old API base port", env: []string{"VPN_API_BASE_PORT", "8000"},
			check: func(is *is.I, c *Config) { is.Equal(c.Plan.Ports.API, 8000); is.Equal(c.Plan.Ports.SharedAPI, false) }},
		{name: "new API port", env: []string{"VPN_API_PORT", "8000"},
			check: func(is *is.I, c *Config) { is.Equal(c.Plan.Ports.API, 8000); is.Equal(c.Plan.Ports.SharedAPI, true) }},
		{name: "both API ports", env: []string{"VPN_API_PORT", "8000", "VPN_API_BASE_PORT", "8000"},
			err: `VPN_API_PORT="8000": VPN_API_BASE_PORT="8000" is set too: set one (VPN_API_PORT is one port for all instances, VPN_API_BASE_PORT a base counted up per instance)`},
		{name: "old verbose", env: []string{"DEFAULT_VERBOSE_LOGS", "true"},
			check: func(is *is.I, c *Config) { is.True(c.Verbose) }},
		{name: "new verbose", env: []string{"VPN_VERBOSE_LOGS", "1"},
			check: func(is *is.I, c *Config) { is.True(c.Verbose) }},
		{name: "verbose disagree", env: []string{"VPN_VERBOSE_LOGS", "false", "DEFAULT_VERBOSE_LOGS", "true"},
			check: func(is *is.I, c *Config) { is.True(!c.Verbose) },
			warn:  "taken=VPN_VERBOSE_LOGS value=false ignored=DEFAULT_VERBOSE_LOGS ignored_value=true"},
		{name: "container's API host", env: []string{"BALENA_API_HOST", "", "API_HOST", "api.balena.test"},
			check: func(is *is.I, c *Config) { is.Equal(c.Balena.BaseURL(), "https://api.balena.test") }},
		{name: "container's internal API host", env: []string{"API_INTERNAL_HOST", "api.internal:81"},
			check: func(is *is.I, c *Config) { is.Equal(c.Balena.BaseURL(), "http://api.internal:81") }},
		{name: "both API hosts, the container's taken", env: []string{"BALENA_API_HOST", "api.balena.example", "API_HOST", "api.balena.test"},
			check: func(is *is.I, c *Config) { is.Equal(c.Balena.APIHost, "api.balena.test") },
			warn:  "taken=API_HOST value=api.balena.test ignored=BALENA_API_HOST ignored_value=api.balena.example"},
		{name: "both API hosts, same", env: []string{"BALENA_API_HOST", "api.balena.test", "API_HOST", "api.balena.test"},
			check: func(is *is.I, c *Config) { is.Equal(c.Balena.APIHost, "api.balena.test") }},
		{name: "container's API host malformed names it", env: []string{"API_HOST", "https://api.balena.test"},
			err: `API_HOST="https://api.balena.test": want a host name with an optional :port, without a scheme`},
		{name: "old verbose malformed", env: []string{"DEFAULT_VERBOSE_LOGS", "yes please"},
			err: `DEFAULT_VERBOSE_LOGS="yes please": want true or false`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			is := is.New(t)
			l := loader(serverEnv(tt.env...))
			var logs strings.Builder
			l.Logger = slog.New(slog.NewTextHandler(&logs, nil))
			c, err := l.Config()
			if tt.err != "" {
				is.True(err != nil)
				is.Equal(err.Error(), tt.err)
				return
			}
			is.NoErr(err)
			tt.check(is, c)
			lines := strings.Count(logs.String(), "\n")
			switch {
			case tt.warn == "" && lines != 0:
				t.Errorf("warnings: got %q, want none", logs.String())
			case tt.warn != "" && (lines != 1 || !strings.Contains(logs.String(), "level=WARN") || !strings.Contains(logs.String(), tt.warn)):
				t.Errorf("warnings: got %q, want one with %q", logs.String(), tt.warn)
			}
		})
	}
}

func TestLoadConfigErrors(t *testing.T) {
	dir := t.TempDir()
	notPEM := filepath.Join(dir, "not.pem")
	if err := os.WriteFile(notPEM, []byte("hello"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		env  []string
		want string
	}{
		{"missing base", []string{"VPN_BASE_SUBNET", ""}, `VPN_BASE_SUBNET: required, not set`},
		{"base not a prefix", []string{"VPN_BASE_SUBNET", "10.240.0.0"},
			`VPN_BASE_SUBNET="10.240.0.0": netip.ParsePrefix("10.240.0.0"): no '/'`},
		{"base ipv6", []string{"VPN_BASE_SUBNET", "fd00::/8"},
			`VPN_BASE_SUBNET="fd00::/8": base prefix fd00::/8: not an IPv4 address`},
		{"base host bits", []string{"VPN_BASE_SUBNET", "10.240.1.0/12"},
			`VPN_BASE_SUBNET="10.240.1.0/12": base prefix 10.240.1.0/12: host bits set (did you mean 10.240.0.0/12?)`},
		{"bitmask not a number", []string{"VPN_INSTANCE_SUBNET_BITMASK", "/20"},
			`VPN_INSTANCE_SUBNET_BITMASK="/20": not an integer`},
		{"bitmask too long", []string{"VPN_INSTANCE_SUBNET_BITMASK", "30"},
			`VPN_INSTANCE_SUBNET_BITMASK="30": Mask /30 is too small, 3 usable addresses are required.`},
		{"bitmask shorter than base", []string{"VPN_BASE_SUBNET", "10.240.0.0/24", "VPN_INSTANCE_SUBNET_BITMASK", "20"},
			`VPN_INSTANCE_SUBNET_BITMASK="20": Cannot split /24 into /20!`},
		{"bitmask clamp makes it shorter than base", []string{"VPN_BASE_SUBNET", "10.240.0.0/24", "VPN_INSTANCE_SUBNET_BITMASK", "8"},
			`VPN_INSTANCE_SUBNET_BITMASK="8": Cannot split /24 into /16!`},
		{"too many instances", []string{"VPN_INSTANCE_COUNT", "257"},
			`VPN_INSTANCE_COUNT="257": 257 instances, but 10.240.0.0/12 at /20 has room for 256`},
		{"too many instances for the default bitmask", []string{"VPN_BASE_SUBNET", "192.0.2.0/24", "VPN_INSTANCE_SUBNET_BITMASK", "", "VPN_INSTANCE_COUNT", "64"},
			`VPN_INSTANCE_COUNT="64": 64 instances need /30 subnets of 192.0.2.0/24: Mask /30 is too small, 3 usable addresses are required.`},
		{"negative instance count", []string{"VPN_INSTANCE_COUNT", "-1"}, `VPN_INSTANCE_COUNT="-1": out of range 0…1048576`},
		{"gateway ipv6", []string{"VPN_GATEWAY", "fd00::1"}, `VPN_GATEWAY="fd00::1": not an IPv4 address`},
		{"port not a number", []string{"VPN_BASE_PORT", "ten"}, `VPN_BASE_PORT="ten": not an integer`},
		{"port overflow for the last instance", []string{"VPN_BASE_PORT", "65534"},
			`VPN_BASE_PORT="65534": instance 2 would use port 65536, above 65535`},
		{"management port overflow", []string{"VPN_BASE_MANAGEMENT_PORT", "65535"},
			`VPN_BASE_MANAGEMENT_PORT="65535": out of range 0…65534`},
		{"api base port overflow", []string{"VPN_API_BASE_PORT", "65534"},
			`VPN_API_BASE_PORT="65534": instance 2 would use port 65536, above 65535`},
		{"api port zero", []string{"VPN_API_PORT", "0"}, `VPN_API_PORT="0": out of range 1…65535`},
		{"udp with two instances", []string{"VPN_OPENVPN_PROTO", "udp4"},
			`VPN_OPENVPN_PROTO="udp4": a udp protocol allows one instance, and VPN_INSTANCE_COUNT gives 2`},
		{"unknown compression", []string{"VPN_COMPRESSION", "lz4"},
			`VPN_COMPRESSION="lz4": want one of migrate, lzo, off`},
		{"unknown user", []string{"VPN_OPENVPN_USER", "no-such-user-obvpn"},
			`VPN_OPENVPN_USER="no-such-user-obvpn": not on this host: user: unknown user no-such-user-obvpn`},
		{"user with a space", []string{"VPN_OPENVPN_GROUP", "no group"},
			`VPN_OPENVPN_GROUP="no group": want a user or group name`},
		{"providers quoted", []string{"VPN_OPENSSL_PROVIDERS", `"legacy"`},
			`VPN_OPENSSL_PROVIDERS="\"legacy\"": want provider names separated by spaces`},
		{"exit notify out of range", []string{"VPN_UDP_SERVER_EXPLICIT_EXIT_NOTIFY", "3"},
			`VPN_UDP_SERVER_EXPLICIT_EXIT_NOTIFY="3": out of range 0…2`},
		{"unknown isolation", []string{"VPN_DEVICE_ISOLATION", "nftables"},
			`VPN_DEVICE_ISOLATION="nftables": want one of on, off`},
		{"index path relative", []string{"VPN_NSS_INDEX", "nss.index"},
			`VPN_NSS_INDEX="nss.index": want an absolute path`},
		{"unknown proto", []string{"VPN_OPENVPN_PROTO", "sctp"},
			`VPN_OPENVPN_PROTO="sctp": want tcp4-server, tcp6-server, tcp-server, udp4, udp6 or udp`},
		{"status interval zero", []string{"VPN_STATUS_FILE_WRITE_INTERVAL_SECONDS", "0"},
			`VPN_STATUS_FILE_WRITE_INTERVAL_SECONDS="0": out of range 1…4611686018`},
		{"ciphers with spaces", []string{"VPN_DATA_CIPHERS", "AES-256-GCM AES-128-GCM"},
			`VPN_DATA_CIPHERS="AES-256-GCM AES-128-GCM": want cipher names separated by colons, without spaces or quotes`},
		{"missing CA", []string{"VPN_OPENVPN_CA_CRT", ""}, `VPN_OPENVPN_CA_CRT: required, not set (nor is VPN_OPENVPN_CA_CRT_FILE)`},
		{"CA in both forms", []string{"VPN_OPENVPN_CA_CRT_FILE", notPEM}, `VPN_OPENVPN_CA_CRT: VPN_OPENVPN_CA_CRT_FILE is set too: set one`},
		{"CA not base64", []string{"VPN_OPENVPN_CA_CRT", "not*base64"}, `VPN_OPENVPN_CA_CRT: not base64-encoded PEM`},
		{"CA file missing", []string{"VPN_OPENVPN_CA_CRT", "", "VPN_OPENVPN_CA_CRT_FILE", "/nonexistent/ca.crt"},
			`VPN_OPENVPN_CA_CRT_FILE="/nonexistent/ca.crt": open /nonexistent/ca.crt: no such file or directory`},
		{"CA file not PEM", []string{"VPN_OPENVPN_CA_CRT", "", "VPN_OPENVPN_CA_CRT_FILE", notPEM}, `VPN_OPENVPN_CA_CRT_FILE: holds no PEM block`},
		{"key is a certificate", []string{"VPN_OPENVPN_SERVER_KEY", b64(testCert)},
			`VPN_OPENVPN_SERVER_KEY: holds a PEM "CERTIFICATE" block, want "PRIVATE KEY"`},
		{"DH too small", []string{"VPN_OPENVPN_SERVER_DH", b64(smallDH)}, `VPN_OPENVPN_SERVER_DH: 1024-bit DH parameters: ` +
			`OpenSSL refuses fewer than 2048 bits at its default security level (make new ones with openssl dhparam 2048, or leave it unset for ECDH only)`},
		{"DH not DH", []string{"VPN_OPENVPN_SERVER_DH", b64("-----BEGIN DH PARAMETERS-----\nTUlJQg==\n-----END DH PARAMETERS-----\n")},
			`VPN_OPENVPN_SERVER_DH: holds no DH parameters`},
		{"auth mode", []string{"VPN_AUTH_MODE", "plugin"}, `VPN_AUTH_MODE="plugin": want one of management, script`},
		{"negative cache timeout", []string{"VPN_AUTH_CACHE_TIMEOUT", "-1"}, `VPN_AUTH_CACHE_TIMEOUT="-1": out of range 0…4611686018427`},
		{"no workers", []string{"MAX_API_POST_WORKERS", "0"}, `MAX_API_POST_WORKERS="0": out of range 1…65536`},
		{"no API host", []string{"BALENA_API_HOST", ""}, `BALENA_API_HOST: required, not set (nor are API_HOST, BALENA_API_INTERNAL_HOST and API_INTERNAL_HOST)`},
		{"API host with scheme", []string{"BALENA_API_HOST", "https://api.example.com"},
			`BALENA_API_HOST="https://api.example.com": want a host name with an optional :port, without a scheme`},
		{"API host with path", []string{"BALENA_API_INTERNAL_HOST", "api/v7"},
			`BALENA_API_INTERNAL_HOST="api/v7": want a host name with an optional :port, without a path`},
		{"API host bad port", []string{"BALENA_API_HOST", "api:99999"}, `BALENA_API_HOST="api:99999": port "99999": want a number from 1 to 65535`},
		{"no service key", []string{"VPN_SERVICE_API_KEY", ""}, `VPN_SERVICE_API_KEY: required, not set`},
		{"service key with a newline", []string{"VPN_SERVICE_API_KEY", "abc\ndef"}, `VPN_SERVICE_API_KEY: contains spaces or control characters`},
		{"batch size zero", []string{"API_DEVICE_STATE_POST_BATCH_SIZE", "0"}, `API_DEVICE_STATE_POST_BATCH_SIZE="0": out of range 1…1048576`},
		{"proxy port", []string{"VPN_CONNECT_PROXY_PORT", "70000"}, `VPN_CONNECT_PROXY_PORT="70000": out of range 0…65535`},
		{"forward port", []string{"VPN_FORWARD_PROXY_PORT", "x"}, `VPN_FORWARD_PROXY_PORT="x": not an integer`},
		{"haproxy mode", []string{"VPN_HAPROXY", "yes"}, `VPN_HAPROXY="yes": want one of managed, external, off`},
		{"vpn port", []string{"VPN_PORT", "0"}, `VPN_PORT="0": out of range 1…65535`},
		{"haproxy socket relative", []string{"VPN_HAPROXY_SOCKET", "haproxy.sock"}, `VPN_HAPROXY_SOCKET="haproxy.sock": want an absolute path`},
		{"proxy protocol", []string{"VPN_HAPROXY_USEPROXYPROTOCOL", "maybe"}, `VPN_HAPROXY_USEPROXYPROTOCOL="maybe": want true or false`},
		{"rate format", []string{"VPN_DOWNRATE", "10mb", "VPN_UPRATE", "1mbit"},
			`VPN_DOWNRATE="10mb": want <n>kbit, <n>mbit or <n>gbit with n a positive integer`},
		{"rate zero", []string{"VPN_DOWNRATE", "0mbit", "VPN_UPRATE", "1mbit"},
			`VPN_DOWNRATE="0mbit": want <n>kbit, <n>mbit or <n>gbit with n a positive integer`},
		{"rate fraction", []string{"VPN_DOWNRATE", "1mbit", "VPN_UPRATE", "1.5mbit"},
			`VPN_UPRATE="1.5mbit": want <n>kbit, <n>mbit or <n>gbit with n a positive integer`},
		{"down rate only", []string{"VPN_DOWNRATE", "10mbit"}, `VPN_UPRATE: not set, but VPN_DOWNRATE="10mbit" is: set both or neither`},
		{"up rate only", []string{"VPN_UPRATE", "10mbit"}, `VPN_DOWNRATE: not set, but VPN_UPRATE="10mbit" is: set both or neither`},
		{"rates in script mode", []string{"VPN_DOWNRATE", "10mbit", "VPN_UPRATE", "1mbit", "VPN_AUTH_MODE", "script"},
			`VPN_DOWNRATE="10mbit": bandwidth limits need VPN_AUTH_MODE=management, not script`},
		{"metrics addr", []string{"VPN_METRICS_ADDR", "8080"}, `VPN_METRICS_ADDR="8080": want host:port or :port`},
		{"metrics port", []string{"VPN_METRICS_ADDR", ":99999"}, `VPN_METRICS_ADDR=":99999": port "99999": want a number from 0 to 65535`},
		{"metrics timeout", []string{"METRICS_TIMEOUT", "soon"}, `METRICS_TIMEOUT="soon": not an integer`},
		{"drain rate", []string{"MINIMUM_DRAIN_RATE_PER_MINUTE", "0"}, `MINIMUM_DRAIN_RATE_PER_MINUTE="0": out of range 1…2147483647`},
		{"sigterm timeout", []string{"DEFAULT_SIGTERM_TIMEOUT", "2m"}, `DEFAULT_SIGTERM_TIMEOUT="2m": not an integer`},
		{"run dir relative", []string{"VPN_RUN_DIR", "run"}, `VPN_RUN_DIR="run": want an absolute path`},
		{"trust proxy", []string{"TRUST_PROXY", "loopback"},
			`TRUST_PROXY="loopback": want true, false, a hop count, or addresses and prefixes separated by commas`},
		{"management ports overlap the OpenVPN ports", []string{"VPN_BASE_MANAGEMENT_PORT", "10001"},
			`VPN_BASE_MANAGEMENT_PORT="10001": ports 10002…10003 overlap VPN_BASE_PORT's ports 10001…10002`},
		{"default API ports overlap", []string{"VPN_BASE_PORT", "29999"},
			`VPN_API_BASE_PORT: ports 30001…30002 overlap VPN_BASE_PORT's ports 30000…30001`},
		{"shared API port inside the management ports", []string{"VPN_API_PORT", "20002"},
			`VPN_API_PORT="20002": port 20002 overlaps VPN_BASE_MANAGEMENT_PORT's ports 20001…20002`},
		{"public port is an instance port", []string{"VPN_PORT", "10002"},
			`VPN_PORT="10002": port 10002 overlaps VPN_BASE_PORT's ports 10001…10002`},
		{"proxy on the metrics port", []string{"VPN_CONNECT_PROXY_PORT", "8080"},
			`VPN_METRICS_ADDR=":8080": port 8080 overlaps VPN_CONNECT_PROXY_PORT's port 8080`},
		{"trust proxy negative", []string{"TRUST_PROXY", "-2"}, `TRUST_PROXY="-2": a hop count cannot be negative`},
		{"production not a bool", []string{"PRODUCTION_MODE", "yes please"}, `PRODUCTION_MODE="yes please": want true or false`},
		{"root CA not base64", []string{"ROOT_CA", "%%%"}, `ROOT_CA: not base64-encoded PEM`},
		{"root CA not a certificate", []string{"ROOT_CA", b64(testKey)}, `ROOT_CA: holds a PEM "PRIVATE KEY" block, want "CERTIFICATE"`},
		{"root CA does not parse", []string{"ROOT_CA", b64(testCert)}, `ROOT_CA: holds no certificate that parses`},
		{"haproxy maxconn zero", []string{"VPN_HAPROXY_MAXCONN", "0"}, `VPN_HAPROXY_MAXCONN="0": out of range 1…16777216`},
		{"haproxy ulimit tiny", []string{"VPN_HAPROXY_ULIMIT", "10"}, `VPN_HAPROXY_ULIMIT="10": out of range 64…1073741824`},
		{"haproxy timeout zero", []string{"VPN_HAPROXY_TIMEOUT", "0"}, `VPN_HAPROXY_TIMEOUT="0": out of range 1…4611686018`},
		{"haproxy threads", []string{"HAPROXY_NBTHREAD", "many"}, `HAPROXY_NBTHREAD="many": not an integer`},
		{"haproxy cpu map quote", []string{"HAPROXY_CPU_MAP", `auto:1/1-2 "0-1"`}, `HAPROXY_CPU_MAP="auto:1/1-2 \"0-1\"": want HAProxy's cpu-map arguments, such as "auto:1/1-2 0-1", or none`},
		{"node exporter no port", []string{"VPN_NODE_EXPORTER_ADDR", "127.0.0.1"}, `VPN_NODE_EXPORTER_ADDR="127.0.0.1": want host:port`},
		{"process exporter port 0", []string{"VPN_PROCESS_EXPORTER_ADDR", "127.0.0.1:0"}, `VPN_PROCESS_EXPORTER_ADDR="127.0.0.1:0": port "0": want a number from 1 to 65535`},
		{"proxy idle negative", []string{"VPN_CONNECT_PROXY_IDLE_TIMEOUT", "-1"}, `VPN_CONNECT_PROXY_IDLE_TIMEOUT="-1": out of range 0…4611686018`},
		{"proxy max tunnels", []string{"VPN_CONNECT_PROXY_MAX_TUNNELS", "lots"}, `VPN_CONNECT_PROXY_MAX_TUNNELS="lots": not an integer`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := loader(serverEnv(tt.env...)).Config()
			if err == nil {
				t.Fatalf("no error; want %s", tt.want)
			}
			if err.Error() != tt.want {
				t.Errorf("error\n got %s\nwant %s", err, tt.want)
			}
			var ce *ConfigError
			if !errors.As(err, &ce) {
				t.Fatalf("%T is not a *ConfigError", err)
			}
			if !strings.HasPrefix(err.Error(), ce.Var) || strings.Contains(err.Error(), "\n") {
				t.Errorf("error %q does not start with its variable %s on one line", err, ce.Var)
			}
		})
	}
}

func TestSecretsStayOutOfErrors(t *testing.T) {
	const key = "VERY-SECRET-KEY-MATERIAL"
	for _, env := range [][]string{
		{"VPN_SERVICE_API_KEY", key + " x"},
		{"VPN_GUEST_API_KEY", key + "\x00"},
		{"VPN_OPENVPN_SERVER_KEY", key},
		{"VPN_OPENVPN_SERVER_KEY", b64(key)},
		{"VPN_OPENVPN_SERVER_KEY", "-----BEGIN PRIVATE KEY-----\n" + key},
		{"VPN_OPENVPN_SERVER_DH", key},
		{"MONITOR_SECRET_TOKEN", key + "'"},
		{"MONITOR_SECRET_TOKEN", key + "\n"},
	} {
		_, err := loader(serverEnv(env...)).Config()
		if err == nil {
			t.Fatalf("%s: no error", env[0])
		}
		if strings.Contains(err.Error(), key) || strings.Contains(err.Error(), b64(key)) {
			t.Errorf("%s: the error repeats the secret: %s", env[0], err)
		}
	}
}

// TestProductionMode checks PRODUCTION_MODE's effect on the instance
// count, as the reference container's env.tmpl has it: outside production
// one instance, in production one per CPU, and VPN_INSTANCE_COUNT wins
// over both.
func TestProductionMode(t *testing.T) {
	for _, tt := range []struct {
		production, count string
		want              int
	}{
		{"", "", 3},
		{"true", "", 3},
		{"false", "", 1},
		{"false", "2", 2},
		{"true", "2", 2},
		{"false", "0", 1},
	} {
		t.Run("PRODUCTION_MODE="+tt.production+",VPN_INSTANCE_COUNT="+tt.count, func(t *testing.T) {
			c, err := loader(serverEnv("PRODUCTION_MODE", tt.production, "VPN_INSTANCE_COUNT", tt.count, "VPN_INSTANCE_SUBNET_BITMASK", "")).Config()
			if err != nil {
				t.Fatal(err)
			}
			if c.Plan.Instances != tt.want {
				t.Errorf("instances: got %d, want %d", c.Plan.Instances, tt.want)
			}
			if c.Production != (tt.production == "true") {
				t.Errorf("Production: got %v, want %v", c.Production, tt.production == "true")
			}
		})
	}
}

func TestInstanceCountFallback(t *testing.T) {
	is := is.New(t)
	dir := t.TempDir()
	podinfo := filepath.Join(dir, "cpu_request")
	env := serverEnv("VPN_INSTANCE_COUNT", "", "VPN_INSTANCE_SUBNET_BITMASK", "")

	// No variable, no file: the CPU count, and the bitmask follows it.
	c, err := Loader{Env: env, CPURequestFile: podinfo, NumCPU: func() int { return 3 }}.Config()
	is.NoErr(err)
	is.Equal(c.Plan.Instances, 3)
	is.Equal(c.Plan.Bits, 16) // 12 + ceil(log2 3) = 14, clamped to 16

	// The pod's CPU request wins over the CPU count.
	is.NoErr(os.WriteFile(podinfo, []byte("24\n"), 0o600))
	c, err = Loader{Env: env, CPURequestFile: podinfo, NumCPU: func() int { return 3 }}.Config()
	is.NoErr(err)
	is.Equal(c.Plan.Instances, 24)
	is.Equal(c.Plan.Bits, 17) // 12 + 5

	// VPN_INSTANCE_COUNT=0 counts as unset.
	env["VPN_INSTANCE_COUNT"] = "0"
	c, err = Loader{Env: env, CPURequestFile: podinfo}.Config()
	is.NoErr(err)
	is.Equal(c.Plan.Instances, 24)

	// A file that holds no whole number is ignored.
	is.NoErr(os.WriteFile(podinfo, []byte("500m"), 0o600))
	c, err = Loader{Env: env, CPURequestFile: podinfo, NumCPU: func() int { return 2 }}.Config()
	is.NoErr(err)
	is.Equal(c.Plan.Instances, 2)

	// The variable wins over both.
	env["VPN_INSTANCE_COUNT"] = "5"
	c, err = Loader{Env: env, CPURequestFile: podinfo, NumCPU: func() int { return 2 }}.Config()
	is.NoErr(err)
	is.Equal(c.Plan.Instances, 5)

	// An error for a count taken from the machine says where it came from.
	env = serverEnv("VPN_BASE_SUBNET", "192.0.2.0/24", "VPN_INSTANCE_SUBNET_BITMASK", "", "VPN_INSTANCE_COUNT", "")
	_, err = Loader{Env: env, CPURequestFile: podinfo, NumCPU: func() int { return 64 }}.Config()
	is.Equal(err.Error(), `VPN_INSTANCE_COUNT: 64 instances (the CPU count) need /30 subnets of 192.0.2.0/24: Mask /30 is too small, 3 usable addresses are required.`)
}

func TestLoadPlan(t *testing.T) {
	is := is.New(t)
	// The plan needs only the network: no keys, no certificates.
	plan, err := loader(map[string]string{"VPN_BASE_SUBNET": "10.240.0.0/12", "VPN_INSTANCE_SUBNET_BITMASK": "20"}).Plan()
	is.NoErr(err)
	is.Equal(plan.Instances, 3)
	last, err := plan.Instance(256)
	is.NoErr(err)
	is.Equal(last.Subnet.String(), "10.255.240.0/20")

	_, err = loader(map[string]string{"VPN_BASE_SUBNET": "10.240.0.0/12", "VPN_OPENVPN_PROTO": "udp"}).Plan()
	is.Equal(err.Error(), `VPN_OPENVPN_PROTO="udp": a udp protocol allows one instance, and VPN_INSTANCE_COUNT gives 3`)
	_, err = loader(map[string]string{}).Plan()
	is.True(errors.Is(err, ErrMissing))
}

func TestLoadConnectProxyConfig(t *testing.T) {
	is := is.New(t)
	env := map[string]string{
		"VPN_CONNECT_PROXY_PORT": "3128",
		"BALENA_API_HOST":        "api.example.com",
		"VPN_SERVICE_API_KEY":    "k",
		"VPN_SERVICE_ID":         "42",
		"VPN_RUN_DIR":            "/tmp/obvpn",
	}
	c, err := loader(env).ConnectProxyConfig()
	is.NoErr(err)
	is.Equal(*c, ConnectProxyConfig{
		Balena:                  BalenaConfig{APIHost: "api.example.com", ServiceAPIKey: "k", StateBatchSize: 8000},
		Proxy:                   ProxyConfig{Port: 3128, ForwardPort: 3128, MaxTunnels: DefaultMaxTunnels},
		ServiceID:               42,
		StatusFileWriteInterval: 10 * time.Second,
		StatusGlob:              "/tmp/obvpn/server-*.status",
		Sentry:                  SentryConfig{Environment: "development"},
	})

	env["NSS_OPENVPN_STATUS_GLOB"] = "/srv/status/*.status"
	env["VPN_FORWARD_PROXY_PORT"] = "3129"
	env["VPN_VERBOSE_LOGS"] = "true"
	c, err = loader(env).ConnectProxyConfig()
	is.NoErr(err)
	is.Equal(c.StatusGlob, "/srv/status/*.status")
	is.Equal(c.Proxy.ForwardPort, 3129)
	is.True(c.Verbose)

	env["NSS_OPENVPN_STATUS_GLOB"] = "/srv/[status/*.status"
	_, err = loader(env).ConnectProxyConfig()
	is.Equal(err.Error(), `NSS_OPENVPN_STATUS_GLOB="/srv/[status/*.status": not a glob pattern: syntax error in pattern`)

	delete(env, "NSS_OPENVPN_STATUS_GLOB")
	env["VPN_CONNECT_PROXY_PORT"] = ""
	_, err = loader(env).ConnectProxyConfig()
	is.Equal(err.Error(), `VPN_CONNECT_PROXY_PORT: required, not set`)

	env["VPN_CONNECT_PROXY_PORT"] = "3128"
	env["VPN_SERVICE_ID"] = "one"
	_, err = loader(env).ConnectProxyConfig()
	is.Equal(err.Error(), `VPN_SERVICE_ID="one": not an integer`)
}

func TestLoadFromProcessEnvironment(t *testing.T) {
	is := is.New(t)
	for k, v := range serverEnv("VPN_INSTANCE_COUNT", "1", "VPN_RUN_DIR", "/tmp/obvpn-test") {
		t.Setenv(k, v)
	}
	c, err := LoadConfig()
	is.NoErr(err)
	is.Equal(c.RunDir, "/tmp/obvpn-test")
	is.Equal(c.Plan.Instances, 1)
	plan, err := LoadPlan()
	is.NoErr(err)
	is.Equal(plan, c.Plan)
	t.Setenv("VPN_CONNECT_PROXY_PORT", "3128")
	pc, err := LoadConnectProxyConfig()
	is.NoErr(err)
	is.Equal(pc.StatusGlob, "/tmp/obvpn-test/server-*.status")
}

func TestConfigLogValueHidesKeys(t *testing.T) {
	c, err := loader(serverEnv()).Config()
	if err != nil {
		t.Fatal(err)
	}
	var buf strings.Builder
	slog.New(slog.NewTextHandler(&buf, nil)).Info("config", "config", c)
	if strings.Contains(buf.String(), "s3rv1ce-key") {
		t.Errorf("the log shows the service key: %s", buf.String())
	}
	if !strings.Contains(buf.String(), "base_url=https://api.example.com") || !strings.Contains(buf.String(), "service_key_set=true") {
		t.Errorf("the log lacks the API URL or the key's presence: %s", buf.String())
	}
}

// testRootCA is a self-signed CA certificate, for ROOT_CA.
const testRootCA = `-----BEGIN CERTIFICATE-----
MIIBkjCCATmgAwIBAgIUYHt+qnNJLrSNOqd7bQvB5DeroqMwCgYIKoZIzj0EAwIw
HjEcMBoGA1UEAwwTcm9vdC1jYS5iYWxlbmEudGVzdDAgFw0yNjEyMDIwMDA4Mjda
GA8yMTI2MTEwODAwMDgyN1owHjEcMBoGA1UEAwwTcm9vdC1jYS5iYWxlbmEudGVz
dDBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABHNaPV88mrt4Fw9qqKeOD2ON9E+q
Y8jfHhqWdWdtGkcxyDCNj7TCszfdAUgWE7jV4coRu1sy+YUcowbYJfGAxZKjUzBR
MB0GA1UdDgQWBBQ8MbjBuAYV5ZLLX0ORUvWO+zl4IjAfBgNVHSMEGDAWgBQ8MbjB
uAYV5ZLLX0ORUvWO+zl4IjAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0cA
MEQCICw/XhGiPQ06+z6LtMHaHZySCon3e2cjDaDnblWkS1kBAiAlxj0S3FkpDYbq
x1L+129wsQl1PeQhuzQfeEmJyoGPuw==
-----END CERTIFICATE-----
`
