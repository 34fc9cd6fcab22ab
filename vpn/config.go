package vpn

import (
	"crypto/x509"
	"errors"
	"log/slog"
	"time"

	"github.com/obvpn/obvpn/subnet"
	"github.com/obvpn/obvpn/vpn/bandwidth"
	"github.com/obvpn/obvpn/vpn/haproxy"
	"github.com/obvpn/obvpn/vpn/internalapi"
)

// Config is the configuration of a VPN server: the address plan and
// everything else its parts need. [LoadConfig] fills it from the
// environment and validates it. A Config built by hand means what its
// fields document for their zero values: [Config.WithDefaults] fills them
// in, and every part of the server runs on what it returns.
type Config struct {
	// Plan is the address and port plan: VPN_BASE_SUBNET,
	// VPN_INSTANCE_SUBNET_BITMASK (defaulted and clamped, see
	// subnet.DefaultBits), BALENA_VPN_GATEWAY/VPN_GATEWAY, VPN_BASE_PORT,
	// VPN_BASE_MANAGEMENT_PORT, VPN_API_BASE_PORT/VPN_API_PORT and the
	// instance count (VPN_INSTANCE_COUNT, else /etc/podinfo/cpu_request,
	// else the CPU count). Ports that are all zero mean
	// [subnet.ReferencePorts]: 10000, 20000 and 30000.
	Plan subnet.Plan

	OpenVPN   OpenVPNConfig
	Auth      AuthConfig
	Balena    BalenaConfig
	Proxy     ProxyConfig
	HAProxy   haproxy.Config
	Bandwidth BandwidthConfig
	Metrics   MetricsConfig
	Drain     DrainConfig
	Sentry    SentryConfig

	// RunDir is where status files, pid files, generated configurations and
	// certificates go (VPN_RUN_DIR). Empty means /run/openvpn.
	RunDir string

	// Verbose turns on verbose logs, OpenVPN's own included
	// (VPN_VERBOSE_LOGS/DEFAULT_VERBOSE_LOGS). SIGUSR2 toggles it at run
	// time.
	Verbose bool

	// NSSIndex is the index file of the NSS module that the server keeps
	// current from what it knows of its devices (VPN_NSS_INDEX, else
	// NSS_OPENVPN_INDEX): the status files, and the addresses learned from
	// the management interface before the next status write. Empty means
	// nss.index in the run directory, where the NSS module looks for the
	// status files there; "off" writes none.
	NSSIndex string

	// PIDFile is where open-balena-vpn writes the pid of the process that
	// serves, the successor's after an upgrade in place (VPN_PID_FILE, or
	// its -pid-file flag). Empty writes none. The Server does not use it.
	PIDFile string

	// UpgradeTimeout bounds an upgrade in place of open-balena-vpn
	// (SIGHUP; VPN_UPGRADE_TIMEOUT, in seconds): a successor that is not
	// ready within it is given up on, and this process keeps serving.
	// Zero means 60 s. The Server does not use it.
	UpgradeTimeout time.Duration

	// TrustProxy says whose X-Forwarded-For the HTTP endpoints believe
	// (TRUST_PROXY). The zero value trusts nobody.
	TrustProxy internalapi.TrustProxy

	// Production says that the server runs in production
	// (PRODUCTION_MODE, as the reference container has it): then the
	// instance count defaults to the CPUs (see [Loader]), otherwise,
	// with PRODUCTION_MODE set to false, to 1. It changes nothing else
	// in package vpn.
	Production bool
}

// LogValue implements slog.LogValuer; API keys and private keys are left
// out.
func (c Config) LogValue() slog.Value {
	return slog.GroupValue(
		slog.String("plan", c.Plan.String()),
		slog.String("proto", c.OpenVPN.Proto),
		slog.String("auth_mode", string(c.Auth.Mode)),
		slog.Any("balena", c.Balena),
		slog.Int("proxy_port", c.Proxy.Port),
		slog.String("haproxy", string(c.HAProxy.Mode)),
		slog.Int("vpn_port", c.HAProxy.Port),
		slog.String("metrics_addr", c.Metrics.Addr),
		slog.String("run_dir", c.RunDir),
		slog.Bool("verbose", c.Verbose),
		slog.Any("sentry", c.Sentry),
	)
}

