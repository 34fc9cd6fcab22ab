package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/matryer/is"
)

func TestLookup(t *testing.T) {
	is := is.New(t)
	t.Setenv("NSS_OPENVPN_STATUS_GLOB", testGlob)
	code, out, _ := runCmd("lookup", "FEDCBA9876543210fedcba9876543210.vpn")
	is.Equal(code, 0)
	is.True(strings.HasPrefix(out, "10.240."))
	code, out, _ = runCmd("lookup", "--glob", "../../nss/testdata/openvpn-2.6-v3.status", "0123456789abcdef0123456789abcdef")
	is.Equal(code, 0)
	is.Equal(out, "10.240.48.3\n")
	code, _, errOut := runCmd("lookup", "ffff.vpn")
	is.Equal(code, 1)
	is.True(strings.Contains(errOut, "no such device"))
	code, _, _ = runCmd("lookup")
	is.Equal(code, 2)
	t.Setenv("NSS_OPENVPN_STATUS_GLOB", "[")
	code, _, errOut = runCmd("lookup", "ffff")
	is.Equal(code, 2)
	is.True(strings.Contains(errOut, "NSS_OPENVPN_STATUS_GLOB"))
}

func TestLookupTornFile(t *testing.T) {
	is := is.New(t)
	dir := t.TempDir()
	full, err := os.ReadFile("../../nss/testdata/openvpn-2.6-v2.status")
	is.NoErr(err)
	is.NoErr(os.WriteFile(filepath.Join(dir, "server-1.status"), full, 0o644))
	is.NoErr(os.WriteFile(filepath.Join(dir, "server-2.status"), full[:len(full)-20], 0o644))
	// The torn file answers nothing; the whole one still does.
	code, out, errOut := runCmd("lookup", "--glob", filepath.Join(dir, "*.status"), "0123456789abcdef0123456789abcdef")
	is.Equal(errOut, "")
	is.Equal(code, 0)
	is.Equal(out, "10.240.32.3\n")
}

func TestStatusGlobs(t *testing.T) {
	is := is.New(t)
	t.Setenv("NSS_OPENVPN_STATUS_GLOB", "")
	t.Setenv("VPN_RUN_DIR", "")
	g, err := statusGlobs("")
	is.NoErr(err)
	is.Equal(g, []string(nil)) // the resolver's defaults, /run and /var/run
	g, _ = statusGlobs("/x/*.status")
	is.Equal(g, []string{"/x/*.status"})
	t.Setenv("VPN_RUN_DIR", "/srv/vpn")
	g, _ = statusGlobs("")
	is.Equal(g, []string{"/srv/vpn/server-*.status"})
	t.Setenv("NSS_OPENVPN_STATUS_GLOB", "/tmp/s-*.status")
	g, _ = statusGlobs("")
	is.Equal(g, []string{"/tmp/s-*.status"})
	g, _ = statusGlobs("/x/*.status") // the flag wins
	is.Equal(g, []string{"/x/*.status"})
	t.Setenv("NSS_OPENVPN_STATUS_GLOB", "[")
	_, err = statusGlobs("")
	is.True(err != nil && strings.Contains(err.Error(), "NSS_OPENVPN_STATUS_GLOB"))
}
