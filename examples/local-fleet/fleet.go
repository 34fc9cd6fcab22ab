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
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/obvpn/obvpn/connectproxy"
	"github.com/obvpn/obvpn/nss"
	"github.com/obvpn/obvpn/vpn/balena/balenatest"
	"github.com/obvpn/obvpn/vpn/vpntest"
)

//go:embed devices.json
var devicesJSON []byte

const maxDevices = vpntest.MaxDevices

// vpnPort is where the devices dial the fleet: the balancer in the world.
const vpnPort = 443

type options struct {
	devices     int
	devicesFile string
	hosts       int
	killHost    int // after the first check, SIGKILL this host (1-indexed), or 0
	drainHost   int // after the first check, SIGTERM this host, or 0
	once        bool
	timeout     time.Duration
	proxyAddr   string // on the machine, relayed to host 1's proxy
	metricsAddr string // on the machine, relayed to host 1's metrics
	verbose     bool
	profile     string // the devices' client profile: a vpntest.Profile, or "mixed"
	targets     targets
	memoryLimit byteSize // run the fleet in a memory cgroup with this limit, or 0
	log         *slog.Logger
	out         io.Writer
}

// targets are the times that a run must keep (issue 16's, for 500
// devices on 2 cores); 0 is no target.
type targets struct {
	online time.Duration // from local-fleet's start until every device is online in the API
	reach  time.Duration // from then until every device was reached through every host's proxy
	back   time.Duration // from a kill or drain until every device is online elsewhere and reached
}

// device is a simulated device: its record in the API, its namespace, its
// openvpn client and its web service, and what the last check found.
type device struct {
	balenatest.Device
	ns   *vpntest.Device
	opts vpntest.ClientOptions // its openvpn client's
	dir  string                // its client's files
	web  *http.Server

	mu   sync.Mutex
	proc *vpntest.Process // its openvpn client, restarted when it exits

	host     *host // the host that the API says holds it
	instance int
	addr     netip.Addr
	reached  int // how many live hosts' proxies reached it
	rtt      time.Duration
	err      error
}

// fleet is everything the demo made, for close to remove.
type fleet struct {
	o              options
	dir            string
	world          *vpntest.Netns // the network: devices, hosts, the balancer and the API
	pki            *vpntest.PKI
	api            *balenatest.API
	apiSrv         *http.Server
	apiDone        chan struct{}
	hosts          []*host
	balancer       *vpntest.Process
	balancerSocket string
	devices        []*device
	relays         []net.Listener
	wg             sync.WaitGroup // the web services, the relays and the devices' supervisors
	closing        chan struct{}  // closed when close begins
	restarts       atomic.Int64   // how many times a device's openvpn exited and was started again
	memAvailable   int64          // the machine's, in bytes, before start
	mem            *memGroup      // the fleet's memory cgroup, with -memory-limit
	missed         []string       // the targets missed, as sentences
	mu             sync.Mutex     // the devices' check results, while check runs
}

func (d *device) client() *vpntest.Process {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.proc
}

func (d *device) setClient(p *vpntest.Process) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.proc = p
}

