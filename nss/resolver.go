package nss

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// DefaultGlobs are the status files a Resolver reads when none are given:
// every OpenVPN server instance's, under both spellings of the run
// directory.
var DefaultGlobs = []string{"/run/openvpn/server-*.status", "/var/run/openvpn/server-*.status"}

// ErrNotFound reports a name that no status file holds.
var ErrNotFound = errors.New("nss: no such device connected")

// Resolver resolves device names, "<uuid>" or "<uuid>.vpn" in any case, to
// the virtual IPv4 address that the routing table of an OpenVPN status file
// gives the common name <uuid>.
//
// It keeps an index of every status file that its globs match. Lookups
// read an immutable snapshot of the index through an atomic pointer and
// take no lock. The index is refreshed on a lookup at most once per
// Interval, and then only the files whose identity, size or modification
// time changed are read again; a file that is torn (being rewritten) or
// unreadable keeps its last good entries until it reads whole, and a file
// that is gone drops its entries. When two files name the same device, the
// routing row with the latest "Last Ref" wins. [Resolver.Learn] and
// [Resolver.Forget] put what OpenVPN's management interface reports in
// front of a status file until that file is rewritten; [IndexWriter]
// writes what the resolver knows for the NSS module.
//
// The zero Resolver reads [DefaultGlobs] and is safe for concurrent use.
type Resolver struct {
	// Globs are the file name patterns of the status files. Nil means
	// DefaultGlobs.
	Globs []string

	// Interval is the least time between two refreshes started by
	// lookups. Zero means 1 s; a negative value refreshes on every lookup.
	Interval time.Duration

	index     atomic.Pointer[index]
	refreshed atomic.Int64 // unix nanoseconds of the last refresh
	mu        sync.Mutex   // one refresh at a time; guards what follows
	files     map[string]*fileState
	owners    map[string][]*fileState            // name → the files that route it
	learned   map[string]map[string]learnedEntry // name → source path → what was learned
	lastNum   uint32                             // the last fileState.num given
}

// index is an immutable snapshot of the names: device UUIDs (32 hex
// digits, the usual common names) as 16-byte keys held inside the table,
// so that a lookup follows no pointer to compare keys, and other common
// names as lower-case strings.
//
// It also carries what the writer of the index file needs: the identity of
// every status file the names came from (sources), a generation number that
// changes whenever the names do (gen), and a channel that is closed when a
// newer snapshot replaces this one (next).
type index struct {
	uuids   table[[16]byte]
	names   table[string]
	gen     uint64
	sources []source
	next    chan struct{}
}

// entry is what the index holds for one name: the address, the winning
// route's Last Ref (Unix seconds, 0 if unknown) and the number of the
// status file it came from (0: none, a learned entry of a file not seen).
//
// multi says that more than one status file (or learned entry) routed the
// name when the winner was chosen: a reader that finds the winner's file
// changed must then read every file, not only the changed ones.
type entry struct {
	a     v4
	ref   uint32
	src   uint32
	multi bool
}

// source is one status file as the snapshot was built from it.
type source struct {
	path string
	id   fileID
	num  uint32
}

// table is a large base map and a small overlay of what changed since the
// base was built (an entry with a zero address in the overlay deletes the
// name). A refresh
// copies only the overlay; when the overlay has grown to an eighth of the
// base (and at least minCompact names), it is merged into a new base. So a
// lookup is two map reads, and the cost of a refresh follows what changed,
// not the size of the fleet.
type table[K comparable] struct {
	base, overlay map[K]entry
}

func (t *table[K]) get(k K) (entry, bool) {
	if len(t.overlay) > 0 {
		if e, ok := t.overlay[k]; ok {
			return e, e.a != 0
		}
	}
	e, ok := t.base[k]
	return e, ok
}

// each calls fn for every name of the table.
func (t *table[K]) each(fn func(K, entry)) {
	for k, e := range t.base {
		if len(t.overlay) == 0 {
			fn(k, e)
		} else if _, ok := t.overlay[k]; !ok {
			fn(k, e)
		}
	}
	for k, e := range t.overlay {
		if e.a != 0 {
			fn(k, e)
		}
	}
}

