// Package bandwidth limits the rate of each device of an OpenVPN instance
// with Linux traffic control: a [Limiter] per tun device gives every
// device address a class of its own towards the device and from it, and
// [Rate] is a rate as tc writes it (VPN_DOWNRATE, VPN_UPRATE).
//
// The limiter runs tc and ip through a [CommandRunner], so that it can
// work inside a network namespace; [ExecRunner] runs them as they are.
package bandwidth

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"sort"
	"strings"
	"sync"

	"github.com/obvpn/obvpn/subnet"
)

// CommandRunner runs a command such as "tc" or "ip" with its arguments and
// returns its combined output. Tests and callers that work in a network
// namespace replace the default, which runs the command as is.
type CommandRunner func(ctx context.Context, name string, args ...string) ([]byte, error)

// ExecRunner runs commands with os/exec.
func ExecRunner(ctx context.Context, name string, args ...string) ([]byte, error) {
	return exec.CommandContext(ctx, name, args...).CombinedOutput()
}

// Limiter applies per-device rate limits (SPEC §8) to one instance's tun
// device with tc: an HTB class at the down rate for each device address on
// the tun device's egress, and the same at the up rate on an IFB device
// that the tun device's ingress is redirected to. (Shaping the ingress on
// an IFB needs only HTB, u32 and mirred, which every kernel with traffic
// control has; a police action, as the reference system used, is not
// always built.)
//
// Each device has handles of its own, derived from its address's offset in
// the instance subnet: class 1:<offset> and u32 filter <table>:<bucket>:1
// in a hash table per /24 of the subnet. Removing one device's limits
// deletes exactly its filter and class, so every other device keeps its
// limits, and classification stays a hash lookup with tens of thousands of
// devices.
type Limiter struct {
	// Dev is the tun device, such as "tun1".
	Dev string
	// IFB is the IFB device for the up rate, such as "obvpnifb1"; it is
	// created by Setup and deleted by Teardown.
	IFB string
	// Subnet is the instance subnet: every limited address is in it.
	Subnet netip.Prefix
	// Down and Up are the rates towards and from each device.
	Down, Up Rate
	// Run runs tc and ip. Nil means ExecRunner.
	Run CommandRunner

	mu      sync.Mutex
	clients map[netip.Addr]bool
	tables  map[int]bool // hash tables (one per /24 block) that exist
}

// ErrNotInSubnet reports an address outside the limiter's subnet.
var ErrNotInSubnet = errors.New("address not in the instance subnet")

// side is one direction: the device its qdisc is on and the address field
// (destination at offset 16 towards devices, source at 12 from them).
type side struct {
	dev, field string
	offset     int
	rate       Rate
}

func (l *Limiter) sides() [2]side {
	return [2]side{{l.Dev, "dst", 16, l.Down}, {l.IFB, "src", 12, l.Up}}
}

func (l *Limiter) run(ctx context.Context, args ...string) error {
	run := l.Run
	if run == nil {
		run = ExecRunner
	}
	out, err := run(ctx, args[0], args[1:]...)
	if err != nil {
		return fmt.Errorf("%s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// Setup creates the IFB device, the redirect of the tun device's ingress
// to it, and the root HTB qdiscs, replacing whatever limits were there
// (after an instance restart, [Limiter.Reconcile] puts the devices' limits
// back).
func (l *Limiter) Setup(ctx context.Context) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.setup(ctx)
}

// Reset forgets the limits, as when the tun device went away with its
// OpenVPN: the next Add sets the devices up anew.
func (l *Limiter) Reset() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.clients, l.tables = nil, nil
}

func (l *Limiter) setup(ctx context.Context) error {
	if !l.Subnet.Addr().Is4() || l.Subnet.Bits() < 16 {
		return fmt.Errorf("limiter: subnet %s: want an IPv4 prefix of /16 or longer", l.Subnet)
	}
	l.clients = make(map[netip.Addr]bool)
	l.tables = make(map[int]bool)
	// What an earlier run left is deleted first; these fail when there is
	// nothing to delete.
	_ = l.run(ctx, "ip", "link", "del", l.IFB)
	_ = l.run(ctx, "tc", "qdisc", "del", "dev", l.Dev, "ingress")
	_ = l.run(ctx, "tc", "qdisc", "del", "dev", l.Dev, "root")
	for _, cmd := range [][]string{
		{"ip", "link", "add", l.IFB, "type", "ifb"},
		{"ip", "link", "set", l.IFB, "up"},
		{"tc", "qdisc", "add", "dev", l.Dev, "root", "handle", "1:", "htb"},
		{"tc", "qdisc", "add", "dev", l.IFB, "root", "handle", "1:", "htb"},
		{"tc", "qdisc", "add", "dev", l.Dev, "handle", "ffff:", "ingress"},
		{"tc", "filter", "add", "dev", l.Dev, "parent", "ffff:", "protocol", "ip", "prio", "1",
			"u32", "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", l.IFB},
	} {
		if err := l.run(ctx, cmd...); err != nil {
			return fmt.Errorf("limiter: %w", err)
		}
	}
	return nil
}

// offset returns a's offset in the subnet, split into the /24 block (the
// hash table) and the last octet (the bucket).
func (l *Limiter) offset(a netip.Addr) (off, block, bucket int, err error) {
	if !l.Subnet.Contains(a) {
		return 0, 0, 0, fmt.Errorf("limiter: %s: %w %s", a, ErrNotInSubnet, l.Subnet)
	}
	off = int(subnet.Uint32(a) - subnet.Uint32(l.Subnet.Addr()))
	return off, off >> 8, int(subnet.Uint32(a) & 0xff), nil
}

// Add limits the device at address a, setting the devices up first if
// that has not been done (or was undone by Reset). Adding an address twice
// is a no-op.
func (l *Limiter) Add(ctx context.Context, a netip.Addr) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.clients == nil {
		if err := l.setup(ctx); err != nil {
			return err
		}
	}
	if l.clients[a] {
		return nil
	}
	off, block, bucket, err := l.offset(a)
	if err != nil {
		return err
	}
	if err := l.table(ctx, block); err != nil {
		return err
	}
	for _, s := range l.sides() {
		class := fmt.Sprintf("1:%x", off)
		if err := l.run(ctx, "tc", "class", "replace", "dev", s.dev, "parent", "1:", "classid", class,
			"htb", "rate", s.rate.String()); err != nil {
			return fmt.Errorf("limiter: %w", err)
		}
		if err := l.run(ctx, "tc", "filter", "replace", "dev", s.dev, "parent", "1:", "prio", "1", "protocol", "ip",
			"handle", fmt.Sprintf("%x:%x:1", block+1, bucket), "u32", "ht", fmt.Sprintf("%x:%x:", block+1, bucket),
			"match", "ip", s.field, a.String()+"/32", "flowid", class); err != nil {
			return fmt.Errorf("limiter: %w", err)
		}
	}
	l.clients[a] = true
	return nil
}

