package vpn

import (
	"crypto/x509"
	"encoding/asn1"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"net/netip"
	"net/url"
	"os"
	"os/user"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	env "github.com/caarlos0/env/v10"

	"github.com/obvpn/obvpn/subnet"
	"github.com/obvpn/obvpn/vpn/bandwidth"
	"github.com/obvpn/obvpn/vpn/haproxy"
	"github.com/obvpn/obvpn/vpn/internalapi"
)

// ErrMissing reports a required variable that is not set.
var ErrMissing = errors.New("required, not set")

// ConfigError reports a missing or malformed configuration variable. Its
// message is one line that names the variable, its value (unless the
// variable holds a secret) and what is wrong, such as
//
//	VPN_BASE_PORT="ten": not an integer
type ConfigError struct {
	Var   string // the variable, such as "VPN_BASE_PORT"
	Value string // its value; empty for secrets and unset variables
	Err   error  // what is wrong
}

func (e *ConfigError) Error() string {
	if e.Value == "" {
		return e.Var + ": " + e.Err.Error()
	}
	return fmt.Sprintf("%s=%q: %v", e.Var, e.Value, e.Err)
}

func (e *ConfigError) Unwrap() error { return e.Err }

// DefaultCPURequestFile is where Kubernetes' downward API puts the pod's CPU
// request, read for the instance count when VPN_INSTANCE_COUNT is unset.
const DefaultCPURequestFile = "/etc/podinfo/cpu_request"

// Loader maps environment variables onto a [Config]. The zero Loader reads
// the process environment, /etc/podinfo/cpu_request and the CPU count.
type Loader struct {
	// Env holds the variables. Nil means the process environment.
	Env map[string]string

	// CPURequestFile is read for the instance count when
	// VPN_INSTANCE_COUNT is unset or 0. Empty means
	// [DefaultCPURequestFile].
	CPURequestFile string

	// NumCPU returns the instance count when neither VPN_INSTANCE_COUNT
	// nor the CPU request file gives one. Nil means runtime.NumCPU.
	NumCPU func() int

	// Logger receives the warnings of loading: a variable set under two
	// names to different values (which one was taken), and the variables
	// of the reference container that obvpn does not use. Nil means
	// discard.
	Logger *slog.Logger
}

func (l Loader) logger() *slog.Logger {
	if l.Logger != nil {
		return l.Logger
	}
	return slog.New(slog.DiscardHandler)
}

// LoadConfig loads the server's configuration from the process environment
// with the zero [Loader].
func LoadConfig() (*Config, error) { return Loader{}.Config() }

// Variables returns the name of every environment variable that a
// [Loader] reads, the old names included, in sorted order: for tools that
// check deployment files and documentation against the code.
func Variables() []string {
	params, err := env.GetFieldParamsWithOptions(&environment{}, env.Options{Environment: map[string]string{}})
	if err != nil {
		panic(err) // the struct's tags are fixed at compile time
	}
	names := make([]string, len(params))
	for i, p := range params {
		names[i] = p.Key
	}
	slices.Sort(names)
	return slices.Compact(names)
}

// LoadConnectProxyConfig loads the configuration of the CONNECT proxy when
// it runs alone, from the process environment with the zero [Loader].
func LoadConnectProxyConfig() (*ConnectProxyConfig, error) {
	return Loader{}.ConnectProxyConfig()
}

// LoadPlan loads only the address and port plan from the process
// environment with the zero [Loader].
func LoadPlan() (subnet.Plan, error) { return Loader{}.Plan() }

