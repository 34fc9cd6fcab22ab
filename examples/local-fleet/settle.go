package main

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/obvpn/obvpn/vpn"
)

// settleTimeout is how long settle waits for the API to agree with the
// hosts: OpenVPN rewrites its status files every
// vpn.DefaultStatusInterval, and state reports are batched.
const settleTimeout = 3 * vpn.DefaultStatusInterval

// settle waits until the balena API and the hosts agree on every device:
// a device that a serving host's OpenVPN lists as connected is online in
// the API on that host's service instance, and a device online in the API
// is listed by a serving host. What still disagrees after settleTimeout
// is a missed target: a device offline in the API while it is connected
// is one that nobody can reach through a proxy that asks the API.
func (f *fleet) settle(ctx context.Context) {
	t0 := time.Now()
	ctx, cancel := context.WithTimeout(ctx, settleTimeout)
	defer cancel()
	// The status files change with no event to wait for: look again
	// every quarter of a second.
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		offline, stray := f.disagreements()
		if len(offline)+len(stray) == 0 {
			fmt.Fprintf(f.o.out, "the API agrees with the hosts' status files on all %d devices (%s after the last check)\n",
				len(f.devices), time.Since(t0).Round(time.Millisecond))
			return
		}
		select {
		case <-ctx.Done():
			if len(offline) > 0 {
				f.missed = append(f.missed, fmt.Sprintf("%d devices connected to a serving host but not online on it in the API, %s after the last check: %s",
					len(offline), time.Since(t0).Round(time.Millisecond), some(offline)))
			}
			if len(stray) > 0 {
				f.missed = append(f.missed, fmt.Sprintf("%d devices online in the API but in no serving host's status files, %s after the last check: %s",
					len(stray), time.Since(t0).Round(time.Millisecond), some(stray)))
			}
			return
		case <-tick.C:
		}
	}
}

// disagreements returns the devices that a serving host lists as
// connected while the API does not have them online on that host, and
// those online in the API that no serving host lists.
func (f *fleet) disagreements() (offline, stray []string) {
	where := map[string]*host{}
	for _, h := range f.hosts {
		if h.gone {
			continue
		}
		for name := range f.connected(h) {
			where[name] = h
		}
	}
	for _, d := range f.devices {
		a, _ := f.api.Device(d.UUID)
		switch h := where[strings.ToLower(d.UUID)]; {
		case h != nil && (!a.ConnectedToVPN || a.ServiceInstance != h.serviceID):
			offline = append(offline, d.UUID)
		case h == nil && a.ConnectedToVPN:
			stray = append(stray, d.UUID)
		}
	}
	return offline, stray
}

// some lists the first few of uuids.
func some(uuids []string) string {
	const n = 5
	if len(uuids) <= n {
		return strings.Join(uuids, ", ")
	}
	return fmt.Sprintf("%s and %d more", strings.Join(uuids[:n], ", "), len(uuids)-n)
}
