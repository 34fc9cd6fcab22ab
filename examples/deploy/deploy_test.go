package deploy

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"maps"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/obvpn/obvpn/vpn"
	"github.com/obvpn/obvpn/vpn/haproxy"
)

// The files under test, relative to this directory.
const (
	dockerfilePath = "Dockerfile"
	composePath    = "compose.yaml"
	dashboardPath  = "grafana-dashboard.json"
	manifestsDir   = "kubernetes"
	repoRoot       = "../.."
)

// drainMargin is how much longer than the drain (DEFAULT_SIGTERM_TIMEOUT)
// the runtime must wait before it kills the server: after the last client
// is killed the server still reports its devices offline, stops its
// instances and HAProxy, and exits.
const drainMargin = 30 * time.Second

// composeStopTimeout is the time podman-compose 1.0.3 gives a container on
// stop and down: it passes podman stop -t 10 unless told otherwise, and
// ignores stop_grace_period. It is docker's default too. compose.yaml's
// drain ends within it, with composeDrainMargin to spare, so that both
// tools let it finish: measured by TestImageLive, the server exits well
// within a second of the drain's end with a few devices.
const (
	composeStopTimeout = 10 * time.Second
	composeDrainMargin = 5 * time.Second
)

// allowedVariables is the list of environment variables the deployment
// files may set although vpn.Variables() does not name them. It is empty:
// every variable they set is read by the Loader. Add one only for a
// variable that something else in the image reads, and say which.
var allowedVariables = map[string]string{}

// TestEnvironmentVariablesAreKnown checks that every environment variable
// that the manifests (env names and the keys of the ConfigMaps and Secrets
// that envFrom loads), compose.yaml's environment and the Dockerfile's ENV
// lines set is one that vpn.Loader reads: a misspelt name would be ignored
// silently and its default used.
func TestEnvironmentVariablesAreKnown(t *testing.T) {
	known := make(map[string]bool)
	for _, v := range vpn.Variables() {
		known[v] = true
	}
	if len(known) == 0 {
		t.Fatal("vpn.Variables() is empty")
	}
	check := func(where string, names []string) {
		t.Helper()
		if len(names) == 0 {
			t.Errorf("%s: sets no environment variable; the test reads the wrong place", where)
		}
		for _, name := range names {
			if !known[name] {
				if why, ok := allowedVariables[name]; ok {
					t.Logf("%s: %s is not read by vpn.Loader, allowed: %s", where, name, why)
					continue
				}
				t.Errorf("%s: %s is not an obvpn variable (vpn.Variables()); misspelt?", where, name)
			}
		}
	}

	m := loadManifests(t)
	for _, w := range m.workloads {
		for _, c := range podContainers(&w.template.Spec) {
			names, err := m.containerEnvNames(c)
			if err != nil {
				t.Errorf("%s: container %s: %v", w.source, c.Name, err)
				continue
			}
			check(w.source+": container "+c.Name, names)
		}
	}
	check(composePath, slices.Sorted(maps.Keys(composeService(t).Environment)))
	env := dockerfileEnv(t, parseDockerfile(t))
	check(dockerfilePath+" ENV", slices.Sorted(maps.Keys(env)))
}

// TestGracePeriodsCoverDrain checks that Kubernetes and compose wait
// longer than the drain on SIGTERM before they kill the server, with
// drainMargin to spare in Kubernetes, and within podman-compose's fixed
// stop timeout with composeDrainMargin to spare in compose.
func TestGracePeriodsCoverDrain(t *testing.T) {
	k := loadKubernetesConfig(t)
	grace := k.workload.template.Spec.TerminationGracePeriodSeconds
	if grace == nil {
		t.Errorf("%s: no terminationGracePeriodSeconds: Kubernetes' default of 30 s cuts the drain (DEFAULT_SIGTERM_TIMEOUT %v) short", k.workload.source, k.cfg.Drain.Timeout)
	} else if got := time.Duration(*grace) * time.Second; got < k.cfg.Drain.Timeout+drainMargin {
		t.Errorf("%s: terminationGracePeriodSeconds %v, want at least DEFAULT_SIGTERM_TIMEOUT %v + %v", k.workload.source, got, k.cfg.Drain.Timeout, drainMargin)
	}

	c := loadComposeConfig(t)
	if c.svc.StopGracePeriod == "" {
		t.Fatalf("%s: no stop_grace_period: docker's default of 10 s cuts the drain (DEFAULT_SIGTERM_TIMEOUT %v) short", composePath, c.cfg.Drain.Timeout)
	}
	got, err := time.ParseDuration(c.svc.StopGracePeriod)
	if err != nil {
		t.Fatalf("%s: stop_grace_period %q: %v", composePath, c.svc.StopGracePeriod, err)
	}
	if got < c.cfg.Drain.Timeout+composeDrainMargin {
		t.Errorf("%s: stop_grace_period %v, want at least DEFAULT_SIGTERM_TIMEOUT %v + %v", composePath, got, c.cfg.Drain.Timeout, composeDrainMargin)
	}
	if got > composeStopTimeout || c.cfg.Drain.Timeout+composeDrainMargin > composeStopTimeout {
		t.Errorf("%s: stop_grace_period %v, DEFAULT_SIGTERM_TIMEOUT %v: podman-compose 1.0.3 kills the server after %v whatever stop_grace_period says; want the drain and %v within that", composePath, got, c.cfg.Drain.Timeout, composeStopTimeout, composeDrainMargin)
	}
}