// demo brings the fleet up, checks every device through every host's
// proxy, prints the results, kills or drains a host if asked to and
// checks again, checks that the API agrees with the hosts and that the
// targets were met; then, unless o.once, it waits for ctx to end; then it
// removes everything.
func demo(ctx context.Context, o options) (err error) {
	records, err := loadDevices(o)
	if err != nil {
		return err
	}
	if o.hosts == 0 {
		o.hosts = 1
	}
	start := time.Now()
	f := &fleet{o: o, closing: make(chan struct{})}
	f.memAvailable = memAvailable()
	if o.memoryLimit > 0 {
		if f.mem, err = newMemGroup(int64(o.memoryLimit)); err != nil {
			return err
		}
	}
	defer func() {
		// A second signal cuts the drain short.
		hurry, stop := signalContext()
		defer stop()
		if cerr := f.close(hurry); err == nil {
			err = cerr
		}
		if f.mem != nil {
			if merr := f.mem.close(); err == nil {
				err = merr
			}
		}
	}()
	if err := f.start(ctx); err != nil {
		return err
	}
	t0 := time.Now()
	if err := f.addDevices(records); err != nil {
		return err
	}
	fmt.Fprintf(o.out, "%d devices made (namespace, link, web service, openvpn started) in %s\n", len(f.devices), time.Since(t0).Round(time.Millisecond))
	wctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	if err := f.waitOnline(wctx); err != nil {
		return err
	}
	fmt.Fprintf(o.out, "all %d devices online in the API in %s from the first device's start (%s from local-fleet's start)\n",
		len(f.devices), time.Since(t0).Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
	f.meet("every device online in the API, from local-fleet's start", time.Since(start), o.targets.online)
	f.printAPICalls(o.out)
	took, lat := f.check(wctx)
	reached := f.report()
	f.printCheck(took, lat)
	f.meet("every device reached through every host's proxy, once online", took, o.targets.reach)
	f.printAPICalls(o.out)
	f.printUsage(o.out)
	if k := max(o.killHost, o.drainHost); k > 0 && reached == len(f.devices) {
		if reached, err = f.moveHost(wctx, f.hosts[k-1]); err != nil {
			return err
		}
	}
	if reached == len(f.devices) {
		f.settle(wctx)
	}
	f.checkMemory()
	f.printTargets()
	if o.once {
		if reached < len(f.devices) {
			return fmt.Errorf("%d of %d devices not reached through every proxy", len(f.devices)-reached, len(f.devices))
		}
		if len(f.missed) > 0 {
			return fmt.Errorf("%d targets missed", len(f.missed))
		}
		return nil
	}
	f.offerByHand(ctx)
	return nil
}

// offerByHand relays host 1's proxy and metrics to this machine, says how
// to use them, and waits for ctx to end.
func (f *fleet) offerByHand(ctx context.Context) {
	o := f.o
	f.relay(o.proxyAddr, f.hosts[0].proxyAddr())
	f.relay(o.metricsAddr, fmt.Sprintf("%s:%d", f.hosts[0].ns.Addr, hostMetricsPort))
	example := f.devices[0]
	for _, d := range f.devices {
		if d.host == f.hosts[0] {
			example = d // reached without a key: no forwarding, which needs one
			break
		}
	}
	fmt.Fprintf(o.out, "\nTry it by hand (host1's proxy):\n  curl -x http://%s --proxytunnel http://%s.balena/\n", o.proxyAddr, example.UUID)
	fmt.Fprintf(o.out, "Metrics: http://%s/cluster_metrics\n", o.metricsAddr)
	fmt.Fprintln(o.out, "Ctrl-C drains the fleet and removes every namespace, link, process and file.")
	<-ctx.Done()
}

// meet notes whether took kept the target (0: none): a missed one is
// printed at once and again at the end.
func (f *fleet) meet(what string, took, target time.Duration) {
	if target <= 0 || took <= target {
		return
	}
	miss := fmt.Sprintf("%s in %s, target %s", what, took.Round(time.Millisecond), target)
	f.missed = append(f.missed, miss)
	fmt.Fprintf(f.o.out, "target missed: %s\n", miss)
}

// printTargets says whether every target was met.
func (f *fleet) printTargets() {
	if len(f.missed) == 0 {
		fmt.Fprintf(f.o.out, "\ntargets met: online within %s, reached within %s, back within %s (0 is none), the API agrees with the hosts",
			f.o.targets.online, f.o.targets.reach, f.o.targets.back)
		if f.mem != nil {
			fmt.Fprintf(f.o.out, ", the fleet fits in %s", mib(f.mem.limit))
		}
		fmt.Fprintln(f.o.out)
		return
	}
	fmt.Fprintf(f.o.out, "\n%d targets missed:\n", len(f.missed))
	for _, m := range f.missed {
		fmt.Fprintf(f.o.out, "  %s\n", m)
	}
}

// moveHost kills or drains host h, as o says, waits until its devices are
// online on the other hosts, checks every device again through every
// other host's proxy, and prints the times.
func (f *fleet) moveHost(ctx context.Context, h *host) (int, error) {
	var moved int
	for _, d := range f.devices {
		if d.host == h {
			moved++
		}
	}
	t0 := time.Now()
	if f.o.killHost > 0 {
		fmt.Fprintf(f.o.out, "\nkilling %s (SIGKILL to its server, openvpn and haproxy), which holds %d devices\n", h.name(), moved)
		f.killHost(h)
	} else {
		fmt.Fprintf(f.o.out, "\ndraining %s (out of the balancer, SIGTERM), which holds %d devices\n", h.name(), moved)
		code, err := f.drainHost(ctx, h)
		if err != nil {
			return 0, err
		}
		fmt.Fprintf(f.o.out, "%s drained and exited with status %d in %s\n", h.name(), code, time.Since(t0).Round(time.Millisecond))
		if code != 0 {
			return 0, fmt.Errorf("%s exited with status %d:\n%s", h.name(), code, tail(h.proc, 20))
		}
	}
	if err := f.waitOnline(ctx); err != nil {
		return 0, err
	}
	online := time.Since(t0)
	took, lat := f.check(ctx)
	recovered := time.Since(t0)
	reached := f.report()
	f.printCheck(took, lat)
	verb := "kill"
	if f.o.drainHost > 0 {
		verb = "drain"
	}
	fmt.Fprintf(f.o.out, "devices' openvpn that exited and were started again so far (%s later): %d\n", clientRestartDelay, f.restarts.Load())
	fmt.Fprintf(f.o.out, "from the %s: every device online on the other hosts in %s, reached through every other proxy in %s\n",
		verb, online.Round(time.Millisecond), recovered.Round(time.Millisecond))
	f.meet(fmt.Sprintf("from the %s, every device online elsewhere and reached", verb), recovered, f.o.targets.back)
	f.printAPICalls(f.o.out)
	f.printUsage(f.o.out)
	return reached, nil
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

// start makes the world, the API, the hosts and the balancer, and waits
// until every host is ready.
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

	// The balena API, in the world, where every host reaches it on the
	// world's end of its link.
	f.api = balenatest.New()
	l, err := f.world.Listen("tcp", fmt.Sprintf("0.0.0.0:%d", apiPort))
	if err != nil {
		return err
	}
	f.apiSrv = &http.Server{Handler: f.api, ReadHeaderTimeout: 10 * time.Second}
	f.apiDone = make(chan struct{})
	go func() { defer close(f.apiDone); _ = f.apiSrv.Serve(l) }()

	for id := 1; id <= f.o.hosts; id++ {
		if _, err := f.startHost(id); err != nil {
			return err
		}
	}
	rctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	for _, h := range f.hosts {
		if err := f.waitReady(rctx, h); err != nil {
			return err
		}
		fmt.Fprintf(f.o.out, "%s up at %s (service instance %d): 2 OpenVPN instances behind its HAProxy, CONNECT proxy on :%d\n",
			h.name(), h.ns.Addr, h.serviceID, hostProxyPort)
	}
	if err := f.startBalancer(); err != nil {
		return err
	}
	fmt.Fprintf(f.o.out, "balancer up: HAProxy on port %d, leastconn over %d hosts (namespace %s)\n", vpnPort, len(f.hosts), f.world.Name)
	return nil
}

// profileOf returns the client profile of the i-th device: every other
// one balenaOS's and the minimal client's in turn with -profile mixed.
func (f *fleet) profileOf(i int) vpntest.Profile {
	if f.o.profile == "mixed" {
		return vpntest.Profiles[i%len(vpntest.Profiles)]
	}
	return vpntest.Profile(f.o.profile)
}

// makers is how many devices addDevices makes at once.
const makers = 4

// addDevices registers the devices with the API and makes them, makers
// at a time, in the order of records; it returns the first error.
func (f *fleet) addDevices(records []record) error {
	for _, r := range records {
		f.devices = append(f.devices, &device{Device: f.api.AddDevice(balenatest.Device{UUID: r.UUID, Key: r.Key, PublicPorts: []uint16{80}})})
	}
	next := make(chan int)
	errs := make([]error, len(f.devices))
	var failed atomic.Bool
	var wg sync.WaitGroup
	for range makers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				if errs[i] = f.addDevice(f.devices[i], i); errs[i] != nil {
					failed.Store(true)
				}
			}
		}()
	}
	for i := range f.devices {
		if failed.Load() {
			break
		}
		next <- i
	}
	close(next)
	wg.Wait()
	return errors.Join(errs...)
}

