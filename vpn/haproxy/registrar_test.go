package haproxy

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/matryer/is"
)

// TestRegistrar: instances set ready before HAProxy runs are registered
// once it does; an HAProxy that restarts (and forgets its runtime state)
// gets them back; maint and drain are applied and kept.
func TestRegistrar(t *testing.T) {
	bin := requireCommand(t, "haproxy")
	is := is.New(t)
	dir := t.TempDir()
	c, site := testConfig(t, dir)
	cfg := filepath.Join(dir, "cfg")
	is.NoErr(os.WriteFile(cfg, []byte(c.Render(site)), 0o600))
	hap := &Runtime{Socket: c.Socket}
	// Interval: the check that finds a restarted HAProxy.
	r := &Registrar{Runtime: hap, Interval: 200 * time.Millisecond}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	done := make(chan struct{})
	go func() { defer close(done); r.Run(ctx) }()
	defer func() { cancel(); <-done }()

	r.Set(1, instanceAddr(1), Ready)
	r.Set(2, instanceAddr(2), Maint)
	state := func() map[string]ServerStatus {
		st, err := hap.ServersState(ctx, Backend)
		if err != nil {
			return nil
		}
		m := map[string]ServerStatus{}
		for _, s := range st {
			m[s.Name] = s
		}
		return m
	}
	waitFor := func(what string, cond func(map[string]ServerStatus) bool) {
		t.Helper()
		for {
			if st := state(); st != nil && cond(st) {
				return
			}
			select {
			case <-ctx.Done():
				t.Fatalf("HAProxy never got %s: %v", what, state())
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
	registered := func(st map[string]ServerStatus) bool {
		return st["vpn1"].Addr == instanceAddr(1) && !st["vpn1"].Maint && !st["vpn1"].Draining && st["vpn2"].Maint
	}

	stop := startHAProxyStoppable(t, bin, cfg) // after set: the first attempts failed
	waitFor("vpn1 registered and vpn2 in maint", registered)

	stop() // a restart: the runtime state is gone
	startHAProxyStoppable(t, bin, cfg)
	waitFor("vpn1 registered again after a restart", registered)

	r.SetAll(Drain)
	waitFor("both draining", func(st map[string]ServerStatus) bool {
		return st["vpn1"].Draining && st["vpn2"].Draining && !st["vpn2"].Maint
	})
}
