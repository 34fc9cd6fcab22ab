// Package vpntest is the test kit for code that runs real OpenVPN: a
// throw-away PKI made with crypto/x509, network namespaces that are removed
// when the test ends, and real openvpn servers and clients inside them.
//
// Tests that need root, openvpn or ip call [Require], which skips the test
// with the reason when something is missing, or fails it when OBVPN_E2E=1
// (as CI sets it). Every namespace, process and file the kit makes is
// removed in t.Cleanup, also when the test fails.
//
// A server runs in a namespace of its own (a "world" with loopback and the
// test's links, no default route), so nothing it does can leave the
// machine. Its management interface is a unix socket in the test's
// directory, reachable from the test's own namespace.
package vpntest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// Require skips tb, or fails it under OBVPN_E2E=1, unless the process is
// root and every command in cmds is installed. It returns the commands'
// paths in order.
func Require(tb testing.TB, cmds ...string) []string {
	tb.Helper()
	e2e := os.Getenv("OBVPN_E2E") == "1"
	missing := func(format string, args ...any) {
		tb.Helper()
		msg := fmt.Sprintf(format, args...)
		if e2e {
			tb.Fatalf("OBVPN_E2E=1 but %s", msg)
		}
		tb.Skipf("%s (set OBVPN_E2E=1 to make this a failure)", msg)
	}
	if os.Geteuid() != 0 {
		missing("the test needs root (network namespaces, tun devices)")
	}
	paths := make([]string, len(cmds))
	for i, c := range cmds {
		p, err := exec.LookPath(c)
		if err != nil {
			missing("%s is not installed", c)
		}
		paths[i] = p
	}
	return paths
}

// PKI is a throw-away certificate authority with one server certificate,
// written as PEM files (mode 0600) into a directory of the test.
type PKI struct {
	CACert, ServerCert, ServerKey []byte // PEM
	CAFile, CertFile, KeyFile     string
}

// NewPKI makes a CA and a server certificate (ECDSA P-256, valid for a
// day) in tb's temporary directory.
func NewPKI(tb testing.TB) *PKI {
	tb.Helper()
	p, err := MakePKI(tb.TempDir())
	if err != nil {
		tb.Fatal(err)
	}
	return p
}

// MakePKI is NewPKI outside a test: it writes the PEM files into dir,
// which the caller removes.
func MakePKI(dir string) (*PKI, error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "obvpn test CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, err
	}
	srvKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	srvTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "obvpn test server"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyAgreement,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	srvDER, err := x509.CreateCertificate(rand.Reader, srvTmpl, ca, &srvKey.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(srvKey)
	if err != nil {
		return nil, err
	}
	p := &PKI{
		CACert:     pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}),
		ServerCert: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srvDER}),
		ServerKey:  pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
		CAFile:     filepath.Join(dir, "ca.crt"),
		CertFile:   filepath.Join(dir, "server.crt"),
		KeyFile:    filepath.Join(dir, "server.key"),
	}
	for file, data := range map[string][]byte{p.CAFile: p.CACert, p.CertFile: p.ServerCert, p.KeyFile: p.ServerKey} {
		if err := os.WriteFile(file, data, 0o600); err != nil {
			return nil, err
		}
	}
	return p, nil
}

var nsSeq atomic.Int64

// Netns is a network namespace that the test owns: loopback up, nothing
// else until the test links it.
type Netns struct {
	Name string
}

// NewNetns creates a namespace named obvpn-<prefix>-<pid>-<n>; it is
// deleted when the test ends.
func NewNetns(tb testing.TB, prefix string) *Netns {
	tb.Helper()
	Require(tb, "ip")
	n, err := MakeNetns(prefix)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := n.Delete(); err != nil {
			tb.Error(err)
		}
	})
	return n
}

// MakeNetns is NewNetns outside a test: the caller deletes the namespace
// with Delete.
func MakeNetns(prefix string) (*Netns, error) {
	n, err := addNetns(prefix)
	if err != nil {
		return nil, err
	}
	if err := ipBatch(n.Name, []string{"link set lo up"}); err != nil {
		_ = n.Delete()
		return nil, err
	}
	return n, nil
}