// addDevice makes the namespace of d, the i-th device, starts its web
// service on port 80 and its openvpn client, which dials the balancer.
func (f *fleet) addDevice(d *device, i int) error {
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
	d.opts = vpntest.ClientOptions{
		Profile:  f.profileOf(i),
		Netns:    d.ns.Netns,
		Remote:   fmt.Sprintf("%s:%d", d.ns.WorldAddr, vpnPort),
		Username: d.UUID, Password: d.Key,
		CA:     f.pki.CAFile,
		Tunnel: true,
		// Back within 2 s when the server goes away (not OpenVPN's
		// default back-off of up to 5 minutes), and restart rather than
		// exit when the server is silent.
		Extra: []string{"connect-retry 1 2", "pull-filter ignore ping-exit", "ping-restart 20"},
	}
	d.dir = dir
	client, err := vpntest.LaunchClient(dir, d.opts)
	if err != nil {
		return err
	}
	d.setClient(client)
	f.wg.Add(1)
	go func() { defer f.wg.Done(); f.supervise(d) }()
	return nil
}

// clientRestartDelay is how long a device waits before it starts its
// openvpn again once it exited: balenaOS's openvpn.service says
// RestartSec=10s; the demo is quicker.
const clientRestartDelay = time.Second

// loggedRestarts is how many device restarts supervise logs (all with
// -v): a host lost under a large fleet restarts hundreds.
const loggedRestarts = 5

