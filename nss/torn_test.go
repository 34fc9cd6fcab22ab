package nss

import (
	"bytes"
	"errors"
	"os"
	"slices"
	"strings"
	"testing"
)

// TestTornJunction reads every junction that OpenVPN's rewrite in place
// can show a reader: the start of the new file up to any byte, then the
// old file from there on (its END included). The new file lost one device.
// Each junction must parse as incomplete, or give exactly the new file's
// routes or the old file's (at a line boundary of both, before the files
// differ): never a mix that keeps the device that left.
func TestTornJunction(t *testing.T) {
	old, err := os.ReadFile("testdata/openvpn-2.6-v2.status")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.SplitAfter(string(old), "\n")
	var kept []string
	for _, l := range lines {
		if !strings.Contains(l, "FEDCBA9876543210") {
			kept = append(kept, l)
		}
	}
	nw := []byte(strings.Join(kept, ""))
	names := func(st *Status) []string {
		var out []string
		for _, r := range st.Routes {
			out = append(out, r.CommonName)
		}
		return out
	}
	want := map[string]bool{}
	for _, data := range [][]byte{old, nw} {
		st, err := ParseStatus(bytes.NewReader(data))
		if err != nil {
			t.Fatal(err)
		}
		want[strings.Join(names(st), " ")] = true
	}
	undetected := 0
	for k := 0; k <= len(nw); k++ {
		junction := append(append([]byte(nil), nw[:k]...), old[min(k, len(old)):]...)
		st, err := ParseStatus(bytes.NewReader(junction))
		if errors.Is(err, ErrIncomplete) {
			continue
		}
		if err != nil && !errors.Is(err, ErrFormat) {
			t.Fatalf("at %d: %v", k, err)
		}
		if err == nil && !want[strings.Join(names(st), " ")] {
			t.Errorf("junction at byte %d parses whole with routes %v:\n%s", k, names(st), junction)
		}
		if err == nil && !slices.Equal(names(st), names(mustParse(t, nw))) {
			undetected++
		}
	}
	t.Logf("%d junctions of %d read as the old file", undetected, len(nw)+1)
}

func mustParse(t *testing.T, data []byte) *Status {
	t.Helper()
	st, err := ParseStatus(bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	return st
}
