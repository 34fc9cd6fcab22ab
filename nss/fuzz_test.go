package nss

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// FuzzParseStatus checks that no input panics, that errors are the
// documented ones or I/O-free format errors, and that an address only ever
// comes from a routing row that is exactly a plain IPv4 address.
func FuzzParseStatus(f *testing.F) {
	files, _ := filepath.Glob("testdata/*.status")
	for _, name := range files {
		b, err := os.ReadFile(name)
		if err == nil {
			f.Add(b)
		}
	}
	f.Add([]byte("OpenVPN CLIENT LIST\nUpdated,x\nCommon Name\nROUTING TABLE\nVirtual Address,Common Name\n1.2.3.4,a\nEND\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		st, err := ParseStatus(strings.NewReader(string(b)))
		if err != nil && !errors.Is(err, ErrIncomplete) && !errors.Is(err, ErrFormat) {
			t.Fatalf("unexpected error kind: %v", err)
		}
		if st == nil {
			return
		}
		for _, r := range st.Routes {
			if r.Addr.IsValid() && (!r.Addr.Is4() || r.Addr.String() != r.Virtual) {
				t.Fatalf("route %q gave address %s", r.Virtual, r.Addr)
			}
		}
	})
}
