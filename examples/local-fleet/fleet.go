package main

import (
	"bufio"
	"context"
	"crypto/rand"
	_ "embed"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/obvpn/obvpn/nss"
	"github.com/obvpn/obvpn/vpn"
	"github.com/obvpn/obvpn/vpn/balena/balenatest"
	"github.com/obvpn/obvpn/vpn/vpntest"
)

//go:embed devices.json
var devicesJSON []byte

const maxDevices = vpntest.MaxDevices

// The server's addresses inside the world namespace.
const (
	vpnPort     = 443              // HAProxy's frontend, which the devices dial
	proxyAddr   = "127.0.0.1:3128" // the CONNECT proxy
	metricsAddr = "127.0.0.1:8080" // /cluster_metrics
	monitorAddr = "127.0.0.1:8088" // HAProxy's /ping
)

type options struct {
	devices     int
	devicesFile string
	once        bool
	timeout     time.Duration
	proxyAddr   string // on the host, relayed to the world's proxy
	metricsAddr string // on the host, relayed to the world's metrics
	log         *slog.Logger
	out         io.Writer
}

// device is a simulated device: its record in the API, its namespace, its
// openvpn client and its web service, and what the check found.
type device struct {
	balenatest.Device
	ns     *vpntest.Device
	client *vpntest.Process
	web    *http.Server

	instance int
	addr     netip.Addr
	reached  bool
	rtt      time.Duration
	err      error
}

// fleet is everything the demo made, for close to remove.
type fleet struct {
	o       options
	dir     string
	world   *vpntest.Netns
	pki     *vpntest.PKI
	api     *balenatest.API
	apiSrv  *http.Server
	apiDone chan struct{}
	cfg     *vpn.Config
	srv     *vpn.Server
	stop    context.CancelFunc // ends the server's Run
	done    chan struct{}      // closed when Run returned
	runErr  error
	devices []*device
	relays  []net.Listener
	wg      sync.WaitGroup // the web services and the relays
}

// demo brings the fleet up, checks every device through the proxy, prints
// the results and, unless o.once, waits for ctx to end; then it removes
// everything.
func demo(ctx context.Context, o options) (err error) {
	records, err := loadDevices(o)
	if err != nil {
		return err
	}
	f := &fleet{o: o}
	defer func() {
		// A second signal cuts the drain short.
		hurry, stop := signalContext()
		defer stop()
		if cerr := f.close(hurry); err == nil {
			err = cerr
		}
	}()
	if err := f.start(ctx); err != nil {
		return err
	}
	fmt.Fprintf(o.out, "VPN server up: %d instances behind HAProxy on port %d, CONNECT proxy on %s (in namespace %s)\n",
		f.cfg.Plan.Instances, vpnPort, proxyAddr, f.world.Name)
	for _, r := range records {
		if err := f.addDevice(r); err != nil {
			return err
		}
	}
	wctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	t0 := time.Now()
	if err := f.waitOnline(wctx); err != nil {
		return err
	}
	fmt.Fprintf(o.out, "all %d devices online in %s\n", len(f.devices), time.Since(t0).Round(time.Millisecond))
	f.check(wctx)
	reached := f.report()
	if o.once {
		if reached < len(f.devices) {
			return fmt.Errorf("%d of %d devices not reached through the proxy", len(f.devices)-reached, len(f.devices))
		}
		return nil
	}
	f.relay(o.proxyAddr, proxyAddr)
	f.relay(o.metricsAddr, metricsAddr)
	fmt.Fprintf(o.out, "\nTry it by hand:\n  curl -x http://%s --proxytunnel http://%s.balena/\n", o.proxyAddr, f.devices[0].UUID)
	fmt.Fprintf(o.out, "Metrics: http://%s/cluster_metrics\n", o.metricsAddr)
	fmt.Fprintln(o.out, "Ctrl-C drains the server and removes every namespace, link, process and file.")
	<-ctx.Done()
	return nil
}

// signalContext is a context that ends at the next SIGINT or SIGTERM.
func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
}

type record struct {
	UUID string `json:"uuid"`
	Key  string `json:"key"`
}

