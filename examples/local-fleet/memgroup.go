package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// cgroupRoot is where the cgroup file systems are mounted.
const cgroupRoot = "/sys/fs/cgroup"

// memGroup is a memory cgroup with a limit that local-fleet moves itself
// into before it starts anything, so that every process of the fleet (the
// hosts, their OpenVPN and HAProxy, the balancer, the devices' openvpn,
// the ip commands) is charged to it from its start, each page once: what
// summed RSS counts once per process that maps it (the shared libraries
// of hundreds of openvpn clients) is counted once here, and the kernel's
// memory for the namespaces, links and sockets that the fleet's processes
// make is counted too. Past the limit the kernel reclaims the group's
// page cache and then kills a process of the group, which the checks
// notice: a fleet that passes ran within the limit.
//
// It works with cgroup v1's memory controller and with cgroup v2 where
// the memory controller is enabled for the parent of local-fleet's own
// group.
type memGroup struct {
	dir   string // the group's directory
	home  string // the directory of the group local-fleet came from
	v2    bool
	limit int64
}

// newMemGroup makes a memory cgroup limited to limit bytes next to
// local-fleet's own (cgroup v2) or under it (v1), and moves local-fleet
// into it.
func newMemGroup(limit int64) (*memGroup, error) {
	own, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return nil, fmt.Errorf("memory cgroup: %w", err)
	}
	return makeMemGroup(cgroupRoot, own, os.Getpid(), limit)
}

// makeMemGroup is newMemGroup for process pid, whose /proc/<pid>/cgroup
// is own, with the cgroup file systems at root.
func makeMemGroup(root string, own []byte, pid int, limit int64) (*memGroup, error) {
	g := &memGroup{limit: limit}
	name := fmt.Sprintf("obvpn-fleet-%d", pid)
	v1, v2 := ownGroups(own)
	switch {
	case v1 != "" && exists(filepath.Join(root, "memory", "memory.limit_in_bytes")):
		g.home = filepath.Join(root, "memory", v1)
		g.dir = filepath.Join(g.home, name)
	case v2 != "" && exists(filepath.Join(root, "cgroup.controllers")):
		// A process may sit only in a leaf of a v2 hierarchy whose
		// controllers are enabled: the new group is a sibling of our own.
		g.v2 = true
		g.home = filepath.Join(root, v2)
		parent := filepath.Dir(g.home)
		if v2 == "/" {
			parent = root // the root group may hold processes and groups both
		}
		g.dir = filepath.Join(parent, name)
		// The memory controller may not be enabled for the parent's
		// children yet; where the parent holds processes itself, the
		// kernel refuses, and the limit below says so.
		_ = os.WriteFile(filepath.Join(parent, "cgroup.subtree_control"), []byte("+memory"), 0o644)
	default:
		return nil, errors.New("memory cgroup: neither cgroup v1's memory controller nor cgroup v2 is mounted at " + root)
	}
	if err := os.Mkdir(g.dir, 0o755); err != nil {
		return nil, fmt.Errorf("memory cgroup: %w", err)
	}
	limitFile := "memory.limit_in_bytes"
	if g.v2 {
		limitFile = "memory.max"
	}
	if err := g.write(limitFile, strconv.FormatInt(limit, 10)); err != nil {
		_ = os.Remove(g.dir)
		return nil, fmt.Errorf("memory cgroup: the limit (is the memory controller enabled for %s?): %w", filepath.Dir(g.dir), err)
	}
	if err := g.write("cgroup.procs", strconv.Itoa(pid)); err != nil {
		_ = os.Remove(g.dir)
		return nil, fmt.Errorf("memory cgroup: moving local-fleet into %s: %w", g.dir, err)
	}
	return g, nil
}

// ownGroups returns local-fleet's cgroup in v1's memory hierarchy and in
// the v2 hierarchy, from /proc/self/cgroup ("id:controllers:path" lines).
func ownGroups(data []byte) (v1, v2 string) {
	for line := range strings.Lines(string(data)) {
		parts := strings.SplitN(strings.TrimSpace(line), ":", 3)
		if len(parts) != 3 {
			continue
		}
		switch {
		case parts[0] == "0" && parts[1] == "":
			v2 = parts[2]
		case strings.Contains(","+parts[1]+",", ",memory,"):
			v1 = parts[2]
		}
	}
	return v1, v2
}