// table creates the hash table of a /24 block of the subnet and links it
// from the root table, once.
func (l *Limiter) table(ctx context.Context, block int) error {
	if l.tables[block] {
		return nil
	}
	first := netip.PrefixFrom(subnet.AddrFromUint32(subnet.Uint32(l.Subnet.Addr())+uint32(block)<<8), 24).Masked()
	ht := fmt.Sprintf("%x:", block+1)
	for _, s := range l.sides() {
		for _, cmd := range [][]string{
			{"tc", "filter", "add", "dev", s.dev, "parent", "1:", "prio", "1", "protocol", "ip",
				"handle", ht, "u32", "divisor", "256"},
			{"tc", "filter", "add", "dev", s.dev, "parent", "1:", "prio", "1", "protocol", "ip",
				"handle", fmt.Sprintf("800::%x", block+1), "u32", "ht", "800::",
				"match", "ip", s.field, first.String(), "hashkey", "mask", "0x000000ff", "at", fmt.Sprint(s.offset), "link", ht},
		} {
			if err := l.run(ctx, cmd...); err != nil {
				return fmt.Errorf("limiter: %w", err)
			}
		}
	}
	l.tables[block] = true
	return nil
}

// Remove lifts the limits of the device at address a, leaving every other
// device's in place. Removing an address that is not limited is a no-op.
func (l *Limiter) Remove(ctx context.Context, a netip.Addr) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.clients[a] {
		return nil
	}
	off, block, bucket, err := l.offset(a)
	if err != nil {
		return err
	}
	var errs []error
	for _, s := range l.sides() {
		// The filter goes first: a class with a filter pointing at it
		// cannot be deleted.
		if err := l.run(ctx, "tc", "filter", "del", "dev", s.dev, "parent", "1:", "prio", "1", "protocol", "ip",
			"handle", fmt.Sprintf("%x:%x:1", block+1, bucket), "u32"); err != nil {
			errs = append(errs, err)
		}
		if err := l.run(ctx, "tc", "class", "del", "dev", s.dev, "classid", fmt.Sprintf("1:%x", off)); err != nil {
			errs = append(errs, err)
		}
	}
	delete(l.clients, a)
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("limiter: %w", err)
	}
	return nil
}

// Limited returns the limited addresses, in order.
func (l *Limiter) Limited() []netip.Addr {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]netip.Addr, 0, len(l.clients))
	for a := range l.clients {
		out = append(out, a)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Less(out[j]) })
	return out
}

// Reconcile makes the limited set equal to addrs: it sets up the devices
// anew (an instance restart recreates its tun device, losing its qdiscs)
// and adds every address of addrs, dropping whatever was limited before.
func (l *Limiter) Reconcile(ctx context.Context, addrs []netip.Addr) error {
	if err := l.Setup(ctx); err != nil {
		return err
	}
	var errs []error
	for _, a := range addrs {
		if err := l.Add(ctx, a); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Teardown removes the limits, the redirect and the IFB device.
func (l *Limiter) Teardown(ctx context.Context) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.clients, l.tables = nil, nil
	// The tun device may be gone with its OpenVPN; only the IFB device's
	// removal must work.
	_ = l.run(ctx, "tc", "qdisc", "del", "dev", l.Dev, "root")
	_ = l.run(ctx, "tc", "qdisc", "del", "dev", l.Dev, "ingress")
	return l.run(ctx, "ip", "link", "del", l.IFB)
}