// addNetns adds a namespace, its loopback still down.
func addNetns(prefix string) (*Netns, error) {
	n := &Netns{Name: fmt.Sprintf("obvpn-%s-%d-%d", prefix, os.Getpid(), nsSeq.Add(1))}
	if out, err := exec.Command("ip", "netns", "add", n.Name).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("vpntest: ip netns add %s: %w: %s", n.Name, err, bytes.TrimSpace(out))
	}
	return n, nil
}

// Delete deletes the namespace, and with it its links and tun devices.
func (n *Netns) Delete() error {
	if out, err := exec.Command("ip", "netns", "del", n.Name).CombinedOutput(); err != nil {
		return fmt.Errorf("vpntest: ip netns del %s: %w: %s", n.Name, err, bytes.TrimSpace(out))
	}
	return nil
}

var linkSeq atomic.Int64

// Device is a namespace of a device's own, linked to a world namespace by
// a veth pair with addresses from 198.18.0.0/15 (a /30 per device).
type Device struct {
	*Netns
	// Addr is the device's address on the link; WorldAddr the world's,
	// which the device reaches its server at.
	Addr, WorldAddr netip.Addr
	// Iface is the name of the device's end of the link.
	Iface string

	world *Netns
	link  string // the world's end of the veth pair
}

// NewDevice creates a device namespace linked to world. The namespace and
// the link go when the test ends.
func NewDevice(tb testing.TB, world *Netns) *Device {
	tb.Helper()
	Require(tb, "ip")
	dev, err := MakeDevice(world)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := dev.Delete(); err != nil {
			tb.Error(err)
		}
	})
	return dev
}

// MaxDevices is how many devices a process can link: the /30s of
// 198.18.0.0/15 but the first. MaxHosts is how many hosts: the /30s of
// 198.51.100.0/24 but the first.
const (
	MaxDevices = 1<<15 - 1
	MaxHosts   = 63
)

// deviceLinks is 198.18.0.0, where the block that the devices' links are
// cut from (198.18.0.0/15, a /30 each) begins.
const deviceLinks = 198<<24 | 18<<16

// deviceLink returns the first address of the n-th device's /30,
// 198.18.0.0 + 4n (n from 1 to MaxDevices).
func deviceLink(n int64) [4]byte {
	v := uint32(deviceLinks + 4*n)
	return [4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}
}

var hostSeq atomic.Int64

// MakeDevice is NewDevice outside a test: the caller deletes the device
// with Delete. A process makes at most MaxDevices devices.
func MakeDevice(world *Netns) (*Device, error) {
	n := linkSeq.Add(1)
	if n > MaxDevices {
		return nil, fmt.Errorf("vpntest: at most %d devices per process", MaxDevices)
	}
	return makeLinked(world, "dev", "od", deviceLink(n), n)
}

// MakeHost makes a namespace for a server host, linked to world like a
// device but with addresses from 198.51.100.0/24, and routed to every
// other host through world, which forwards between its links: hosts reach
// each other as servers on one network do, and nothing else (no default
// route). The caller deletes it with Delete. A process makes at most
// MaxHosts hosts.
func MakeHost(world *Netns) (*Device, error) {
	n := hostSeq.Add(1)
	if n > MaxHosts {
		return nil, fmt.Errorf("vpntest: at most %d hosts per process", MaxHosts)
	}
	h, err := makeLinked(world, "host", "oh", [4]byte{198, 51, 100, byte(4 * n)}, n)
	if err != nil {
		return nil, err
	}
	for _, c := range [][]string{
		{"ip", "netns", "exec", world.Name, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"},
		{"ip", "-n", h.Name, "route", "add", "198.51.100.0/24", "via", h.WorldAddr.String()},
	} {
		if out, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
			_ = h.Delete()
			return nil, fmt.Errorf("vpntest: %s: %w: %s", strings.Join(c, " "), err, bytes.TrimSpace(out))
		}
	}
	return h, nil
}

