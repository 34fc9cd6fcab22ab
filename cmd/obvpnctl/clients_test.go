package main

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/matryer/is"
)

const testGlob = "../../nss/testdata/openvpn-2.6-v*.status"

func TestClients(t *testing.T) {
	is := is.New(t)
	code, out, _ := runCmd("clients", "--json", "--glob", testGlob)
	is.Equal(code, 0)
	var clients []map[string]any
	is.NoErr(json.Unmarshal([]byte(out), &clients))
	is.Equal(len(clients), 6)
	for _, c := range clients {
		is.True(strings.HasPrefix(c["virtual_address"].(string), "10.240.")) // v1's from its routing table
		is.Equal(c["bytes_received"], 991.0)
	}
	code, out, _ = runCmd("clients", "--glob", testGlob)
	is.Equal(code, 0)
	is.True(strings.HasSuffix(out, "6 clients\n"))
	is.True(strings.Contains(out, "10.240.32.3"))
	// Server files named server-<id>.status give their instance.
	t.Setenv("VPN_RUN_DIR", t.TempDir())
	code, out, _ = runCmd("clients")
	is.Equal(code, 0)
	is.Equal(out, "INSTANCE  COMMON NAME  VIRTUAL ADDRESS  REAL ADDRESS  RX BYTES  TX BYTES  CONNECTED SINCE\n0 clients\n")
}