func exists(name string) bool {
	_, err := os.Stat(name)
	return err == nil
}

func (g *memGroup) write(file, value string) error {
	return os.WriteFile(filepath.Join(g.dir, file), []byte(value), 0o644)
}

// memUse is what a memory cgroup holds: its peak and what it charged,
// by kind.
type memUse struct {
	peak, anon, file, kernel int64 // bytes
	oomKills                 int64
}

// use reads what the group holds now and its peak since it was made.
func (g *memGroup) use() (memUse, error) {
	var u memUse
	peakFile, statFile, eventsFile := "memory.max_usage_in_bytes", "memory.stat", "memory.oom_control"
	if g.v2 {
		peakFile, eventsFile = "memory.peak", "memory.events"
	}
	peak, err := os.ReadFile(filepath.Join(g.dir, peakFile))
	if err != nil {
		return u, err
	}
	if u.peak, err = strconv.ParseInt(strings.TrimSpace(string(peak)), 10, 64); err != nil {
		return u, fmt.Errorf("%s: %w", peakFile, err)
	}
	stat := g.keyed(statFile)
	if g.v2 {
		u.anon, u.file, u.kernel = stat["anon"], stat["file"], stat["kernel"]
	} else {
		// v1's stat has no kernel line: its kmem counter has it.
		u.anon, u.file = stat["total_rss"], stat["total_cache"]
		if kmem, err := os.ReadFile(filepath.Join(g.dir, "memory.kmem.usage_in_bytes")); err == nil {
			u.kernel, _ = strconv.ParseInt(strings.TrimSpace(string(kmem)), 10, 64)
		}
	}
	u.oomKills = g.keyed(eventsFile)["oom_kill"]
	return u, nil
}

// keyed reads a cgroup file of "key value" lines.
func (g *memGroup) keyed(file string) map[string]int64 {
	m := map[string]int64{}
	data, err := os.ReadFile(filepath.Join(g.dir, file))
	if err != nil {
		return m
	}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), " ")
		if n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64); ok && err == nil {
			m[k] = n
		}
	}
	return m
}

// close moves local-fleet back to its own group and removes the group,
// once the processes that the fleet started have left it.
func (g *memGroup) close() error {
	if err := os.WriteFile(filepath.Join(g.home, "cgroup.procs"), []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		return fmt.Errorf("memory cgroup: moving local-fleet back to %s: %w", g.home, err)
	}
	// A process that was killed may take a moment to be gone from the
	// group (its exit runs after the signal): try for a few seconds.
	deadline := time.Now().Add(5 * time.Second)
	for {
		err := os.Remove(g.dir)
		if err == nil || errors.Is(err, os.ErrNotExist) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("memory cgroup: %w", err)
		}
		time.Sleep(50 * time.Millisecond) // no event says that a cgroup emptied in v1
	}
}

// byteSize is a flag of a size in bytes, written with a unit: 4GiB,
// 512MiB, 64KiB, or a plain number of bytes. Empty or 0 is none.
type byteSize int64

func (b *byteSize) String() string {
	switch n := int64(*b); {
	case n == 0:
		return ""
	case n%(1<<30) == 0:
		return fmt.Sprintf("%dGiB", n>>30)
	case n%(1<<20) == 0:
		return fmt.Sprintf("%dMiB", n>>20)
	default:
		return strconv.FormatInt(n, 10)
	}
}

func (b *byteSize) Set(s string) error {
	if s == "" {
		*b = 0
		return nil
	}
	num, shift := s, 0
	for _, u := range []struct {
		suffix string
		shift  int
	}{{"GiB", 30}, {"MiB", 20}, {"KiB", 10}} {
		if n, ok := strings.CutSuffix(s, u.suffix); ok {
			num, shift = n, u.shift
			break
		}
	}
	n, err := strconv.ParseInt(num, 10, 64)
	if err != nil || n < 0 || n > (1<<62)>>shift {
		return fmt.Errorf("want a size such as 4GiB, 512MiB or a number of bytes, not %q", s)
	}
	*b = byteSize(n << shift)
	return nil
}

// memGroupPossible says why newMemGroup cannot work here, or nil: it
// makes a group and removes it.
func memGroupPossible() error {
	g, err := newMemGroup(1 << 30)
	if err != nil {
		return err
	}
	return g.close()
}