// environment is every variable that obvpn reads, as strings: the env
// package maps them and applies the defaults, and the parse methods below
// turn them into typed values with errors that name the variable. Where two
// names are given, the first is the new one and the second the old.
type environment struct {
	BaseSubnet    string `env:"VPN_BASE_SUBNET"`
	InstanceBits  string `env:"VPN_INSTANCE_SUBNET_BITMASK"`
	Gateway       string `env:"VPN_GATEWAY"`
	GatewayOld    string `env:"BALENA_VPN_GATEWAY"`
	BasePort      string `env:"VPN_BASE_PORT" envDefault:"10000"`
	MgmtPort      string `env:"VPN_BASE_MANAGEMENT_PORT" envDefault:"20000"`
	APIPort       string `env:"VPN_API_PORT"`
	APIBasePort   string `env:"VPN_API_BASE_PORT"`
	InstanceCount string `env:"VPN_INSTANCE_COUNT"`
	Production    string `env:"PRODUCTION_MODE"`

	Proto             string `env:"VPN_OPENVPN_PROTO" envDefault:"tcp4-server"`
	StatusInterval    string `env:"VPN_STATUS_FILE_WRITE_INTERVAL_SECONDS" envDefault:"10"`
	KeepaliveFreq     string `env:"VPN_KEEPALIVE_FREQUENCY" envDefault:"10"`
	KeepaliveTimeout  string `env:"VPN_KEEPALIVE_TIMEOUT" envDefault:"60"`
	DataCiphers       string `env:"VPN_DATA_CIPHERS" envDefault:"AES-128-GCM:AES-192-GCM:AES-256-GCM:AES-128-CBC:AES-192-CBC:AES-256-CBC"`
	BytecountInterval string `env:"VPN_BYTECOUNT_INTERVAL" envDefault:"60"`
	CACert            string `env:"VPN_OPENVPN_CA_CRT"`
	CACertFile        string `env:"VPN_OPENVPN_CA_CRT_FILE"`
	ServerCert        string `env:"VPN_OPENVPN_SERVER_CRT"`
	ServerCertFile    string `env:"VPN_OPENVPN_SERVER_CRT_FILE"`
	ServerKey         string `env:"VPN_OPENVPN_SERVER_KEY"`
	ServerKeyFile     string `env:"VPN_OPENVPN_SERVER_KEY_FILE"`
	DH                string `env:"VPN_OPENVPN_SERVER_DH"`
	DHFile            string `env:"VPN_OPENVPN_SERVER_DH_FILE"`
	Compression       string `env:"VPN_COMPRESSION" envDefault:"migrate"`
	OpenVPNUser       string `env:"VPN_OPENVPN_USER" envDefault:"nobody"`
	OpenVPNGroup      string `env:"VPN_OPENVPN_GROUP" envDefault:"nogroup"`
	Providers         string `env:"VPN_OPENSSL_PROVIDERS"`
	ExitNotify        string `env:"VPN_UDP_SERVER_EXPLICIT_EXIT_NOTIFY" envDefault:"0"`
	Isolation         string `env:"VPN_DEVICE_ISOLATION" envDefault:"on"`

	AuthMode         string `env:"VPN_AUTH_MODE" envDefault:"management"`
	AuthCacheTimeout string `env:"VPN_AUTH_CACHE_TIMEOUT" envDefault:"60000"`
	MaxAPIWorkers    string `env:"MAX_API_POST_WORKERS" envDefault:"80"`
	DelayOnAuthFail  string `env:"DELAY_ON_AUTH_FAIL" envDefault:"10000"`

	APIHost           string `env:"BALENA_API_HOST"`
	APIHostC          string `env:"API_HOST"` // the reference container's name
	APIInternalHost   string `env:"BALENA_API_INTERNAL_HOST"`
	APIInternalHostC  string `env:"API_INTERNAL_HOST"` // the reference container's name
	RootCA            string `env:"ROOT_CA"`
	ServiceAPIKey     string `env:"VPN_SERVICE_API_KEY"`
	GuestAPIKey       string `env:"VPN_GUEST_API_KEY"`
	StateBatchSize    string `env:"API_DEVICE_STATE_POST_BATCH_SIZE" envDefault:"8000"`
	RegisterInterface string `env:"VPN_SERVICE_REGISTER_INTERFACE"`
	ServiceID         string `env:"VPN_SERVICE_ID" envDefault:"0"`

	ProxyPort   string `env:"VPN_CONNECT_PROXY_PORT" envDefault:"0"`
	ForwardPort string `env:"VPN_FORWARD_PROXY_PORT"`
	ProxyIdle   string `env:"VPN_CONNECT_PROXY_IDLE_TIMEOUT" envDefault:"0"`
	ProxyMax    string `env:"VPN_CONNECT_PROXY_MAX_TUNNELS" envDefault:"10000"`
	StatusGlob  string `env:"NSS_OPENVPN_STATUS_GLOB"`
	NSSIndex    string `env:"VPN_NSS_INDEX"`
	PIDFile     string `env:"VPN_PID_FILE"`
	Upgrade     string `env:"VPN_UPGRADE_TIMEOUT" envDefault:"60"`
	NSSIndexOld string `env:"NSS_OPENVPN_INDEX"`

	HAProxy         string `env:"VPN_HAPROXY" envDefault:"managed"`
	VPNPort         string `env:"VPN_PORT" envDefault:"443"`
	HAProxySocket   string `env:"VPN_HAPROXY_SOCKET" envDefault:"/run/haproxy.sock"`
	HAProxyUseProxy string `env:"VPN_HAPROXY_USEPROXYPROTOCOL" envDefault:"false"`
	HAProxyMonitor  string `env:"VPN_HAPROXY_MONITOR_ADDR" envDefault:":80"`
	HAProxyMaxConn  string `env:"VPN_HAPROXY_MAXCONN" envDefault:"10000"`
	HAProxyULimit   string `env:"VPN_HAPROXY_ULIMIT"`
	HAProxyTimeout  string `env:"VPN_HAPROXY_TIMEOUT"`
	HAProxyThreads  string `env:"HAPROXY_NBTHREAD" envDefault:"2"`
	HAProxyCPUMap   string `env:"HAPROXY_CPU_MAP" envDefault:"auto:1/1-2 0-1"`
	NodeExporter    string `env:"VPN_NODE_EXPORTER_ADDR"`
	ProcessExporter string `env:"VPN_PROCESS_EXPORTER_ADDR"`
	MonitorToken    string `env:"MONITOR_SECRET_TOKEN"`
	DownRate        string `env:"VPN_DOWNRATE"`
	UpRate          string `env:"VPN_UPRATE"`
	MetricsAddr     string `env:"VPN_METRICS_ADDR" envDefault:":8080"`
	MetricsTimeout  string `env:"METRICS_TIMEOUT" envDefault:"20000"`
	DrainRate       string `env:"MINIMUM_DRAIN_RATE_PER_MINUTE" envDefault:"500"`
	SigtermTimeout  string `env:"DEFAULT_SIGTERM_TIMEOUT" envDefault:"120"`
	RunDir          string `env:"VPN_RUN_DIR" envDefault:"/run/openvpn"`
	Verbose         string `env:"VPN_VERBOSE_LOGS"`
	VerboseOld      string `env:"DEFAULT_VERBOSE_LOGS"`
	TrustProxy      string `env:"TRUST_PROXY" envDefault:"false"`
	SentryDSN       string `env:"SENTRY_DSN"`
	SentryDSNVPN    string `env:"VPN_SENTRY_DSN"`
}

// defaultAPIBasePort is the internal API's base port when neither
// VPN_API_PORT nor VPN_API_BASE_PORT is set.
const defaultAPIBasePort = 30000

// load maps the variables onto an environment with the env package, which
// applies the defaults; an empty variable counts as unset.
func (l Loader) load() (*environment, error) {
	var e environment
	if err := env.ParseWithOptions(&e, env.Options{Environment: l.vars()}); err != nil {
		// Only string fields without required or file options: the env
		// package has nothing to reject.
		return nil, fmt.Errorf("vpn: mapping the environment: %w", err)
	}
	return &e, nil
}

// vars returns the variables: Env, or the process environment.
func (l Loader) vars() map[string]string {
	if l.Env != nil {
		return l.Env
	}
	vars := make(map[string]string)
	for _, kv := range os.Environ() {
		if k, v, ok := strings.Cut(kv, "="); ok {
			vars[k] = v
		}
	}
	return vars
}

