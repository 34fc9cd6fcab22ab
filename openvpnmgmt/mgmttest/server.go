// Package mgmttest is a scripted fake of OpenVPN's management interface,
// for testing code that uses package openvpnmgmt, like net/http/httptest
// for HTTP.
//
// A Server listens on 127.0.0.1, greets each connection with OpenVPN's
// >INFO banner, answers commands from handlers (SUCCESS for the commands a
// server knows when no handler is set, ERROR for the others), records every
// command it reads (Commands; WaitCommand waits for one), and pushes
// real-time lines on demand. It serves one client at a time, as OpenVPN
// does.
package mgmttest

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
)

// A HandlerFunc answers a command line (for client-auth, its config lines
// follow, joined by "\n") with reply lines; the server adds the line ends.
type HandlerFunc func(line string) []string

// Server is a fake management interface.
type Server struct {
	l        net.Listener
	password string
	mu       sync.Mutex
	handlers map[string]HandlerFunc
	commands []string
	added    chan struct{} // closed and replaced when a command is recorded; under mu
	conn     net.Conn
	ready    chan struct{} // closed when a client is connected
	done     chan struct{} // closed by Close
	closed   bool
	wg       sync.WaitGroup
}

// NewServer starts a Server on 127.0.0.1 on a free port; it is closed when
// the test ends.
func NewServer(tb testing.TB) *Server {
	tb.Helper()
	s, err := Start()
	if err != nil {
		tb.Fatalf("mgmttest: %v", err)
	}
	tb.Cleanup(s.Close)
	return s
}

// Start starts a Server on 127.0.0.1 on a free port, for use outside
// tests (examples, demos); the caller closes it.
func Start() (*Server, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s := &Server{l: l, handlers: map[string]HandlerFunc{}, added: make(chan struct{}),
		ready: make(chan struct{}), done: make(chan struct{})}
	s.wg.Add(1)
	go s.accept()
	return s, nil
}

// SetPassword makes the next connections ask for password with "ENTER
// PASSWORD:", as OpenVPN does with a pw-file.
func (s *Server) SetPassword(password string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.password = password
}

// Addr returns the server's address, "127.0.0.1:<port>".
func (s *Server) Addr() string { return s.l.Addr().String() }

// Handle sets the handler of the commands whose first word is name, such as
// "status" or "client-auth-nt".
func (s *Server) Handle(name string, h HandlerFunc) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.handlers[name] = h
}

// Commands returns the command lines read so far, in order.
func (s *Server) Commands() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.commands...)
}

// ErrServerClosed reports a wait that the server's Close ended.
var ErrServerClosed = errors.New("mgmttest: server closed")

// WaitCommand waits until the server has read a command line that
// contains want (a client-auth command: its line and its config lines,
// joined by "\n", as Commands returns them), and returns nil. The command
// may have come before the call: WaitCommand looks at every command since
// the server started. It returns ctx's error when ctx ends first, and
// ErrServerClosed when the server is closed first.
func (s *Server) WaitCommand(ctx context.Context, want string) error {
	from := 0 // the commands before it are looked at
	for {
		s.mu.Lock()
		for _, c := range s.commands[from:] {
			if strings.Contains(c, want) {
				s.mu.Unlock()
				return nil
			}
		}
		from = len(s.commands)
		added := s.added
		s.mu.Unlock()
		select {
		case <-added:
		case <-ctx.Done():
			return fmt.Errorf("mgmttest: waiting for a command with %q: %w", want, ctx.Err())
		case <-s.done:
			return fmt.Errorf("mgmttest: waiting for a command with %q: %w", want, ErrServerClosed)
		}
	}
}

// Connected returns a channel that is closed once a client is connected.
func (s *Server) Connected() <-chan struct{} { return s.ready }

// Send writes lines to the connected client, each with "\r\n", waiting for
// a client first. Real-time lines start with ">".
func (s *Server) Send(lines ...string) error {
	<-s.ready
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conn == nil {
		return net.ErrClosed
	}
	_, err := fmt.Fprint(s.conn, strings.Join(lines, "\r\n")+"\r\n")
	return err
}

// Close stops the server and its connection, and waits for its
// goroutines. It is safe to call more than once.
func (s *Server) Close() {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	s.closed = true
	close(s.done)
	s.l.Close()
	if s.conn != nil {
		s.conn.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

// Disconnect closes the current client's connection, as when OpenVPN
// exits.
func (s *Server) Disconnect() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conn != nil {
		s.conn.Close()
	}
}

func (s *Server) accept() {
	defer s.wg.Done()
	first := true
	for {
		conn, err := s.l.Accept()
		if err != nil {
			return
		}
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			conn.Close()
			return
		}
		s.conn = conn
		s.mu.Unlock()
		s.serve(conn, first)
		first = false
	}
}

func (s *Server) serve(conn net.Conn, first bool) {
	defer conn.Close()
	br := bufio.NewReader(conn)
	s.mu.Lock()
	password := s.password
	s.mu.Unlock()
	if password != "" {
		fmt.Fprint(conn, "ENTER PASSWORD:")
		pw, err := br.ReadString('\n')
		if err != nil {
			return
		}
		if strings.TrimRight(pw, "\r\n") != password {
			fmt.Fprint(conn, "ERROR: bad password\r\n")
			return
		}
		fmt.Fprint(conn, "SUCCESS: password is correct\r\n")
	}
	s.mu.Lock()
	fmt.Fprint(conn, ">INFO:OpenVPN Management Interface Version 5 -- type 'help' for more info\r\n")
	s.mu.Unlock()
	if first {
		close(s.ready)
	}
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			return
		}
		line = strings.TrimRight(line, "\r\n")
		name, _, _ := strings.Cut(line, " ")
		if name == "client-auth" {
			// Its config lines follow, up to END.
			for {
				l, err := br.ReadString('\n')
				if err != nil {
					return
				}
				l = strings.TrimRight(l, "\r\n")
				if l == "END" {
					break
				}
				line += "\n" + l
			}
		}
		s.mu.Lock()
		s.commands = append(s.commands, line)
		close(s.added)
		s.added = make(chan struct{})
		h := s.handlers[name]
		s.mu.Unlock()
		var reply []string
		switch {
		case h != nil:
			reply = h(line)
		case known[name]:
			reply = []string{"SUCCESS: " + name + " command succeeded"}
		default:
			reply = []string{"ERROR: unknown command, enter 'help' for more options"}
		}
		if len(reply) > 0 {
			s.mu.Lock()
			_, err = fmt.Fprint(conn, strings.Join(reply, "\r\n")+"\r\n")
			s.mu.Unlock()
			if err != nil {
				return
			}
		}
	}
}

// known are the commands that answer SUCCESS when no handler is set.
var known = map[string]bool{
	"hold": true, "bytecount": true, "client-auth": true, "client-auth-nt": true, "client-deny": true,
	"client-pending-auth": true, "client-kill": true, "kill": true, "signal": true, "log": true,
	"state": true, "echo": true, "env-filter": true, "verb": true, "mute": true,
}