// loadDevices returns o.devices generated devices, or those of the JSON
// file.
func loadDevices(o options) ([]record, error) {
	if o.devices < 0 || o.devices > maxDevices {
		return nil, fmt.Errorf("-devices %d: want 1 to %d", o.devices, maxDevices)
	}
	if o.devices > 0 {
		rs := make([]record, o.devices)
		for i := range rs {
			rs[i] = record{UUID: randomHex(16), Key: randomHex(16)}
		}
		return rs, nil
	}
	data, name := devicesJSON, "devices.json"
	if o.devicesFile != "" {
		var err error
		if data, err = os.ReadFile(o.devicesFile); err != nil {
			return nil, err
		}
		name = o.devicesFile
	}
	var rs []record
	if err := json.Unmarshal(data, &rs); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if len(rs) == 0 || len(rs) > maxDevices {
		return nil, fmt.Errorf("%s: %d devices, want 1 to %d", name, len(rs), maxDevices)
	}
	seen := map[string]bool{}
	for i, r := range rs {
		if _, err := hex.DecodeString(r.UUID); err != nil || len(r.UUID) == 0 || r.Key == "" {
			return nil, fmt.Errorf("%s: device %d: want a hexadecimal uuid and a key", name, i+1)
		}
		if seen[strings.ToLower(r.UUID)] {
			return nil, fmt.Errorf("%s: device %d: uuid %s twice", name, i+1, r.UUID)
		}
		seen[strings.ToLower(r.UUID)] = true
	}
	return rs, nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// start makes the world, the API and the server, and waits until the
// server is ready.
func (f *fleet) start(ctx context.Context) error {
	var err error
	if f.dir, err = os.MkdirTemp("", "local-fleet-"); err != nil {
		return err
	}
	if f.world, err = vpntest.MakeNetns("fleet"); err != nil {
		return err
	}
	if f.pki, err = vpntest.MakePKI(f.dir); err != nil {
		return err
	}

	// The balena API, on the host's loopback.
	f.api = balenatest.New()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	f.apiSrv = &http.Server{Handler: f.api, ReadHeaderTimeout: 10 * time.Second}
	f.apiDone = make(chan struct{})
	go func() { defer close(f.apiDone); _ = f.apiSrv.Serve(l) }()

	run := filepath.Join(f.dir, "run")
	if err := os.Mkdir(run, 0o700); err != nil {
		return err
	}
	f.cfg, err = vpn.Loader{Env: map[string]string{
		"VPN_BASE_SUBNET":                        "10.240.0.0/12",
		"VPN_INSTANCE_SUBNET_BITMASK":            "20",
		"VPN_INSTANCE_COUNT":                     "2",
		"VPN_RUN_DIR":                            run,
		"VPN_HAPROXY":                            "managed",
		"VPN_HAPROXY_SOCKET":                     filepath.Join(run, "haproxy.sock"),
		"VPN_HAPROXY_MONITOR_ADDR":               monitorAddr,
		"VPN_PORT":                               fmt.Sprint(vpnPort),
		"BALENA_API_INTERNAL_HOST":               l.Addr().String(),
		"VPN_SERVICE_API_KEY":                    f.api.ServiceKey,
		"VPN_GUEST_API_KEY":                      f.api.GuestKey,
		"VPN_OPENVPN_CA_CRT":                     string(f.pki.CACert),
		"VPN_OPENVPN_SERVER_CRT":                 string(f.pki.ServerCert),
		"VPN_OPENVPN_SERVER_KEY":                 string(f.pki.ServerKey),
		"VPN_API_PORT":                           "8081",
		"VPN_METRICS_ADDR":                       metricsAddr,
		"VPN_CONNECT_PROXY_PORT":                 strings.TrimPrefix(proxyAddr, "127.0.0.1:"),
		"VPN_STATUS_FILE_WRITE_INTERVAL_SECONDS": "1",
		"VPN_BYTECOUNT_INTERVAL":                 "5",
		"DEFAULT_SIGTERM_TIMEOUT":                "10",
		"MINIMUM_DRAIN_RATE_PER_MINUTE":          "6000", // 10 ms between kills
		"DELAY_ON_AUTH_FAIL":                     "1000",
	}}.Config()
	if err != nil {
		return err
	}
	f.srv = &vpn.Server{
		Config:  f.cfg,
		API:     f.api.NewClient("http://" + l.Addr().String()),
		Command: f.world.CommandContext,
		Dial:    f.world.Dial,
		Listen:  f.world.Listen,
		Logger:  f.o.log,
	}
	sctx, stop := context.WithCancel(context.Background())
	f.stop, f.done = stop, make(chan struct{})
	go func() { defer close(f.done); f.runErr = f.srv.Run(sctx) }()
	select {
	case <-f.srv.Ready():
		return nil
	case <-f.done:
		return fmt.Errorf("the VPN server stopped: %w", f.runErr)
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(time.Minute):
		return errors.New("the VPN server was not ready within a minute")
	}
}

// addDevice registers a device with the API, makes its namespace, starts
// its web service on port 80 and its openvpn client, which dials HAProxy.
func (f *fleet) addDevice(r record) error {
	d := &device{Device: f.api.AddDevice(balenatest.Device{UUID: r.UUID, Key: r.Key, PublicPorts: []uint16{80}})}
	f.devices = append(f.devices, d)
	var err error
	if d.ns, err = vpntest.MakeDevice(f.world); err != nil {
		return err
	}
	l, err := d.ns.Listen("tcp", "0.0.0.0:80")
	if err != nil {
		return err
	}
	uuid := d.UUID
	d.web = &http.Server{ReadHeaderTimeout: 10 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from device %s\n", uuid)
	})}
	f.wg.Add(1)
	go func() { defer f.wg.Done(); _ = d.web.Serve(l) }()
	dir := filepath.Join(f.dir, "device-"+uuid)
	if err := os.Mkdir(dir, 0o700); err != nil {
		return err
	}
	d.client, err = vpntest.LaunchClient(dir, vpntest.ClientOptions{
		Netns:    d.ns.Netns,
		Remote:   fmt.Sprintf("%s:%d", d.ns.WorldAddr, vpnPort),
		Username: d.UUID, Password: d.Key,
		CA:     f.pki.CAFile,
		Tunnel: true,
	})
	return err
}