// OpenVPNConfig is how each OpenVPN instance runs.
type OpenVPNConfig struct {
	// Proto is OpenVPN's --proto for the server (VPN_OPENVPN_PROTO): one of
	// tcp-server, tcp4-server, tcp6-server (tcp, tcp4, tcp6 mean the same)
	// or udp, udp4, udp6. A udp protocol allows one instance only. Empty
	// means tcp4-server.
	Proto string

	// StatusInterval is how often OpenVPN rewrites its status file
	// (VPN_STATUS_FILE_WRITE_INTERVAL_SECONDS). Zero means 10 s.
	StatusInterval time.Duration

	// KeepaliveFrequency is the ping interval, for the server and pushed to
	// clients (VPN_KEEPALIVE_FREQUENCY). Zero means 10 s.
	KeepaliveFrequency time.Duration

	// KeepaliveTimeout is the clients' ping-exit; the server's is twice
	// that (VPN_KEEPALIVE_TIMEOUT). Zero means 60 s.
	KeepaliveTimeout time.Duration

	// DataCiphers is OpenVPN's --data-ciphers list, colon-separated
	// (VPN_DATA_CIPHERS). Empty means [DefaultDataCiphers].
	DataCiphers string

	// BytecountInterval is how often OpenVPN reports each client's byte
	// counts on the management interface (VPN_BYTECOUNT_INTERVAL, 60 s by
	// default, as the reference container sets it). Zero turns reporting
	// off: bytes and bitrates are then counted when a session ends.
	BytecountInterval time.Duration

	// CACert, ServerCert and ServerKey are PEM data for OpenVPN's ca, cert
	// and key (VPN_OPENVPN_CA_CRT, VPN_OPENVPN_SERVER_CRT,
	// VPN_OPENVPN_SERVER_KEY, or their _FILE forms). The server needs all
	// three.
	CACert, ServerCert, ServerKey []byte

	// DH is PEM data for OpenVPN's dh (VPN_OPENVPN_SERVER_DH or its _FILE
	// form). Nil means "dh none" (ECDH only).
	DH []byte

	// Compression is how the server meets clients that configure
	// compression, as every balenaOS device does (VPN_COMPRESSION). Empty
	// means [CompressionMigrate].
	Compression Compression

	// User and Group are the account that OpenVPN drops to once it has
	// opened its tun device, its ports and its files (VPN_OPENVPN_USER,
	// VPN_OPENVPN_GROUP). Empty means "nobody" and "nogroup", as in the
	// reference server.
	User, Group string

	// Providers are the OpenSSL providers that OpenVPN loads, separated by
	// spaces, such as "legacy default" to let old devices negotiate
	// BF-CBC (VPN_OPENSSL_PROVIDERS). Empty loads OpenSSL's default only.
	Providers string

	// ExplicitExitNotify is OpenVPN's explicit-exit-notify for a udp
	// server (VPN_UDP_SERVER_EXPLICIT_EXIT_NOTIFY): on a restart the
	// server tells its clients to reconnect (1) or to move to their next
	// remote (2). Zero sends nothing; it is ignored over tcp, where a
	// closed connection says as much.
	ExplicitExitNotify int

	// Isolation keeps devices from reaching each other and the host's
	// networks through the VPN (VPN_DEVICE_ISOLATION). Empty means
	// [IsolationOn].
	Isolation Isolation
}