// UnusedVariables are the variables that the reference container reads
// and obvpn does not, with the reason: [Loader.Config] names those that
// are set in one warning, so that none is silently ignored.
var UnusedVariables = map[string]string{
	"UV_THREADPOOL_SIZE":         "a Node.js setting; obvpn is not Node.js",
	"NODE_EXTRA_CA_CERTS":        "a Node.js setting; use ROOT_CA for the balena API's roots",
	"NODE_ENV":                   "a Node.js setting; PRODUCTION_MODE is read instead",
	"VPN_CONNECT_INSTANCE_COUNT": "obvpn runs one CONNECT proxy, on every CPU",
	"VPN_HOST":                   "the reference's own loopback address; obvpn's internal API is on 127.0.0.1",
	"IPTABLES_FORWARD_POLICY":    "obvpn isolates devices per tun device instead (VPN_DEVICE_ISOLATION)",
	"MINIMUM_DRAIN_RATE":         "the reference's template writes it but its server reads MINIMUM_DRAIN_RATE_PER_MINUTE",
	"LEARN_ADDRESS_DEBUG":        "the reference's learn-address script; obvpn limits bandwidth itself (VPN_DOWNRATE, VPN_UPRATE)",
	"LEARN_ADDRESS_LOG_DIR":      "the reference's learn-address script; obvpn keeps no tc state on disk",
	"LEARN_ADDRESS_STATE_DIR":    "the reference's learn-address script; obvpn keeps no tc state on disk",
	"NPROC":                      "the reference's CPU count; obvpn counts the CPUs itself",
}

// warnUnused names, in one warning, the variables of the reference
// container that are set and that obvpn does not use.
func (l Loader) warnUnused() {
	vars := l.vars()
	var set []string
	for name := range UnusedVariables {
		if vars[name] != "" {
			set = append(set, name)
		}
	}
	if len(set) == 0 {
		return
	}
	slices.Sort(set)
	reasons := make([]string, len(set))
	for i, name := range set {
		reasons[i] = name + ": " + UnusedVariables[name]
	}
	l.logger().Warn("variables of the reference container that obvpn does not use are set; they change nothing",
		"variables", strings.Join(set, ","), "why", strings.Join(reasons, "; "))
}

// Config loads and validates the server's configuration: every variable,
// with the address plan, the balena API host and service key, and the
// server's certificate and key required.
func (l Loader) Config() (*Config, error) {
	e, err := l.load()
	if err != nil {
		return nil, err
	}
	l.warnUnused()
	p := parser{log: l.logger()}
	c := &Config{}
	c.Production = p.production(e)
	c.Plan = p.plan(e, l)
	c.OpenVPN = p.openvpn(e, c.Plan)
	c.Auth = p.auth(e)
	c.Balena = p.balena(e)
	c.Proxy = p.proxy(e)
	c.HAProxy = p.haproxy(e, c.OpenVPN)
	c.Bandwidth = p.bandwidth(e)
	c.Metrics = MetricsConfig{
		Addr:    p.metricsAddr("VPN_METRICS_ADDR", e.MetricsAddr),
		Timeout: p.duration("METRICS_TIMEOUT", e.MetricsTimeout, time.Millisecond, 1),
		Token:   p.token("MONITOR_SECRET_TOKEN", e.MonitorToken),
	}
	c.Drain = DrainConfig{
		MinRatePerMinute: p.int("MINIMUM_DRAIN_RATE_PER_MINUTE", e.DrainRate, 1, 1<<31-1),
		Timeout:          p.duration("DEFAULT_SIGTERM_TIMEOUT", e.SigtermTimeout, time.Second, 1),
	}
	c.RunDir = p.absPath("VPN_RUN_DIR", e.RunDir)
	switch {
	case e.NSSIndex == "off":
		c.NSSIndex = "off"
	case e.NSSIndex != "":
		c.NSSIndex = p.absPath("VPN_NSS_INDEX", e.NSSIndex)
	case e.NSSIndexOld != "":
		c.NSSIndex = p.absPath("NSS_OPENVPN_INDEX", e.NSSIndexOld)
	}
	if e.PIDFile != "" {
		c.PIDFile = p.absPath("VPN_PID_FILE", e.PIDFile)
	}
	c.UpgradeTimeout = p.duration("VPN_UPGRADE_TIMEOUT", e.Upgrade, time.Second, 1)
	c.Verbose = p.verbose(e)
	c.TrustProxy = p.trustProxy("TRUST_PROXY", e.TrustProxy)
	c.Sentry = p.sentry(e)
	p.portClash(e, c)
	if p.err != nil {
		return nil, p.err
	}
	return c, nil
}

func (p *parser) haproxy(e *environment, ovpn OpenVPNConfig) haproxy.Config {
	c := haproxy.Config{
		Mode:             haproxy.Mode(p.oneOf("VPN_HAPROXY", e.HAProxy, string(haproxy.Managed), string(haproxy.External), string(haproxy.Off))),
		Port:             p.port("VPN_PORT", e.VPNPort, 1),
		Socket:           p.absPath("VPN_HAPROXY_SOCKET", e.HAProxySocket),
		UseProxyProtocol: p.bool("VPN_HAPROXY_USEPROXYPROTOCOL", e.HAProxyUseProxy),
		MonitorAddr:      p.listenAddr("VPN_HAPROXY_MONITOR_ADDR", e.HAProxyMonitor),
		MaxConn:          p.int("VPN_HAPROXY_MAXCONN", e.HAProxyMaxConn, 1, 1<<24),
		FileLimit:        p.int("VPN_HAPROXY_ULIMIT", e.HAProxyULimit, 64, 1<<30),
		Timeout:          ovpn.KeepaliveTimeout,
		Threads:          p.int("HAPROXY_NBTHREAD", e.HAProxyThreads, 1, 4096),
		CPUMap:           strings.TrimSpace(e.HAProxyCPUMap),
		NodeExporter:     p.hostPort("VPN_NODE_EXPORTER_ADDR", e.NodeExporter),
		ProcessExporter:  p.hostPort("VPN_PROCESS_EXPORTER_ADDR", e.ProcessExporter),
	}
	if e.HAProxyTimeout != "" {
		c.Timeout = p.duration("VPN_HAPROXY_TIMEOUT", e.HAProxyTimeout, time.Second, 1)
	}
	if strings.ContainsAny(c.CPUMap, "\t\r\n\"'\\#") {
		p.fail("HAPROXY_CPU_MAP", e.HAProxyCPUMap, errors.New("want HAProxy's cpu-map arguments, such as \"auto:1/1-2 0-1\", or none"))
	}
	return c
}