// waitOnline waits until the API says that every device is online, and
// prints the progress as it changes.
func (f *fleet) waitOnline(ctx context.Context) error {
	tty := isTerminal(f.o.out)
	last := -1
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		n := 0
		for _, d := range f.devices {
			if a, ok := f.api.Device(d.UUID); ok && a.ConnectedToVPN {
				n++
			}
		}
		if n != last {
			if tty {
				fmt.Fprintf(f.o.out, "\r%d/%d devices online", n, len(f.devices))
			} else {
				fmt.Fprintf(f.o.out, "%d/%d devices online\n", n, len(f.devices))
			}
			last = n
		}
		if n == len(f.devices) {
			if tty {
				fmt.Fprintln(f.o.out)
			}
			return nil
		}
		select {
		case <-ctx.Done():
			if tty {
				fmt.Fprintln(f.o.out)
			}
			for _, d := range f.devices {
				if a, _ := f.api.Device(d.UUID); !a.ConnectedToVPN {
					lines := d.client.Lines()
					f.o.log.Error("device not online", "uuid", d.UUID, "last client lines", lines[max(0, len(lines)-5):])
				}
			}
			return fmt.Errorf("%d of %d devices online: %w", last, len(f.devices), ctx.Err())
		case <-tick.C:
		}
	}
}

func isTerminal(w io.Writer) bool {
	file, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := file.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

// check fetches every device's page through the CONNECT proxy, as a
// caller without a key (the guest key reaches public ports), until each
// answers or ctx ends. A device's address shows in the proxy's view once
// OpenVPN has written its status file, so early attempts may fail.
func (f *fleet) check(ctx context.Context) {
	res := &nss.Resolver{Globs: []string{filepath.Join(f.cfg.RunDir, "server-*.status")}, Interval: -1}
	var wg sync.WaitGroup
	for _, d := range f.devices {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				body, err := fetch(ctx, f.world, d.UUID+".balena:80")
				if err == nil && strings.Contains(string(body), d.UUID) {
					// The round trip of a second fetch, with the proxy's
					// caches warm and the device in its status file.
					t0 := time.Now()
					if _, err := fetch(ctx, f.world, d.UUID+".balena:80"); err == nil {
						d.rtt = time.Since(t0)
					}
					d.reached, d.err = true, nil
					return
				}
				if err == nil {
					err = fmt.Errorf("unexpected page %q", body)
				}
				d.err = err
				select {
				case <-ctx.Done():
					return
				case <-time.After(250 * time.Millisecond):
				}
			}
		}()
	}
	wg.Wait()
	clients, err := res.Clients()
	if err != nil {
		f.o.log.Warn("reading the status files", "err", err)
	}
	for _, d := range f.devices {
		for _, c := range clients {
			if strings.EqualFold(c.CommonName, d.UUID) {
				d.instance, d.addr = c.Instance, c.VirtualAddress
			}
		}
	}
}