// supervise starts d's openvpn again whenever it exits, until the fleet
// closes, as balenaOS's openvpn.service (Restart=always) does. A balenaOS
// client that comes back on another instance or host is pushed another
// address and must reopen its tun device, which it cannot do as its
// unprivileged user: it exits, and the unit starts it again.
func (f *fleet) supervise(d *device) {
	for {
		select {
		case <-d.client().Exited():
		case <-f.closing:
			return
		}
		if n := f.restarts.Add(1); n <= loggedRestarts || f.o.verbose {
			f.o.log.Info("a device's openvpn exited; starting it again, as balenaOS's openvpn.service does",
				"uuid", d.UUID, "last line", tail(d.client(), 1))
			if n == loggedRestarts && !f.o.verbose {
				f.o.log.Info("more devices' openvpn exiting are counted, not logged (-v logs them)")
			}
		}
		select {
		case <-time.After(clientRestartDelay):
		case <-f.closing:
			return
		}
		client, err := vpntest.LaunchClient(d.dir, d.opts)
		if err != nil {
			f.o.log.Error("could not start a device's openvpn again", "uuid", d.UUID, "err", err)
			return
		}
		d.setClient(client)
		select {
		case <-f.closing: // close may have missed it
			client.Stop()
			return
		default:
		}
	}
}

// waitOnline waits until the API says that every device is online on a
// host that serves, and prints the progress as it changes.
func (f *fleet) waitOnline(ctx context.Context) error {
	tty := isTerminal(f.o.out)
	last := -1
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		n := 0
		for _, d := range f.devices {
			if f.online(d) {
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
				if !f.online(d) {
					f.o.log.Error("device not online", "uuid", d.UUID, "last client lines", tail(d.client(), 5))
				}
			}
			return fmt.Errorf("%d of %d devices online: %w", last, len(f.devices), ctx.Err())
		case <-tick.C:
		}
	}
}