// Compression is how an instance handles compression (OpenVPN's
// --compress and --allow-compression).
//
// Every balenaOS device in the field has comp-lzo in its resin.conf
// (meta-balena, recipes-connectivity/openvpn/openvpn/resin.conf), so
// its packets carry LZO framing: a server without a matching compression
// setting authenticates it but drops every data packet. Compressing data
// is what the VORACLE attack needs, so obvpn never compresses what it
// sends.
type Compression string

const (
	// CompressionMigrate runs "compress migrate" (OpenVPN 2.6): the
	// server itself neither compresses nor frames, so clients without
	// compression talk to it as to any server, and a client that
	// announces compression in its options string (comp-lzo, compress) is
	// pushed "comp-lzo no" or "compress stub-v2": framing without
	// compression, in both directions. Nothing is ever compressed. The
	// default: it serves balenaOS's comp-lzo clients and modern ones
	// alike.
	CompressionMigrate Compression = "migrate"

	// CompressionLZO runs "compress lzo" with "allow-compression asym",
	// the reference server's framing: the server decompresses what a
	// client compressed but compresses nothing it sends. Only clients
	// configured for LZO (comp-lzo, compress lzo) pass data; use it for
	// servers older than OpenVPN 2.6, which lack migrate.
	CompressionLZO Compression = "lzo"

	// CompressionOff sets no compression at all: only clients without
	// compression pass data.
	CompressionOff Compression = "off"
)

// Isolation is how an instance keeps its devices apart.
type Isolation string

const (
	// IsolationOn refuses every packet that arrives on the instance's
	// tun device and is not for this host, with a policy-routing rule
	// ("ip rule add priority 10 iif tun<id> prohibit") added before
	// openvpn starts and deleted when the instance stops: a device reaches
	// this host (its proxy, its operators' tools) and nothing beyond it,
	// not even another device, however the host forwards. It touches
	// nothing but obvpn's own tun devices, and no write of
	// net.ipv4.ip_forward undoes it. The reference sets the whole host's
	// FORWARD policy to DROP instead. The default.
	IsolationOn Isolation = "on"

	// IsolationOff leaves forwarding as the host has it, for operators who
	// route to or between devices on purpose.
	IsolationOff Isolation = "off"
)

// DefaultDataCiphers is the default of [OpenVPNConfig.DataCiphers].
const DefaultDataCiphers = "AES-128-GCM:AES-192-GCM:AES-256-GCM:AES-128-CBC:AES-192-CBC:AES-256-CBC"

// AuthMode says how OpenVPN asks who may connect.
type AuthMode string

const (
	// AuthManagement answers every CLIENT:CONNECT and CLIENT:REAUTH on the
	// management interface (--management-client-auth). The default.
	AuthManagement AuthMode = "management"
	// AuthScript has OpenVPN run the vpn-auth and vpn-client-event commands,
	// which call the internal API.
	AuthScript AuthMode = "script"
)

// AuthConfig is how devices are authenticated against the balena API.
type AuthConfig struct {
	// Mode is VPN_AUTH_MODE. Empty means [AuthManagement].
	Mode AuthMode

	// CacheTimeout is how long an allow or deny answer of the balena API
	// is reused for the same device and key (VPN_AUTH_CACHE_TIMEOUT, in
	// milliseconds). Zero turns the cache off.
	CacheTimeout time.Duration

	// MaxWorkers bounds the authentication requests in flight
	// (MAX_API_POST_WORKERS). Zero means 20.
	MaxWorkers int

	// DelayOnFail is how long a denied device waits for its answer
	// (DELAY_ON_AUTH_FAIL, in milliseconds), without holding up others.
	// Zero answers at once.
	DelayOnFail time.Duration
}

