package deploy

import (
	"errors"
	"fmt"
	"maps"
	"net"
	"net/url"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/obvpn/obvpn/vpn"
)

// composeFile is the part of the Compose file format that compose.yaml
// uses. It is decoded strictly, so that a misspelt key fails: add a field
// here when the file needs one more. It is stricter than compose about
// values, too: environment values must be strings (quote numbers).
type composeFile struct {
	Name     string                `json:"name"`
	Services map[string]composeSvc `json:"services"`
}

type composeSvc struct {
	Build struct {
		Context    string `json:"context"`
		Dockerfile string `json:"dockerfile"`
	} `json:"build"`
	Image   string   `json:"image"`
	Restart string   `json:"restart"`
	Init    bool     `json:"init"`
	CapAdd  []string `json:"cap_add"`
	CapDrop []string `json:"cap_drop"`
	// SecurityOpt are options such as no-new-privileges:true.
	SecurityOpt []string `json:"security_opt"`
	Devices     []string `json:"devices"`
	Ports       []struct {
		Target    int    `json:"target"`
		Published string `json:"published"`
		HostIP    string `json:"host_ip"`
		Protocol  string `json:"protocol"`
	} `json:"ports"`
	Tmpfs []string `json:"tmpfs"`
	// Environment values are nil for a name without a value, which compose
	// passes on from the host when set there.
	Environment     map[string]*string `json:"environment"`
	StopGracePeriod string             `json:"stop_grace_period"`
	StopSignal      string             `json:"stop_signal"`
	Entrypoint      []string           `json:"entrypoint"`
	Command         []string           `json:"command"`
	Healthcheck     struct {
		Test        []string `json:"test"`
		Interval    string   `json:"interval"`
		Timeout     string   `json:"timeout"`
		Retries     int      `json:"retries"`
		StartPeriod string   `json:"start_period"`
	} `json:"healthcheck"`
}

// composeRequired are the variables compose.yaml must take from the host
// with ${VAR:?message}, refusing to start without them.
var composeRequired = []string{
	"BALENA_API_HOST", "VPN_SERVICE_API_KEY",
	"VPN_OPENVPN_CA_CRT", "VPN_OPENVPN_SERVER_CRT", "VPN_OPENVPN_SERVER_KEY",
	"VPN_BASE_SUBNET",
}

// requiredTestValues are values for the required variables, such as an
// operator would set on the host: the test PKI's certificates and key.
func requiredTestValues(t *testing.T) map[string]string {
	t.Helper()
	env := map[string]string{
		"BALENA_API_HOST":     "api.example.com",
		"VPN_SERVICE_API_KEY": "test-service-api-key",
		"VPN_BASE_SUBNET":     "10.240.0.0/12",
	}
	maps.Copy(env, certVariables(pki(t)))
	return env
}

// composeService decodes compose.yaml strictly and returns its one service.
func composeService(t *testing.T) composeSvc {
	t.Helper()
	var f composeFile
	if err := unmarshalStrict(readFile(t, composePath), &f); err != nil {
		t.Fatalf("%s: %v", composePath, err)
	}
	if len(f.Services) != 1 {
		t.Fatalf("%s: %d services, want 1", composePath, len(f.Services))
	}
	for _, s := range f.Services {
		return s
	}
	panic("unreachable")
}

// emptyDefault matches ${NAME:-} and ${NAME-}.
var emptyDefault = regexp.MustCompile(`\$\{[A-Za-z_][A-Za-z0-9_]*:?-\}`)

var interpolation = regexp.MustCompile(`\$(\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|.?)`)