// production is PRODUCTION_MODE; unset is false.
func (p *parser) production(e *environment) bool {
	if e.Production == "" {
		return false
	}
	return p.bool("PRODUCTION_MODE", e.Production)
}

// token checks the monitoring token, which goes into HAProxy's
// configuration in single quotes. Its value is a secret and is not
// repeated in errors.
func (p *parser) token(name, value string) string {
	if strings.ContainsFunc(value, func(r rune) bool { return r < ' ' || r == 0x7f || r == '\'' }) {
		p.fail(name, "", errors.New("contains control characters or a single quote"))
		return ""
	}
	return value
}

// hostPort checks an optional host:port address to connect to.
func (p *parser) hostPort(name, value string) string {
	if value == "" || p.err != nil {
		return ""
	}
	h, port, err := net.SplitHostPort(value)
	if err != nil || h == "" || strings.ContainsAny(h, " \t\r\n\"'#") {
		p.fail(name, value, errors.New("want host:port"))
		return ""
	}
	p.portIn(name, value, port, 1)
	return value
}

// portRange is the ports that one variable gives to the instances or to a
// listener of the server, lo…hi.
type portRange struct {
	name, value string
	lo, hi      int
}

// portClash reports two listeners of the server that would share a port:
// the instances' OpenVPN, management and internal API ports, HAProxy's
// frontend, the CONNECT proxy and the metrics server.
func (p *parser) portClash(e *environment, c *Config) {
	if p.err != nil {
		return
	}
	n := c.Plan.Instances
	ports := c.Plan.Ports
	ranges := []portRange{
		{"VPN_BASE_PORT", e.BasePort, ports.VPN + 1, ports.VPN + n},
		{"VPN_BASE_MANAGEMENT_PORT", e.MgmtPort, ports.Management + 1, ports.Management + n},
	}
	switch {
	case ports.SharedAPI:
		ranges = append(ranges, portRange{"VPN_API_PORT", e.APIPort, ports.API, ports.API})
	case e.APIBasePort != "":
		ranges = append(ranges, portRange{"VPN_API_BASE_PORT", e.APIBasePort, ports.API + 1, ports.API + n})
	default:
		ranges = append(ranges, portRange{"VPN_API_BASE_PORT", "", ports.API + 1, ports.API + n})
	}
	if c.HAProxy.Mode != haproxy.Off {
		ranges = append(ranges, portRange{"VPN_PORT", e.VPNPort, c.HAProxy.Port, c.HAProxy.Port})
	}
	if c.HAProxy.Mode == haproxy.Managed {
		if _, port, err := net.SplitHostPort(c.HAProxy.MonitorAddr); err == nil && port != "0" {
			n, _ := strconv.Atoi(port)
			ranges = append(ranges, portRange{"VPN_HAPROXY_MONITOR_ADDR", e.HAProxyMonitor, n, n})
		}
	}
	if c.Proxy.Port != 0 {
		ranges = append(ranges, portRange{"VPN_CONNECT_PROXY_PORT", e.ProxyPort, c.Proxy.Port, c.Proxy.Port})
	}
	if _, port, err := net.SplitHostPort(c.Metrics.Addr); err == nil && port != "0" {
		n, _ := strconv.Atoi(port)
		ranges = append(ranges, portRange{"VPN_METRICS_ADDR", e.MetricsAddr, n, n})
	}
	for i, a := range ranges {
		for _, b := range ranges[:i] {
			if a.lo <= b.hi && b.lo <= a.hi {
				verb := "overlap"
				if a.lo == a.hi {
					verb = "overlaps"
				}
				p.fail(a.name, a.value, fmt.Errorf("%s %s %s's %s", spanString(a.lo, a.hi), verb, b.name, spanString(b.lo, b.hi)))
				return
			}
		}
	}
}

func spanString(lo, hi int) string {
	if lo == hi {
		return "port " + strconv.Itoa(lo)
	}
	return fmt.Sprintf("ports %d…%d", lo, hi)
}

// ConnectProxyConfig loads and validates what the CONNECT proxy needs when
// it runs alone: the balena API host and service key, and a proxy port are
// required.
func (l Loader) ConnectProxyConfig() (*ConnectProxyConfig, error) {
	e, err := l.load()
	if err != nil {
		return nil, err
	}
	p := parser{log: l.logger()}
	c := &ConnectProxyConfig{
		Balena:                  p.balena(e),
		Proxy:                   p.proxy(e),
		ServiceID:               int64(p.int("VPN_SERVICE_ID", e.ServiceID, 0, 1<<53)),
		StatusFileWriteInterval: p.duration("VPN_STATUS_FILE_WRITE_INTERVAL_SECONDS", e.StatusInterval, time.Second, 1),
		Verbose:                 p.verbose(e),
		Sentry:                  p.sentry(e),
	}
	c.StatusGlob = p.statusGlob(e)
	if p.err == nil && c.Proxy.Port == 0 {
		p.fail("VPN_CONNECT_PROXY_PORT", "", ErrMissing)
	}
	if p.err != nil {
		return nil, p.err
	}
	return c, nil
}

// StatusGlob returns the glob of the OpenVPN status files to resolve
// devices from: NSS_OPENVPN_STATUS_GLOB, else <VPN_RUN_DIR>/server-*.status.
func (l Loader) StatusGlob() (string, error) {
	e, err := l.load()
	if err != nil {
		return "", err
	}
	var p parser
	g := p.statusGlob(e)
	return g, p.err
}

func (p *parser) statusGlob(e *environment) string {
	if e.StatusGlob == "" {
		return filepath.Join(p.absPath("VPN_RUN_DIR", e.RunDir), "server-*.status")
	}
	if _, err := filepath.Match(e.StatusGlob, ""); err != nil {
		p.fail("NSS_OPENVPN_STATUS_GLOB", e.StatusGlob, fmt.Errorf("not a glob pattern: %w", err))
	}
	return e.StatusGlob
}

