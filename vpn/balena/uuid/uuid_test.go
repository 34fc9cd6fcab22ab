package uuid_test

import (
	"fmt"
	"strings"
	"testing"

	"github.com/obvpn/obvpn/vpn/balena/uuid"
)

func TestValid(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want bool
	}{
		{"0123456789abcdef0123456789abcdef", true},
		{"0123456789ABCDEF", true},
		{"a", true},
		{strings.Repeat("a", uuid.MaxLen), true},
		{strings.Repeat("a", uuid.MaxLen+1), false},
		{"", false},
		{"abcg", false},
		{"../x", false},
		{"ab cd", false},
		{"ab'", false},
		{"abc%2f", false},
		{"abc.vpn", false},
	} {
		if got := uuid.Valid(tt.in); got != tt.want {
			t.Errorf("Valid(%q) = %v", tt.in, got)
		}
		n, ok := uuid.Normalize(tt.in)
		if ok != tt.want || ok && n != strings.ToLower(tt.in) || !ok && n != "" {
			t.Errorf("Normalize(%q) = %q, %v", tt.in, n, ok)
		}
	}
	var sink string
	if n := testing.AllocsPerRun(100, func() { sink, _ = uuid.Normalize("0123456789abcdef0123456789abcdef") }); n != 0 {
		t.Errorf("Normalize of a lower-case UUID allocates %v times", n)
	}
	_ = sink
}

func FuzzNormalize(f *testing.F) {
	for _, s := range []string{"0123456789abcdef", "ABC", "", "x", "a'b"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, ok := uuid.Normalize(s)
		if !ok {
			return
		}
		if !uuid.Valid(n) || n != strings.ToLower(n) || !strings.EqualFold(n, s) {
			t.Fatalf("Normalize(%q) = %q", s, n)
		}
	})
}

func ExampleNormalize() {
	for _, s := range []string{"0123ABCDef", "not-a-uuid"} {
		n, ok := uuid.Normalize(s)
		fmt.Printf("%q %v\n", n, ok)
	}
	// Output:
	// "0123abcdef" true
	// "" false
}