// with returns the table with changes applied (a zero address deletes).
func (t table[K]) with(changes map[K]entry) table[K] {
	if len(changes) == 0 {
		return t
	}
	next := table[K]{base: t.base, overlay: make(map[K]entry, len(t.overlay)+len(changes))}
	if next.base == nil {
		next.base = map[K]entry{}
	}
	for k, v := range t.overlay {
		next.overlay[k] = v
	}
	for k, v := range changes {
		_, inBase := next.base[k]
		switch {
		case v.a != 0:
			next.overlay[k] = v
		case inBase:
			next.overlay[k] = entry{} // deleted
		default:
			delete(next.overlay, k)
		}
	}
	if len(next.overlay) >= max(minCompact, len(next.base)/8) {
		base := make(map[K]entry, len(next.base)+len(next.overlay))
		for k, v := range next.base {
			if _, ok := next.overlay[k]; !ok {
				base[k] = v
			}
		}
		for k, v := range next.overlay {
			if v.a != 0 {
				base[k] = v
			}
		}
		next.base, next.overlay = base, map[K]entry{}
	}
	return next
}

// uuidKey decodes a 32-hex-digit name, in any case, into its 16 bytes.
func uuidKey(name string) (k [16]byte, ok bool) {
	if len(name) != 32 {
		return k, false
	}
	for i := 0; i < 16; i++ {
		hi, ok1 := unhex(name[2*i])
		lo, ok2 := unhex(name[2*i+1])
		if !ok1 || !ok2 {
			return k, false
		}
		k[i] = hi<<4 | lo
	}
	return k, true
}

func unhex(c byte) (byte, bool) {
	switch {
	case '0' <= c && c <= '9':
		return c - '0', true
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10, true
	case 'A' <= c && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false
}

// v4 is an IPv4 address as a number: a quarter of a netip.Addr's size and
// free of pointers, which keeps the maps small and out of the garbage
// collector's way. 0.0.0.0, never a client's address, is the zero value.
type v4 uint32

func toV4(a netip.Addr) v4 {
	b := a.As4()
	return v4(b[0])<<24 | v4(b[1])<<16 | v4(b[2])<<8 | v4(b[3])
}

func (x v4) addr() netip.Addr {
	return netip.AddrFrom4([4]byte{byte(x >> 24), byte(x >> 16), byte(x >> 8), byte(x)})
}

// minCompact is the overlay size below which it is never merged.
const minCompact = 1 << 14

// fileState is what the refresher knows of one file.
type fileState struct {
	path  string
	num   uint32 // a number of its own, never reused, for the index's entries
	id    fileID
	names map[string]route // lowercased common name → its address
}

type route struct {
	addr    netip.Addr
	lastRef time.Time
}

// fileID tells whether a file changed: same device, inode, size and
// modification time means the same content.
type fileID struct {
	dev, ino uint64
	size     int64
	mtime    int64
}

// key identifies the file itself, whatever its content.
func (id fileID) key() [2]uint64 { return [2]uint64{id.dev, id.ino} }

func statID(fi os.FileInfo) fileID {
	id := fileID{size: fi.Size(), mtime: fi.ModTime().UnixNano()}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		id.dev, id.ino = uint64(st.Dev), st.Ino
	}
	return id
}

// Lookup returns the virtual IPv4 address of the device named name:
// "<uuid>" or "<uuid>.vpn", in any case. The error wraps [ErrNotFound]
// when no status file holds the device.
func (r *Resolver) Lookup(name string) (netip.Addr, error) {
	r.maybeRefresh()
	if a, ok := r.lookup(name); ok {
		return a, nil
	}
	return netip.Addr{}, fmt.Errorf("%w: %q", ErrNotFound, name)
}

