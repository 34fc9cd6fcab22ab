// Package sdnotifytest is a notification socket for tests, in place of
// systemd's: give its Addr as NOTIFY_SOCKET and read what arrives.
package sdnotifytest

import (
	"context"
	"crypto/rand"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// Socket receives notifications until it is closed.
type Socket struct {
	// Addr is the socket's address, for NOTIFY_SOCKET.
	Addr string

	conn *net.UnixConn
	msgs chan Message
	stop chan struct{} // closed by Close
	done chan struct{} // closed when read returns
	once sync.Once
}

// Message is one datagram: its states, one a line, in order.
type Message []string

// Has reports whether m holds state.
func (m Message) Has(state string) bool {
	for _, s := range m {
		if s == state {
			return true
		}
	}
	return false
}

// Value returns the value of key in m ("" when m has none).
func (m Message) Value(key string) string {
	for _, s := range m {
		if k, v, ok := strings.Cut(s, "="); ok && k == key {
			return v
		}
	}
	return ""
}

// NewSocket listens on a socket in a temporary directory of tb's, closed
// when tb ends.
func NewSocket(tb testing.TB) *Socket {
	tb.Helper()
	return listen(tb, filepath.Join(tb.TempDir(), "notify.sock"))
}

// NewAbstractSocket listens on a socket in the abstract namespace (an
// Addr that starts with '@'), closed when tb ends. The abstract namespace
// belongs to a network namespace: only processes in the test's own can
// reach it.
func NewAbstractSocket(tb testing.TB) *Socket {
	tb.Helper()
	return listen(tb, "@"+strings.NewReplacer("/", "-", " ", "-").Replace(tb.Name())+"-"+rand.Text())
}

func listen(tb testing.TB, addr string) *Socket {
	tb.Helper()
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: addr, Net: "unixgram"})
	if err != nil {
		tb.Fatal(err)
	}
	s := &Socket{Addr: addr, conn: c, msgs: make(chan Message, 256), stop: make(chan struct{}), done: make(chan struct{})}
	go s.read()
	tb.Cleanup(s.Close)
	return s
}

func (s *Socket) read() {
	defer close(s.done)
	buf := make([]byte, 64<<10)
	for {
		n, err := s.conn.Read(buf)
		if err != nil {
			close(s.msgs)
			return
		}
		select {
		case s.msgs <- Message(strings.Split(strings.TrimSuffix(string(buf[:n]), "\n"), "\n")):
		case <-s.stop:
			close(s.msgs)
			return
		}
	}
}

// Next returns the next message, or ctx's error. It returns
// net.ErrClosed once the socket is closed and every message read.
func (s *Socket) Next(ctx context.Context) (Message, error) {
	select {
	case m, ok := <-s.msgs:
		if !ok {
			return nil, net.ErrClosed
		}
		return m, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Close closes the socket and waits for its reader. Calling it again does
// nothing.
func (s *Socket) Close() {
	s.once.Do(func() {
		close(s.stop)
		s.conn.Close()
		<-s.done
	})
}