// Plan loads and validates only the address and port plan:
// VPN_BASE_SUBNET is required, and VPN_OPENVPN_PROTO is checked against the
// instance count.
func (l Loader) Plan() (subnet.Plan, error) {
	e, err := l.load()
	if err != nil {
		return subnet.Plan{}, err
	}
	var p parser
	plan := p.plan(e, l)
	p.proto(e, plan)
	if p.err != nil {
		return subnet.Plan{}, p.err
	}
	return plan, nil
}

// parser turns variables into typed values. It keeps the first error only:
// after it, every method returns zero values, and the caller returns that
// error, so that start-up fails with one line. Warnings go to log; nil
// discards them.
type parser struct {
	err error
	log *slog.Logger
}

func (p *parser) warn(msg string, args ...any) {
	if p.log != nil {
		p.log.Warn(msg, args...)
	}
}

func (p *parser) fail(name, value string, err error) {
	if p.err == nil {
		p.err = &ConfigError{Var: name, Value: value, Err: err}
	}
}

func (p *parser) plan(e *environment, l Loader) subnet.Plan {
	var plan subnet.Plan
	if e.BaseSubnet == "" {
		p.fail("VPN_BASE_SUBNET", "", ErrMissing)
		return plan
	}
	base, err := netip.ParsePrefix(e.BaseSubnet)
	if err == nil {
		err = subnet.CheckBase(base)
	}
	if err != nil {
		p.fail("VPN_BASE_SUBNET", e.BaseSubnet, err)
		return plan
	}
	plan.Base = base
	var countFrom string
	plan.Instances, countFrom = p.instanceCount(e, l)
	if p.err != nil {
		return plan
	}

	// The instance prefix length: given, or from the instance count; both
	// clamped to /16 as the reference system does.
	bitsVar, bitsVal := "VPN_INSTANCE_COUNT", e.InstanceCount
	if e.InstanceBits != "" {
		bitsVar, bitsVal = "VPN_INSTANCE_SUBNET_BITMASK", e.InstanceBits
		plan.Bits = subnet.ClampBits(p.int(bitsVar, bitsVal, 0, 32))
	} else {
		plan.Bits = subnet.DefaultBits(base, plan.Instances)
	}
	if p.err != nil {
		return plan
	}
	n, err := subnet.Count(base, plan.Bits)
	if err != nil {
		if e.InstanceBits == "" {
			err = fmt.Errorf("%d instances%s need /%d subnets of %s: %w", plan.Instances, countFrom, plan.Bits, base, err)
		}
		p.fail(bitsVar, bitsVal, err)
		return plan
	}
	if plan.Instances > n {
		p.fail("VPN_INSTANCE_COUNT", e.InstanceCount,
			fmt.Errorf("%d instances%s, but %s at /%d has room for %d", plan.Instances, countFrom, base, plan.Bits, n))
		return plan
	}

	if g := p.either("VPN_GATEWAY", e.Gateway, "BALENA_VPN_GATEWAY", e.GatewayOld); g.value != "" {
		a, err := netip.ParseAddr(g.value)
		if err == nil && !a.Is4() {
			err = subnet.ErrNotIPv4
		}
		if err != nil {
			p.fail(g.name, g.value, err)
			return plan
		}
		plan.Gateway = a
	}

	plan.Ports.VPN = p.basePort("VPN_BASE_PORT", e.BasePort, plan.Instances)
	plan.Ports.Management = p.basePort("VPN_BASE_MANAGEMENT_PORT", e.MgmtPort, plan.Instances)
	switch {
	case e.APIPort != "" && e.APIBasePort != "":
		p.fail("VPN_API_PORT", e.APIPort, fmt.Errorf("VPN_API_BASE_PORT=%q is set too: set one (VPN_API_PORT is one port for all instances, VPN_API_BASE_PORT a base counted up per instance)", e.APIBasePort))
	case e.APIPort != "":
		plan.Ports.API = p.port("VPN_API_PORT", e.APIPort, 1)
		plan.Ports.SharedAPI = true
	case e.APIBasePort != "":
		plan.Ports.API = p.basePort("VPN_API_BASE_PORT", e.APIBasePort, plan.Instances)
	default:
		plan.Ports.API = defaultAPIBasePort
	}
	if p.err == nil {
		// The checks above cover everything Validate checks; this is a
		// safety net for a plan this function got wrong.
		if err := plan.Validate(); err != nil {
			p.fail("VPN_BASE_SUBNET", e.BaseSubnet, err)
		}
	}
	return plan
}

// instanceCount is VPN_INSTANCE_COUNT, else the integer in the CPU request
// file, else the CPU count. It also says where the count came from, for
// errors: "" for the variable.
func (p *parser) instanceCount(e *environment, l Loader) (int, string) {
	if n := p.int("VPN_INSTANCE_COUNT", e.InstanceCount, 0, 1<<20); n > 0 || p.err != nil {
		return n, ""
	}
	if e.Production != "" && !p.production(e) {
		// The reference container runs one instance outside production.
		return 1, " (PRODUCTION_MODE=" + e.Production + ")"
	}
	file := l.CPURequestFile
	if file == "" {
		file = DefaultCPURequestFile
	}
	if b, err := os.ReadFile(file); err == nil {
		// The downward API writes a whole number of cores (rounded up) for
		// resource "requests.cpu" with divisor 1; anything else is ignored.
		if n, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && n > 0 {
			return n, " (from " + file + ")"
		}
	}
	if l.NumCPU != nil {
		return max(1, l.NumCPU()), " (the CPU count)"
	}
	return runtime.NumCPU(), " (the CPU count)"
}

// basePort parses a base port and checks that the last instance's port,
// base+instances, is still a port.
func (p *parser) basePort(name, value string, instances int) int {
	base := p.int(name, value, 0, subnet.MaxPort-1)
	if p.err == nil && base+instances > subnet.MaxPort {
		p.fail(name, value, fmt.Errorf("instance %d would use port %d, above %d", instances, base+instances, subnet.MaxPort))
	}
	return base
}

