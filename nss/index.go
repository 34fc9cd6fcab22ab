package nss

import (
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// The index file: what a Resolver knows, written for the NSS module
// (cmd/libnss_openvpn), which is loaded into every process on the host that
// resolves a name and must answer without parsing, allocating or starting
// anything.
//
// Why this format. The reader is C code that maps the file and answers one
// name, often in a process that lives for one lookup; so what counts is the
// number of pages a lookup touches and the checks it can make cheaply, not
// the size of the file. A CDB needs two reads per probe and its 256-entry
// head table for nothing here; a sorted table costs log2(n) probes (20 page
// touches at a million names) and a miss costs as much as a hit. So: an
// open-addressing hash table of 8-byte slots (a 32-bit hash tag and the
// offset of a record) at a load factor of at most 1/2, probed linearly:
// a hit reads one or two slots and one record, a miss one or two slots,
// nearly always in one cache line. Records hold the name, so that a hit is
// confirmed by comparing names, never by the hash alone, and carry a check
// of their own bytes, verified for every record a probe reaches, so that a
// corrupted record is noticed when it could answer. The header and the
// list of source files carry a checksum, and so does each block of 512
// slots (4 KB), which a reader verifies when a probe enters it: a lookup
// checks about 4 KB, never the whole table (16 MB for a million names).
// Every offset is checked against the file's size before it is followed.
//
// Layout (version 1), integers little-endian:
//
//	header, 88 bytes:
//	  0 magic "OBVPNIDX"   8 version uint32      12 number of sources uint32
//	 16 entries uint32    20 slots uint32 (a power of two)
//	 24 file size uint64  32 sources offset uint64 (88)
//	 40 slots offset uint64 (a multiple of 8)    48 records offset uint64
//	 56 records length uint64                    64 written at, Unix ns int64
//	 72 block checks offset uint64 (sources offset + sources length)
//	 80 sources length uint32
//	 84 check uint32: FNV-1a (64-bit, low half) of bytes 0-83 and of
//	    everything from the sources offset to the slots offset
//	sources: per status file, sorted by (device, inode), 40 bytes:
//	  device uint64, inode uint64, size int64, modification time (Unix ns)
//	  int64, path offset uint32 (from the section's start), path length
//	  uint32; then the paths; zero-padded to a multiple of 8
//	block checks: per block of min(slots, 512) slots, slotsCheck of its
//	  bytes, uint64
//	slots: per slot, hash tag uint32 (0: empty), record offset / 4 uint32
//	records: per name, padded to a multiple of 4 bytes:
//	  IPv4 address [4]byte, check uint32, Last Ref (Unix s) uint32, source
//	  uint16 (index into sources; 0xffff: none; bit 15 set: other files
//	  routed the name too, so a reader whose source changed must read every
//	  file), name length uint16, name
//
// The hash of a name h is FNV-1a (64-bit) of its lower-case bytes; its tag
// is uint32(h)|1 and its first slot (h>>32) & (slots-1). A record's check
// is the low half of FNV-1a (64-bit) of its bytes without the check field,
// XOR its offset from the records' start.
//
// Freshness: a reader compares each source's identity (device, inode,
// size, modification time) with the file on disk, and looks for status
// files that the index does not name. An entry from a source that
// changed, or a status file the index does not name, is not believed:
// the reader scans those files instead (the C module does; the Go reader
// reports it with [Index.Stale]).
const (
	indexMagic      = "OBVPNIDX"
	indexVersion    = 1
	indexHeaderSize = 88
	indexSourceSize = 40
	recordHeadSize  = 16
	noSource        = 0xffff
	multiSource     = 0x8000 // a flag of a record's source: other files routed the name too
	// MaxIndexSources is the most status files an index names; a
	// resolver over more writes no index (the NSS module then scans).
	MaxIndexSources = 4096
	maxNameLen      = 1<<16 - 1
)

// DefaultIndexPath is where the index file goes when the status files are
// the default ones ([DefaultGlobs]), and where the NSS module looks for it.
const DefaultIndexPath = "/run/openvpn/nss.index"

// ErrIndexFormat reports an index file that is not one, is of another
// version, is cut short or is corrupted.
var ErrIndexFormat = errors.New("nss: not a valid index file")

// IndexPathFor returns the default path of the index for the status files
// that globs match: nss.index in the directory of the first glob, when that
// directory has no wildcards; else [DefaultIndexPath]. Nil globs (the
// defaults) give DefaultIndexPath. The NSS module applies the same rule to
// NSS_OPENVPN_STATUS_GLOB when NSS_OPENVPN_INDEX is not set.
func IndexPathFor(globs []string) string {
	if len(globs) == 0 {
		return DefaultIndexPath
	}
	dir := filepath.Dir(globs[0])
	if strings.ContainsAny(dir, `*?[\`) {
		return DefaultIndexPath
	}
	return filepath.Join(dir, "nss.index")
}

const (
	fnvOffset = 14695981039346656037
	fnvPrime  = 1099511628211
)

func fnv1a(h uint64, b []byte) uint64 {
	for _, c := range b {
		h ^= uint64(c)
		h *= fnvPrime
	}
	return h
}

func fnv1aString(h uint64, s string) uint64 {
	for i := 0; i < len(s); i++ {
		h ^= uint64(s[i])
		h *= fnvPrime
	}
	return h
}

func tagOf(h uint64) uint32 { return uint32(h) | 1 }

// slotsCheck is the check of the slots: four lanes, each (h ^ word) *
// prime over every fourth little-endian 8-byte word, then folded. Each
// step is a bijection of h, so any one word changed changes the check.
func slotsCheck(b []byte) uint64 {
	h := [4]uint64{fnvOffset, fnvOffset ^ 1, fnvOffset ^ 2, fnvOffset ^ 3}
	for i := 0; i+32 <= len(b); i += 32 {
		for k := range h {
			h[k] = (h[k] ^ binary.LittleEndian.Uint64(b[i+8*k:])) * fnvPrime
		}
	}
	r := uint64(fnvOffset)
	for _, x := range h {
		r = (r ^ x) * fnvPrime
	}
	return r
}

// encoded is an index file in its two parts: the head (header and
// sources), which changes whenever a status file is rewritten, and the
// body (slots and records), which changes only when the names do.
type encoded struct {
	gen     uint64   // the snapshot generation of the body
	order   []uint32 // the source numbers, in the file's order
	srcLen  int      // length of the sources section, padded
	body    []byte
	entries uint32
	slots   uint32
	recLen  uint64
	// blocks are the checks of the blocks of slots.
	blocks []byte
}

// blockSlots is the number of slots in a block of nslots.
func blockSlots(nslots uint32) uint32 { return min(nslots, 512) }

func blockChecks(table []byte, nslots uint32) []byte {
	bs := int(blockSlots(nslots)) * 8
	out := make([]byte, len(table)/bs*8)
	for i := 0; i < len(table)/bs; i++ {
		binary.LittleEndian.PutUint64(out[8*i:], slotsCheck(table[i*bs:(i+1)*bs]))
	}
	return out
}

// sortedSources returns the snapshot's sources in the file's order, by
// device and inode.
func sortedSources(snap *index) []source {
	src := slices.Clone(snap.sources)
	slices.SortFunc(src, func(a, b source) int {
		if a.id.dev != b.id.dev {
			if a.id.dev < b.id.dev {
				return -1
			}
			return 1
		}
		switch {
		case a.id.ino < b.id.ino:
			return -1
		case a.id.ino > b.id.ino:
			return 1
		}
		return 0
	})
	return src
}

func sourcesLen(src []source) int {
	n := len(src) * indexSourceSize
	for _, s := range src {
		n += len(s.path)
	}
	return (n + 7) &^ 7
}

// encodeBody builds the slots and records of snap, with source numbers
// mapped to positions in src. It writes each record in place (device
// UUIDs are printed straight into it), so that it allocates the body and
// little else: about 0.2 s for a million names.
func encodeBody(snap *index, src []source) *encoded {
	var maxNum uint32
	for _, s := range src {
		maxNum = max(maxNum, s.num)
	}
	pos := make([]uint16, maxNum+1) // source number → position + 1 (0: none)
	order := make([]uint32, len(src))
	for i, s := range src {
		pos[s.num] = uint16(i) + 1
		order[i] = s.num
	}
	count, recLen := 0, uint64(0)
	snap.uuids.each(func([16]byte, entry) {
		count++
		recLen += (recordHeadSize + 32 + 3) &^ 3
	})
	snap.names.each(func(k string, _ entry) {
		if len(k) <= maxNameLen {
			count++
			recLen += uint64(recordHeadSize+len(k)+3) &^ 3
		}
	})
	slots := uint32(16)
	for int(slots) < 2*count {
		slots <<= 1
	}
	slotsLen := uint64(slots) * 8
	body := make([]byte, slotsLen+recLen)
	table, records := body[:slotsLen], body[slotsLen:]
	off := uint64(0)
	mask := slots - 1
	le := binary.LittleEndian
	// put writes the record whose name is already at off+16, and its slot.
	put := func(nameLen int, e entry) {
		b := records[off : off+recordHeadSize+uint64(nameLen)]
		a := e.a
		b[0], b[1], b[2], b[3] = byte(a>>24), byte(a>>16), byte(a>>8), byte(a)
		le.PutUint32(b[8:], e.ref)
		p := uint16(noSource)
		if int(e.src) < len(pos) && pos[e.src] != 0 {
			p = pos[e.src] - 1
			if e.multi {
				p |= multiSource
			}
		}
		le.PutUint16(b[12:], p)
		le.PutUint16(b[14:], uint16(nameLen))
		le.PutUint32(b[4:], recordCheck(b, off))
		h := fnv1a(fnvOffset, b[recordHeadSize:])
		for i := uint32(h>>32) & mask; ; i = (i + 1) & mask {
			s := table[8*i:]
			if le.Uint32(s) == 0 {
				le.PutUint32(s, tagOf(h))
				le.PutUint32(s[4:], uint32(off/4))
				break
			}
		}
		off += uint64(recordHeadSize+nameLen+3) &^ 3
	}
	snap.uuids.each(func(k [16]byte, e entry) {
		hex.Encode(records[off+recordHeadSize:], k[:])
		put(32, e)
	})
	snap.names.each(func(k string, e entry) {
		if len(k) <= maxNameLen {
			copy(records[off+recordHeadSize:], k)
			put(len(k), e)
		}
	})
	return &encoded{gen: snap.gen, order: order, srcLen: sourcesLen(src), body: body,
		entries: uint32(count), slots: slots, recLen: recLen, blocks: blockChecks(table, slots)}
}

// recordCheck is the check of a record b (its check field is skipped) at
// offset off.
func recordCheck(b []byte, off uint64) uint32 {
	h := fnv1a(fnvOffset, b[:4])
	h = fnv1a(h, b[8:])
	return uint32(h) ^ uint32(off)
}

// encodeHead builds the header and sources section for body and src.
func encodeHead(enc *encoded, src []source, written time.Time) []byte {
	head := make([]byte, indexHeaderSize+enc.srcLen+len(enc.blocks))
	h := head[:indexHeaderSize]
	copy(h, indexMagic)
	le := binary.LittleEndian
	le.PutUint32(h[8:], indexVersion)
	le.PutUint32(h[12:], uint32(len(src)))
	le.PutUint32(h[16:], enc.entries)
	le.PutUint32(h[20:], enc.slots)
	size := uint64(len(head)) + uint64(len(enc.body))
	le.PutUint64(h[24:], size)
	le.PutUint64(h[32:], indexHeaderSize)
	slotsOff := uint64(indexHeaderSize + enc.srcLen + len(enc.blocks))
	le.PutUint64(h[40:], slotsOff)
	le.PutUint64(h[48:], slotsOff+uint64(enc.slots)*8)
	le.PutUint64(h[56:], enc.recLen)
	le.PutUint64(h[64:], uint64(written.UnixNano()))
	le.PutUint64(h[72:], uint64(indexHeaderSize+enc.srcLen))
	le.PutUint32(h[80:], uint32(enc.srcLen))
	sec := head[indexHeaderSize : indexHeaderSize+enc.srcLen]
	copy(head[indexHeaderSize+enc.srcLen:], enc.blocks)
	paths := len(src) * indexSourceSize
	for i, s := range src {
		b := sec[i*indexSourceSize:]
		le.PutUint64(b[0:], s.id.dev)
		le.PutUint64(b[8:], s.id.ino)
		le.PutUint64(b[16:], uint64(s.id.size))
		le.PutUint64(b[24:], uint64(s.id.mtime))
		le.PutUint32(b[32:], uint32(paths))
		le.PutUint32(b[36:], uint32(len(s.path)))
		paths += copy(sec[paths:], s.path)
	}
	c := fnv1a(fnv1a(fnvOffset, h[:84]), head[indexHeaderSize:])
	le.PutUint32(h[84:], uint32(c))
	return head
}

// writeIndexFile writes head and body to a temporary file next to path and
// renames it into place, so that readers see the old index or the new one,
// never a part. The file is world-readable: every process on the host
// reads it.
func writeIndexFile(path string, head, body []byte) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("nss: writing the index: %w", err)
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if _, err := f.Write(head); err != nil {
		return fmt.Errorf("nss: writing the index: %w", err)
	}
	if _, err := f.Write(body); err != nil {
		return fmt.Errorf("nss: writing the index: %w", err)
	}
	if err := f.Chmod(0o644); err != nil {
		return fmt.Errorf("nss: writing the index: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("nss: writing the index: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("nss: writing the index: %w", err)
	}
	ok = true
	return nil
}

// WriteIndex writes the index file of what r knows now (status files and
// learned entries) to path, atomically: a temporary file in the same
// directory, renamed into place. It refreshes r first if r has never read
// its files. See [IndexWriter] to keep the file current.
func (r *Resolver) WriteIndex(path string) error {
	if r.refreshed.Load() == 0 {
		r.Refresh() // errors are files that did not read whole: their entries are absent
	}
	snap := r.index.Load()
	if snap == nil {
		r.mu.Lock()
		r.init()
		r.publish(nil, true)
		r.mu.Unlock()
		snap = r.index.Load()
	}
	_, err := writeSnapshot(path, snap, nil)
	return err
}

// writeSnapshot writes snap, reusing prev's body when the names did not
// change, and returns what it wrote.
func writeSnapshot(path string, snap *index, prev *encoded) (*encoded, error) {
	if len(snap.sources) > MaxIndexSources {
		return nil, fmt.Errorf("nss: %d status files: an index names at most %d", len(snap.sources), MaxIndexSources)
	}
	src := sortedSources(snap)
	enc := prev
	if enc == nil || enc.gen != snap.gen || enc.srcLen != sourcesLen(src) || !sameOrder(enc.order, src) {
		enc = encodeBody(snap, src)
	}
	return enc, writeIndexFile(path, encodeHead(enc, src, time.Now()), enc.body)
}

func sameOrder(order []uint32, src []source) bool {
	if len(order) != len(src) {
		return false
	}
	for i, s := range src {
		if order[i] != s.num {
			return false
		}
	}
	return true
}

// Index is an index file read back: what the NSS module reads, for
// programs that want the same answers (obvpnctl lookup) and for tests.
type Index struct {
	data           []byte
	nentries       int
	nslots         uint32
	slotsOff       uint64
	recOff, recLen uint64
	sources        []IndexSource
	written        time.Time
}

// IndexSource is a status file that an index was built from, with the
// identity it had then.
type IndexSource struct {
	Path    string
	Dev     uint64
	Ino     uint64
	Size    int64
	ModTime time.Time
	mtime   int64
}

// ReadIndex reads and checks the index file at path.
func ReadIndex(path string) (*Index, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("nss: %w", err)
	}
	ix, err := ParseIndex(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return ix, nil
}

// ParseIndex checks an index file's header and sources and returns the
// index over b (which it keeps). The error wraps [ErrIndexFormat].
func ParseIndex(b []byte) (*Index, error) {
	bad := func(what string, args ...any) (*Index, error) {
		return nil, fmt.Errorf("%w: %s", ErrIndexFormat, fmt.Sprintf(what, args...))
	}
	if len(b) < indexHeaderSize || string(b[:8]) != indexMagic {
		return bad("no header")
	}
	le := binary.LittleEndian
	if v := le.Uint32(b[8:]); v != indexVersion {
		return bad("version %d", v)
	}
	nsrc, nent, nslots := le.Uint32(b[12:]), le.Uint32(b[16:]), le.Uint32(b[20:])
	size, srcOff, slotsOff := le.Uint64(b[24:]), le.Uint64(b[32:]), le.Uint64(b[40:])
	recOff, recLen, srcLen := le.Uint64(b[48:]), le.Uint64(b[56:]), uint64(le.Uint32(b[80:]))
	switch {
	case size != uint64(len(b)):
		return bad("size %d, header says %d", len(b), size)
	case srcOff != indexHeaderSize || nsrc > MaxIndexSources || srcLen < uint64(nsrc)*indexSourceSize || srcOff+srcLen > size:
		return bad("sources out of bounds")
	case nslots < 16 || nslots&(nslots-1) != 0 || uint64(nent)*2 > uint64(nslots):
		return bad("%d slots for %d entries", nslots, nent)
	case le.Uint64(b[72:]) != srcOff+srcLen ||
		slotsOff != srcOff+srcLen+uint64(nslots/blockSlots(nslots))*8 || slotsOff%8 != 0 ||
		recOff != slotsOff+uint64(nslots)*8 || recOff > size || recLen != size-recOff:
		return bad("slots or records out of bounds")
	}
	sec := b[srcOff : srcOff+srcLen]
	if c := uint32(fnv1a(fnv1a(fnvOffset, b[:84]), b[srcOff:slotsOff])); c != le.Uint32(b[84:]) {
		return bad("checksum")
	}
	if string(blockChecks(b[slotsOff:recOff], nslots)) != string(b[srcOff+srcLen:slotsOff]) {
		return bad("slots checksum")
	}
	ix := &Index{data: b, nentries: int(nent), nslots: nslots, slotsOff: slotsOff, recOff: recOff, recLen: recLen,
		written: time.Unix(0, int64(le.Uint64(b[64:])))}
	for i := range int(nsrc) {
		s := sec[i*indexSourceSize:]
		po, pl := uint64(le.Uint32(s[32:])), uint64(le.Uint32(s[36:]))
		if po+pl > srcLen {
			return bad("source path out of bounds")
		}
		mt := int64(le.Uint64(s[24:]))
		ix.sources = append(ix.sources, IndexSource{
			Path: string(sec[po : po+pl]), Dev: le.Uint64(s), Ino: le.Uint64(s[8:]),
			Size: int64(le.Uint64(s[16:])), ModTime: time.Unix(0, mt), mtime: mt,
		})
	}
	return ix, nil
}

// Sources returns the status files the index was built from.
func (ix *Index) Sources() []IndexSource { return slices.Clone(ix.sources) }

// Len returns the number of names in the index.
func (ix *Index) Len() int { return ix.nentries }

// Written returns when the index was written.
func (ix *Index) Written() time.Time { return ix.written }

// Lookup returns the address the index holds for name, "<common name>" or
// "<common name>.vpn" in any case. It does not say whether the index is
// still fresh (see [Index.Stale]). The error wraps [ErrNotFound], or
// [ErrIndexFormat] for a corrupted record.
func (ix *Index) Lookup(name string) (netip.Addr, error) {
	a, _, err := ix.lookup(name)
	return a, err
}

// lookup also returns the position of the source of the answer (or
// noSource).
func (ix *Index) lookup(name string) (netip.Addr, int, error) {
	n := asciiLower(name)
	if l := len(n); l > 4 && n[l-4:] == ".vpn" {
		n = n[:l-4]
	}
	if n == "" || len(n) > maxNameLen {
		return netip.Addr{}, noSource, fmt.Errorf("%w: %q", ErrNotFound, name)
	}
	le := binary.LittleEndian
	h := fnv1aString(fnvOffset, n)
	tag, mask := tagOf(h), ix.nslots-1
	slots := ix.data[ix.slotsOff : ix.slotsOff+uint64(ix.nslots)*8]
	recs := ix.data[ix.recOff:]
	i := uint32(h>>32) & mask
	for range ix.nslots {
		s := slots[8*i:]
		t := le.Uint32(s)
		if t == 0 {
			break
		}
		if t == tag {
			off := uint64(le.Uint32(s[4:])) * 4
			if off+recordHeadSize > ix.recLen {
				return netip.Addr{}, noSource, fmt.Errorf("%w: slot %d out of bounds", ErrIndexFormat, i)
			}
			r := recs[off:]
			l := uint64(le.Uint16(r[14:]))
			if off+recordHeadSize+l > ix.recLen {
				return netip.Addr{}, noSource, fmt.Errorf("%w: record at %d out of bounds", ErrIndexFormat, off)
			}
			r = r[:recordHeadSize+l]
			if recordCheck(r, off) != le.Uint32(r[4:]) {
				return netip.Addr{}, noSource, fmt.Errorf("%w: record at %d corrupted", ErrIndexFormat, off)
			}
			if string(r[recordHeadSize:]) == n {
				src := int(le.Uint16(r[12:]))
				if src != noSource {
					src &^= multiSource
				}
				if src != noSource && src >= len(ix.sources) {
					return netip.Addr{}, noSource, fmt.Errorf("%w: record at %d names source %d", ErrIndexFormat, off, src)
				}
				return netip.AddrFrom4([4]byte(r[:4])), src, nil
			}
		}
		i = (i + 1) & mask
	}
	return netip.Addr{}, noSource, fmt.Errorf("%w: %q", ErrNotFound, name)
}

// Stale says whether the status files that globs match (nil: DefaultGlobs)
// are no longer what the index was built from: a source's identity
// (device, inode, size, modification time) changed or it is gone, or a
// status file is not among the sources. A stale index must not answer
// alone.
func (ix *Index) Stale(globs []string) bool {
	if globs == nil {
		globs = DefaultGlobs
	}
	known := make(map[[2]uint64]IndexSource, len(ix.sources))
	for _, s := range ix.sources {
		known[[2]uint64{s.Dev, s.Ino}] = s
	}
	seen := make(map[[2]uint64]bool, len(ix.sources))
	for _, g := range globs {
		paths, err := filepath.Glob(g)
		if err != nil {
			return true
		}
		for _, p := range paths {
			fi, err := os.Stat(p)
			if err != nil {
				return true
			}
			id := statID(fi)
			s, ok := known[id.key()]
			if !ok || s.Size != id.size || s.mtime != id.mtime {
				return true
			}
			seen[id.key()] = true
		}
	}
	return len(seen) != len(known)
}