// fetch sends CONNECT target to the proxy from inside the world, without
// credentials, and returns the body of GET / through the tunnel.
func fetch(ctx context.Context, world *vpntest.Netns, target string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	conn, err := world.Dial(ctx, "tcp", proxyAddr)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	fmt.Fprintf(conn, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", target, target)
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil {
		return nil, err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("CONNECT: %s", resp.Status)
	}
	fmt.Fprintf(conn, "GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", target)
	resp, err = http.ReadResponse(br, nil)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	return io.ReadAll(resp.Body)
}

// report prints the table of devices and a few metrics, and returns how
// many devices were reached.
func (f *fleet) report() int {
	fmt.Fprintln(f.o.out)
	tw := tabwriter.NewWriter(f.o.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "UUID\tINSTANCE\tVPN ADDRESS\tREACHED THROUGH THE PROXY\tRTT")
	reached := 0
	for _, d := range f.devices {
		inst, addr, yes, rtt := "-", "-", "no", "-"
		if d.instance > 0 {
			inst = fmt.Sprint(d.instance)
		}
		if d.addr.IsValid() {
			addr = d.addr.String()
		}
		if d.reached {
			yes = "yes"
			if d.rtt > 0 {
				rtt = d.rtt.Round(10 * time.Microsecond).String()
			}
			reached++
		} else if d.err != nil {
			yes = "no: " + d.err.Error()
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", d.UUID, inst, addr, yes, rtt)
	}
	tw.Flush()
	fmt.Fprintf(f.o.out, "\n%d/%d devices reached through the CONNECT proxy\n", reached, len(f.devices))
	if m, err := f.metrics(); err == nil {
		fmt.Fprintf(f.o.out, "metrics: %s\n", m)
	} else {
		f.o.log.Warn("reading the metrics", "err", err)
	}
	return reached
}

// metrics returns a few of the server's metrics, as name=value.
func (f *fleet) metrics() (string, error) {
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: f.world.Dial}}
	resp, err := hc.Get("http://" + metricsAddr + "/cluster_metrics")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	want := []string{"vpn_online_devices", "vpn_devices_total", "vpn_auth_failures_total", "vpn_proxy_total_tunnels", "vpn_proxy_tunnel_errors"}
	got := map[string]string{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		name, value, ok := strings.Cut(sc.Text(), " ")
		if ok && !strings.HasPrefix(name, "#") {
			got[name] = value
		}
	}
	var parts []string
	for _, n := range want {
		if v, ok := got[n]; ok {
			parts = append(parts, n+"="+v)
		}
	}
	return strings.Join(parts, " "), sc.Err()
}

// relay offers the world's addr on the host at hostAddr, so that a person
// can use the proxy and read the metrics; a port in use is a warning.
func (f *fleet) relay(hostAddr, worldAddr string) {
	l, err := net.Listen("tcp", hostAddr)
	if err != nil {
		f.o.log.Warn("cannot relay to the host", "addr", hostAddr, "err", err)
		return
	}
	f.relays = append(f.relays, l)
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		var conns sync.WaitGroup
		defer conns.Wait()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			conns.Add(1)
			go func() {
				defer conns.Done()
				defer c.Close()
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				w, err := f.world.Dial(ctx, "tcp", worldAddr)
				cancel()
				if err != nil {
					return
				}
				defer w.Close()
				done := make(chan struct{})
				go func() { defer close(done); pipe(w, c) }()
				pipe(c, w)
				<-done
			}()
		}
	}()
}

// pipe copies src to dst and passes the end on as a half-close.
func pipe(dst, src net.Conn) {
	_, _ = io.Copy(dst, src)
	if cw, ok := dst.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	} else {
		_ = dst.Close()
	}
}

// close drains the server and removes what start and addDevice made; when
// hurry ends it stops waiting for the drain.
func (f *fleet) close(hurry context.Context) error {
	var errs []error
	for _, l := range f.relays {
		l.Close()
	}
	if f.stop != nil {
		fmt.Fprintln(f.o.out, "draining the VPN server…")
		t0 := time.Now()
		f.stop()
		select {
		case <-f.done:
			if f.runErr != nil {
				errs = append(errs, fmt.Errorf("the VPN server: %w", f.runErr))
			}
			fmt.Fprintf(f.o.out, "drained in %s\n", time.Since(t0).Round(time.Millisecond))
		case <-hurry.Done():
			fmt.Fprintln(f.o.out, "drain cut short")
		}
	}
	for _, d := range f.devices {
		if d.client != nil {
			d.client.Stop()
		}
		if d.web != nil {
			d.web.Close()
		}
	}
	for _, d := range f.devices {
		if d.ns != nil {
			killAll(d.ns.Netns)
			if err := d.ns.Delete(); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if f.world != nil {
		killAll(f.world) // openvpn and haproxy, if the drain was cut short
		if err := f.world.Delete(); err != nil {
			errs = append(errs, err)
		}
	}
	if f.apiSrv != nil {
		f.apiSrv.Close()
		<-f.apiDone
	}
	f.wg.Wait()
	if f.dir != "" {
		if err := os.RemoveAll(f.dir); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// killAll kills every process left in the namespace.
func killAll(n *vpntest.Netns) {
	out, err := exec.Command("ip", "netns", "pids", n.Name).Output()
	if err != nil {
		return
	}
	for _, f := range strings.Fields(string(out)) {
		var pid int
		if _, err := fmt.Sscan(f, &pid); err == nil && pid > 1 {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}
