package connectproxy

import (
	"errors"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

func TestParseTarget(t *testing.T) {
	tests := []struct {
		in   string
		want Target
		err  bool
	}{
		{"0123abcd.balena:22", Target{"0123abcd", "balena", 22}, false},
		{"0123ABCD.balena", Target{"0123abcd", "balena", 80}, false}, // one device in any case
		{"abc.resin:8080", Target{"abc", "resin", 8080}, false},
		{"abc.vpn:65535", Target{"abc", "vpn", 65535}, false},
		{"abc.vpn:00022", Target{"abc", "vpn", 22}, false},
		{"abc.vpn:1", Target{"abc", "vpn", 1}, false},
		{"", Target{}, true},
		{".balena:22", Target{}, true},
		{"abc.balena:", Target{}, true},
		{"abc.balena:0", Target{}, true},
		{"abc.balena:65536", Target{}, true},
		{"abc.balena:99999999999999999999", Target{}, true},
		{"abc.balena:-1", Target{}, true},
		{"abc.balena:+22", Target{}, true},
		{"abc.balena:22:33", Target{}, true},
		{"abc.BALENA:22", Target{}, true},
		{"abc.balena.io:22", Target{}, true},
		{"abcg.balena:22", Target{}, true},
		{"example.com:443", Target{}, true},
		{"[::1]:22", Target{}, true},
		{"abc.balena:22/", Target{}, true},
		{"abc.balena :22", Target{}, true},
		{"abc.resinx", Target{}, true},
		{"abc..balena", Target{}, true},
		{strings.Repeat("a", 128) + ".balena", Target{strings.Repeat("a", 128), "balena", 80}, false},
		{strings.Repeat("a", 129) + ".balena", Target{}, true},
	}
	for _, tt := range tests {
		got, err := ParseTarget(tt.in)
		if (err != nil) != tt.err || got != tt.want {
			t.Errorf("ParseTarget(%q) = %+v, %v; want %+v, error %v", tt.in, got, err, tt.want, tt.err)
		}
		if err != nil && !errors.Is(err, ErrInvalidTarget) {
			t.Errorf("ParseTarget(%q): error %v does not wrap ErrInvalidTarget", tt.in, err)
		}
	}
}

// slowParseTarget is the reference system's regular expression plus the
// port range: the obvious implementation that ParseTarget must agree with.
var targetRE = regexp.MustCompile(`^([a-fA-F0-9]+)\.(balena|resin|vpn)(?::([0-9]+))?$`)

func slowParseTarget(s string) (Target, bool) {
	m := targetRE.FindStringSubmatch(s)
	if m == nil || len(m[1]) > 128 {
		return Target{}, false
	}
	port := 80
	if m[3] != "" {
		n, err := strconv.ParseUint(m[3], 10, 64)
		if err != nil || n == 0 || n > 65535 {
			return Target{}, false
		}
		port = int(n)
	}
	return Target{UUID: strings.ToLower(m[1]), TLD: m[2], Port: uint16(port)}, true
}

func FuzzParseTarget(f *testing.F) {
	for _, s := range []string{"0123abcd.balena:22", "abc.resin", "abc.vpn:65535", "abc.balena:65536", "", ".balena",
		"abc.balena:", "example.com:443", "abc.balena:0000000000000022", "ABC.vpn:0"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		got, err := ParseTarget(s)
		want, ok := slowParseTarget(s)
		if (err == nil) != ok || got != want {
			t.Fatalf("ParseTarget(%q) = %+v, %v; the reference pattern says %+v, %v", s, got, err, want, ok)
		}
		if err == nil {
			again, err := ParseTarget(got.String())
			if err != nil || again != got {
				t.Fatalf("ParseTarget(%q.String() = %q) = %+v, %v", s, got.String(), again, err)
			}
		}
	})
}

func TestParseTargetAllocs(t *testing.T) {
	n := testing.AllocsPerRun(100, func() { _, _ = ParseTarget("0123456789abcdef0123456789abcdef.balena:22222") })
	if n != 0 {
		t.Fatalf("ParseTarget allocates %v times, want 0", n)
	}
}