// makeLinked makes a namespace linked to world by a veth pair on the /30
// at base, the n-th of its kind. Each end knows the other's hardware
// address for good (a permanent neighbour entry, which the kernel's
// neighbour table, shared by every namespace, does not count towards its
// limits): a thousand devices make no ARP traffic and no "neighbour table
// overflow".
//
// Every ip command that enters a namespace copies the mount table, in
// which each namespace is a mount: with a thousand devices that is what
// making one costs most, so the loopback comes up in the same batch as
// the device's end of the link (two such commands per device, not three).
func makeLinked(world *Netns, prefix, ifPrefix string, base4 [4]byte, n int64) (*Device, error) {
	ns, err := addNetns(prefix)
	if err != nil {
		return nil, err
	}
	pid := os.Getpid() % 10000
	dev := &Device{Netns: ns, world: world,
		link:  fmt.Sprintf("o%sw%d-%d", ifPrefix[1:], pid, n),
		Iface: fmt.Sprintf("%s%d-%d", ifPrefix, pid, n)}
	base := netip.AddrFrom4(base4)
	dev.WorldAddr, dev.Addr = base.Next(), base.Next().Next()
	worldMAC, devMAC := linkMAC(ifPrefix, n, 1), linkMAC(ifPrefix, n, 2)
	steps := []struct {
		netns string // run in this namespace, "" for the process's own
		cmds  []string
	}{
		{"", []string{fmt.Sprintf("link add %s address %s netns %s type veth peer name %s address %s netns %s",
			dev.link, worldMAC, world.Name, dev.Iface, devMAC, dev.Name)}},
		{world.Name, []string{
			fmt.Sprintf("addr add %s/30 dev %s", dev.WorldAddr, dev.link),
			fmt.Sprintf("neigh replace %s lladdr %s dev %s nud permanent", dev.Addr, devMAC, dev.link),
			fmt.Sprintf("link set %s up", dev.link),
		}},
		{dev.Name, []string{
			"link set lo up",
			fmt.Sprintf("addr add %s/30 dev %s", dev.Addr, dev.Iface),
			fmt.Sprintf("neigh replace %s lladdr %s dev %s nud permanent", dev.WorldAddr, worldMAC, dev.Iface),
			fmt.Sprintf("link set %s up", dev.Iface),
		}},
	}
	for _, st := range steps {
		if err := ipBatch(st.netns, st.cmds); err != nil {
			_ = dev.Delete()
			return nil, err
		}
	}
	return dev, nil
}

// linkMAC is the hardware address of one end (side 1 or 2) of the n-th
// link of a kind: locally administered, unique in every namespace.
func linkMAC(kind string, n int64, side byte) string {
	return fmt.Sprintf("02:%02x:%02x:%02x:%02x:%02x", kind[1], byte(n>>16), byte(n>>8), byte(n), side)
}

// ipBatch runs ip's commands in netns ("" for the process's own), in one
// ip process.
func ipBatch(netns string, cmds []string) error {
	args := []string{"-batch", "-"}
	if netns != "" {
		args = append([]string{"-n", netns}, args...)
	}
	cmd := exec.Command("ip", args...)
	cmd.Stdin = strings.NewReader(strings.Join(cmds, "\n") + "\n")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("vpntest: ip %s: %s: %w: %s", strings.Join(args, " "), strings.Join(cmds, "; "), err, bytes.TrimSpace(out))
	}
	return nil
}

// Delete deletes the device's namespace and its link to the world.
func (d *Device) Delete() error {
	// Deleting either namespace deletes the pair; the world may outlive
	// the device, so delete the link explicitly too (it may be gone).
	_ = exec.Command("ip", "-n", d.world.Name, "link", "del", d.link).Run()
	return d.Netns.Delete()
}

// Command returns a command that runs name inside the namespace.
func (n *Netns) Command(name string, args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", n.Name, name}, args...)...)
}

// CommandContext is Command bound to ctx, in the form of the command
// factories of package vpn (vpn.Server.Command, vpn.Instance.Command).
func (n *Netns) CommandContext(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.Name, name}, args...)...)
}

// Process is a process the kit started; it is stopped (SIGTERM, then
// SIGKILL after 5 s) and waited for when the test ends.
type Process struct {
	cmd    *exec.Cmd
	exited chan struct{}
	mu     sync.Mutex
	lines  []string
	waitCh []waiter
}

type waiter struct {
	substr string
	ch     chan string
}

// start runs cmd, collecting its output lines (OpenVPN logs to stdout).
func start(tb testing.TB, cmd *exec.Cmd) *Process {
	tb.Helper()
	p, err := launch(cmd)
	return own(tb, p, err)
}