// online says whether the API has d online on a host that serves, and
// notes that host.
func (f *fleet) online(d *device) bool {
	a, ok := f.api.Device(d.UUID)
	if !ok || !a.ConnectedToVPN {
		return false
	}
	d.host = f.hostOf(a.ServiceInstance)
	return d.host != nil && !d.host.gone
}

func isTerminal(w io.Writer) bool {
	file, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := file.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

// callers is how many fetches a check makes at once.
const callers = 16

// target is a device to reach through a host's proxy.
type target struct {
	d *device
	h *host
}

// check fetches every device's page through the CONNECT proxy of every
// host that serves, with the service's key (a caller's key is what lets a
// proxy ask the API which host holds a device, and forward), callers at a
// time, until each answers or ctx ends; a fetch that fails is tried again
// 250 ms later, after the others queued. A device shows in its host's view
// once the server has learnt its address, so early attempts may fail. It
// returns how long it took and the CONNECTs' durations.
func (f *fleet) check(ctx context.Context) (time.Duration, *latencies) {
	var targets []target
	for _, d := range f.devices {
		d.reached, d.rtt, d.err = 0, 0, nil
		for _, h := range f.hosts {
			if !h.gone {
				targets = append(targets, target{d, h})
			}
		}
	}
	lat := &latencies{}
	queue := make(chan target, len(targets)) // each target is in it once at most
	for _, t := range targets {
		queue <- t
	}
	var left, workers sync.WaitGroup
	left.Add(len(targets))
	stop := make(chan struct{})
	t0 := time.Now()
	for range callers {
		workers.Add(1)
		go func() {
			defer workers.Done()
			for {
				select {
				case t := <-queue:
					if f.try(ctx, t, lat) {
						left.Done()
					} else {
						time.AfterFunc(250*time.Millisecond, func() { queue <- t })
					}
				case <-stop:
					return
				}
			}
		}()
	}
	left.Wait()
	took := time.Since(t0)
	close(stop)
	workers.Wait()
	f.noteAddresses()
	return took, lat
}

// try fetches t's page once and notes the result; it reports whether t
// is done: reached, or out of time.
func (f *fleet) try(ctx context.Context, t target, lat *latencies) bool {
	t0 := time.Now()
	body, connect, err := fetch(ctx, f.world, t.h.proxyAddr(), t.d.UUID+".balena:80", f.api.ServiceKey)
	rtt := time.Since(t0)
	if err == nil && !strings.Contains(string(body), t.d.UUID) {
		err = fmt.Errorf("unexpected page %q", body)
	}
	lat.record(connect, err)
	f.mu.Lock()
	defer f.mu.Unlock()
	if err != nil {
		t.d.err = fmt.Errorf("via %s: %w", t.h.name(), err)
		return ctx.Err() != nil
	}
	t.d.reached++
	if t.h == t.d.host {
		t.d.rtt = rtt
	}
	return true
}

// noteAddresses notes each device's instance and VPN address from its
// host's status files.
func (f *fleet) noteAddresses() {
	for _, h := range f.hosts {
		if h.gone {
			continue
		}
		byName := f.connected(h)
		for _, d := range f.devices {
			if c, ok := byName[strings.ToLower(d.UUID)]; ok && d.host == h {
				d.instance, d.addr = c.Instance, c.VirtualAddress
			}
		}
	}
}

// connected returns the clients that h's OpenVPN instances list in their
// status files, by lower-case common name.
func (f *fleet) connected(h *host) map[string]nss.FileClient {
	res := &nss.Resolver{Globs: []string{filepath.Join(h.dir, "run", "server-*.status")}, Interval: -1}
	clients, err := res.Clients()
	if err != nil {
		f.o.log.Warn("reading the status files", "host", h.name(), "err", err)
	}
	byName := make(map[string]nss.FileClient, len(clients))
	for _, c := range clients {
		byName[strings.ToLower(c.CommonName)] = c
	}
	return byName
}

// fetch asks the proxy, from inside the world, for a tunnel to target,
// with key as its credentials (none if empty), and returns the body of
// GET / through the tunnel and how long the CONNECT took (dialling the
// proxy until its answer).
func fetch(ctx context.Context, world *vpntest.Netns, proxy, target, key string) ([]byte, time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	d := &connectproxy.Dialer{ProxyAddr: proxy, Key: key, DialProxy: world.Dial}
	var connect atomic.Int64 // the transport may still dial once Do returned
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		t0 := time.Now()
		c, err := d.DialContext(ctx, network, addr)
		connect.Store(int64(time.Since(t0)))
		return c, err
	}
	client := &http.Client{Transport: &http.Transport{DialContext: dial, DisableKeepAlives: true}}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+target+"/", nil)
	if err != nil {
		return nil, 0, err
	}
	resp, err := client.Do(req)
	if ue := (*url.Error)(nil); errors.As(err, &ue) {
		err = ue.Err // the dialer's error names the target already
	}
	if err != nil {
		return nil, time.Duration(connect.Load()), err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return body, time.Duration(connect.Load()), err
}