func (p *parser) proto(e *environment, plan subnet.Plan) string {
	proto := strings.ToLower(e.Proto)
	switch proto {
	case "tcp", "tcp4", "tcp6":
		proto += "-server"
	case "tcp-server", "tcp4-server", "tcp6-server":
	case "udp", "udp4", "udp6":
		if plan.Instances > 1 {
			p.fail("VPN_OPENVPN_PROTO", e.Proto, fmt.Errorf("a udp protocol allows one instance, and VPN_INSTANCE_COUNT gives %d", plan.Instances))
		}
	default:
		p.fail("VPN_OPENVPN_PROTO", e.Proto, errors.New("want tcp4-server, tcp6-server, tcp-server, udp4, udp6 or udp"))
	}
	return proto
}

func (p *parser) openvpn(e *environment, plan subnet.Plan) OpenVPNConfig {
	c := OpenVPNConfig{
		Proto:              p.proto(e, plan),
		StatusInterval:     p.duration("VPN_STATUS_FILE_WRITE_INTERVAL_SECONDS", e.StatusInterval, time.Second, 1),
		KeepaliveFrequency: p.duration("VPN_KEEPALIVE_FREQUENCY", e.KeepaliveFreq, time.Second, 1),
		KeepaliveTimeout:   p.duration("VPN_KEEPALIVE_TIMEOUT", e.KeepaliveTimeout, time.Second, 1),
		DataCiphers:        e.DataCiphers,
		BytecountInterval:  p.duration("VPN_BYTECOUNT_INTERVAL", e.BytecountInterval, time.Second, 0),
	}
	if strings.ContainsAny(c.DataCiphers, " \t\r\n\"'\\") {
		p.fail("VPN_DATA_CIPHERS", c.DataCiphers, errors.New("want cipher names separated by colons, without spaces or quotes"))
	}
	c.CACert = p.pem("VPN_OPENVPN_CA_CRT", e.CACert, e.CACertFile, "CERTIFICATE", true)
	c.ServerCert = p.pem("VPN_OPENVPN_SERVER_CRT", e.ServerCert, e.ServerCertFile, "CERTIFICATE", true)
	c.ServerKey = p.pem("VPN_OPENVPN_SERVER_KEY", e.ServerKey, e.ServerKeyFile, "PRIVATE KEY", true)
	c.DH = p.pem("VPN_OPENVPN_SERVER_DH", e.DH, e.DHFile, "PARAMETERS", false)
	if c.DH != nil {
		p.dhBits("VPN_OPENVPN_SERVER_DH", c.DH)
	}
	c.Compression = Compression(p.oneOf("VPN_COMPRESSION", e.Compression,
		string(CompressionMigrate), string(CompressionLZO), string(CompressionOff)))
	c.User = p.account("VPN_OPENVPN_USER", e.OpenVPNUser, func(name string) error { _, err := user.Lookup(name); return err })
	c.Group = p.account("VPN_OPENVPN_GROUP", e.OpenVPNGroup, func(name string) error { _, err := user.LookupGroup(name); return err })
	c.Providers = e.Providers
	if strings.ContainsAny(c.Providers, "\t\r\n\"'\\#;") {
		p.fail("VPN_OPENSSL_PROVIDERS", c.Providers, errors.New("want provider names separated by spaces"))
	}
	c.ExplicitExitNotify = p.int("VPN_UDP_SERVER_EXPLICIT_EXIT_NOTIFY", e.ExitNotify, 0, 2)
	c.Isolation = Isolation(p.oneOf("VPN_DEVICE_ISOLATION", e.Isolation, string(IsolationOn), string(IsolationOff)))
	return c
}

// account checks that the user or group name exists on this host, since
// OpenVPN would otherwise fail only once it has started.
func (p *parser) account(name, value string, lookup func(string) error) string {
	if strings.ContainsAny(value, " \t\r\n\"'\\#;") || value == "" {
		p.fail(name, value, errors.New("want a user or group name"))
		return value
	}
	if err := lookup(value); err != nil {
		p.fail(name, value, fmt.Errorf("not on this host: %w", err))
	}
	return value
}

func (p *parser) auth(e *environment) AuthConfig {
	return AuthConfig{
		Mode:         AuthMode(p.oneOf("VPN_AUTH_MODE", e.AuthMode, string(AuthManagement), string(AuthScript))),
		CacheTimeout: p.duration("VPN_AUTH_CACHE_TIMEOUT", e.AuthCacheTimeout, time.Millisecond, 0),
		MaxWorkers:   p.int("MAX_API_POST_WORKERS", e.MaxAPIWorkers, 1, 1<<16),
		DelayOnFail:  p.duration("DELAY_ON_AUTH_FAIL", e.DelayOnAuthFail, time.Millisecond, 0),
	}
}

func (p *parser) balena(e *environment) BalenaConfig {
	host := p.either("API_HOST", e.APIHostC, "BALENA_API_HOST", e.APIHost)
	internal := p.either("API_INTERNAL_HOST", e.APIInternalHostC, "BALENA_API_INTERNAL_HOST", e.APIInternalHost)
	c := BalenaConfig{
		APIHost:           p.host(host.name, host.value),
		APIInternalHost:   p.host(internal.name, internal.value),
		ServiceAPIKey:     e.ServiceAPIKey,
		GuestAPIKey:       e.GuestAPIKey,
		StateBatchSize:    p.int("API_DEVICE_STATE_POST_BATCH_SIZE", e.StateBatchSize, 1, 1<<20),
		RegisterInterface: e.RegisterInterface,
	}
	if c.APIHost == "" && c.APIInternalHost == "" {
		p.fail("BALENA_API_HOST", "", fmt.Errorf("%w (nor are API_HOST, BALENA_API_INTERNAL_HOST and API_INTERNAL_HOST)", ErrMissing))
	}
	if e.RootCA != "" {
		c.RootCA = p.pem("ROOT_CA", e.RootCA, "", "CERTIFICATE", false)
		if p.err == nil && !x509.NewCertPool().AppendCertsFromPEM(c.RootCA) {
			p.fail("ROOT_CA", "", errors.New("holds no certificate that parses"))
		}
	}
	if c.ServiceAPIKey == "" {
		p.fail("VPN_SERVICE_API_KEY", "", ErrMissing)
	}
	for _, k := range []struct{ name, value string }{{"VPN_SERVICE_API_KEY", c.ServiceAPIKey}, {"VPN_GUEST_API_KEY", c.GuestAPIKey}} {
		// Keys go into Authorization headers: refuse what would break one.
		// The value is a secret and is not repeated in the error.
		if strings.ContainsFunc(k.value, func(r rune) bool { return r <= ' ' || r == 0x7f }) {
			p.fail(k.name, "", errors.New("contains spaces or control characters"))
		}
	}
	return c
}

