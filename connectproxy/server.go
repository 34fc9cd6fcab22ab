package connectproxy

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"
)

// Server serves a [Handler] on listeners with what a hijacking proxy
// needs: request heads limited in time and size (slow and huge heads are
// cut off before the handler sees them), connections handed to the
// handler as the listener yields them (so that tunnels between
// *net.TCPConn park while idle, and can splice), and a Shutdown that
// waits for the tunnels too.
// Idle tunnels and the number of tunnels are the Handler's (IdleTimeout,
// MaxTunnels).
//
// The zero Server serves a zero Handler. Its fields must not change once
// it serves.
type Server struct {
	// Handler serves the requests. Nil means a zero Handler, which denies
	// every CONNECT.
	Handler *Handler

	// ReadHeaderTimeout bounds the time to read a request head, from the
	// connection's start (or the previous request's end). Zero means 10 s.
	ReadHeaderTimeout time.Duration

	// MaxHeaderBytes bounds the size of a request head; larger heads are
	// answered 431 (net/http allows 4 KiB over it). Zero means 8 KiB.
	MaxHeaderBytes int

	// Logger receives the HTTP server's own errors, at debug level. Nil
	// means discard.
	Logger *slog.Logger

	once     sync.Once
	srv      *http.Server
	h        *Handler
	mu       sync.Mutex
	ls       map[net.Listener]struct{} // the listeners being served
	conns    map[net.Conn]struct{}     // open and not hijacked
	draining bool                      // Shutdown has begun
	drained  chan struct{}             // closed once conns is empty, while draining
}

const (
	defaultReadHeaderTimeout = 10 * time.Second
	defaultMaxHeaderBytes    = 8 << 10
	keepAliveIdle            = 60 * time.Second
)

func (s *Server) init() {
	s.once.Do(func() {
		s.h = s.Handler
		if s.h == nil {
			s.h = &Handler{}
		}
		rht := s.ReadHeaderTimeout
		if rht <= 0 {
			rht = defaultReadHeaderTimeout
		}
		mhb := s.MaxHeaderBytes
		if mhb <= 0 {
			mhb = defaultMaxHeaderBytes
		}
		log := s.Logger
		if log == nil {
			log = discard
		}
		s.srv = &http.Server{
			Handler:           s.h,
			ReadHeaderTimeout: rht,
			MaxHeaderBytes:    mhb,
			IdleTimeout:       keepAliveIdle,
			ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
			ConnState:         s.connState,
		}
		s.ls = make(map[net.Listener]struct{})
		s.conns = make(map[net.Conn]struct{})
	})
}

// connState keeps the set of open connections that the HTTP server
// still serves, for Shutdown.
func (s *Server) connState(c net.Conn, st http.ConnState) {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch st {
	case http.StateNew:
		s.conns[c] = struct{}{}
	case http.StateHijacked, http.StateClosed:
		delete(s.conns, c)
		if s.draining && len(s.conns) == 0 && s.drained != nil {
			close(s.drained)
			s.drained = nil
		}
	}
}

// Serve accepts connections on l and serves them until Shutdown or Close.
// It always returns a non-nil error; after Shutdown or Close it is
// http.ErrServerClosed.
func (s *Server) Serve(l net.Listener) error {
	s.init()
	s.mu.Lock()
	if s.draining {
		s.mu.Unlock()
		return http.ErrServerClosed
	}
	s.ls[l] = struct{}{}
	s.mu.Unlock()
	err := s.srv.Serve(l)
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.ls, l)
	if s.draining {
		return http.ErrServerClosed // Shutdown closed l
	}
	return err
}

// ListenAndServe listens on the TCP address addr and serves it.
func (s *Server) ListenAndServe(addr string) error {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	return s.Serve(l)
}

// Shutdown stops the listeners, waits for the requests in flight and then
// for the tunnels to end (see [Handler.Shutdown]). When ctx ends first, it
// closes what is still open and returns ctx's error.
//
// Every connection accepted before Shutdown gets its answer, also one
// whose request head has not arrived yet (within ReadHeaderTimeout):
// http.Server.Shutdown alone drops those unanswered. So a process that
// hands its listening socket to the next one (an upgrade in place) and
// shuts down refuses nothing: the connections it did not accept are the
// next one's.
func (s *Server) Shutdown(ctx context.Context) error {
	s.init()
	s.mu.Lock()
	s.draining = true
	for l := range s.ls {
		l.Close()
	}
	drained := make(chan struct{})
	if len(s.conns) == 0 {
		close(drained)
	} else {
		s.drained = drained
	}
	s.mu.Unlock()
	// Idle connections close now, the others after their answer.
	s.srv.SetKeepAlivesEnabled(false)
	select {
	case <-drained:
	case <-ctx.Done():
	}
	err := s.srv.Shutdown(ctx)
	if errors.Is(err, net.ErrClosed) {
		err = nil // the listeners closed above
	}
	if herr := s.h.Shutdown(ctx); err == nil {
		err = herr
	}
	if err != nil {
		_ = s.srv.Close()
	}
	return err
}

// Close closes the listeners, the connections and the tunnels at once.
func (s *Server) Close() error {
	s.init()
	err := s.srv.Close()
	if herr := s.h.Close(); err == nil {
		err = herr
	}
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return err
}
