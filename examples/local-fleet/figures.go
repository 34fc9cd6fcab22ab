package main

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/obvpn/obvpn/vpn/balena/balenatest"
	"github.com/obvpn/obvpn/vpn/vpntest"
)

// clockTick is the unit of the CPU times in /proc/<pid>/stat (USER_HZ,
// 100 on every Linux architecture that Go supports).
const clockTick = 10 * time.Millisecond

// usage is what a set of processes use: resident memory, counted whole
// for each process (RSS) and with shared pages split between the
// processes that share them (PSS, what adds up), and CPU time.
type usage struct {
	procs    int
	rss, pss int64 // bytes
	cpu      time.Duration
}

func (u *usage) add(v usage) {
	u.procs += v.procs
	u.rss += v.rss
	u.pss += v.pss
	u.cpu += v.cpu
}

func (u usage) String() string {
	return fmt.Sprintf("RSS %s (PSS %s) in %d processes, CPU %.1f s", mib(u.rss), mib(u.pss), u.procs, u.cpu.Seconds())
}

func mib(b int64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }

// procUsage reads what process pid uses, with its name; a process that
// is gone uses nothing.
func procUsage(pid int) (string, usage) {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return "", usage{}
	}
	// pid (comm) state ppid … utime stime: fields 14 and 15.
	open, end := bytes.IndexByte(stat, '('), bytes.LastIndexByte(stat, ')')
	if open < 0 || end < open {
		return "", usage{}
	}
	comm := string(stat[open+1 : end])
	fields := strings.Fields(string(stat[end+1:]))
	u := usage{procs: 1}
	if len(fields) > 12 {
		ut, _ := strconv.ParseInt(fields[11], 10, 64)
		st, _ := strconv.ParseInt(fields[12], 10, 64)
		u.cpu = time.Duration(ut+st) * clockTick
	}
	rollup, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return comm, u
	}
	sc := bufio.NewScanner(bytes.NewReader(rollup))
	for sc.Scan() {
		name, rest, _ := strings.Cut(sc.Text(), ":")
		kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
		if err != nil {
			continue
		}
		switch name {
		case "Rss":
			u.rss = kb << 10
		case "Pss":
			u.pss = kb << 10
		}
	}
	return comm, u
}