// own stops p when the test ends, and logs its output if the test failed;
// err fails the test at once.
func own(tb testing.TB, p *Process, err error) *Process {
	tb.Helper()
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		p.Stop()
		if tb.Failed() {
			tb.Logf("output of %v:\n%s", p.cmd.Args, strings.Join(p.Lines(), "\n"))
		}
	})
	return p
}

// Launch starts cmd in a process group of its own, collecting its output
// lines (standard output and error), as the kit starts openvpn; the
// caller ends it with Stop.
func Launch(cmd *exec.Cmd) (*Process, error) { return launch(cmd) }

func launch(cmd *exec.Cmd) (*Process, error) {
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	cmd.Stderr = cmd.Stdout
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("vpntest: %s: %w", cmd.Path, err)
	}
	p := &Process{cmd: cmd, exited: make(chan struct{})}
	go func() {
		defer close(p.exited)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			p.add(sc.Text())
		}
		_ = cmd.Wait()
	}()
	return p, nil
}

func (p *Process) add(line string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.lines = append(p.lines, line)
	kept := p.waitCh[:0]
	for _, w := range p.waitCh {
		if strings.Contains(line, w.substr) {
			w.ch <- line
		} else {
			kept = append(kept, w)
		}
	}
	p.waitCh = kept
}

// Lines returns the output so far.
func (p *Process) Lines() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.lines...)
}

// WaitFor waits until an output line contains substr (one already printed
// counts) and returns it; it fails when ctx ends or the process exits
// first.
func (p *Process) WaitFor(ctx context.Context, substr string) (string, error) {
	return p.WaitFrom(ctx, 0, substr)
}

// WaitFrom is WaitFor for the lines from the from-th on (0-indexed, as in
// Lines), so that a test can wait for something to happen again.
func (p *Process) WaitFrom(ctx context.Context, from int, substr string) (string, error) {
	ch := make(chan string, 1)
	p.mu.Lock()
	for _, l := range p.lines[min(from, len(p.lines)):] {
		if strings.Contains(l, substr) {
			p.mu.Unlock()
			return l, nil
		}
	}
	p.waitCh = append(p.waitCh, waiter{substr, ch})
	p.mu.Unlock()
	select {
	case l := <-ch:
		return l, nil
	case <-p.exited:
		select {
		case l := <-ch:
			return l, nil
		default:
		}
		return "", fmt.Errorf("vpntest: %s exited before printing %q", filepath.Base(p.cmd.Path), substr)
	case <-ctx.Done():
		return "", fmt.Errorf("vpntest: waiting for %q: %w", substr, ctx.Err())
	}
}

// Pid returns the process's id (that of the command itself: ip netns
// exec becomes the command it runs).
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// Exited returns a channel closed when the process has exited.
func (p *Process) Exited() <-chan struct{} { return p.exited }

// Signal sends sig to the process (not to its group).
func (p *Process) Signal(sig os.Signal) error { return p.cmd.Process.Signal(sig) }

// Kill kills the process's group with SIGKILL, without waiting.
func (p *Process) Kill() error { return syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL) }

// ExitCode returns the process's exit status once it has exited (-1 if a
// signal ended it), and -1 before.
func (p *Process) ExitCode() int {
	select {
	case <-p.exited:
		return p.cmd.ProcessState.ExitCode()
	default:
		return -1
	}
}

// Stop ends the process group and waits for it.
func (p *Process) Stop() {
	select {
	case <-p.exited:
		return
	default:
	}
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(5 * time.Second):
		_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.exited
	}
}

// ServerOptions configure StartServer.
type ServerOptions struct {
	// Netns is where the server runs; nil makes a world namespace.
	Netns *Netns
	// Listen is the address the server listens on inside its namespace;
	// empty means 127.0.0.1. Devices in namespaces of their own need the
	// world side of their link, or "0.0.0.0".
	Listen string
	// Port is the TCP port; zero means 1194.
	Port int
	// Subnet is the server's --server network, such as "10.8.0.0
	// 255.255.255.0"; empty means that one.
	Subnet string
	// ClientAuth adds --management-client-auth: every client must be
	// answered on the management interface.
	ClientAuth bool
	// Extra are more configuration lines.
	Extra []string
}

// Server is a running openvpn server.
type Server struct {
	*Process
	Netns *Netns
	PKI   *PKI
	// Management is the management interface's unix socket.
	Management string
	// StatusFile is written every second in status version 2.
	StatusFile string
	Port       int
}