// printCheck prints how long check took and its CONNECTs' durations.
func (f *fleet) printCheck(took time.Duration, lat *latencies) {
	fmt.Fprintf(f.o.out, "every device tried through every serving host's proxy in %s, %d callers at a time: %d CONNECTs answered (p50 %s, p99 %s), %d failed and were tried again\n",
		took.Round(time.Millisecond), callers, len(lat.ok), lat.quantile(0.5).Round(10*time.Microsecond), lat.quantile(0.99).Round(10*time.Microsecond), lat.failures)
}

// maxTable is how many devices report lists in full; a bigger fleet's
// table has only the devices that were not reached.
const maxTable = 100

// report prints the table of devices and a few metrics of each host that
// serves, and returns how many devices every such host's proxy reached.
func (f *fleet) report() int {
	live := 0
	for _, h := range f.hosts {
		if !h.gone {
			live++
		}
	}
	fmt.Fprintln(f.o.out)
	tw := tabwriter.NewWriter(f.o.out, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "UUID\tHOST\tINSTANCE\tVPN ADDRESS\tREACHED THROUGH THE PROXY\tRTT\n")
	reached := 0
	for _, d := range f.devices {
		hostName, inst, addr, yes, rtt := "-", "-", "-", "no", "-"
		if d.host != nil {
			hostName = d.host.name()
		}
		if d.instance > 0 {
			inst = fmt.Sprint(d.instance)
		}
		if d.addr.IsValid() {
			addr = d.addr.String()
		}
		switch {
		case d.reached == live:
			yes = "yes"
			if live > 1 {
				yes = fmt.Sprintf("yes, through all %d", live)
			}
			reached++
		case d.err != nil:
			yes = "no: " + d.err.Error()
		}
		if d.rtt > 0 {
			rtt = d.rtt.Round(10 * time.Microsecond).String()
		}
		if len(f.devices) > maxTable && d.reached == live {
			continue
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", d.UUID, hostName, inst, addr, yes, rtt)
	}
	tw.Flush()
	if len(f.devices) > maxTable {
		fmt.Fprintf(f.o.out, "(more than %d devices: only those not reached are listed)\n", maxTable)
	}
	fmt.Fprintf(f.o.out, "\n%d/%d devices reached through the CONNECT proxy", reached, len(f.devices))
	if live > 1 {
		fmt.Fprintf(f.o.out, " of each of the %d hosts", live)
	}
	fmt.Fprintln(f.o.out)
	for _, h := range f.hosts {
		if h.gone {
			continue
		}
		if m, err := f.metrics(h); err == nil {
			fmt.Fprintf(f.o.out, "%s metrics: %s\n", h.name(), m)
		} else {
			f.o.log.Warn("reading the metrics", "host", h.name(), "err", err)
		}
	}
	return reached
}

// metrics returns a few of h's metrics, as name=value.
func (f *fleet) metrics(h *host) (string, error) {
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: f.world.Dial, DisableKeepAlives: true}}
	resp, err := hc.Get(fmt.Sprintf("http://%s:%d/cluster_metrics", h.ns.Addr, hostMetricsPort))
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

