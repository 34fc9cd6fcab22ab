package nss

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/obvpn/obvpn/vpn/vpntest/leaktest"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata")

func TestMain(m *testing.M) {
	// Formatted timestamps are local time; pin it so golden files do not
	// depend on the machine's zone.
	time.Local = time.UTC
	os.Exit(leaktest.Main(m)) // and no goroutine left behind
}

// dump writes a Status in a stable text form for golden files.
func dump(st *Status, err error) string {
	var b strings.Builder
	fmt.Fprintf(&b, "error: %v\n", err)
	if st == nil {
		return b.String()
	}
	ts := func(t time.Time) string {
		if t.IsZero() {
			return "-"
		}
		return t.UTC().Format(time.RFC3339)
	}
	fmt.Fprintf(&b, "version %d\ntitle %q\nupdated %s\n", st.Version, st.Title, ts(st.Updated))
	for _, c := range st.Clients {
		fmt.Fprintf(&b, "client cn=%q real=%s proto=%q v4=%s v6=%s rx=%d tx=%d since=%s user=%q cid=%d pid=%d cipher=%q\n",
			c.CommonName, c.RealAddress, c.Proto, c.VirtualAddress, c.VirtualIPv6, c.BytesReceived, c.BytesSent,
			ts(c.ConnectedSince), c.Username, c.ClientID, c.PeerID, c.Cipher)
	}
	for _, r := range st.Routes {
		fmt.Fprintf(&b, "route virtual=%q addr=%s cn=%q real=%s proto=%q lastref=%s\n",
			r.Virtual, r.Addr, r.CommonName, r.RealAddress, r.Proto, ts(r.LastRef))
	}
	keys := make([]string, 0, len(st.GlobalStats))
	for k := range st.GlobalStats {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		fmt.Fprintf(&b, "stat %q=%q\n", k, st.GlobalStats[k])
	}
	return b.String()
}

func TestParseStatusGolden(t *testing.T) {
	files, err := filepath.Glob("testdata/*.status")
	if err != nil || len(files) == 0 {
		t.Fatalf("no status files: %v", err)
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			in, err := os.Open(f)
			if err != nil {
				t.Fatal(err)
			}
			defer in.Close()
			got := dump(ParseStatus(in))
			golden := strings.TrimSuffix(f, ".status") + ".golden"
			if *update {
				if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatal(err)
			}
			if got != string(want) {
				t.Errorf("differs from %s (go test -update to accept):\n%s", golden, got)
			}
		})
	}
}

func TestParseStatusRealFiles(t *testing.T) {
	// The files captured from OpenVPN 2.6.14 with two clients each.
	for v := 1; v <= 3; v++ {
		f, err := os.Open(fmt.Sprintf("testdata/openvpn-2.6-v%d.status", v))
		if err != nil {
			t.Fatal(err)
		}
		st, err := ParseStatus(f)
		f.Close()
		if err != nil {
			t.Fatalf("v%d: %v", v, err)
		}
		if st.Version != v || len(st.Clients) != 2 || len(st.Routes) != 2 {
			t.Fatalf("v%d: version %d, %d clients, %d routes", v, st.Version, len(st.Clients), len(st.Routes))
		}
		for _, r := range st.Routes {
			if !r.Addr.Is4() || r.CommonName == "" {
				t.Errorf("v%d: route %+v has no address", v, r)
			}
		}
	}
}

func TestParseStatusQuirks(t *testing.T) {
	f, err := os.Open("testdata/quirks-v2.status")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, err := ParseStatus(f)
	if err != nil {
		t.Fatal(err)
	}
	// Only the plain IPv4 rows have an address: cached, subnet, IPv6 and
	// MAC rows never do.
	var with []string
	for _, r := range st.Routes {
		if r.Addr.IsValid() {
			with = append(with, r.Virtual)
		}
	}
	if strings.Join(with, " ") != "10.240.0.3 10.240.0.4" {
		t.Errorf("routes with an address: %v", with)
	}
	if st.Clients[1].CommonName != "" || st.Clients[1].Username != "" {
		t.Errorf("UNDEF not blanked: %+v", st.Clients[1])
	}
	if st.Clients[0].Proto != "udp4" || st.Clients[0].RealAddress.String() != "192.0.2.10:1194" {
		t.Errorf("2.7 prefix: %q %s", st.Clients[0].Proto, st.Clients[0].RealAddress)
	}
	if st.Clients[1].Proto != "tcp6-server" || st.Clients[1].RealAddress.String() != "[2001:db8::7]:40000" {
		t.Errorf("2.7 prefix with IPv6: %q %s", st.Clients[1].Proto, st.Clients[1].RealAddress)
	}
}

func TestParseStatusErrors(t *testing.T) {
	for name, in := range map[string]string{
		"empty":         "",
		"not status":    "<html>\n",
		"binary":        "\x00\x01\x02",
		"huge line":     "TITLE," + strings.Repeat("x", maxLine+1) + "\nEND\n",
		"v1 torn":       "OpenVPN CLIENT LIST\nUpdated,2026-11-25 04:26:21\n",
		"v3 no end":     "TITLE\tx\n",
		"end with junk": "TITLE,x\nEND,x\n",
	} {
		st, err := ParseStatus(strings.NewReader(in))
		if err == nil {
			t.Errorf("%s: no error", name)
		}
		if errors.Is(err, ErrIncomplete) && st == nil {
			t.Errorf("%s: ErrIncomplete without the partial status", name)
		}
	}
}