// StartServer starts an openvpn server with a fresh PKI on 127.0.0.1
// inside its namespace, held (--management-hold) until a management
// client releases it, and returns once the management socket is ready.
func StartServer(tb testing.TB, opts ServerOptions) *Server {
	tb.Helper()
	bin := Require(tb, "openvpn", "ip")[0]
	if opts.Netns == nil {
		opts.Netns = NewNetns(tb, "world")
	}
	if opts.Port == 0 {
		opts.Port = 1194
	}
	if opts.Listen == "" {
		opts.Listen = "127.0.0.1"
	}
	if opts.Subnet == "" {
		opts.Subnet = "10.8.0.0 255.255.255.0"
	}
	pki := NewPKI(tb)
	dir := tb.TempDir()
	s := &Server{Netns: opts.Netns, PKI: pki, Management: filepath.Join(dir, "mgmt.sock"),
		StatusFile: filepath.Join(dir, "server-1.status"), Port: opts.Port}
	conf := []string{
		"mode server", "tls-server", "topology subnet", "proto tcp4-server", "local " + opts.Listen,
		fmt.Sprintf("port %d", opts.Port), "dev tun", "server " + opts.Subnet,
		"ca " + pki.CAFile, "cert " + pki.CertFile, "key " + pki.KeyFile, "dh none",
		"verify-client-cert none", "username-as-common-name",
		"management " + s.Management + " unix", "management-hold",
		"status " + s.StatusFile + " 1", "status-version 2",
		"keepalive 2 10", "hand-window 20", "verb 3",
		// As obvpn's instances: serve comp-lzo clients (balenaOS) and
		// clients without compression alike, compressing nothing.
		"compress migrate",
	}
	if opts.ClientAuth {
		conf = append(conf, "management-client-auth")
	} else {
		// Without management auth a client needs a verify script; accept
		// every client.
		conf = append(conf, "script-security 2", "auth-user-pass-verify /bin/true via-env")
	}
	conf = append(conf, opts.Extra...)
	file := filepath.Join(dir, "server.conf")
	if err := os.WriteFile(file, []byte(strings.Join(conf, "\n")+"\n"), 0o600); err != nil {
		tb.Fatal(err)
	}
	s.Process = start(tb, opts.Netns.Command(bin, "--config", file))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := s.WaitFor(ctx, "MANAGEMENT: unix domain socket listening"); err != nil {
		tb.Fatal(err)
	}
	return s
}

// Profile is a client configuration that devices in the field run.
type Profile string

const (
	// BalenaOS is the configuration that every balenaOS device ships,
	// meta-balena's resin.conf (recipes-connectivity/openvpn/openvpn/
	// resin.conf): client, remote, resolv-retry infinite, remote-cert-tls
	// server, ca, auth-user-pass, auth-retry none, comp-lzo, dev resin-vpn,
	// dev-type tun, proto tcp, nobind, persist-key, persist-tun, verb 3,
	// user and group of an unprivileged account, reneg-sec 0 and
	// reneg-bytes 1073741824. Adapted to the test machine: the remote, the
	// CA and credential files, the account (nobody and nogroup, for
	// balenaOS's openvpn), and, for a client that shares its namespace
	// with others (no Tunnel), the device name (dev tun: the kernel picks
	// one). Its up and down scripts, which only report to the device's
	// supervisor, are left out. The default profile.
	BalenaOS Profile = "balenaos"

	// Minimal is the least a client needs to talk to an obvpn server: no
	// compression, no privilege drop.
	Minimal Profile = "minimal"
)

// Profiles are every client profile, for tests that must pass with each.
var Profiles = []Profile{BalenaOS, Minimal}

// TunDev returns the name of the tun device that a client of profile p
// with a Tunnel makes in its namespace: balenaOS's "resin-vpn", or the
// kernel's first "tun0".
func TunDev(p Profile) string {
	if p == Minimal {
		return "tun0"
	}
	return "resin-vpn"
}

// ClientOptions configure StartClient.
type ClientOptions struct {
	// Profile is the client's configuration. Empty means BalenaOS.
	Profile Profile

	// Netns is where the client runs, normally the server's.
	Netns *Netns
	// Remote is the server's address and port inside the namespace.
	Remote string
	// Username and Password are sent with auth-user-pass.
	Username, Password string
	// CA is the server's CA certificate file.
	CA string
	// Tunnel configures the client's tun device and routes, so that the
	// device is reachable through the tunnel; it needs a namespace of the
	// client's own (see NewDevice). Without it the client only talks to
	// the server (--ifconfig-noexec, --route-nopull).
	Tunnel bool
	// Extra are more configuration lines.
	Extra []string
}