// nsPids returns the processes in namespace n.
func nsPids(n *vpntest.Netns) []int {
	out, err := exec.Command("ip", "netns", "pids", n.Name).Output()
	if err != nil {
		return nil
	}
	var pids []int
	for _, f := range strings.Fields(string(out)) {
		if pid, err := strconv.Atoi(f); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids
}

// byName sums the usage of pids, in all and for each process name.
func byName(pids []int) (usage, map[string]usage) {
	var all usage
	names := map[string]usage{}
	for _, pid := range pids {
		comm, u := procUsage(pid)
		if u.procs == 0 {
			continue
		}
		all.add(u)
		v := names[comm]
		v.add(u)
		names[comm] = v
	}
	return all, names
}

// describe is "local-fleet 40.1 MiB, openvpn 2 × 6.0 MiB, haproxy 9.5 MiB"
// (RSS).
func describe(names map[string]usage) string {
	keys := make([]string, 0, len(names))
	for k := range names {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var parts []string
	for _, k := range keys {
		u := names[k]
		if u.procs == 1 {
			parts = append(parts, fmt.Sprintf("%s %s", k, mib(u.rss)))
		} else {
			parts = append(parts, fmt.Sprintf("%s %d × %s", k, u.procs, mib(u.rss/int64(u.procs))))
		}
	}
	return strings.Join(parts, ", ")
}

// printUsage prints what the hosts, the balancer, the devices' openvpn
// clients and this process use, and the whole.
func (f *fleet) printUsage(w io.Writer) {
	var all usage
	fmt.Fprintln(w, "\nresources (RSS counts shared pages in each process, PSS splits them; CPU since each process started):")
	for _, h := range f.hosts {
		if h.gone {
			continue
		}
		u, names := byName(nsPids(h.ns.Netns))
		all.add(u)
		fmt.Fprintf(w, "  %s: %s: %s\n", h.name(), u, describe(names))
	}
	u, names := byName(nsPids(f.world))
	all.add(u)
	fmt.Fprintf(w, "  balancer: %s: %s\n", u, describe(names))
	var pids []int
	for _, d := range f.devices {
		if c := d.client(); c != nil {
			pids = append(pids, c.Pid())
		}
	}
	u, _ = byName(pids)
	all.add(u)
	per := int64(0)
	if u.procs > 0 {
		per = u.rss / int64(u.procs)
	}
	fmt.Fprintf(w, "  devices' openvpn: %s: %s each\n", u, mib(per))
	_, u = procUsage(os.Getpid())
	all.add(u)
	fmt.Fprintf(w, "  local-fleet (the API, %d device web services, the checks): %s\n", len(f.devices), u)
	fmt.Fprintf(w, "  all: %s\n", all)
	if f.mem != nil {
		if u, err := f.mem.use(); err != nil {
			f.o.log.Warn("reading the fleet's memory cgroup", "err", err)
		} else {
			fmt.Fprintf(w, "  the fleet's memory cgroup (every process above, each page once, the kernel's part included): peak %s of its %s limit; now %s anonymous, %s files, %s kernel; %d processes killed for want of memory\n",
				mib(u.peak), mib(f.mem.limit), mib(u.anon), mib(u.file), mib(u.kernel), u.oomKills)
		}
	}
	if avail := memAvailable(); f.memAvailable > 0 && avail > 0 {
		fmt.Fprintf(w, "  the machine's available memory: %s less than before the fleet started (other programs' use included)\n", mib(f.memAvailable-avail))
	}
}

// checkMemory notes a missed target if the kernel killed a process of the
// fleet's memory cgroup for want of memory: the fleet did not fit.
func (f *fleet) checkMemory() {
	if f.mem == nil {
		return
	}
	u, err := f.mem.use()
	switch {
	case err != nil:
		f.missed = append(f.missed, fmt.Sprintf("the fleet's memory cgroup could not be read: %v", err))
	case u.oomKills > 0:
		f.missed = append(f.missed, fmt.Sprintf("the fleet did not fit in %s: the kernel killed %d of its processes for want of memory", mib(f.mem.limit), u.oomKills))
	}
}

// memAvailable returns the machine's MemAvailable (/proc/meminfo) in
// bytes, or 0.
func memAvailable() int64 {
	data, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0
	}
	for line := range strings.Lines(string(data)) {
		if rest, ok := strings.CutPrefix(line, "MemAvailable:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			if err != nil {
				return 0
			}
			return kb << 10
		}
	}
	return 0
}

// printAPICalls prints the calls that the balena API received so far:
// a state-report request may carry several devices (batching).
func (f *fleet) printAPICalls(w io.Writer) {
	devices := 0
	for _, r := range f.api.StateReports() {
		devices += len(r.UUIDs)
	}
	fmt.Fprintf(w, "balena API calls so far: %d device auths, %d state-report requests carrying %d device reports, %d canAccess, %d locate, %d device-online, %d heartbeats\n",
		f.api.Calls(balenatest.DeviceAuth), f.api.Calls(balenatest.StateReport), devices,
		f.api.Calls(balenatest.CanAccess), f.api.Calls(balenatest.LocateDevice),
		f.api.Calls(balenatest.DeviceOnline), f.api.Calls(balenatest.Heartbeat))
}

// latencies collects the durations of the CONNECTs that a check made.
type latencies struct {
	mu       sync.Mutex
	ok       []time.Duration
	failures int
}

func (l *latencies) record(d time.Duration, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if err != nil {
		l.failures++
		return
	}
	l.ok = append(l.ok, d)
}

// quantile returns the q-quantile (0 to 1) of the successful CONNECTs,
// nearest rank.
func (l *latencies) quantile(q float64) time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.ok) == 0 {
		return 0
	}
	s := slices.Sorted(slices.Values(l.ok))
	i := int(q*float64(len(s))+0.999999) - 1
	return s[min(max(i, 0), len(s)-1)]
}