// close drains the hosts and removes what start and addDevice made; when
// hurry ends it stops waiting for the drain.
func (f *fleet) close(hurry context.Context) error {
	var errs []error
	for _, l := range f.relays {
		l.Close()
	}
	var running []*host
	for _, h := range f.hosts {
		if h.proc != nil {
			select {
			case <-h.proc.Exited():
			default:
				running = append(running, h)
			}
		}
	}
	if len(running) > 0 {
		fmt.Fprintln(f.o.out, "draining the VPN hosts…")
		t0 := time.Now()
		for _, h := range running {
			_ = h.proc.Signal(syscall.SIGTERM)
		}
		for _, h := range running {
			select {
			case <-h.proc.Exited():
				if code := h.proc.ExitCode(); code != 0 {
					errs = append(errs, fmt.Errorf("%s exited with status %d:\n%s", h.name(), code, tail(h.proc, 20)))
				}
			case <-hurry.Done():
			}
		}
		if hurry.Err() == nil {
			fmt.Fprintf(f.o.out, "drained in %s\n", time.Since(t0).Round(time.Millisecond))
		} else {
			fmt.Fprintln(f.o.out, "drain cut short")
		}
	}
	for _, h := range f.hosts {
		if h.proc != nil && f.o.verbose {
			fmt.Fprintf(f.o.out, "--- %s's log\n%s\n", h.name(), strings.Join(h.proc.Lines(), "\n"))
		}
	}
	if f.balancer != nil {
		f.balancer.Stop()
	}
	close(f.closing) // no client is started again
	t0 := time.Now()
	errs = append(errs, f.removeDevices())
	if len(f.devices) > 0 {
		fmt.Fprintf(f.o.out, "%d devices removed (openvpn, namespace, link) in %s\n", len(f.devices), time.Since(t0).Round(time.Millisecond))
	}
	for _, h := range f.hosts {
		if h.ns != nil {
			killAll(h.ns.Netns) // openvpn and haproxy, if the drain was cut short
			if h.proc != nil {
				h.proc.Stop()
			}
			if err := h.ns.Delete(); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if f.apiSrv != nil {
		f.apiSrv.Close()
		<-f.apiDone
	}
	if f.world != nil {
		killAll(f.world)
		if err := f.world.Delete(); err != nil {
			errs = append(errs, err)
		}
	}
	f.wg.Wait()
	if f.dir != "" {
		if err := os.RemoveAll(f.dir); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// removers is how many devices removeDevices removes at once: each takes
// three ip commands and its openvpn's exit.
const removers = 8

// removeDevices stops the devices' openvpn and web services and removes
// their namespaces and links, removers at a time (one at a time, 1000
// devices took most of a minute).
func (f *fleet) removeDevices() error {
	next := make(chan *device)
	var mu sync.Mutex
	var errs []error
	var wg sync.WaitGroup
	for range removers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for d := range next {
				if err := d.remove(); err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
				}
			}
		}()
	}
	for _, d := range f.devices {
		next <- d
	}
	close(next)
	wg.Wait()
	return errors.Join(errs...)
}

// remove stops d's openvpn and web service and removes its namespace and
// link.
func (d *device) remove() error {
	if c := d.client(); c != nil {
		c.Stop()
	}
	if d.web != nil {
		d.web.Close()
	}
	if d.ns == nil {
		return nil
	}
	killAll(d.ns.Netns)
	return d.ns.Delete()
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