// testPKI is a throw-away CA and a server certificate signed by it, as
// base64-encoded PEM like the deployments pass them.
type testPKI struct {
	CA, ServerCert, ServerKey string
}

var pkiOnce = sync.OnceValues(newTestPKI)

func pki(t *testing.T) testPKI {
	t.Helper()
	p, err := pkiOnce()
	if err != nil {
		t.Fatalf("making a test PKI: %v", err)
	}
	return p
}

func newTestPKI() (testPKI, error) {
	b64 := func(typ string, der []byte) string {
		return base64.StdEncoding.EncodeToString(pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}))
	}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return testPKI{}, err
	}
	now := time.Now()
	ca := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "obvpn deploy test CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	if err != nil {
		return testPKI{}, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return testPKI{}, err
	}
	srv := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "vpn.example.com"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	srvDER, err := x509.CreateCertificate(rand.Reader, srv, ca, &key.PublicKey, caKey)
	if err != nil {
		return testPKI{}, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return testPKI{}, err
	}
	return testPKI{
		CA:         b64("CERTIFICATE", caDER),
		ServerCert: b64("CERTIFICATE", srvDER),
		ServerKey:  b64("PRIVATE KEY", keyDER),
	}, nil
}

// certVariables maps the certificate and key variables to the test PKI's
// values; the deployments' placeholders for them are replaced by these.
func certVariables(p testPKI) map[string]string {
	return map[string]string{
		"VPN_OPENVPN_CA_CRT":     p.CA,
		"VPN_OPENVPN_SERVER_CRT": p.ServerCert,
		"VPN_OPENVPN_SERVER_KEY": p.ServerKey,
	}
}

// loadConfig loads env with vpn.Loader: the instance count from
// cpuRequest (written where the downward API would put it) when it is
// positive, else from a CPU count of 2, never from this machine.
func loadConfig(t *testing.T, env map[string]string, cpuRequest int64) (*vpn.Config, error) {
	t.Helper()
	file := filepath.Join(t.TempDir(), filepath.Base(vpn.DefaultCPURequestFile))
	if cpuRequest > 0 {
		writeFile(t, file, strconv.FormatInt(cpuRequest, 10)+"\n")
	}
	return vpn.Loader{Env: env, CPURequestFile: file, NumCPU: func() int { return 2 }}.Config()
}

// serverPorts is every port the server listens on from outside its
// container, from its configuration.
type serverPorts struct {
	VPN     int // VPN_PORT, HAProxy's frontend; 0 with VPN_HAPROXY=off
	Monitor int // VPN_HAPROXY_MONITOR_ADDR; 0 unless HAProxy is managed
	Proxy   int // VPN_CONNECT_PROXY_PORT; 0 for no proxy
	Forward int // VPN_FORWARD_PROXY_PORT
	Metrics int // VPN_METRICS_ADDR
}

func portsOf(t *testing.T, cfg *vpn.Config) serverPorts {
	t.Helper()
	p := serverPorts{Proxy: cfg.Proxy.Port, Forward: cfg.Proxy.ForwardPort, Metrics: addrPort(t, "VPN_METRICS_ADDR", cfg.Metrics.Addr)}
	if p.Forward == 0 {
		p.Forward = p.Proxy
	}
	if cfg.HAProxy.Mode != haproxy.Off {
		p.VPN = cfg.HAProxy.Port
	}
	if cfg.HAProxy.Mode == haproxy.Managed {
		p.Monitor = addrPort(t, "VPN_HAPROXY_MONITOR_ADDR", cfg.HAProxy.MonitorAddr)
	}
	return p
}

func addrPort(t *testing.T, name, addr string) int {
	t.Helper()
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("%s=%q: %v", name, addr, err)
	}
	n, err := strconv.Atoi(port)
	if err != nil {
		t.Fatalf("%s=%q: port: %v", name, addr, err)
	}
	return n
}

func writeFile(t *testing.T, name, data string) {
	t.Helper()
	if err := os.WriteFile(name, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
}

func readFile(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