// StartClient starts an openvpn client that does not configure its tun
// device nor routes (--ifconfig-noexec, --route-nopull): enough to talk to
// a server. Wait for "Initialization Sequence Completed" or AUTH_FAILED
// with WaitFor.
func StartClient(tb testing.TB, opts ClientOptions) *Process {
	tb.Helper()
	Require(tb, "openvpn", "ip")
	p, err := LaunchClient(tb.TempDir(), opts)
	return own(tb, p, err)
}

// searchable lets others search dir and every directory above it (adds
// o+x where it is missing; nothing else changes).
func searchable(dir string) error {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	for p := abs; ; p = filepath.Dir(p) {
		fi, err := os.Stat(p)
		if err != nil {
			return err
		}
		if fi.Mode().Perm()&0o001 == 0 {
			if err := os.Chmod(p, fi.Mode().Perm()|0o001); err != nil {
				return err
			}
		}
		if p == filepath.Dir(p) {
			return nil
		}
	}
}

// clientConfig returns the lines of opts.Profile's configuration, with
// the credentials in the file cred.
func clientConfig(opts ClientOptions, cred string) ([]string, error) {
	host, port, _ := strings.Cut(opts.Remote, ":")
	switch opts.Profile {
	case Minimal:
		return []string{
			"client", "dev tun", "proto tcp4-client", "remote " + host + " " + port,
			"ca " + opts.CA, "auth-user-pass " + cred,
			"remote-cert-tls server", "connect-retry 1", "auth-retry none", "verb 3",
		}, nil
	case BalenaOS, "":
		dev := "resin-vpn"
		if !opts.Tunnel {
			dev = "tun" // several clients in one namespace
		}
		return []string{
			"client",
			"remote " + host + " " + port,
			"resolv-retry infinite",
			"remote-cert-tls server",
			"ca " + opts.CA,
			"auth-user-pass " + cred,
			"auth-retry none",
			"comp-lzo",
			"dev " + dev,
			"dev-type tun",
			"proto tcp",
			"nobind",
			"persist-key",
			"persist-tun",
			"verb 3",
			"user nobody",
			"group nogroup",
			"reneg-sec 0",
			"reneg-bytes 1073741824",
		}, nil
	}
	return nil, fmt.Errorf("vpntest: unknown client profile %q", opts.Profile)
}

// LaunchClient is StartClient outside a test: its configuration and
// credentials go into dir, which the caller removes, and the caller ends
// it with Stop.
func LaunchClient(dir string, opts ClientOptions) (*Process, error) {
	bin, err := exec.LookPath("openvpn")
	if err != nil {
		return nil, fmt.Errorf("vpntest: %w", err)
	}
	cred := filepath.Join(dir, "credentials")
	mode := os.FileMode(0o600)
	if opts.Profile == BalenaOS || opts.Profile == "" {
		// balenaOS's prepare-openvpn writes /var/volatile/vpnfile with the
		// default umask, so that openvpn, once it runs as its own user,
		// reads it again when it reconnects after the server ended its
		// session (a drain, a kill): readable by others, in directories
		// they can search.
		mode = 0o644
		if err := searchable(dir); err != nil {
			return nil, err
		}
	}
	if err := os.WriteFile(cred, []byte(opts.Username+"\n"+opts.Password+"\n"), mode); err != nil {
		return nil, err
	}
	if err := os.Chmod(cred, mode); err != nil { // whatever the umask
		return nil, err
	}
	conf, err := clientConfig(opts, cred)
	if err != nil {
		return nil, err
	}
	if !opts.Tunnel {
		conf = append(conf, "ifconfig-noexec", "route-nopull")
	}
	conf = append(conf, opts.Extra...)
	file := filepath.Join(dir, "client.conf")
	if err := os.WriteFile(file, []byte(strings.Join(conf, "\n")+"\n"), 0o600); err != nil {
		return nil, err
	}
	return launch(opts.Netns.Command(bin, "--config", file))
}