// interpolate expands s as compose does, from the host's env: $$ is a
// dollar; ${NAME} is the value; ${NAME:-default} (unset or empty) and
// ${NAME-default} (unset) give a default; ${NAME:?message} and
// ${NAME?message} refuse an unset (or empty) variable with the message.
// Unlike compose, ${NAME} without a default is refused when NAME is unset,
// and so are $NAME and the forms these tests do not know, so that every
// variable the file reads has a default or says that it is required. It
// returns the names it read.
func interpolate(s string, env map[string]string) (string, []string, error) {
	var names []string
	var err error
	out := interpolation.ReplaceAllStringFunc(s, func(m string) string {
		sub := interpolation.FindStringSubmatch(m)
		if sub[1] == "$" {
			return "$"
		}
		name, op, arg := sub[2], sub[3], sub[4]
		if name == "" {
			err = errors.Join(err, fmt.Errorf("%q: want $$ or ${NAME…}", m))
			return ""
		}
		names = append(names, name)
		v, set := env[name]
		switch op {
		case "":
			if !set {
				err = errors.Join(err, fmt.Errorf("${%s}: no default and not required", name))
			}
		case ":-":
			if v == "" {
				v = arg
			}
		case "-":
			if !set {
				v = arg
			}
		case ":?", "?":
			if arg == "" {
				err = errors.Join(err, fmt.Errorf("${%s%s}: no message", name, op))
			}
			if !set || (op == ":?" && v == "") {
				err = errors.Join(err, fmt.Errorf("required variable %s is missing a value: %s", name, arg))
			}
		}
		return v
	})
	return out, names, err
}

// composeEnvironment is the service's environment, interpolated from host;
// a name without a value has the host's value, or is left out when the
// host has none.
func composeEnvironment(svc composeSvc, host map[string]string) (map[string]string, error) {
	env := make(map[string]string)
	var errs []error
	for k, v := range svc.Environment {
		if v == nil {
			if hv, ok := host[k]; ok {
				env[k] = hv
			}
			continue
		}
		got, _, err := interpolate(*v, host)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", k, err))
		}
		env[k] = got
	}
	return env, errors.Join(errs...)
}

type composeConfig struct {
	svc   composeSvc
	env   map[string]string
	cfg   *vpn.Config
	ports serverPorts
}

// loadComposeConfig loads compose.yaml's environment with vpn.Loader, the
// host having set the required variables only.
func loadComposeConfig(t *testing.T) *composeConfig {
	t.Helper()
	c := &composeConfig{svc: composeService(t)}
	var err error
	c.env, err = composeEnvironment(c.svc, requiredTestValues(t))
	if err != nil {
		t.Fatalf("%s: environment: %v", composePath, err)
	}
	c.cfg, err = loadConfig(t, c.env, 0)
	if err != nil {
		t.Fatalf("%s: the environment does not load: %v", composePath, err)
	}
	c.ports = portsOf(t, c.cfg)
	return c
}

