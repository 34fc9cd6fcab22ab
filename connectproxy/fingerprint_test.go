package connectproxy

import (
	"strings"
	"testing"
	"time"

	"github.com/obvpn/obvpn/vpn/balena/balenatest"
)

// checkFingerprint checks that the proxy's log has one refusal, at error
// level with the fingerprint fp, or at no error level and without a
// fingerprint when fp is empty.
func checkFingerprint(t *testing.T, log *logBuffer, fp string) {
	t.Helper()
	var refusals []string
	for _, l := range strings.Split(log.String(), "\n") {
		if strings.Contains(l, "request refused") {
			refusals = append(refusals, l)
		}
	}
	if len(refusals) != 1 {
		t.Fatalf("%d refusals logged, want 1: %q", len(refusals), refusals)
	}
	l := refusals[0]
	switch {
	case fp == "" && strings.Contains(l, FingerprintKey+"="):
		t.Errorf("an expected refusal carries a fingerprint: %s", l)
	case fp != "" && (!strings.Contains(l, " "+FingerprintKey+"="+fp) || !strings.Contains(l, "level=ERROR")):
		t.Errorf("want an error with %s=%s: %s", FingerprintKey, fp, l)
	}
}

// TestFingerprints checks which refusals are errors to report, with which
// fingerprint, and that the expected ones are not.
func TestFingerprints(t *testing.T) {
	svc := startService(t, echo)
	public := startService(t, echo)
	closed := closedPort(t)
	notHere := func(w *world) {
		w.res = newResolver()
		w.h.Resolver = w.res
	}
	tests := []struct {
		name   string
		setup  func(w *world)
		target string
		header []string
		want   string
	}{
		{"canAccess fails", func(w *world) { w.api.FailNext(balenatest.CanAccess, 1, 500) }, target(devUUID, public.port), nil, FingerprintTunnel},
		{"online check fails", func(w *world) { notHere(w); w.api.FailNext(balenatest.DeviceOnline, 1, 502) }, target(devUUID, public.port), nil, FingerprintDeviceLookup},
		{"locate fails", func(w *world) { notHere(w); w.api.FailNext(balenatest.LocateDevice, 1, 500) }, target(devUUID, svc.port),
			[]string{"Proxy-Authorization: " + basic("u", opKey)}, FingerprintVPNHostLookup},
		{"no key", nil, target(devUUID, svc.port), nil, ""},
		{"a wrong key", nil, target(devUUID, svc.port), []string{"Proxy-Authorization: " + basic("u", "wrong-SECRET")}, ""},
		{"not a device", nil, "example.com:443", nil, ""},
		{"device offline", func(w *world) { notHere(w); w.api.SetOffline(devUUID) }, target(devUUID, public.port), nil, ""},
		{"device service down", func(w *world) { w.api.Grant(opKey, devUUID, closed) }, target(devUUID, closed),
			[]string{"Proxy-Authorization: " + basic("u", opKey)}, ""},
		{"held by no server", func(w *world) { notHere(w); w.api.SetOnline(devUUID, 0) }, target(devUUID, public.port), nil, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := newWorld(t, tt.setup)
			w.addDevice(devUUID, svc.port, public.port)
			if tt.setup != nil {
				tt.setup(w)
			}
			a := connect(t, w.addr, tt.target, tt.header...)
			if a.status == 200 {
				t.Fatalf("got %q, want a refusal", a.line)
			}
			a.waitEOF(t, 5*time.Second)
			checkFingerprint(t, w.log, tt.want)
		})
	}
}

// TestForwardFingerprints: a peer that cannot be reached is an error to
// report; a peer that refuses is not.
func TestForwardFingerprints(t *testing.T) {
	svc := startService(t, echo)
	t.Run("peer unreachable", func(t *testing.T) {
		closed := closedPort(t)
		p := newPair(t, func(p *pair) { p.a.ForwardPort = int(closed) })
		p.onB(devUUID, svc.port)
		a := connect(t, p.addrA, target(devUUID, svc.port), "Proxy-Authorization: "+basic("me", opKey))
		if a.status != 500 {
			t.Fatalf("got %q, want 500", a.line)
		}
		a.waitEOF(t, 5*time.Second)
		checkFingerprint(t, p.logA, FingerprintForward)
	})
	t.Run("peer refuses", func(t *testing.T) {
		p := newPair(t, func(p *pair) { p.b.Resolver = newResolver() }) // B does not find it
		p.onB(devUUID, svc.port)
		a := connect(t, p.addrA, target(devUUID, svc.port), "Proxy-Authorization: "+basic("me", opKey))
		if a.status != 500 {
			t.Fatalf("got %q, want 500", a.line)
		}
		a.waitEOF(t, 5*time.Second)
		checkFingerprint(t, p.logA, "")
	})
}
