package vpn

import (
	"os"
	"slices"
	"strings"
	"testing"

	env "github.com/caarlos0/env/v10"
)

// variable is one variable of the environment with its default.
type variable struct {
	Name, Default string
}

// variables lists every variable that obvpn reads, in the order of the
// environment struct.
func variables() []variable {
	params, err := env.GetFieldParamsWithOptions(&environment{}, env.Options{Environment: map[string]string{}})
	if err != nil {
		panic(err) // the struct's tags are fixed at compile time
	}
	out := make([]variable, len(params))
	for i, p := range params {
		out[i] = variable{p.Key, p.DefaultValue}
	}
	return out
}

// TestREADMEListsEveryVariable keeps the README's table of variables true:
// every variable obvpn reads is in it, with its default.
func TestREADMEListsEveryVariable(t *testing.T) {
	b, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	readme := string(b)
	for _, v := range variables() {
		row := ""
		for _, line := range strings.Split(readme, "\n") {
			// A row of a variables table names the variable in its first
			// cell.
			cells := strings.Split(line, "|")
			if len(cells) > 2 && strings.HasPrefix(line, "|") && strings.Contains(cells[1], "`"+v.Name+"`") {
				row = line
				break
			}
		}
		if row == "" {
			t.Errorf("README.md has no table row for %s", v.Name)
			continue
		}
		if v.Default != "" && !strings.Contains(row, "`"+v.Default+"`") {
			t.Errorf("README.md's row for %s does not give its default `%s`: %s", v.Name, v.Default, row)
		}
	}
}

func TestVariables(t *testing.T) {
	names := Variables()
	if len(names) != len(variables()) {
		t.Errorf("Variables: %d names, the environment struct has %d", len(names), len(variables()))
	}
	for _, want := range []string{"VPN_BASE_SUBNET", "BALENA_VPN_GATEWAY", "VPN_GATEWAY", "VPN_API_BASE_PORT", "NSS_OPENVPN_STATUS_GLOB"} {
		if _, ok := slices.BinarySearch(names, want); !ok {
			t.Errorf("Variables lacks %s", want)
		}
	}
}
