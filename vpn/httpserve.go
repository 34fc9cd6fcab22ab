package vpn

import (
	"context"
	"net"
	"net/http"
	"sync"
)

// httpServer serves one listener of the internal API or the metrics with
// a shutdown that answers every connection accepted before it:
// http.Server.Shutdown alone drops, unanswered, a connection whose request
// head arrives after it began, and in a handover the hooks' requests (a
// device's auth) must not be lost, since the next process serves the same
// socket. connectproxy.Server does the same for the proxy.
type httpServer struct {
	srv *http.Server
	l   net.Listener

	mu      sync.Mutex
	conns   map[net.Conn]struct{} // open and not hijacked
	drained chan struct{}         // closed once conns empties, while draining
}

func newHTTPServer(srv *http.Server, l net.Listener) *httpServer {
	s := &httpServer{srv: srv, l: l, conns: make(map[net.Conn]struct{})}
	srv.ConnState = s.connState
	return s
}

func (s *httpServer) connState(c net.Conn, st http.ConnState) {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch st {
	case http.StateNew:
		s.conns[c] = struct{}{}
	case http.StateHijacked, http.StateClosed:
		delete(s.conns, c)
		if len(s.conns) == 0 && s.drained != nil {
			close(s.drained)
			s.drained = nil
		}
	}
}

// serve serves until shutdown.
func (s *httpServer) serve() { _ = s.srv.Serve(s.l) }

// shutdown stops accepting, lets every open connection have its answer
// and close (no keep-alive from here on), and shuts the server down, all
// within ctx.
func (s *httpServer) shutdown(ctx context.Context) {
	s.l.Close()
	s.mu.Lock()
	drained := make(chan struct{})
	if len(s.conns) == 0 {
		close(drained)
	} else {
		s.drained = drained
	}
	s.mu.Unlock()
	s.srv.SetKeepAlivesEnabled(false)
	select {
	case <-drained:
	case <-ctx.Done():
	}
	_ = s.srv.Shutdown(ctx)
}
