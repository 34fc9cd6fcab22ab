package nss

import (
	"net/netip"
	"time"
)

// learnedEntry is what Learn or Forget recorded for one name and source:
// an address, or the zero Addr for a name forgotten.
type learnedEntry struct {
	addr netip.Addr
	at   time.Time
}

// Learn records that the device with common name name (in any case) has
// the virtual address addr, as reported by the OpenVPN instance whose
// status file is source (its path, as the globs match it), for example
// from a >CLIENT:ESTABLISHED event of the management interface. Lookups
// see it when Learn returns, without waiting for OpenVPN's next status
// write, and a writer of the index file ([IndexWriter]) writes it promptly.
//
// The entry replaces what source says of the name, from now until source
// has been rewritten after this moment and read whole (its modification
// time is later than the moment of Learn): from then on the file is the
// truth again and the entry is dropped. Other status files and other
// sources' entries still compete for the name, and the latest Last Ref
// wins (a learned entry's Last Ref is the moment of Learn). An entry whose
// source never appears stays until a Learn or Forget of the same name and
// source replaces it.
//
// An addr that is not an IPv4 address (IPv4-mapped IPv6 addresses are
// unmapped) records the name as gone, as Forget does. Learn is safe for
// concurrent use with lookups and refreshes.
func (r *Resolver) Learn(source, name string, addr netip.Addr) {
	addr = addr.Unmap()
	if !addr.Is4() {
		addr = netip.Addr{}
	}
	r.record(source, name, addr)
}

// Forget records that the device with common name name (in any case) is
// no longer connected to the instance whose status file is source, for
// example after a >CLIENT:DISCONNECT event: lookups stop resolving it from
// source at once, unless another status file or another source's learned
// entry routes it. As with [Resolver.Learn], the record lasts until source
// has been rewritten after it; so a DISCONNECT that was missed heals
// itself at the next status write, and one that arrives before the file
// is rewritten without the device does no harm.
func (r *Resolver) Forget(source, name string) {
	r.record(source, name, netip.Addr{})
}

func (r *Resolver) record(source, name string, addr netip.Addr) {
	n := asciiLower(name)
	if n == "" {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.init()
	m := r.learned[n]
	if m == nil {
		m = make(map[string]learnedEntry, 1)
		r.learned[n] = m
	}
	m[source] = learnedEntry{addr, time.Now()}
	r.publish(map[string]bool{n: true}, false)
}

// expireLearned drops what was learned from source before its file's
// modification time mtime (Unix nanoseconds), as the file now says. When
// the file was read for the first time (first), what stays is noted as
// changed too: its entries now name a file the index knows, whose
// rewrite tells the NSS module that they may be out of date.
func (r *Resolver) expireLearned(source string, mtime int64, first bool, changed map[string]bool) {
	for n, m := range r.learned {
		l, ok := m[source]
		switch {
		case ok && l.at.UnixNano() < mtime:
			delete(m, source)
			if len(m) == 0 {
				delete(r.learned, n)
			}
			changed[n] = true
		case ok && first:
			changed[n] = true
		}
	}
}