func (p *parser) proxy(e *environment) ProxyConfig {
	c := ProxyConfig{
		Port:        p.port("VPN_CONNECT_PROXY_PORT", e.ProxyPort, 0),
		IdleTimeout: p.duration("VPN_CONNECT_PROXY_IDLE_TIMEOUT", e.ProxyIdle, time.Second, 0),
		MaxTunnels:  p.int("VPN_CONNECT_PROXY_MAX_TUNNELS", e.ProxyMax, 0, 1<<24),
	}
	c.ForwardPort = c.Port
	if e.ForwardPort != "" {
		c.ForwardPort = p.port("VPN_FORWARD_PROXY_PORT", e.ForwardPort, 1)
	}
	return c
}

func (p *parser) bandwidth(e *environment) BandwidthConfig {
	var c BandwidthConfig
	switch {
	case e.DownRate == "" && e.UpRate == "":
		return c
	case e.DownRate == "":
		p.fail("VPN_DOWNRATE", "", fmt.Errorf("not set, but VPN_UPRATE=%q is: set both or neither", e.UpRate))
	case e.UpRate == "":
		p.fail("VPN_UPRATE", "", fmt.Errorf("not set, but VPN_DOWNRATE=%q is: set both or neither", e.DownRate))
	}
	c.Down = p.rate("VPN_DOWNRATE", e.DownRate)
	c.Up = p.rate("VPN_UPRATE", e.UpRate)
	if e.AuthMode == string(AuthScript) {
		// Limits follow the addresses OpenVPN announces on the management
		// interface (>CLIENT:ADDRESS), which it does only under
		// management-mode authentication.
		p.fail("VPN_DOWNRATE", e.DownRate, errors.New("bandwidth limits need VPN_AUTH_MODE=management, not script"))
	}
	return c
}

func (p *parser) verbose(e *environment) bool {
	v := p.either("VPN_VERBOSE_LOGS", e.Verbose, "DEFAULT_VERBOSE_LOGS", e.VerboseOld)
	if v.value == "" {
		return false
	}
	return p.bool(v.name, v.value)
}

// sentry reads SENTRY_DSN (the reference's name, taken when both are
// set) or VPN_SENTRY_DSN, and PRODUCTION_MODE for the environment. The
// DSN holds a key: it is checked for its shape only and never repeated
// in errors or warnings.
func (p *parser) sentry(e *environment) SentryConfig {
	c := SentryConfig{Environment: "development"}
	if p.production(e) {
		c.Environment = "production"
	}
	name, dsn := "SENTRY_DSN", e.SentryDSN
	switch {
	case dsn == "":
		name, dsn = "VPN_SENTRY_DSN", e.SentryDSNVPN
	case e.SentryDSNVPN != "" && e.SentryDSNVPN != dsn:
		p.warn("a variable is set under two names, to different values: taking SENTRY_DSN, as the reference container does",
			"taken", "SENTRY_DSN", "ignored", "VPN_SENTRY_DSN")
	}
	if dsn == "" {
		return c
	}
	u, err := url.Parse(dsn)
	switch {
	case err != nil:
		p.fail(name, "", errors.New("not a URL"))
	case u.Scheme != "http" && u.Scheme != "https":
		p.fail(name, "", errors.New("want an http or https URL"))
	case u.User.Username() == "" || u.Host == "":
		p.fail(name, "", errors.New("want https://<key>@<host>/<project id>"))
	case u.Path[strings.LastIndex(u.Path, "/")+1:] == "":
		p.fail(name, "", errors.New("names no project: want https://<key>@<host>/<project id>"))
	}
	c.DSN = dsn
	return c
}

// named is a variable's name with its value.
type named struct{ name, value string }

// either returns whichever of two names of a variable is set: first, the
// name the reference container reads, second the other. When both are set
// to different values, the first is taken, as the reference container
// takes it, and a warning names both.
func (p *parser) either(first, firstValue, second, secondValue string) named {
	switch {
	case firstValue != "" && secondValue != "" && firstValue != secondValue:
		p.warn("a variable is set under two names, to different values: taking "+first+", as the reference container does",
			"taken", first, "value", firstValue, "ignored", second, "ignored_value", secondValue)
	case firstValue == "" && secondValue != "":
		return named{second, secondValue}
	}
	return named{first, firstValue}
}

func (p *parser) int(name, value string, lo, hi int) int {
	if value == "" || p.err != nil {
		return 0
	}
	n, err := strconv.Atoi(strings.TrimSpace(value))
	switch {
	case err != nil:
		p.fail(name, value, errors.New("not an integer"))
	case n < lo || n > hi:
		p.fail(name, value, fmt.Errorf("out of range %d…%d", lo, hi))
	default:
		return n
	}
	return 0
}

func (p *parser) port(name, value string, lo int) int {
	return p.int(name, value, lo, subnet.MaxPort)
}

// duration parses a whole number of units, at least lo.
func (p *parser) duration(name, value string, unit time.Duration, lo int) time.Duration {
	return time.Duration(p.int(name, value, lo, int(time.Duration(1<<62)/unit))) * unit
}

func (p *parser) bool(name, value string) bool {
	if p.err != nil {
		return false
	}
	b, err := strconv.ParseBool(strings.TrimSpace(value))
	if err != nil {
		p.fail(name, value, errors.New("want true or false"))
	}
	return b
}

func (p *parser) oneOf(name, value string, allowed ...string) string {
	v := strings.ToLower(strings.TrimSpace(value))
	for _, a := range allowed {
		if v == a {
			return v
		}
	}
	p.fail(name, value, fmt.Errorf("want one of %s", strings.Join(allowed, ", ")))
	return ""
}