// lookup reads the current snapshot. It does not allocate for names of up
// to 128 bytes.
func (r *Resolver) lookup(name string) (netip.Addr, bool) {
	idx := r.index.Load()
	if idx == nil {
		return netip.Addr{}, false
	}
	if n := len(name); n > 4 && name[n-4] == '.' && name[n-3]|0x20 == 'v' && name[n-2]|0x20 == 'p' && name[n-1]|0x20 == 'n' {
		name = name[:n-4] // ".vpn" in any case
	}
	if k, ok := uuidKey(name); ok {
		e, ok := idx.uuids.get(k)
		return e.a.addr(), ok
	}
	if name == "" {
		return netip.Addr{}, false
	}
	if hasUpper(name) {
		if len(name) > 128 {
			e, ok := idx.names.get(asciiLower(name))
			return e.a.addr(), ok
		}
		var buf [128]byte
		b := buf[:len(name)]
		for i := 0; i < len(name); i++ {
			c := name[i]
			if 'A' <= c && c <= 'Z' {
				c += 'a' - 'A'
			}
			b[i] = c
		}
		// Map reads keyed by string(b) do not allocate.
		if len(idx.names.overlay) > 0 {
			if e, ok := idx.names.overlay[string(b)]; ok {
				return e.a.addr(), e.a != 0
			}
		}
		e, ok := idx.names.base[string(b)]
		return e.a.addr(), ok
	}
	e, ok := idx.names.get(name)
	return e.a.addr(), ok
}

// asciiLower lower-cases the ASCII letters of s and nothing else: names
// compare case-insensitively in ASCII only, as DNS names do (RFC 4343), and
// as the NSS module does.
func asciiLower(s string) string {
	if !hasUpper(s) {
		return s
	}
	b := []byte(s)
	for i, c := range b {
		if 'A' <= c && c <= 'Z' {
			b[i] = c + 'a' - 'A'
		}
	}
	return string(b)
}

func hasUpper(s string) bool {
	for i := 0; i < len(s); i++ {
		if 'A' <= s[i] && s[i] <= 'Z' {
			return true
		}
	}
	return false
}

// LookupHost is Lookup in the form of net.Resolver.LookupHost: the address
// as a string, or a *net.DNSError with IsNotFound set.
func (r *Resolver) LookupHost(ctx context.Context, host string) ([]string, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	a, err := r.Lookup(host)
	if err != nil {
		return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
	}
	return []string{a.String()}, nil
}

// FileClient is a client of one status file.
type FileClient struct {
	// File is the status file's path; Instance the instance id from its
	// name (server-<id>.status), or 0.
	File     string
	Instance int
	Client
}

// Clients returns every client of every status file that the globs match,
// by file and then in file order. It reads the files anew (the index keeps
// only names), so it costs a full read: it is meant for operators, not for
// a hot path.
func (r *Resolver) Clients() ([]FileClient, error) {
	var out []FileClient
	var errs []error
	seen := make(map[[2]uint64]bool)
	for _, g := range r.globs() {
		paths, err := filepath.Glob(g)
		if err != nil {
			errs = append(errs, fmt.Errorf("nss: glob %q: %w", g, err))
			continue
		}
		for _, p := range paths {
			f, err := os.Open(p)
			if err != nil {
				continue // gone since the glob
			}
			fi, err := f.Stat()
			if err != nil || seen[statID(fi).key()] {
				f.Close()
				continue
			}
			seen[statID(fi).key()] = true
			st, err := ParseStatus(f)
			f.Close()
			if err != nil {
				errs = append(errs, fmt.Errorf("nss: %s: %w", p, err))
			}
			if st == nil {
				continue
			}
			routes := make(map[string]netip.Addr, len(st.Routes))
			for _, rt := range st.Routes {
				if rt.Addr.IsValid() {
					routes[strings.ToLower(rt.CommonName)] = rt.Addr
				}
			}
			inst := instanceOf(p)
			for _, c := range st.Clients {
				if !c.VirtualAddress.IsValid() {
					// Version 1 lists clients without their virtual
					// address: take it from the routing table.
					c.VirtualAddress = routes[strings.ToLower(c.CommonName)]
				}
				out = append(out, FileClient{File: p, Instance: inst, Client: c})
			}
		}
	}
	return out, errors.Join(errs...)
}

func (r *Resolver) globs() []string {
	if r.Globs == nil {
		return DefaultGlobs
	}
	return r.Globs
}

