package deploy

import (
	"net/url"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// TestKubernetesAndComposeSameContainer checks that the Deployment's
// container gets from Kubernetes what compose.yaml's gets from compose,
// which TestImageLive runs the image with: the same capabilities (all
// dropped, the same ones added), no privilege escalation
// (no-new-privileges), /dev/net/tun, the run directory in memory, and a
// readiness probe that asks what compose's healthcheck asks (HAProxy's
// /ping on the monitor port).
func TestKubernetesAndComposeSameContainer(t *testing.T) {
	k := loadKubernetesConfig(t)
	c := loadComposeConfig(t)

	norm := func(caps []string) []string {
		out := make([]string, len(caps))
		for i, s := range caps {
			out[i] = strings.TrimPrefix(strings.ToUpper(s), "CAP_")
		}
		slices.Sort(out)
		return out
	}
	var kAdd, kDrop []string
	sc := k.container.SecurityContext
	if sc != nil && sc.Capabilities != nil {
		for _, s := range sc.Capabilities.Add {
			kAdd = append(kAdd, string(s))
		}
		for _, s := range sc.Capabilities.Drop {
			kDrop = append(kDrop, string(s))
		}
	}
	if got, want := norm(kAdd), norm(c.svc.CapAdd); !slices.Equal(got, want) {
		t.Errorf("capabilities added: %s %q, %s %q: want the same", k.workload.source, got, composePath, want)
	}
	if got, want := norm(kDrop), norm(c.svc.CapDrop); !slices.Equal(got, want) || !slices.Equal(got, []string{"ALL"}) {
		t.Errorf("capabilities dropped: %s %q, %s %q: want ALL in both", k.workload.source, got, composePath, want)
	}
	noEscalation := sc != nil && sc.AllowPrivilegeEscalation != nil && !*sc.AllowPrivilegeEscalation
	nnp := slices.Contains(c.svc.SecurityOpt, "no-new-privileges:true") || slices.Contains(c.svc.SecurityOpt, "no-new-privileges")
	if !noEscalation || !nnp {
		t.Errorf("allowPrivilegeEscalation false in %s: %v; security_opt no-new-privileges in %s: %v; want both", k.workload.source, noEscalation, composePath, nnp)
	}

	rp := k.container.ReadinessProbe
	var hcURL *url.URL
	for _, a := range c.svc.Healthcheck.Test {
		if u, err := url.Parse(a); err == nil && u.Scheme == "http" {
			hcURL = u
		}
	}
	switch {
	case rp == nil || rp.HTTPGet == nil:
		t.Errorf("%s: no httpGet readiness probe", k.workload.source)
	case hcURL == nil:
		t.Errorf("%s: the healthcheck asks no http:// URL", composePath)
	default:
		port := rp.HTTPGet.Port.IntValue()
		for _, p := range k.container.Ports {
			if p.Name == rp.HTTPGet.Port.String() {
				port = int(p.ContainerPort)
			}
		}
		if rp.HTTPGet.Path != hcURL.Path || strconv.Itoa(port) != hcURL.Port() {
			t.Errorf("readiness probe %s on %d, healthcheck %s: want the same (HAProxy's monitor)", rp.HTTPGet.Path, port, hcURL)
		}
	}
}
