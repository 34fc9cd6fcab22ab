package connectproxy

import (
	"context"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/matryer/is"
)

// TestPlaceBeforeAPI checks that a CONNECT takes its tunnel's place before
// it asks the API: with MaxTunnels places held by requests that wait for
// the API, a flood of further requests is answered 503 without a single
// call, and the held ones go on once the API answers.
func TestPlaceBeforeAPI(t *testing.T) {
	is := is.New(t)
	svc := startService(t, echo)
	const places, flood = 2, 20
	calls := make(chan struct{}, places+flood)
	release := make(chan struct{})
	var n atomic.Int32
	w := newWorld(t, func(w *world) {
		w.h.MaxTunnels = places
		api := w.h.Authorizer
		w.h.Authorizer = AuthorizerFunc(func(ctx context.Context, uuid string, port uint16, key string) (int64, bool, error) {
			n.Add(1)
			calls <- struct{}{}
			select {
			case <-release:
			case <-ctx.Done():
				return 0, false, ctx.Err()
			}
			// Each held request has a key of its own, so that the
			// handler does not share one question between them; the
			// device's port is public, so the API lets a caller
			// without a key in.
			return api.CanAccess(ctx, uuid, port, "")
		})
	})
	w.addDevice(devUUID, svc.port, svc.port)

	held := make([]net.Conn, places)
	for i := range held {
		c, err := net.Dial("tcp", w.addr)
		is.NoErr(err)
		t.Cleanup(func() { c.Close() })
		tg := target(devUUID, svc.port)
		_, err = io.WriteString(c, "CONNECT "+tg+" HTTP/1.1\r\nHost: "+tg+"\r\nProxy-Authorization: "+basic("x", "key-"+string(rune('a'+i)))+"\r\n\r\n")
		is.NoErr(err)
		held[i] = c
	}
	for range places {
		select {
		case <-calls:
		case <-time.After(10 * time.Second):
			t.Fatalf("the API got %d of the %d held requests' questions within 10 s", n.Load(), places)
		}
	}

	for i := range flood {
		a := connect(t, w.addr, target(devUUID, svc.port), "Proxy-Authorization: "+basic("x", "flood-"+string(rune('a'+i))))
		is.Equal(a.line, "HTTP/1.0 503 Service Unavailable")
	}
	if got := n.Load(); got != places {
		t.Errorf("API calls during the flood: got %d, want %d (one per place)", got, places)
	}

	close(release)
	for _, c := range held {
		a := readAnswer(t, c)
		is.Equal(a.status, 200)
		a.roundTrip(t, "hello")
	}
}
