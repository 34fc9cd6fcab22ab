package vpn

import (
	"errors"
	"strings"
	"testing"
)

// FuzzLoader feeds arbitrary environments to every loader. Whatever the
// input, loading never panics, an error is a one-line *ConfigError naming a
// variable that obvpn reads, and a loaded configuration is consistent:
// its plan validates and the API key is never repeated in an error.
func FuzzLoader(f *testing.F) {
	f.Add("VPN_BASE_SUBNET=10.240.0.0/12\nVPN_INSTANCE_SUBNET_BITMASK=20\nVPN_INSTANCE_COUNT=2")
	f.Add("VPN_BASE_SUBNET=100.64.0.0/10\nVPN_GATEWAY=100.64.0.1\nBALENA_VPN_GATEWAY=100.64.0.2")
	f.Add("VPN_BASE_SUBNET=10.0.0.0/8\nVPN_BASE_PORT=65000\nVPN_INSTANCE_COUNT=600")
	f.Add("VPN_BASE_SUBNET=192.0.2.0/24\nVPN_OPENVPN_PROTO=udp\nVPN_INSTANCE_COUNT=1\nVPN_DOWNRATE=1mbit\nVPN_UPRATE=2gbit")
	f.Add("VPN_BASE_SUBNET=10.240.0.0/12\nVPN_API_PORT=1\nVPN_API_BASE_PORT=2\nTRUST_PROXY=1.2.3.4,::1/128")
	f.Add("VPN_BASE_SUBNET=::/0\nVPN_INSTANCE_SUBNET_BITMASK=-1\nVPN_METRICS_ADDR=[::1]:http")
	f.Add("VPN_CONNECT_PROXY_PORT=3128\nBALENA_API_HOST=api:0\nVPN_SERVICE_ID=9007199254740993")
	f.Add("VPN_BASE_SUBNET=100.64.0.0/10\nPRODUCTION_MODE=false\nAPI_HOST=api.balena.test\nAPI_INTERNAL_HOST=api:80\nUV_THREADPOOL_SIZE=128")
	f.Add("VPN_BASE_SUBNET=10.240.0.0/12\nMONITOR_SECRET_TOKEN=t$k\"n\nHAPROXY_CPU_MAP=auto:1/1-2 0-1\nVPN_NODE_EXPORTER_ADDR=127.0.0.1:9000\nVPN_HAPROXY_TIMEOUT=5")
	f.Add("VPN_BASE_SUBNET=10.240.0.0/12\nVPN_HAPROXY_MAXCONN=1\nVPN_HAPROXY_ULIMIT=64\nHAPROXY_NBTHREAD=1\nVPN_CONNECT_PROXY_MAX_TUNNELS=0\nROOT_CA=x")
	const secret = "fuzz-secret-key"
	f.Fuzz(func(t *testing.T, text string) {
		vars := map[string]string{
			"BALENA_API_HOST":        "api.example.com",
			"VPN_SERVICE_API_KEY":    secret,
			"VPN_OPENVPN_CA_CRT":     b64(testCert),
			"VPN_OPENVPN_SERVER_CRT": b64(testCert),
			"VPN_OPENVPN_SERVER_KEY": b64(testKey),
		}
		for _, line := range strings.Split(text, "\n") {
			if k, v, ok := strings.Cut(line, "="); ok && !strings.HasSuffix(k, "_FILE") {
				vars[k] = v // no file names: the fuzzer must not read the machine's files
			}
		}
		l := loader(vars)
		c, err := l.Config()
		checkLoadError(t, err, vars[`VPN_SERVICE_API_KEY`])
		if err == nil {
			if verr := c.Plan.Validate(); verr != nil {
				t.Fatalf("loaded a plan that does not validate: %v", verr)
			}
			if c.Plan.Instances < 1 {
				t.Fatalf("loaded %d instances", c.Plan.Instances)
			}
			if c.Bandwidth.Up == 0 != (c.Bandwidth.Down == 0) {
				t.Fatalf("one rate without the other: %+v", c.Bandwidth)
			}
			// No value starts a line of HAProxy's configuration of its
			// own: every line is a comment, a section or a setting in one.
			for _, line := range strings.Split(c.renderHAProxy(0), "\n") {
				if line == "" || line[0] == '\t' || line[0] == '#' {
					continue
				}
				if f := strings.Fields(line); len(f) > 2 || !map[string]bool{"global": true, "defaults": true, "frontend": true, "backend": true, "userlist": true}[f[0]] {
					t.Fatalf("HAProxy configuration line %q is not a section header", line)
				}
			}
		}
		_, err = l.Plan()
		checkLoadError(t, err, "")
		_, err = l.ConnectProxyConfig()
		checkLoadError(t, err, vars[`VPN_SERVICE_API_KEY`])
	})
}

func checkLoadError(t *testing.T, err error, secret string) {
	t.Helper()
	if err == nil {
		return
	}
	var ce *ConfigError
	if !errors.As(err, &ce) {
		t.Fatalf("error %q is a %T, not a *ConfigError", err, err)
	}
	if !known[ce.Var] && !known[strings.TrimSuffix(ce.Var, "_FILE")] {
		t.Fatalf("error names %q, not a variable obvpn reads: %v", ce.Var, err)
	}
	msg := err.Error()
	if !strings.HasPrefix(msg, ce.Var) {
		t.Fatalf("error %q does not start with its variable", msg)
	}
	if len(secret) >= 4 && strings.Contains(msg, secret) {
		t.Fatalf("error repeats the API key: %q", msg)
	}
	if strings.Contains(msg, "\n") {
		t.Fatalf("error spans lines: %q", msg)
	}
}

// known is every variable of the environment struct.
var known = func() map[string]bool {
	m := map[string]bool{}
	for _, v := range variables() {
		m[v.Name] = true
	}
	return m
}()
