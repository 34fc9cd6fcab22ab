package nss

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// writeFleet writes files status files of perFile clients each, in
// version 2 with client and routing rows, and returns their glob and the
// devices' names.
func writeFleet(b *testing.B, dir string, files, perFile int, salt string) (string, []string) {
	b.Helper()
	var names []string
	for f := 1; f <= files; f++ {
		path := filepath.Join(dir, fmt.Sprintf("server-%d.status", f))
		out, err := os.Create(path)
		if err != nil {
			b.Fatal(err)
		}
		w := bufio.NewWriterSize(out, 1<<20)
		fmt.Fprint(w, "TITLE,OpenVPN 2.6.14\nTIME,2026-11-25 04:26:21,1795580781\n")
		fmt.Fprint(w, "HEADER,CLIENT_LIST,Common Name,Real Address,Virtual Address,Virtual IPv6 Address,Bytes Received,Bytes Sent,Connected Since,Connected Since (time_t),Username,Client ID,Peer ID,Data Channel Cipher\n")
		start := len(names)
		for i := 0; i < perFile; i++ {
			n := fmt.Sprintf("%08x%024x", f, i) // a 32-hex-digit device UUID
			n = salt + n[len(salt):]
			names = append(names, n)
			fmt.Fprintf(w, "CLIENT_LIST,%s,198.51.100.%d:%d,10.%d.%d.%d,,12345,67890,2026-11-25 04:26:18,1795580778,%s,%d,%d,AES-256-GCM\n",
				n, i%250, 1024+i, f-1, i>>8, i&0xff, n, i, i)
		}
		fmt.Fprint(w, "HEADER,ROUTING_TABLE,Virtual Address,Common Name,Real Address,Last Ref,Last Ref (time_t)\n")
		for i, n := range names[start:] {
			fmt.Fprintf(w, "ROUTING_TABLE,10.%d.%d.%d,%s,198.51.100.%d:%d,2026-11-25 04:26:18,1795580778\n", f-1, i>>8, i&0xff, n, i%250, 1024+i)
		}
		fmt.Fprint(w, "GLOBAL_STATS,dco_enabled,0\nEND\n")
		if err := w.Flush(); err != nil {
			b.Fatal(err)
		}
		out.Close()
	}
	return filepath.Join(dir, "server-*.status"), names
}

// BenchmarkLookup: one lookup in an index of 1,000,000 devices over 256
// status files (3907 each).
func BenchmarkLookup(b *testing.B) {
	glob, names := writeFleet(b, b.TempDir(), 256, 1_000_000/256+1, "")
	r := &Resolver{Globs: []string{glob}, Interval: 1 << 62}
	if err := r.Refresh(); err != nil {
		b.Fatal(err)
	}
	// The baseline: one plain map of the same names, as fast as a Go
	// lookup of a random key among a million gets on this machine.
	plain := make(map[string]int, len(names))
	for i, n := range names {
		plain[n] = i
	}
	queries := make([]string, len(names))
	copies := make([]string, len(names)) // keys the maps do not share
	for i := range names {
		queries[i] = strings.ToUpper(names[i][:4]) + names[i][4:] + ".vpn"
		copies[i] = strings.Clone(names[i])
	}
	b.Run("resolver", func(b *testing.B) {
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			if _, err := r.Lookup(queries[i%len(queries)]); err != nil {
				b.Fatal(err)
			}
			i += 7919
		}
	})
	b.Run("resolver-lowercase-uuid", func(b *testing.B) {
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			if _, err := r.Lookup(copies[i%len(copies)]); err != nil {
				b.Fatal(err)
			}
			i += 7919
		}
	})
	b.Run("plain-map-baseline", func(b *testing.B) {
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			if _, ok := plain[copies[i%len(copies)]]; !ok {
				b.Fatal("missing")
			}
			i += 7919
		}
	})
}

