package bandwidth

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/matryer/is"
	"github.com/obvpn/obvpn/vpn/vpntest"
)

// netns creates a network namespace with a tun device named dev in it and
// returns a CommandRunner that runs commands inside it. Both go when the
// test ends.
func netns(t *testing.T, dev string) CommandRunner {
	t.Helper()
	ip := vpntest.Require(t, "ip", "tc")[0]
	name := fmt.Sprintf("obvpn-bw-%d-%d", os.Getpid(), rand.IntN(1<<20))
	if out, err := exec.Command(ip, "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command(ip, "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", name, err, out)
		}
	})
	run := func(ctx context.Context, cmd string, args ...string) ([]byte, error) {
		return exec.CommandContext(ctx, ip, append([]string{"netns", "exec", name, cmd}, args...)...).CombinedOutput()
	}
	for _, c := range [][]string{{"ip", "tuntap", "add", "dev", dev, "mode", "tun"}, {"ip", "link", "set", dev, "up"}} {
		if out, err := run(context.Background(), c[0], c[1:]...); err != nil {
			t.Fatalf("%v: %v: %s", c, err, out)
		}
	}
	return run
}

// tcState lists the classes and filter matches on dev, one per line, as
// "class 1:3" and "flowid 1:3 match 0af00003".
func tcState(t *testing.T, run CommandRunner, dev string) []string {
	t.Helper()
	var state []string
	out, err := run(context.Background(), "tc", "class", "show", "dev", dev)
	if err != nil {
		t.Fatalf("tc class show: %v: %s", err, out)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) > 2 && f[0] == "class" {
			state = append(state, "class "+f[2])
		}
	}
	out, err = run(context.Background(), "tc", "filter", "show", "dev", dev, "parent", "1:")
	if err != nil {
		t.Fatalf("tc filter show: %v: %s", err, out)
	}
	lines := strings.Split(string(out), "\n")
	for i, line := range lines {
		if _, after, ok := strings.Cut(line, "*flowid "); ok && i+1 < len(lines) {
			flow := strings.Fields(after)[0]
			match := strings.Fields(lines[i+1])
			if len(match) > 1 {
				state = append(state, "flowid "+flow+" match "+strings.Split(match[1], "/")[0])
			}
		}
	}
	return state
}

func TestLimiterKeepsOthersLimits(t *testing.T) {
	is := is.New(t)
	run := netns(t, "tun7")
	l := &Limiter{Dev: "tun7", IFB: "obvpnifb7", Subnet: netip.MustParsePrefix("10.240.0.0/16"),
		Down: 10_000_000, Up: 1_000_000, Run: run}
	ctx := context.Background()
	is.NoErr(l.Setup(ctx))
	a, b, c := netip.MustParseAddr("10.240.0.3"), netip.MustParseAddr("10.240.0.4"), netip.MustParseAddr("10.240.1.5")
	for _, x := range []netip.Addr{a, b, c, a} {
		is.NoErr(l.Add(ctx, x))
	}
	want := func(offs ...string) []string {
		var s []string
		for _, o := range offs {
			s = append(s, "class 1:"+o)
		}
		return s
	}
	filters := func(pairs ...string) []string { return pairs }
	check := func(classes, flows []string) {
		t.Helper()
		for _, dev := range []string{"tun7", "obvpnifb7"} {
			got := tcState(t, run, dev)
			wantAll := append(append([]string{}, classes...), flows...)
			slices.Sort(got)
			slices.Sort(wantAll)
			if strings.Join(got, ",") != strings.Join(wantAll, ",") {
				t.Fatalf("%s:\n got %q\nwant %q", dev, got, wantAll)
			}
		}
	}
	check(want("3", "4", "105"), filters("flowid 1:3 match 0af00003", "flowid 1:4 match 0af00004", "flowid 1:105 match 0af00105"))

	// Removing one device's limits keeps the others'.
	is.NoErr(l.Remove(ctx, a))
	check(want("4", "105"), filters("flowid 1:4 match 0af00004", "flowid 1:105 match 0af00105"))
	// And the reverse: adding it back, then removing the other.
	is.NoErr(l.Add(ctx, a))
	is.NoErr(l.Remove(ctx, b))
	check(want("3", "105"), filters("flowid 1:3 match 0af00003", "flowid 1:105 match 0af00105"))
	is.NoErr(l.Remove(ctx, b)) // not limited: a no-op

	// The rates are those asked for, on each side.
	out, _ := run(ctx, "tc", "class", "show", "dev", "tun7")
	is.True(strings.Contains(string(out), "rate 10Mbit"))
	out, _ = run(ctx, "tc", "class", "show", "dev", "obvpnifb7")
	is.True(strings.Contains(string(out), "rate 1Mbit"))

	// After a restart the limits are set up anew for the devices still
	// there; stale ones are gone.
	is.NoErr(l.Reconcile(ctx, []netip.Addr{b}))
	check(want("4"), filters("flowid 1:4 match 0af00004"))
	is.Equal(l.Limited(), []netip.Addr{b})

	is.True(errors.Is(l.Add(ctx, netip.MustParseAddr("10.241.0.3")), ErrNotInSubnet))

	is.NoErr(l.Teardown(ctx))
	_, err := run(ctx, "ip", "link", "show", "obvpnifb7")
	is.True(err != nil) // the IFB device is gone
}

func TestLimiterCommands(t *testing.T) {
	is := is.New(t)
	var cmds []string
	fail := ""
	l := &Limiter{Dev: "tun1", IFB: "obvpnifb1", Subnet: netip.MustParsePrefix("10.240.0.0/20"), Down: 1e6, Up: 5e5,
		Run: func(_ context.Context, name string, args ...string) ([]byte, error) {
			cmd := name + " " + strings.Join(args, " ")
			cmds = append(cmds, cmd)
			if fail != "" && strings.Contains(cmd, fail) {
				return []byte("RTNETLINK answers: File exists"), errors.New("exit status 2")
			}
			return nil, nil
		}}
	ctx := context.Background()
	is.NoErr(l.Add(ctx, netip.MustParseAddr("10.240.0.3"))) // sets up first
	is.True(strings.Contains(strings.Join(cmds, "\n"), "ip link add obvpnifb1 type ifb"))
	l.Reset()
	is.NoErr(l.Setup(ctx))
	cmds = nil
	is.NoErr(l.Add(ctx, netip.MustParseAddr("10.240.15.254")))
	is.Equal(cmds[len(cmds)-2:], []string{
		"tc class replace dev obvpnifb1 parent 1: classid 1:ffe htb rate 500kbit",
		"tc filter replace dev obvpnifb1 parent 1: prio 1 protocol ip handle 10:fe:1 u32 ht 10:fe: match ip src 10.240.15.254/32 flowid 1:ffe",
	})
	is.True(strings.Contains(strings.Join(cmds, "\n"),
		"tc filter add dev tun1 parent 1: prio 1 protocol ip handle 800::10 u32 ht 800:: match ip dst 10.240.15.0/24 hashkey mask 0x000000ff at 16 link 10:"))
	fail = "class replace dev tun1"
	err := l.Add(ctx, netip.MustParseAddr("10.240.0.9"))
	is.True(err != nil)
	is.True(strings.Contains(err.Error(), "File exists"))
	is.Equal(len(l.Limited()), 1)
	is.True((&Limiter{Subnet: netip.MustParsePrefix("10.0.0.0/8"), Run: l.Run}).Setup(ctx) != nil)
}
