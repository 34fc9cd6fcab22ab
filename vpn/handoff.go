package vpn

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"syscall"
	"time"
)

// handoff is what a server keeps in its run directory for the process
// after it (an upgrade in place, or a restart after a crash): the service
// instance it registered and the devices that the API may hold as
// connected to it. The next process resumes the service instance and
// reports only what changed while nobody watched. It holds no key.
type handoff struct {
	ServiceID int64 `json:"service_id"`
	// Held are the devices that the API acknowledged as connected, by
	// UUID, with the instance of their session.
	Held map[string]int `json:"held,omitempty"`
	// Maybe are the devices whose report was sent but not acknowledged.
	Maybe []string `json:"maybe,omitempty"`
}

// handoffFile and handoffLock are the names of the handoff and of its
// lock in the run directory.
const (
	handoffFile = "server.state"
	handoffLock = "server.lock"
)

// held returns what the API may hold connected: Held, and Maybe on the
// instance 0 (unknown).
func (h *handoff) held() map[string]DeviceState {
	m := make(map[string]DeviceState, len(h.Held)+len(h.Maybe))
	for _, u := range h.Maybe {
		m[u] = DeviceState{Connected: true}
	}
	for u, id := range h.Held {
		m[u] = DeviceState{Connected: true, Instance: id}
	}
	return m
}

// readHandoff reads the handoff in dir; none is an empty one.
func readHandoff(dir string) (*handoff, error) {
	b, err := os.ReadFile(filepath.Join(dir, handoffFile))
	if errors.Is(err, os.ErrNotExist) {
		return &handoff{}, nil
	}
	if err != nil {
		return &handoff{}, err
	}
	var h handoff
	if err := json.Unmarshal(b, &h); err != nil {
		return &handoff{}, fmt.Errorf("vpn: %s: %w", handoffFile, err)
	}
	return &h, nil
}

// writeHandoff replaces the handoff in dir.
func writeHandoff(dir string, serviceID int64, held map[string]DeviceState, maybe []string) error {
	h := handoff{ServiceID: serviceID, Held: make(map[string]int, len(held))}
	for u, st := range held {
		h.Held[u] = st.Instance
	}
	sort.Strings(maybe)
	h.Maybe = maybe
	b, err := json.Marshal(h)
	if err != nil {
		return err
	}
	return writeFile0600(filepath.Join(dir, handoffFile), b)
}

// lockRunDir takes the run directory's lock, which a server holds while
// it runs its instances: a process started to take over from another (an
// upgrade in place) waits here until that one has handed over, and one
// started after a crash gets it at once, since the lock went with the
// process. It waits until ctx ends; the lock is held until release.
func lockRunDir(ctx context.Context, dir string, log *slog.Logger) (release func(), err error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("vpn: %w", err)
	}
	f, err := os.OpenFile(filepath.Join(dir, handoffLock), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("vpn: %w", err)
	}
	release = func() { f.Close() } // the lock goes with the descriptor
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for waited := false; ; waited = true {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			if waited {
				log.Info("the process before this one has handed over")
			}
			return release, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("vpn: locking %s: %w", f.Name(), err)
		}
		if !waited {
			log.Info("waiting for the process before this one to hand over its instances", "lock", f.Name())
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, ctx.Err()
		case <-t.C:
		}
	}
}
