package vpn

import (
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/obvpn/obvpn/openvpnmgmt"
	"github.com/obvpn/obvpn/subnet"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata")

func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if got != string(want) {
		t.Errorf("%s differs from the golden file (run go test -update to accept):\n%s", name, got)
	}
}

func TestOpenVPNServerConfig(t *testing.T) {
	c, err := loader(serverEnv("VPN_RUN_DIR", "/run/obvpn test", "VPN_BYTECOUNT_INTERVAL", "5")).Config()
	if err != nil {
		t.Fatal(err)
	}
	in, err := c.Plan.Instance(2)
	if err != nil {
		t.Fatal(err)
	}
	conf, err := c.OpenVPNServerConfig(in, ScriptHooks{})
	if err != nil {
		t.Fatal(err)
	}
	golden(t, "server-management.conf", conf)

	c.Auth.Mode = AuthScript
	c.OpenVPN.DH = []byte(testDH)
	c.Plan.Gateway = c.Plan.Base.Addr().Next()
	in, _ = c.Plan.Instance(2)
	if _, err := c.OpenVPNServerConfig(in, ScriptHooks{}); err == nil {
		t.Error("script mode without hooks: no error")
	}
	conf, err = c.OpenVPNServerConfig(in, ScriptHooks{Auth: "/usr/local/bin/vpn-auth", ClientEvent: "/usr/local/bin/vpn-client-event", APIURL: "http://127.0.0.1:30002"})
	if err != nil {
		t.Fatal(err)
	}
	golden(t, "server-script.conf", conf)
	if !strings.Contains(conf, "\ndh \"/run/obvpn test/dh.pem\"\n") {
		t.Errorf("the DH file is not quoted:\n%s", conf)
	}
}

func TestNetmask(t *testing.T) {
	for p, want := range map[string]string{"10.240.0.0/20": "255.255.240.0", "0.0.0.0/0": "0.0.0.0", "10.0.0.0/8": "255.0.0.0", "192.0.2.8/29": "255.255.255.248"} {
		pfx := netip.MustParsePrefix(p)
		if got := subnet.Netmask(pfx).String(); got != want {
			t.Errorf("netmask(%s) = %s, want %s", p, got, want)
		}
	}
	for in, want := range map[string]string{"plain": "plain", "": `""`, "a b": `"a b"`, `say "hi"`: `"say \"hi\""`, `c:\x`: `"c:\\x"`, "#x": `"#x"`} {
		if got := openvpnmgmt.Quote(in); got != want {
			t.Errorf("openvpnmgmt.Quote(%q) = %s, want %s", in, got, want)
		}
	}
}

// TestCheckHooks: a hook in a directory that others cannot search is
// refused, with its path and the account; one they can run is not.
func TestCheckHooks(t *testing.T) {
	dir := t.TempDir()
	hook := filepath.Join(dir, "vpn-auth")
	if err := os.WriteFile(hook, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	h := ScriptHooks{Auth: hook, ClientEvent: hook}
	if err := os.Chmod(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	err := h.CheckHooks("nobody")
	if err == nil || !strings.Contains(err.Error(), dir) || !strings.Contains(err.Error(), "VPN_OPENVPN_USER") {
		t.Errorf("a hook in a 0700 directory: %v", err)
	}
	if err := h.CheckHooks("root"); err != nil {
		t.Errorf("as root: %v", err)
	}
	for _, d := range []string{dir, filepath.Dir(dir)} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := h.CheckHooks("nobody"); err != nil {
		t.Errorf("a hook others can run: %v", err)
	}
	if err := (ScriptHooks{Auth: filepath.Join(dir, "missing")}).CheckHooks("nobody"); err == nil {
		t.Error("a missing hook: no error")
	}
}

// TestOpenVPNServerConfigZeroValues: a Config built by hand, with the
// OpenVPN settings left zero, renders what their documentation says:
// compress migrate, nobody and nogroup, no providers; and the other
// modes render their lines.
func TestOpenVPNServerConfigZeroValues(t *testing.T) {
	c := &Config{}
	c.Plan.Base = netip.MustParsePrefix("10.240.0.0/16")
	c.Plan.Bits = 24
	c.Plan.Instances = 1
	in, err := c.Plan.Instance(1)
	if err != nil {
		t.Fatal(err)
	}
	conf, err := c.OpenVPNServerConfig(in, ScriptHooks{})
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"\ncompress migrate\n", "\nuser nobody\n", "\ngroup nogroup\n", "\npersist-tun\n", "\nmute 20\n"} {
		if !strings.Contains(conf, want) {
			t.Errorf("zero OpenVPNConfig: no %q in\n%s", strings.TrimSpace(want), conf)
		}
	}
	for _, unwanted := range []string{"allow-compression", "providers", "explicit-exit-notify"} {
		if strings.Contains(conf, unwanted) {
			t.Errorf("zero OpenVPNConfig: %q in\n%s", unwanted, conf)
		}
	}
	c.OpenVPN = OpenVPNConfig{Compression: CompressionLZO, User: "daemon", Group: "daemon", Providers: "legacy default",
		Proto: "udp4", ExplicitExitNotify: 1}
	conf, _ = c.OpenVPNServerConfig(in, ScriptHooks{})
	for _, want := range []string{"\ncompress lzo\nallow-compression asym\n", "\nuser daemon\ngroup daemon\n",
		"\nproviders legacy default\n", "\nexplicit-exit-notify 1\n"} {
		if !strings.Contains(conf, want) {
			t.Errorf("no %q in\n%s", strings.TrimSpace(want), conf)
		}
	}
	c.OpenVPN = OpenVPNConfig{Compression: CompressionOff, ExplicitExitNotify: 1} // tcp: no exit notify
	conf, _ = c.OpenVPNServerConfig(in, ScriptHooks{})
	if strings.Contains(conf, "compress") || strings.Contains(conf, "explicit-exit-notify") {
		t.Errorf("compression off over tcp:\n%s", conf)
	}
}

// TestScriptConfigDeferral: script mode's configuration names OpenVPN's tmp-dir
// for the deferred auth control files, and -sync leaves it out.
func TestScriptConfigDeferral(t *testing.T) {
	c, err := loader(serverEnv("VPN_AUTH_MODE", "script")).Config()
	if err != nil {
		t.Fatal(err)
	}
	in, _ := c.Plan.Instance(1)
	hooks := ScriptHooks{Auth: "/bin/vpn-auth", ClientEvent: "/bin/vpn-client-event", APIURL: "http://127.0.0.1:1", ControlDir: "/run/openvpn/openvpn-tmp"}
	conf, err := c.OpenVPNServerConfig(in, hooks)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(conf, "\ntmp-dir /run/openvpn/openvpn-tmp\n") || !strings.Contains(conf, "\nauth-user-pass-verify \"/bin/vpn-auth -api http://127.0.0.1:1\" via-file\n") {
		t.Errorf("no tmp-dir, or a changed auth-user-pass-verify:\n%s", conf)
	}
	hooks.Sync, hooks.ControlDir = true, ""
	conf, _ = c.OpenVPNServerConfig(in, hooks)
	if strings.Contains(conf, "tmp-dir") || !strings.Contains(conf, "\nauth-user-pass-verify \"/bin/vpn-auth -api http://127.0.0.1:1 -sync\" via-file\n") {
		t.Errorf("Sync: a tmp-dir, or no -sync:\n%s", conf)
	}
}
