package vpn

import (
	"context"
	"fmt"
	"log/slog"
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
	c, err := loader(serverEnv("VPN_RUN_DIR", dir, "VPN_HAPROXY_SOCKET", filepath.Join(dir, "admin.sock"),
		"VPN_PORT", fmt.Sprint(freePort(t)), "VPN_HAPROXY_MONITOR_ADDR", fmt.Sprintf("127.0.0.1:%d", freePort(t)))).Config()
	is.NoErr(err)
	cfg := filepath.Join(dir, "haproxy.cfg")
	is.NoErr(os.WriteFile(cfg, []byte(c.RenderHAProxy()), 0o600))
	hap := &HAProxyRuntime{Socket: c.HAProxy.Socket}
	r := newRegistrar(hap, slog.New(slog.DiscardHandler))
	r.interval = 200 * time.Millisecond // the check that finds a restarted HAProxy
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	done := make(chan struct{})
	go func() { defer close(done); r.run(ctx) }()
	defer func() { cancel(); <-done }()

	r.set(1, instanceAddr(c, 1), StateReady)
	r.set(2, instanceAddr(c, 2), StateMaint)
	state := func() map[string]ServerStatus {
		st, err := hap.ServersState(ctx, HAProxyBackend)
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
		return st["vpn1"].Addr == instanceAddr(c, 1) && !st["vpn1"].Maint && !st["vpn1"].Draining && st["vpn2"].Maint
	}

	stop := startHAProxyStoppable(t, bin, cfg) // after set: the first attempts failed
	waitFor("vpn1 registered and vpn2 in maint", registered)

	stop() // a restart: the runtime state is gone
	startHAProxyStoppable(t, bin, cfg)
	waitFor("vpn1 registered again after a restart", registered)

	r.setAll(StateDrain)
	waitFor("both draining", func(st map[string]ServerStatus) bool {
		return st["vpn1"].Draining && st["vpn2"].Draining && !st["vpn2"].Maint
	})
}