// BalenaConfig is how to reach the balena API.
type BalenaConfig struct {
	// APIHost is the public API host, with an optional port
	// (BALENA_API_HOST); it is reached over HTTPS.
	APIHost string
	// APIInternalHost, if set, is used instead of APIHost and reached over
	// plain HTTP (BALENA_API_INTERNAL_HOST).
	APIInternalHost string
	// ServiceAPIKey is the VPN service's own API key (VPN_SERVICE_API_KEY).
	ServiceAPIKey string
	// GuestAPIKey, if set, authorises proxy requests that carry no key
	// (VPN_GUEST_API_KEY).
	GuestAPIKey string
	// StateBatchSize bounds the UUIDs in one state report
	// (API_DEVICE_STATE_POST_BATCH_SIZE). Zero means 8000.
	StateBatchSize int
	// RegisterInterface names the network interface whose first IPv4
	// address is registered with the service instance
	// (VPN_SERVICE_REGISTER_INTERFACE). Empty registers no address.
	RegisterInterface string
	// RootCA is PEM data of certificates that are trusted for the API's
	// TLS certificate besides the system's roots (ROOT_CA, base64-encoded
	// PEM, as the reference container takes it). Nil trusts the system's
	// roots only.
	RootCA []byte
}

// RootCAs returns the roots to trust for the API's TLS certificate: nil
// (the system's) without RootCA, else the system's roots and RootCA's
// certificates.
func (c BalenaConfig) RootCAs() (*x509.CertPool, error) {
	if len(c.RootCA) == 0 {
		return nil, nil
	}
	pool, err := x509.SystemCertPool()
	if err != nil {
		pool = x509.NewCertPool()
	}
	if !pool.AppendCertsFromPEM(c.RootCA) {
		return nil, errors.New("vpn: ROOT_CA holds no PEM certificate")
	}
	return pool, nil
}

// BaseURL returns the API's base URL, without a trailing slash:
// http://<APIInternalHost> if that is set, else https://<APIHost>.
func (c BalenaConfig) BaseURL() string {
	if c.APIInternalHost != "" {
		return "http://" + c.APIInternalHost
	}
	return "https://" + c.APIHost
}

// LogValue implements slog.LogValuer: the keys are only said to be set.
func (c BalenaConfig) LogValue() slog.Value {
	return slog.GroupValue(
		slog.String("base_url", c.BaseURL()),
		slog.Bool("service_key_set", c.ServiceAPIKey != ""),
		slog.Bool("guest_key_set", c.GuestAPIKey != ""),
		slog.Int("state_batch_size", c.StateBatchSize),
		slog.String("register_interface", c.RegisterInterface),
		slog.Bool("root_ca_set", len(c.RootCA) > 0),
	)
}

// ProxyConfig is the CONNECT proxy's.
type ProxyConfig struct {
	// Port is where the CONNECT proxy listens (VPN_CONNECT_PROXY_PORT).
	// Zero runs no proxy.
	Port int
	// ForwardPort is the port of the peers' proxies, to which requests for
	// devices held by another VPN server are forwarded
	// (VPN_FORWARD_PROXY_PORT). [LoadConfig] defaults it to Port; zero
	// means Port.
	ForwardPort int
	// IdleTimeout closes a tunnel in which no byte moved either way for
	// that long (VPN_CONNECT_PROXY_IDLE_TIMEOUT, in seconds; see
	// connectproxy.Handler.IdleTimeout). Zero never closes an idle
	// tunnel, as the reference proxy.
	IdleTimeout time.Duration
	// MaxTunnels bounds the tunnels open at once, those being set up
	// included (VPN_CONNECT_PROXY_MAX_TUNNELS): a CONNECT takes its place
	// before it asks the balena API anything, so that a flood of requests
	// cannot fan out to the API without bound, and more are answered 503.
	// [LoadConfig] defaults it to [DefaultMaxTunnels]; zero means no
	// bound.
	MaxTunnels int
}

// DefaultMaxTunnels is the default of VPN_CONNECT_PROXY_MAX_TUNNELS: as
// many tunnels as HAProxy's default connection limit lets devices in.
const DefaultMaxTunnels = 10000