func (p *parser) rate(name, value string) bandwidth.Rate {
	if p.err != nil {
		return 0
	}
	r, err := bandwidth.ParseRate(strings.TrimSpace(value))
	if err != nil {
		p.fail(name, value, bandwidth.ErrRateSyntax)
	}
	return r
}

func (p *parser) absPath(name, value string) string {
	if p.err == nil && !filepath.IsAbs(value) {
		p.fail(name, value, errors.New("want an absolute path"))
	}
	return filepath.Clean(value)
}

// host checks an API host name with an optional port: no scheme, no path.
func (p *parser) host(name, value string) string {
	if value == "" || p.err != nil {
		return value
	}
	if strings.Contains(value, "://") {
		p.fail(name, value, errors.New("want a host name with an optional :port, without a scheme"))
		return ""
	}
	if strings.ContainsAny(value, "/?#@ \t\r\n") {
		p.fail(name, value, errors.New("want a host name with an optional :port, without a path"))
		return ""
	}
	if h, port, err := net.SplitHostPort(value); err == nil {
		if h == "" {
			p.fail(name, value, errors.New("no host name"))
		}
		p.portIn(name, value, port, 1)
	}
	return value
}

// metricsAddr is listenAddr, or [MetricsOff].
func (p *parser) metricsAddr(name, value string) string {
	if value == MetricsOff {
		return MetricsOff
	}
	return p.listenAddr(name, value)
}

func (p *parser) listenAddr(name, value string) string {
	if p.err != nil {
		return ""
	}
	_, port, err := net.SplitHostPort(value)
	if err != nil {
		p.fail(name, value, errors.New("want host:port or :port"))
		return ""
	}
	p.portIn(name, value, port, 0)
	return value
}

// portIn checks the port part of an address variable.
func (p *parser) portIn(name, value, port string, lo int) {
	if n, err := strconv.Atoi(port); err != nil || n < lo || n > subnet.MaxPort {
		p.fail(name, value, fmt.Errorf("port %q: want a number from %d to %d", port, lo, subnet.MaxPort))
	}
}

func (p *parser) trustProxy(name, value string) internalapi.TrustProxy {
	v := strings.TrimSpace(value)
	if v == "" || p.err != nil {
		return internalapi.TrustProxy{}
	}
	if b, err := strconv.ParseBool(v); err == nil {
		return internalapi.TrustProxy{All: b}
	}
	if n, err := strconv.Atoi(v); err == nil {
		if n < 0 {
			p.fail(name, value, errors.New("a hop count cannot be negative"))
		}
		return internalapi.TrustProxy{Hops: n}
	}
	var t internalapi.TrustProxy
	for _, s := range strings.Split(v, ",") {
		s = strings.TrimSpace(s)
		pfx, err := netip.ParsePrefix(s)
		if err != nil {
			a, aerr := netip.ParseAddr(s)
			if aerr != nil {
				p.fail(name, value, errors.New("want true, false, a hop count, or addresses and prefixes separated by commas"))
				return internalapi.TrustProxy{}
			}
			pfx = netip.PrefixFrom(a, a.BitLen())
		}
		t.Prefixes = append(t.Prefixes, pfx.Masked())
	}
	return t
}

// pem returns the PEM data of a certificate variable: base64-encoded PEM
// (as the reference container takes it), plain PEM, or the name of a PEM
// file in its _FILE form. Its values are not repeated in errors, since one
// of them is a private key.
// minDHBits is the smallest DH prime OpenSSL 3 takes at the security level
// Debian and most distributions default to (2): with a smaller one,
// openvpn exits at start with "dh key too small".
const minDHBits = 2048

// dhBits fails name unless the PEM DH parameters in data (PKCS #3 or
// X9.42: a SEQUENCE whose first INTEGER is the prime) have a prime of at
// least minDHBits bits.
func (p *parser) dhBits(name string, data []byte) {
	block, _ := pem.Decode(data)
	var seq asn1.RawValue
	var prime *big.Int
	if _, err := asn1.Unmarshal(block.Bytes, &seq); err != nil || seq.Tag != asn1.TagSequence {
		p.fail(name, "", errors.New("holds no DH parameters"))
		return
	}
	if _, err := asn1.Unmarshal(seq.Bytes, &prime); err != nil || prime.Sign() <= 0 {
		p.fail(name, "", errors.New("holds no DH parameters"))
		return
	}
	if n := prime.BitLen(); n < minDHBits {
		p.fail(name, "", fmt.Errorf("%d-bit DH parameters: OpenSSL refuses fewer than %d bits at its default security level "+
			"(make new ones with openssl dhparam %d, or leave it unset for ECDH only)", n, minDHBits, minDHBits))
	}
}

func (p *parser) pem(name, value, file, blockType string, required bool) []byte {
	if p.err != nil {
		return nil
	}
	var data []byte
	switch {
	case value != "" && file != "":
		p.fail(name, "", fmt.Errorf("%s_FILE is set too: set one", name))
		return nil
	case file != "":
		b, err := os.ReadFile(file)
		if err != nil {
			p.fail(name+"_FILE", file, err)
			return nil
		}
		name, data = name+"_FILE", b
	case value != "":
		v := strings.TrimSpace(value)
		if strings.HasPrefix(v, "-----BEGIN ") {
			data = []byte(v + "\n")
			break
		}
		b, err := base64.StdEncoding.DecodeString(strings.Join(strings.Fields(v), ""))
		if err != nil {
			p.fail(name, "", errors.New("not base64-encoded PEM"))
			return nil
		}
		data = b
	default:
		if required {
			p.fail(name, "", fmt.Errorf("%w (nor is %s_FILE)", ErrMissing, name))
		}
		return nil
	}
	block, _ := pem.Decode(data)
	if block == nil {
		p.fail(name, "", errors.New("holds no PEM block"))
		return nil
	}
	if !strings.HasSuffix(block.Type, blockType) {
		p.fail(name, "", fmt.Errorf("holds a PEM %q block, want %q", block.Type, blockType))
		return nil
	}
	return data
}