func instanceOf(path string) int {
	if m := instanceRE.FindStringSubmatch(filepath.Base(path)); m != nil {
		n, _ := strconv.Atoi(m[1])
		return n
	}
	return 0
}

func (r *Resolver) maybeRefresh() {
	interval := r.Interval
	if interval == 0 {
		interval = time.Second
	}
	last := r.refreshed.Load()
	if last != 0 && time.Now().UnixNano()-last < int64(interval) {
		return
	}
	if !r.mu.TryLock() {
		if last != 0 {
			return // another lookup refreshes; use what there is
		}
		r.mu.Lock() // the first lookup waits for the first index
	}
	defer r.mu.Unlock()
	r.refreshLocked()
}

// Refresh reads every status file that changed since the last refresh and
// publishes the new index. It returns the errors of files it could not
// read whole; their last good entries stay in the index.
func (r *Resolver) Refresh() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.refreshLocked()
}

var instanceRE = regexp.MustCompile(`^server-([0-9]+)\.status$`)

func (r *Resolver) init() {
	if r.files == nil {
		r.files = make(map[string]*fileState)
		r.owners = make(map[string][]*fileState)
		r.learned = make(map[string]map[string]learnedEntry)
	}
}

func (r *Resolver) refreshLocked() error {
	defer func() { r.refreshed.Store(time.Now().UnixNano()) }()
	r.init()
	globs := r.globs()
	seen := make(map[string]bool)
	seenID := make(map[[2]uint64]bool)
	var errs []error
	changed := make(map[string]bool) // names whose winner may have changed
	sourcesChanged := false
	for _, g := range globs {
		paths, err := filepath.Glob(g)
		if err != nil {
			errs = append(errs, fmt.Errorf("nss: glob %q: %w", g, err))
			continue
		}
		for _, p := range paths {
			// /var/run is usually a link to /run: the same file under two
			// names is read once, under the first.
			fi, err := os.Stat(p)
			if err != nil {
				continue // gone since the glob
			}
			id := statID(fi)
			if seenID[id.key()] {
				continue
			}
			seenID[id.key()] = true
			seen[p] = true
			if f := r.files[p]; f != nil && f.id == id {
				continue // unchanged: not even opened
			}
			ok, err := r.refreshFile(p, changed)
			if err != nil {
				errs = append(errs, err)
			}
			sourcesChanged = sourcesChanged || ok
		}
	}
	for p, f := range r.files {
		if !seen[p] {
			r.setNames(f, nil, changed)
			delete(r.files, p)
			sourcesChanged = true
		}
	}
	r.publish(changed, sourcesChanged)
	return errors.Join(errs...)
}

// refreshFile rereads one file if it changed, and says whether it read it
// whole (then the file's identity in the index changed).
func (r *Resolver) refreshFile(path string, changed map[string]bool) (bool, error) {
	f := r.files[path]
	if f == nil {
		r.lastNum++
		f = &fileState{path: path, num: r.lastNum}
		r.files[path] = f
	}
	file, err := os.Open(path)
	if err != nil {
		return false, fmt.Errorf("nss: %w", err)
	}
	defer file.Close()
	before, err := file.Stat()
	if err != nil {
		return false, fmt.Errorf("nss: %w", err)
	}
	id := statID(before)
	if id == f.id {
		return false, nil
	}
	names := make(map[string]route, len(f.names))
	_, err = parseStatus(file, func(rt Route) {
		if !rt.Addr.IsValid() || rt.CommonName == "" {
			return
		}
		cn := asciiLower(rt.CommonName) // rt's strings are the line's: copy
		if cn == rt.CommonName {
			cn = strings.Clone(cn)
		}
		if old, ok := names[cn]; !ok || rt.LastRef.After(old.lastRef) {
			names[cn] = route{rt.Addr, rt.LastRef}
		}
	})
	if err != nil {
		return false, fmt.Errorf("nss: %s: %w", path, err)
	}
	if after, err := file.Stat(); err != nil || statID(after) != id {
		// Rewritten while we read: try again on the next refresh.
		return false, fmt.Errorf("nss: %s: %w (changed while read)", path, ErrIncomplete)
	}
	first := f.names == nil
	r.setNames(f, names, changed)
	f.id = id
	r.expireLearned(path, id.mtime, first, changed)
	return true, nil
}