// BandwidthConfig is the per-device rate limit. The zero value limits
// nothing; otherwise both rates are set.
type BandwidthConfig struct {
	// Down is the rate towards each device (VPN_DOWNRATE).
	Down bandwidth.Rate
	// Up is the rate from each device (VPN_UPRATE).
	Up bandwidth.Rate
}

// MetricsConfig is where Prometheus metrics are served.
type MetricsConfig struct {
	// Addr is the listen address of /cluster_metrics, /metrics and /ping
	// (VPN_METRICS_ADDR). Empty means [DefaultMetricsAddr], ":8080";
	// [MetricsOff], "off", serves no metrics.
	Addr string
	// Timeout bounds the gathering of one scrape (METRICS_TIMEOUT, in
	// milliseconds). Zero means [DefaultMetricsTimeout], the reference's.
	Timeout time.Duration
	// Token, if set, guards the metrics (MONITOR_SECRET_TOKEN): a caller
	// must send HTTP Basic credentials "monitor:<Token>" for everything
	// but /ping, on this listener and on the managed HAProxy's monitor
	// frontend, else it is answered 401. It is compared in constant time
	// and never logged. Empty serves the metrics to anyone.
	Token string
	// MaxConns bounds the connections that the metrics listener holds
	// open at once; more wait to be accepted. Zero means 64.
	MaxConns int
}

// DefaultMetricsTimeout is the default of [MetricsConfig.Timeout]: 20 s,
// the reference's METRICS_TIMEOUT.
const DefaultMetricsTimeout = 20 * time.Second

// DrainConfig is how the server lets its devices go on SIGTERM or SIGINT.
type DrainConfig struct {
	// MinRatePerMinute is the least number of clients killed per minute
	// (MINIMUM_DRAIN_RATE_PER_MINUTE). Zero means 500.
	MinRatePerMinute int
	// Timeout bounds the whole drain (DEFAULT_SIGTERM_TIMEOUT, in seconds).
	// Zero means 120 s.
	Timeout time.Duration
}

// ConnectProxyConfig is what the CONNECT proxy needs when it runs alone
// (cmd/connect-proxy).
type ConnectProxyConfig struct {
	Balena BalenaConfig
	Proxy  ProxyConfig
	// ServiceID is this VPN server's service instance id (VPN_SERVICE_ID),
	// used to recognise requests for devices held here and in the
	// Forwarded signature. Zero means unknown.
	ServiceID int64
	// StatusFileWriteInterval is how often OpenVPN rewrites its status
	// files (VPN_STATUS_FILE_WRITE_INTERVAL_SECONDS); the proxy waits that
	// long before it looks for a device once more. Zero means 10 s.
	StatusFileWriteInterval time.Duration
	// StatusGlob matches the OpenVPN status files to resolve devices from:
	// NSS_OPENVPN_STATUS_GLOB, else <VPN_RUN_DIR>/server-*.status.
	StatusGlob string
	// Verbose turns on verbose logs (VPN_VERBOSE_LOGS/DEFAULT_VERBOSE_LOGS).
	Verbose bool
	// Sentry is where the proxy's errors are reported.
	Sentry SentryConfig
}

// SentryConfig is where errors are reported. Package vpn only carries it:
// the commands report the log records that carry a [FingerprintKey]
// attribute (cmd/internal/sentrysetup).
type SentryConfig struct {
	// DSN is the Sentry project's DSN (SENTRY_DSN, as the reference
	// reads it, else VPN_SENTRY_DSN). It holds the project's key and is
	// never logged. Empty reports nothing.
	DSN string
	// Environment names the deployment in the events: "production" with
	// PRODUCTION_MODE=true, else "development".
	Environment string
}

// LogValue implements slog.LogValuer: the DSN is only said to be set.
func (c SentryConfig) LogValue() slog.Value {
	return slog.GroupValue(slog.Bool("dsn_set", c.DSN != ""), slog.String("environment", c.Environment))
}
