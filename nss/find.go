package nss

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Find looks one name up by scanning the status files that globs match,
// without building an index: what a short-lived process needs, such as
// one getent call through the NSS module, where building an index of the
// whole fleet would cost more than the scan. It reads every file (the
// routing row with the latest Last Ref wins, as with [Resolver]), but
// parses a row only when its common name is the one asked for. The error
// wraps [ErrNotFound] when no file routes the name.
func Find(globs []string, name string) (netip.Addr, error) {
	if globs == nil {
		globs = DefaultGlobs
	}
	cn := asciiLower(name)
	if n := len(cn); n > 4 && cn[n-4:] == ".vpn" {
		cn = cn[:n-4]
	}
	var best netip.Addr
	var bestRef time.Time
	seen := make(map[[2]uint64]bool)
	for _, g := range globs {
		paths, err := filepath.Glob(g)
		if err != nil {
			return netip.Addr{}, fmt.Errorf("nss: glob %q: %w", g, err)
		}
		for _, p := range paths {
			a, ref, ok := findInFile(p, cn, seen)
			if ok && (!best.IsValid() || ref.After(bestRef)) {
				best, bestRef = a, ref
			}
		}
	}
	if !best.IsValid() || cn == "" {
		return netip.Addr{}, fmt.Errorf("%w: %q", ErrNotFound, name)
	}
	return best, nil
}

// findInFile scans one file for cn's routing rows. A file without its END
// line yields nothing: a torn row must not give an address.
func findInFile(path, cn string, seen map[[2]uint64]bool) (netip.Addr, time.Time, bool) {
	f, err := os.Open(path)
	if err != nil {
		return netip.Addr{}, time.Time{}, false
	}
	defer f.Close()
	before, err := f.Stat()
	if err != nil || seen[statID(before).key()] {
		return netip.Addr{}, time.Time{}, false
	}
	seen[statID(before).key()] = true
	// A file rewritten while it was read (size or mtime moved) is read
	// again, a few times: a read across OpenVPN's rewrite can look whole.
	for range 3 {
		a, ref, ok := scanRoutes(f, cn)
		after, err := f.Stat()
		if err != nil {
			break
		}
		if statID(after) == statID(before) {
			return a, ref, ok
		}
		before = after
		if _, err := f.Seek(0, io.SeekStart); err != nil {
			break
		}
	}
	return netip.Addr{}, time.Time{}, false
}

// scanRoutes scans a status file for cn's routing rows; a file without
// its END line yields nothing.
func scanRoutes(r io.Reader, cn string) (netip.Addr, time.Time, bool) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), maxLine)
	var (
		best     netip.Addr
		bestRef  time.Time
		cols     *columns // the routing table's header
		v1Routes bool     // inside version 1's ROUTING TABLE section
		complete bool
		sep      = []byte{','}
	)
	needle := []byte(cn)
	for sc.Scan() {
		line := sc.Bytes()
		var row []byte
		switch {
		case bytes.Equal(line, []byte("END")):
			complete = true
			continue
		case bytes.HasPrefix(line, []byte("HEADER,ROUTING_TABLE,")), bytes.HasPrefix(line, []byte("HEADER\tROUTING_TABLE\t")):
			sep = []byte{line[len("HEADER")]} // a copy: line is reused by the scanner
			cols = newColumns(strings.Split(string(line[len("HEADER,ROUTING_TABLE,"):]), string(sep)))
			continue
		case bytes.HasPrefix(line, []byte("ROUTING_TABLE,")), bytes.HasPrefix(line, []byte("ROUTING_TABLE\t")):
			row = line[len("ROUTING_TABLE,"):]
		case bytes.Equal(line, []byte("ROUTING TABLE")):
			v1Routes, cols = true, nil
			continue
		case bytes.Equal(line, []byte("GLOBAL STATS")):
			v1Routes = false
			continue
		case v1Routes && cols == nil:
			cols = newColumns(strings.Split(string(line), ","))
			continue
		case v1Routes:
			row = line
		default:
			continue
		}
		// Only rows whose common name is the name are split and parsed
		// (UNDEF is no name).
		if cols == nil || !equalFoldASCII(field(row, sep[0], cols[colCommonName]), needle) {
			continue
		}
		f := strings.Split(string(row), string(sep))
		if cn := cols.get(f, colCommonName); !equalFoldASCII([]byte(cn), needle) || cn == "UNDEF" {
			continue
		}
		a := parseHost(cols.get(f, colVirtualAddress), true)
		if !a.IsValid() {
			continue
		}
		ref := parseTime(cols.get(f, colLastRef), cols.get(f, colLastRefT))
		if !best.IsValid() || ref.After(bestRef) {
			best, bestRef = a, ref
		}
	}
	if sc.Err() != nil || !complete {
		return netip.Addr{}, time.Time{}, false
	}
	return best, bestRef, best.IsValid()
}

// field returns the i-th field of row, or nil.
func field(row []byte, sep byte, i int) []byte {
	if i < 0 {
		return nil
	}
	for ; i > 0; i-- {
		j := bytes.IndexByte(row, sep)
		if j < 0 {
			return nil
		}
		row = row[j+1:]
	}
	if j := bytes.IndexByte(row, sep); j >= 0 {
		return row[:j]
	}
	return row
}

// equalFoldASCII compares a and b, ignoring the case of ASCII letters only.
func equalFoldASCII(a, b []byte) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		x, y := a[i], b[i]
		if 'A' <= x && x <= 'Z' {
			x += 'a' - 'A'
		}
		if 'A' <= y && y <= 'Z' {
			y += 'a' - 'A'
		}
		if x != y {
			return false
		}
	}
	return true
}
