package nss

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"
)

func TestFind(t *testing.T) {
	dir := t.TempDir()
	s1, s2 := filepath.Join(dir, "server-1.status"), filepath.Join(dir, "server-2.status")
	write(t, s1, statusV2(100, devA, "10.240.0.3", devB, "10.240.0.4"))
	write(t, s2, statusV2(200, strings.ToUpper(devA), "10.240.16.3"))
	globs := []string{filepath.Join(dir, "*.status")}
	for name, want := range map[string]string{
		devA + ".vpn":                      "10.240.16.3", // the later Last Ref
		strings.ToUpper(devB) + ".VPN":     "10.240.0.4",
		devB:                               "10.240.0.4",
		"ffffffffffffffffffffffffffffffff": "",
		"":                                 "",
		".vpn":                             "",
		devA[:8]:                           "", // a part of a name is not the name
	} {
		a, err := Find(globs, name)
		if want == "" {
			if !errors.Is(err, ErrNotFound) {
				t.Errorf("Find(%q) = %v, %v; want ErrNotFound", name, a, err)
			}
			continue
		}
		if err != nil || a.String() != want {
			t.Errorf("Find(%q) = %v, %v; want %s", name, a, err, want)
		}
	}
	// A torn file gives nothing; the other file still answers.
	full := statusV2(300, devA, "10.240.16.9")
	write(t, s2, full[:len(full)-5])
	if a, err := Find(globs, devA); err != nil || a.String() != "10.240.0.3" {
		t.Errorf("with a torn file: %v, %v", a, err)
	}
	// The real files, every version.
	for v := 1; v <= 3; v++ {
		g := []string{filepath.Join("testdata", "openvpn-2.6-v"+string(rune('0'+v))+".status")}
		if a, err := Find(g, "FEDCBA9876543210FEDCBA9876543210.vpn"); err != nil || !strings.HasPrefix(a.String(), "10.240.") {
			t.Errorf("v%d: %v, %v", v, a, err)
		}
	}
	// Find agrees with the resolver on the quirk file: no address from
	// cached, subnet, IPv6 or MAC rows.
	for _, cn := range []string{"cccccccccccccccccccccccccccccccc", "dddddddddddddddddddddddddddddddd", "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee"} {
		if _, err := Find([]string{"testdata/quirks-v2.status"}, cn); !errors.Is(err, ErrNotFound) {
			t.Errorf("%s: %v", cn, err)
		}
	}
}
