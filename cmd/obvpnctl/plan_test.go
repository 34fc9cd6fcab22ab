package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/matryer/is"
)

// seedEnv sets the seed's variables for the test.
func seedEnv(t *testing.T) {
	t.Setenv("VPN_BASE_SUBNET", "10.240.0.0/12")
	t.Setenv("VPN_INSTANCE_SUBNET_BITMASK", "20")
	t.Setenv("VPN_INSTANCE_COUNT", "2")
	t.Setenv("VPN_BASE_PORT", "10000")
	t.Setenv("VPN_BASE_MANAGEMENT_PORT", "20000")
	t.Setenv("VPN_API_BASE_PORT", "30000")
}

type planOut struct {
	Base         string           `json:"base"`
	InstanceBits int              `json:"instance_bits"`
	Instances    []map[string]any `json:"instances"`
}

func runCmd(args ...string) (code int, stdout, stderr string) {
	var out, errOut bytes.Buffer
	code = run(args, &out, &errOut)
	return code, out.String(), errOut.String()
}

func TestPlanJSONAll(t *testing.T) {
	is := is.New(t)
	seedEnv(t)
	code, out, errOut := runCmd("plan", "--json", "--all")
	is.Equal(code, 0)
	is.Equal(errOut, "")
	var p planOut
	is.NoErr(json.Unmarshal([]byte(out), &p))
	is.Equal(p.Base, "10.240.0.0/12")
	is.Equal(p.InstanceBits, 20)
	is.Equal(len(p.Instances), 256)
	is.Equal(p.Instances[0]["subnet"], "10.240.0.0/20")
	is.Equal(p.Instances[1]["subnet"], "10.240.16.0/20")
	is.Equal(p.Instances[255]["subnet"], "10.255.240.0/20")

	// The exact keys of the first instance.
	var first struct {
		Instances []json.RawMessage `json:"instances"`
	}
	is.NoErr(json.Unmarshal([]byte(out), &first))
	is.Equal(string(first.Instances[0]), `{"id":1,"subnet":"10.240.0.0/20","gateway":"10.240.0.1","peer":"10.240.0.2",`+
		`"pool_first":"10.240.0.3","pool_last":"10.240.15.254","port":10001,"management_port":20001,`+
		`"api_port":30001,"max_clients":4092}`)
}

func TestPlanJSONConfigured(t *testing.T) {
	is := is.New(t)
	seedEnv(t)
	t.Setenv("VPN_API_BASE_PORT", "")
	t.Setenv("VPN_API_PORT", "8080")
	t.Setenv("VPN_GATEWAY", "10.240.0.1")
	code, out, _ := runCmd("plan", "-json")
	is.Equal(code, 0)
	var p planOut
	is.NoErr(json.Unmarshal([]byte(out), &p))
	is.Equal(len(p.Instances), 2)
	is.Equal(p.Instances[1]["gateway"], "10.240.0.1")
	is.Equal(p.Instances[1]["peer"], "10.240.16.2")
	is.Equal(p.Instances[1]["api_port"], 8080.0)
}

func TestPlanTable(t *testing.T) {
	is := is.New(t)
	seedEnv(t)
	code, out, _ := runCmd("plan")
	is.Equal(code, 0)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	is.Equal(lines[0], "10.240.0.0/12 at /20: 2 of 256 instances, 4092 clients each; 8184 clients in all")
	is.Equal(len(lines), 5) // summary, blank, head, two instances
	is.Equal(strings.Fields(lines[4]), []string{"2", "10.240.16.0/20", "10.240.16.1", "10.240.16.2",
		"10.240.16.3-10.240.31.254", "10002", "20002", "30002", "4092"})
}

func TestPlanErrors(t *testing.T) {
	tests := []struct {
		name string
		env  map[string]string
		args []string
		want string
	}{
		{"missing base", map[string]string{"VPN_BASE_SUBNET": ""}, []string{"plan"},
			"obvpnctl plan: VPN_BASE_SUBNET: required, not set\n"},
		{"bad bitmask", map[string]string{"VPN_INSTANCE_SUBNET_BITMASK": "31"}, []string{"plan", "--json"},
			"obvpnctl plan: VPN_INSTANCE_SUBNET_BITMASK=\"31\": Mask /31 is too small, 3 usable addresses are required.\n"},
		{"port overflow", map[string]string{"VPN_BASE_PORT": "65535"}, []string{"plan"},
			"obvpnctl plan: VPN_BASE_PORT=\"65535\": out of range 0…65534\n"},
		{"unknown flag", nil, []string{"plan", "--yaml"}, "flag provided but not defined: -yaml\n"},
		{"stray argument", nil, []string{"plan", "extra"}, "usage: obvpnctl plan [--json] [--all]\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			is := is.New(t)
			seedEnv(t)
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			code, out, errOut := runCmd(tt.args...)
			is.Equal(code, 2)
			is.Equal(out, "")
			is.True(strings.HasPrefix(errOut, tt.want))
		})
	}
}

// TestPlanAllOutOfPorts: ports that fit the configured instances but not
// every subnet of the base fail --all with the error alone, never half a
// JSON document.
func TestPlanAllOutOfPorts(t *testing.T) {
	for _, args := range [][]string{{"plan", "--json", "--all"}, {"plan", "--all"}} {
		is := is.New(t)
		seedEnv(t)
		t.Setenv("VPN_BASE_PORT", "65300")
		code, out, errOut := runCmd(args...)
		is.Equal(code, 1)
		is.Equal(out, "")
		is.True(strings.Contains(errOut, "instance 236"))
		code, out, _ = runCmd(args[:len(args)-1]...) // the configured instances fit
		is.Equal(code, 0)
		is.True(out != "")
	}
}

func TestUsage(t *testing.T) {
	is := is.New(t)
	code, out, _ := runCmd("help")
	is.Equal(code, 0)
	is.True(strings.Contains(out, "plan "))
	code, _, errOut := runCmd("frobnicate")
	is.Equal(code, 2)
	is.True(strings.Contains(errOut, `unknown command "frobnicate"`))
	code, _, _ = runCmd()
	is.Equal(code, 2)
}