// TestCompose checks compose.yaml: the required variables come from the
// host with ${VAR:?message}, every host variable has the container's name,
// the environment loads with vpn.Loader, and the ports, the healthcheck,
// NET_ADMIN, /dev/net/tun, the run directory and the build agree with it.
func TestCompose(t *testing.T) {
	c := loadComposeConfig(t)
	svc := c.svc

	for _, name := range composeRequired {
		re := regexp.MustCompile(`^\$\{` + name + `:\?[^}]+\}$`)
		if v, ok := svc.Environment[name]; !ok || v == nil || !re.MatchString(*v) {
			t.Errorf("environment: %s: %v, want ${%s:?<what to set>}", name, v, name)
		}
	}
	for _, k := range slices.Sorted(maps.Keys(svc.Environment)) {
		v := svc.Environment[k]
		if v == nil {
			continue // the host's k itself
		}
		// podman-compose 1.0.3 passes ${NAME:-} and ${NAME-} on literally
		// (its pattern wants a default of one character or more), and the
		// server then refuses "${NAME:-}" as a value: leave the value out
		// instead, which both tools read as "the host's, if set".
		if m := emptyDefault.FindString(*v); m != "" {
			t.Errorf("environment: %s: %q has an empty default, which podman-compose 1.0.3 passes on literally: write %s: with no value", k, m, k)
		}
		_, names, _ := interpolate(*v, map[string]string{})
		for _, n := range names {
			if n != k {
				t.Errorf("environment: %s reads the host's %s: name them the same", k, n)
			}
		}
	}
	// Each required variable left unset stops compose.
	for _, name := range composeRequired {
		host := requiredTestValues(t)
		delete(host, name)
		if _, err := composeEnvironment(svc, host); err == nil || !strings.Contains(err.Error(), name) {
			t.Errorf("without %s on the host: %v, want an error naming it", name, err)
		}
	}

	targets := make(map[int]bool)
	for _, p := range svc.Ports {
		if p.Protocol != "" && p.Protocol != "tcp" {
			continue
		}
		targets[p.Target] = true
		if p.Published == "" {
			t.Errorf("port %d: not published", p.Target)
		}
	}
	for name, port := range map[string]int{"VPN_PORT": c.ports.VPN, "VPN_CONNECT_PROXY_PORT": c.ports.Proxy, "VPN_METRICS_ADDR": c.ports.Metrics} {
		if port != 0 && !targets[port] {
			t.Errorf("ports: container port %d (%s) not published", port, name)
		}
	}

	hc := svc.Healthcheck.Test
	var rawURL string
	for _, arg := range hc {
		if strings.HasPrefix(arg, "http://") {
			rawURL = arg
		}
	}
	if len(hc) < 2 || hc[0] != "CMD" || rawURL == "" {
		t.Errorf("healthcheck: test %q, want [CMD, <program>, …, http://127.0.0.1:<monitor port>/ping]", hc)
	} else if u, err := url.Parse(rawURL); err != nil {
		t.Errorf("healthcheck: %v", err)
	} else {
		port, _ := strconv.Atoi(u.Port())
		if ip := net.ParseIP(u.Hostname()); ip == nil || !ip.IsLoopback() || port != c.ports.Monitor || u.Path != "/ping" {
			t.Errorf("healthcheck: asks %s, want http://127.0.0.1:%d/ping (VPN_HAPROXY_MONITOR_ADDR)", rawURL, c.ports.Monitor)
		}
	}

	if !slices.Contains(svc.CapAdd, "NET_ADMIN") {
		t.Errorf("cap_add %q lacks NET_ADMIN", svc.CapAdd)
	}
	if !slices.Contains(svc.Devices, "/dev/net/tun") && !slices.Contains(svc.Devices, "/dev/net/tun:/dev/net/tun") {
		t.Errorf("devices %q lacks /dev/net/tun", svc.Devices)
	}
	if svc.StopSignal != "" && svc.StopSignal != "SIGTERM" {
		t.Errorf("stop_signal %q: the server drains on SIGTERM", svc.StopSignal)
	}
	tmpfs := false
	for _, m := range svc.Tmpfs {
		tmpfs = tmpfs || filepath.Clean(strings.SplitN(m, ":", 2)[0]) == c.cfg.RunDir
	}
	if !tmpfs {
		t.Errorf("tmpfs %q: VPN_RUN_DIR %s is not on a tmpfs", svc.Tmpfs, c.cfg.RunDir)
	}

	// The build: this directory's Dockerfile, with the repository root as
	// its context.
	here, err := filepath.Abs(".")
	if err != nil {
		t.Fatal(err)
	}
	root, _ := filepath.Abs(repoRoot)
	ctx := filepath.Join(here, svc.Build.Context)
	if ctx != root {
		t.Errorf("build.context %q is %s, want the repository root %s", svc.Build.Context, ctx, root)
	}
	if df := filepath.Join(ctx, svc.Build.Dockerfile); df != filepath.Join(here, dockerfilePath) {
		t.Errorf("build.dockerfile %q is %s, want %s", svc.Build.Dockerfile, df, filepath.Join(here, dockerfilePath))
	}

	// Only the environment is interpolated by these tests.
	for what, v := range map[string]string{"image": svc.Image, "stop_grace_period": svc.StopGracePeriod, "healthcheck": strings.Join(hc, " ")} {
		if strings.Contains(v, "$") {
			t.Errorf("%s %q: interpolated outside environment, which these tests do not follow", what, v)
		}
	}
}

// TestInterpolate checks the tests' reading of compose's interpolation.
func TestInterpolate(t *testing.T) {
	host := map[string]string{"A": "a", "E": ""}
	for _, tc := range []struct {
		in, want string
		err      bool
	}{
		{"${A}", "a", false},
		{"x${A}y$$", "xay$", false},
		{"${E:-d}", "d", false},
		{"${E-d}", "", false},
		{"${U-d}", "d", false},
		{"${U:-}", "", false},
		{"${A:?set A}", "a", false},
		{"${U:?set U}", "", true},
		{"${E:?set E}", "", true},
		{"${E?set E}", "", false},
		{"${A:?}", "a", true},
		{"${U}", "", true},
		{"$A", "", true},
	} {
		got, _, err := interpolate(tc.in, host)
		if (err != nil) != tc.err || (err == nil && got != tc.want) {
			t.Errorf("interpolate(%q) = %q, %v; want %q, error %v", tc.in, got, err, tc.want, tc.err)
		}
	}
}
