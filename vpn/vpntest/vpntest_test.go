package vpntest_test

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"os"
	"regexp"
	"testing"
	"time"

	"github.com/obvpn/obvpn/openvpnmgmt"
	"github.com/obvpn/obvpn/vpn/vpntest"
)

func TestPKI(t *testing.T) {
	p := vpntest.NewPKI(t)
	block, _ := pem.Decode(p.ServerCert)
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	caBlock, _ := pem.Decode(p.CACert)
	ca, err := x509.ParseCertificate(caBlock.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	if _, err := cert.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		t.Errorf("the server certificate does not verify: %v", err)
	}
	fi, err := os.Stat(p.KeyFile)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("key file: %v %v", fi, err)
	}
}

// TestDeviceThroughTheTunnel: a device in a namespace of its own connects
// to a server in the world namespace over a veth link, and the world
// reaches the device's VPN address through the tunnel.
func TestDeviceThroughTheTunnel(t *testing.T) {
	vpntest.Require(t, "openvpn", "ip")
	for _, p := range vpntest.Profiles {
		t.Run(string(p), func(t *testing.T) { testDeviceThroughTheTunnel(t, p) })
	}
}

func testDeviceThroughTheTunnel(t *testing.T, profile vpntest.Profile) {
	world := vpntest.NewNetns(t, "world")
	dev := vpntest.NewDevice(t, world)
	srv := vpntest.StartServer(t, vpntest.ServerOptions{Netns: world, Listen: dev.WorldAddr.String()})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	mgmt, err := openvpnmgmt.Dial(ctx, "unix", srv.Management, openvpnmgmt.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer mgmt.Close()
	if err := mgmt.HoldRelease(ctx); err != nil {
		t.Fatal(err)
	}
	client := vpntest.StartClient(t, vpntest.ClientOptions{Profile: profile, Netns: dev.Netns, Remote: fmt.Sprintf("%s:%d", dev.WorldAddr, srv.Port),
		CA: srv.PKI.CAFile, Username: "0123456789abcdef0123456789abcdef", Password: "k", Tunnel: true})
	if _, err := client.WaitFor(ctx, "Initialization Sequence Completed"); err != nil {
		t.Fatal(err)
	}
	// "net_addr_v4_add: 10.8.0.2/24 dev tun0"
	var vpnAddr string
	re := regexp.MustCompile(`net_addr_v4_add: ([0-9.]+)/`)
	for _, l := range client.Lines() {
		if m := re.FindStringSubmatch(l); m != nil {
			vpnAddr = m[1]
		}
	}
	if vpnAddr == "" {
		t.Fatal("no VPN address in the client's log")
	}
	// A service on the device, reached from the world through the tunnel.
	l, err := dev.Listen("tcp", "0.0.0.0:8080")
	if err != nil {
		t.Fatal(err)
	}
	srvHTTP := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, "hello from the device")
	})}
	go srvHTTP.Serve(l)
	defer srvHTTP.Close()
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DialContext: world.Dial}}
	resp, err := hc.Get("http://" + vpnAddr + ":8080/")
	if err != nil {
		t.Fatalf("GET through the tunnel: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "hello from the device" {
		t.Errorf("body %q", body)
	}
	// And the device's link address is not reachable from the world's
	// loopback-only side: only through the link or the tunnel.
	if _, err := vpntest.NewNetns(t, "other").Dial(ctx, "tcp", vpnAddr+":8080"); err == nil {
		t.Error("a namespace without a link reached the device")
	}
}
