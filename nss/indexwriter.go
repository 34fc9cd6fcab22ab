package nss

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"syscall"
	"time"
)

// IndexWriter keeps the index file of a [Resolver] current for the NSS
// module, which then answers every process on the host from it.
//
// Run writes the file at once, then checks the status files every Poll
// and rewrites the file when the resolver's view changed: at once when
// names or addresses changed (a refresh, Learn or Forget), and at most
// every MinInterval when only the files' identities did (OpenVPN rewrote
// them with the same devices, as it does every status interval). Until
// then, the NSS module scans only the files rewritten since the index
// was written and takes the rest from the index. A rewrite that only
// renews identities reuses the encoded names: its cost is writing the
// file (about 50 ms for the 61 MB of a million names); encoding the names
// anew costs about 0.5 s for a million. So that the writer takes at most
// about half a core however fast things change, the next write waits at
// least as long as the last one took (nothing, in practice, below
// 100,000 names).
//
// The fields must not change while Run runs.
type IndexWriter struct {
	// Resolver is the view to write; required. Its Globs say which
	// status files the index covers.
	Resolver *Resolver

	// Path is the index file. Empty means IndexPathFor(Resolver.Globs):
	// nss.index next to the status files, /run/openvpn/nss.index for the
	// default ones.
	Path string

	// Poll is how often the status files are checked for changes. Zero
	// means 100 ms.
	Poll time.Duration

	// MinInterval is the least time between two writes that only renew
	// the status files' identities. Zero means 250 ms.
	MinInterval time.Duration

	// Logger gets write failures (warn) and writes (debug). Nil discards.
	Logger *slog.Logger

	// Written, if not nil, is called after each write of the file (the
	// first one too), from Run's goroutine, with the number of names
	// written: what a test waits on instead of polling the file.
	Written func(names int)
}

func (w *IndexWriter) path() string {
	if w.Path != "" {
		return w.Path
	}
	return IndexPathFor(w.Resolver.Globs)
}

// Run keeps the index current until ctx ends; then it removes the index
// file it wrote (unless another writer replaced it since), so that the NSS
// module reads the status files themselves, and returns nil. It returns at
// once with the error of the first write when that fails (for example, a
// directory that does not exist); later failures are logged and retried
// at the next change.
func (w *IndexWriter) Run(ctx context.Context) error {
	if w.Resolver == nil {
		return errors.New("nss: IndexWriter without a Resolver")
	}
	log := w.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	poll, minInterval := w.Poll, w.MinInterval
	if poll <= 0 {
		poll = 100 * time.Millisecond
	}
	if minInterval <= 0 {
		minInterval = 250 * time.Millisecond
	}
	path, r := w.path(), w.Resolver
	rl := refreshLogger{r: r, log: log}
	refresh := rl.refresh
	refresh()
	snap := r.index.Load()
	if snap == nil { // nothing published yet: an empty view
		r.mu.Lock()
		r.init()
		r.publish(nil, true)
		r.mu.Unlock()
		snap = r.index.Load()
	}
	enc, err := writeSnapshot(path, snap, nil)
	if err != nil {
		return err
	}
	written, lastWrite, took := snap, time.Now(), time.Duration(0)
	if w.Written != nil {
		w.Written(int(enc.entries))
	}
	mine := inode(path)
	defer func() {
		if ino := inode(path); ino != 0 && ino == mine {
			os.Remove(path)
		}
	}()

	ticker := time.NewTicker(poll)
	defer ticker.Stop()
	var later *time.Timer // a write put off by MinInterval
	var laterC <-chan time.Time
	defer func() {
		if later != nil {
			later.Stop()
		}
	}()
	var failed time.Time // the last write that failed
	for {
		cur := r.index.Load()
		if cur != written && time.Since(failed) >= poll {
			gap := took
			if cur.gen == written.gen {
				gap = max(gap, minInterval)
			}
			if time.Since(lastWrite) >= gap {
				start := time.Now()
				next, err := writeSnapshot(path, cur, enc)
				if err != nil {
					log.Warn("nss: cannot write the index", "path", path, "err", err)
					failed = time.Now()
					continue
				}
				enc, written, lastWrite, took = next, cur, time.Now(), time.Since(start)
				mine = inode(path)
				log.Debug("nss: index written", "path", path, "entries", enc.entries,
					"sources", len(cur.sources), "took", time.Since(start))
				if w.Written != nil {
					w.Written(int(enc.entries))
				}
				continue
			}
			if laterC == nil {
				if later == nil {
					later = time.NewTimer(gap - time.Since(lastWrite))
				} else {
					later.Reset(gap - time.Since(lastWrite))
				}
				laterC = later.C
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-ticker.C:
			refresh()
		case <-cur.next:
		case <-laterC:
			laterC = nil
		}
	}
}

// refreshLogger refreshes a Resolver and logs a status file's trouble
// when it changes, not at every poll: an instance's file stays empty
// until openvpn first writes it.
type refreshLogger struct {
	r       *Resolver
	log     *slog.Logger
	lastErr string
}

func (l *refreshLogger) refresh() {
	err := l.r.Refresh()
	switch {
	case err == nil && l.lastErr != "":
		l.log.Debug("nss: status files readable again")
		l.lastErr = ""
	case err != nil && err.Error() != l.lastErr:
		l.log.Debug("nss: status files", "err", err)
		l.lastErr = err.Error()
	}
}

func inode(path string) uint64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Ino
	}
	return 0
}

// String describes the writer for logs.
func (w *IndexWriter) String() string {
	return fmt.Sprintf("nss index %s", w.path())
}
