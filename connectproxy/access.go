package connectproxy

import (
	"context"
	"crypto/sha256"
	"errors"
	"sync"
	"time"
)

// accessCache holds the Authorizer's answers for accessTTL per (uuid,
// port, key), and lets concurrent identical questions share one call.
// Errors are never cached. Keys are held as SHA-256 digests.
type accessCache struct {
	mu        sync.Mutex
	m         map[accessKey]*accessEntry
	nextSweep time.Time
}

type accessKey struct {
	uuid string
	port uint16
	key  [sha256.Size]byte
}

type accessEntry struct {
	done     chan struct{} // closed when the answer is in
	id       int64
	ok       bool
	err      error
	expires  time.Time
	finished bool
}

// maxAccessEntries bounds the cache; beyond it, answers are not cached.
const maxAccessEntries = 1 << 16

// canAccess asks the Authorizer, through the cache.
func (h *Handler) canAccess(ctx context.Context, t Target, key string) (int64, bool, error) {
	if h.Authorizer == nil {
		return 0, false, nil
	}
	c := &h.access
	k := accessKey{uuid: t.UUID, port: t.Port, key: sha256.Sum256([]byte(key))}
	for {
		now := h.clock()
		c.mu.Lock()
		if c.m == nil {
			c.m = map[accessKey]*accessEntry{}
		}
		e := c.m[k]
		if e != nil && e.finished && !now.Before(e.expires) {
			delete(c.m, k)
			e = nil
		}
		if e != nil {
			finished := e.finished
			c.mu.Unlock()
			cacheAnswer(ctx, hitOrShared(finished))
			if !finished {
				select {
				case <-e.done:
				case <-ctx.Done():
					return 0, false, ctx.Err()
				}
			}
			if e.err != nil && isContextError(e.err) && ctx.Err() == nil {
				continue // the caller that asked went away; ask again
			}
			return e.id, e.ok, e.err
		}
		if len(c.m) >= maxAccessEntries {
			c.sweep(now)
		}
		if len(c.m) >= maxAccessEntries {
			c.mu.Unlock()
			return h.Authorizer.CanAccess(ctx, t.UUID, t.Port, key)
		}
		if now.After(c.nextSweep) {
			c.sweep(now)
			c.nextSweep = now.Add(accessTTL)
		}
		e = &accessEntry{done: make(chan struct{})}
		c.m[k] = e
		c.mu.Unlock()
		cacheAnswer(ctx, "miss")

		id, ok, err := h.Authorizer.CanAccess(ctx, t.UUID, t.Port, key)
		c.mu.Lock()
		e.id, e.ok, e.err, e.finished = id, ok, err, true
		e.expires = h.clock().Add(accessTTL)
		if err != nil && c.m[k] == e {
			delete(c.m, k)
		}
		close(e.done)
		c.mu.Unlock()
		return id, ok, err
	}
}

// sweep drops the expired answers. The caller holds c.mu.
func (c *accessCache) sweep(now time.Time) {
	for k, e := range c.m {
		if e.finished && !now.Before(e.expires) {
			delete(c.m, k)
		}
	}
}

func isContextError(err error) bool {
	return errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}