// BenchmarkRefreshOneFile: the cost of picking up one rewritten file of
// 4092 clients among 256, the other 255 unchanged. "same" rewrites the
// same devices (new counters, as every status write does); "new" replaces
// every device of the file.
func BenchmarkRefreshOneFile(b *testing.B) {
	for _, mode := range []string{"same", "new"} {
		b.Run(mode, func(b *testing.B) {
			dir := b.TempDir()
			glob, _ := writeFleet(b, dir, 256, 4092, "aa")
			r := &Resolver{Globs: []string{glob}, Interval: 1 << 62}
			if err := r.Refresh(); err != nil {
				b.Fatal(err)
			}
			// Two versions of server-1.status to alternate between.
			var versions [2][]byte
			for v := range versions {
				salt := "aa"
				if mode == "new" {
					salt = fmt.Sprintf("b%d", v)
				}
				vdir := b.TempDir()
				writeFleet(b, vdir, 1, 4092, salt)
				data, err := os.ReadFile(filepath.Join(vdir, "server-1.status"))
				if err != nil {
					b.Fatal(err)
				}
				versions[v] = []byte(strings.Replace(string(data), "12345", fmt.Sprintf("%05d", v), -1))
			}
			target := filepath.Join(dir, "server-1.status")
			b.ReportAllocs()
			b.ResetTimer()
			n := 0
			for b.Loop() {
				b.StopTimer()
				if err := os.WriteFile(target, versions[n%2], 0o644); err != nil {
					b.Fatal(err)
				}
				n++
				b.StartTimer()
				if err := r.Refresh(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkFind: one lookup by Find (a scan with no index, as the NSS
// module does for a process's first lookup) over the same files as
// BenchmarkLinearScan.
func BenchmarkFind(b *testing.B) {
	glob, names := writeFleet(b, b.TempDir(), 256, 1_000_000/256+1, "")
	b.ResetTimer()
	i := 0
	for b.Loop() {
		if _, err := Find([]string{glob}, names[i%len(names)]+".vpn"); err != nil {
			b.Fatal(err)
		}
		i += 7919
	}
}

// BenchmarkLinearScan is the reference module's way, the baseline: open
// and scan every file for every lookup (here 256 files of 3907 devices).
func BenchmarkLinearScan(b *testing.B) {
	glob, names := writeFleet(b, b.TempDir(), 256, 1_000_000/256+1, "")
	paths, _ := filepath.Glob(glob)
	b.ResetTimer()
	i := 0
	for b.Loop() {
		want := names[i%len(names)]
		i += 7919
		found := false
		for _, p := range paths {
			f, err := os.Open(p)
			if err != nil {
				b.Fatal(err)
			}
			sc := bufio.NewScanner(f)
			for sc.Scan() {
				line := sc.Text()
				if strings.HasPrefix(line, "ROUTING_TABLE,") && strings.Contains(line, ","+want+",") {
					found = true
					break
				}
			}
			f.Close()
			if found {
				break
			}
		}
		if !found {
			b.Fatal("not found")
		}
	}
}

// BenchmarkParseStatus: one status file of 4092 clients (a full /20).
func BenchmarkParseStatus(b *testing.B) {
	dir := b.TempDir()
	writeFleet(b, dir, 1, 4092, "")
	data, err := os.ReadFile(filepath.Join(dir, "server-1.status"))
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	for b.Loop() {
		st, err := ParseStatus(strings.NewReader(string(data)))
		if err != nil || len(st.Routes) != 4092 {
			b.Fatal(err)
		}
	}
}

// BenchmarkWriteIndex: writing the index file of 1,000,000 devices (256
// status files), as IndexWriter does: "names" after a change of names
// (the table encoded anew), "identities" after status rewrites that kept
// the names (the encoded table reused, only the file written).
func BenchmarkWriteIndex(b *testing.B) {
	dir := b.TempDir()
	glob, _ := writeFleet(b, dir, 256, 1_000_000/256+1, "")
	r := &Resolver{Globs: []string{glob}, Interval: 1 << 62}
	if err := r.Refresh(); err != nil {
		b.Fatal(err)
	}
	path := filepath.Join(dir, "nss.index")
	b.Run("names", func(b *testing.B) {
		for b.Loop() {
			if _, err := writeSnapshot(path, r.index.Load(), nil); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("identities", func(b *testing.B) {
		enc, err := writeSnapshot(path, r.index.Load(), nil)
		if err != nil {
			b.Fatal(err)
		}
		for b.Loop() {
			if _, err := writeSnapshot(path, r.index.Load(), enc); err != nil {
				b.Fatal(err)
			}
		}
	})
}
