package vpn

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/matryer/is"

	"github.com/obvpn/obvpn/nss"
)

// recording keeps what a Reporter's Record was given.
type recording struct {
	mu    sync.Mutex
	calls []recorded
}

type recorded struct {
	held  []string
	maybe []string
}

func (r *recording) record(held map[string]DeviceState, maybe []string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var h []string
	for u := range held {
		h = append(h, u)
	}
	slices.Sort(h)
	m := slices.Clone(maybe)
	slices.Sort(m)
	r.calls = append(r.calls, recorded{h, m})
}

func (r *recording) last() recorded {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.calls[len(r.calls)-1]
}

// TestReporterRecord: before a pass sends, the devices it sends may be
// held either way; after it, the acknowledged ones are held, and a failed
// batch stays a maybe.
func TestReporterRecord(t *testing.T) {
	is := is.New(t)
	api := newFakeStateAPI()
	rec := &recording{}
	r := &Reporter{API: api, ServiceID: func() int64 { return 7 }, Record: rec.record}
	r.Set("a", st(true))
	r.Set("b", st(true))
	is.NoErr(r.Flush(context.Background()))
	is.Equal(rec.calls[0], recorded{nil, []string{"a", "b"}}) // before the send
	is.Equal(rec.last(), recorded{[]string{"a", "b"}, nil})

	api.fail = func() error { return errors.New("503") }
	r.Set("a", st(false))
	r.Set("c", st(true))
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	is.True(r.Flush(ctx) != nil)
	// a may still be held, c may be: both maybes; b is held.
	is.Equal(rec.last(), recorded{[]string{"a", "b"}, []string{"a", "c"}})
	api.fail = nil
	is.NoErr(r.Flush(context.Background()))
	is.Equal(rec.last(), recorded{[]string{"b", "c"}, nil})
}

// TestReporterRestoreResume: a device restored as held and resumed on its
// instance costs no report; on another instance, or not restored, it is
// reported; a restored device that goes offline is reported offline.
func TestReporterRestoreResume(t *testing.T) {
	is := is.New(t)
	api := newFakeStateAPI()
	r := &Reporter{API: api, ServiceID: func() int64 { return 7 }}
	r.Restore(map[string]DeviceState{"a": st(true), "b": st(true), "gone": st(true), "x": st(false)})
	r.Resume("a", st(true))
	is.Equal(r.Pending(), 0)
	r.Resume("b", DeviceState{Connected: true, Instance: 2})
	r.Resume("new", st(true))
	r.Set("gone", st(false))
	r.Set("x", st(false)) // not held: nothing to send
	is.Equal(r.Pending(), 3)
	is.NoErr(r.Flush(context.Background()))
	is.Equal(api.onlineSet(), []string{"b", "new"})
	is.Equal(api.requests, 2)
}

// TestHandoffFile: the handoff is written readable by its owner only and
// read back; none is an empty one; a damaged one is an error and an empty
// one.
func TestHandoffFile(t *testing.T) {
	is := is.New(t)
	dir := t.TempDir()
	h, err := readHandoff(dir)
	is.NoErr(err)
	is.Equal(h.ServiceID, int64(0))
	is.NoErr(writeHandoff(dir, 42, map[string]DeviceState{"a": {Connected: true, Instance: 2}}, []string{"c", "b"}))
	fi, err := os.Stat(filepath.Join(dir, handoffFile))
	is.NoErr(err)
	is.Equal(fi.Mode().Perm(), os.FileMode(0o600))
	h, err = readHandoff(dir)
	is.NoErr(err)
	is.Equal(h.ServiceID, int64(42))
	is.Equal(h.held(), map[string]DeviceState{"a": {Connected: true, Instance: 2}, "b": {Connected: true}, "c": {Connected: true}})
	is.NoErr(os.WriteFile(filepath.Join(dir, handoffFile), []byte("{"), 0o600))
	h, err = readHandoff(dir)
	is.True(err != nil)
	is.Equal(len(h.held()), 0)
}

// TestLockRunDir: a second server on the run directory waits for the
// first to let go, and gives up with its context.
func TestLockRunDir(t *testing.T) {
	is := is.New(t)
	dir := t.TempDir()
	release, err := lockRunDir(context.Background(), dir, nil)
	is.NoErr(err)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err = lockRunDir(ctx, dir, nil)
	is.True(errors.Is(err, context.DeadlineExceeded))
	got := make(chan error, 1)
	go func() {
		rel, err := lockRunDir(context.Background(), dir, nil)
		if err == nil {
			rel()
		}
		got <- err
	}()
	select {
	case <-got:
		t.Fatal("locked twice")
	case <-time.After(100 * time.Millisecond):
	}
	release()
	is.NoErr(<-got)
}

// TestServiceResume: a service instance of the process before is kept
// when it takes a heartbeat, and replaced when it does not.
func TestServiceResume(t *testing.T) {
	for _, c := range []struct {
		name    string
		beatErr error
		want    int64
		regs    int
	}{{"alive", nil, 7, 0}, {"gone", errors.New("404 Not Found"), 42, 1}} {
		t.Run(c.name, func(t *testing.T) {
			is := is.New(t)
			api := &fakeServiceAPI{beats: make(chan int64, 10), beatErr: c.beatErr}
			s := &Service{API: api, Resume: 7, Interval: time.Hour}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- s.Run(ctx) }()
			<-s.Registered()
			is.Equal(s.ID(), c.want)
			is.Equal(<-api.beats, int64(7))
			cancel()
			<-done
			api.mu.Lock()
			defer api.mu.Unlock()
			is.Equal(len(api.registered), c.regs)
		})
	}
}

// TestSessionsResync: the clients of an adopted openvpn are counted, the
// ones the API holds already without a report; a session that ended
// unwatched is counted as gone.
func TestSessionsResync(t *testing.T) {
	is := is.New(t)
	api := newFakeStateAPI()
	r := &Reporter{API: api, ServiceID: func() int64 { return 7 }}
	r.Restore(map[string]DeviceState{"aaaa": st(true)})
	conns := &Connections{}
	m, _ := NewMetrics(nil)
	s := &Sessions{Auth: heldAuth{}, Connections: conns, State: r, Metrics: m}
	since := time.Now().Add(-time.Hour)
	s.Resync(context.Background(), 1, []nss.Client{
		{CommonName: "aaaa", ClientID: 5, VirtualAddress: netip.MustParseAddr("10.240.0.5"), ConnectedSince: since, BytesReceived: 10},
		{CommonName: "bbbb", ClientID: 6, VirtualAddress: netip.MustParseAddr("10.240.0.6")},
		{CommonName: "", ClientID: 7}, // not through auth yet
	})
	is.Equal(conns.Online(), []string{"aaaa", "bbbb"})
	is.Equal(r.Pending(), 1) // bbbb only
	is.Equal(len(s.sessionList()), 2)
	s.Resync(context.Background(), 1, []nss.Client{{CommonName: "bbbb", ClientID: 6}})
	is.Equal(conns.Online(), []string{"bbbb"})
	is.NoErr(r.Flush(context.Background()))
	is.Equal(api.onlineSet(), []string{"bbbb"})
	is.Equal(len(s.sessionList()), 1)
}