// setNames replaces a file's names, keeping owners up to date and noting
// every name whose entry in the index may change. A name that stays in
// the file changes the index only if its address changed, or if another
// file names it too (then the latest Last Ref wins): a rewrite that only
// moves Last Ref, as most do, costs no index update.
func (r *Resolver) setNames(f *fileState, names map[string]route, changed map[string]bool) {
	for n, old := range f.names {
		if nr, ok := names[n]; ok {
			if nr != old && (nr.addr != old.addr || len(r.owners[n]) > 1) {
				changed[n] = true
			}
			continue
		}
		changed[n] = true
		r.owners[n] = removeFile(r.owners[n], f)
		if len(r.owners[n]) == 0 {
			delete(r.owners, n)
		}
	}
	for n := range names {
		if _, had := f.names[n]; !had {
			changed[n] = true
			r.owners[n] = append(r.owners[n], f)
		}
	}
	f.names = names
}

func removeFile(s []*fileState, f *fileState) []*fileState {
	for i, x := range s {
		if x == f {
			return append(s[:i:i], s[i+1:]...)
		}
	}
	return s
}

// winner returns the entry that name n gets: among the files that route it
// and what was learned of it, the latest Last Ref wins; a learned entry
// replaces what its own file says.
func (r *Resolver) winner(n string) entry {
	var best entry
	var bestRef time.Time
	candidates := 0
	learned := r.learned[n]
	for _, f := range r.owners[n] {
		if _, ok := learned[f.path]; ok {
			continue // overridden by what was learned since
		}
		rt := f.names[n]
		if candidates++; candidates == 1 || rt.lastRef.After(bestRef) {
			best, bestRef = entry{a: toV4(rt.addr), ref: unixSeconds(rt.lastRef), src: f.num}, rt.lastRef
		}
	}
	for src, l := range learned {
		if !l.addr.IsValid() {
			continue // forgotten
		}
		if candidates++; candidates == 1 || l.at.After(bestRef) {
			var num uint32
			if f := r.files[src]; f != nil {
				num = f.num
			}
			best, bestRef = entry{a: toV4(l.addr), ref: unixSeconds(l.at), src: num}, l.at
		}
	}
	best.multi = candidates > 1
	return best
}

func unixSeconds(t time.Time) uint32 {
	s := t.Unix()
	if t.IsZero() || s <= 0 {
		return 0
	}
	if s > 1<<32-1 {
		return 1<<32 - 1
	}
	return uint32(s)
}

// publish builds the next snapshot from the current one, with the changed
// names' winners and, when the files changed, their identities. It closes
// the replaced snapshot's next channel.
func (r *Resolver) publish(changed map[string]bool, sourcesChanged bool) {
	cur := r.index.Load()
	if cur != nil && len(changed) == 0 && !sourcesChanged {
		return // the snapshot is still right
	}
	var next index
	if cur != nil {
		next = *cur
	}
	if len(changed) > 0 {
		uuids, names := map[[16]byte]entry{}, map[string]entry{}
		for n := range changed {
			e := r.winner(n) // zero: deleted
			if k, ok := uuidKey(n); ok {
				uuids[k] = e
			} else {
				names[n] = e
			}
		}
		next.uuids = next.uuids.with(uuids)
		next.names = next.names.with(names)
		next.gen++
	}
	if next.uuids.base == nil {
		next.uuids.base = map[[16]byte]entry{}
	}
	if next.names.base == nil {
		next.names.base = map[string]entry{}
	}
	if sourcesChanged || cur == nil {
		next.sources = make([]source, 0, len(r.files))
		for _, f := range r.files {
			if f.names != nil { // read whole at least once
				next.sources = append(next.sources, source{f.path, f.id, f.num})
			}
		}
		slices.SortFunc(next.sources, func(a, b source) int { return strings.Compare(a.path, b.path) })
	}
	next.next = make(chan struct{})
	r.index.Store(&next)
	if cur != nil {
		close(cur.next)
	}
}
