// Package sentrytest is an in-memory Sentry ingestion endpoint for tests:
// it serves the envelope endpoint that the Sentry SDKs post to
// (POST /api/<project>/envelope/), decodes the envelopes and keeps the
// error events they carry, so that a test can look at them or wait for
// them.
//
// Use [NewServer] for an endpoint on a loopback httptest server, or [New]
// and serve the [Receiver] (an http.Handler) on a listener of your own,
// such as one inside a network namespace; point the SDK at it with the
// DSN "http://public@<host:port>/1" ([DSN]).
//
// It is not Sentry: it checks no key, keeps only what tests look at, and
// answers every envelope 200.
package sentrytest

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
)

// Event is an error event as the endpoint got it.
type Event struct {
	EventID     string                    `json:"event_id"`
	Level       string                    `json:"level"`
	Message     string                    `json:"message"`
	Logger      string                    `json:"logger"`
	Release     string                    `json:"release"`
	Environment string                    `json:"environment"`
	ServerName  string                    `json:"server_name"`
	Fingerprint []string                  `json:"fingerprint"`
	Tags        map[string]string         `json:"tags"`
	Contexts    map[string]map[string]any `json:"contexts"`
	// Exception is the error's chain, the innermost first.
	Exception []struct {
		Type  string `json:"type"`
		Value string `json:"value"`
	} `json:"exception"`

	// Raw is the event's JSON as it was sent.
	Raw json.RawMessage `json:"-"`
}

// Request is an envelope request as it arrived.
type Request struct {
	// Path is the request's path, such as "/api/1/envelope/".
	Path string
	// Header is the request's header.
	Header http.Header
	// Body is the envelope, decompressed.
	Body []byte
}

// Receiver receives Sentry envelopes. The zero value is not usable; call
// [New]. It is safe for concurrent use.
type Receiver struct {
	mu       sync.Mutex
	events   []Event
	requests []Request
	failures int
	changed  chan struct{} // closed and replaced when events arrive
}

// New returns an empty receiver.
func New() *Receiver { return &Receiver{changed: make(chan struct{})} }

// DSN returns the DSN of an endpoint at hostport ("127.0.0.1:port"), for
// project 1: "http://public@<hostport>/1".
func DSN(hostport string) string { return "http://public@" + hostport + "/1" }

// Server is a Receiver served by an httptest server on loopback.
type Server struct {
	*Receiver
	// URL is the server's base URL, "http://127.0.0.1:<port>".
	URL string
	// DSN is the DSN that points an SDK at the server.
	DSN string
	ts  *httptest.Server
}

// NewServer starts an endpoint on loopback, closed when the test ends.
func NewServer(tb testing.TB) *Server {
	tb.Helper()
	r := New()
	ts := httptest.NewServer(r)
	tb.Cleanup(ts.Close)
	return &Server{Receiver: r, URL: ts.URL, DSN: DSN(strings.TrimPrefix(ts.URL, "http://")), ts: ts}
}

// Close stops the server. It may be called more than once.
func (s *Server) Close() { s.ts.Close() }

// maxBody bounds an envelope.
const maxBody = 32 << 20

// ServeHTTP serves POST /api/<project>/envelope/.
func (r *Receiver) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	parts := strings.Split(strings.Trim(req.URL.Path, "/"), "/")
	if len(parts) != 3 || parts[0] != "api" || parts[2] != "envelope" {
		http.NotFound(w, req)
		return
	}
	if req.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		http.Error(w, "Method Not Allowed", http.StatusMethodNotAllowed)
		return
	}
	body := io.Reader(req.Body)
	if req.Header.Get("Content-Encoding") == "gzip" {
		zr, err := gzip.NewReader(req.Body)
		if err != nil {
			r.fail()
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		defer zr.Close()
		body = zr
	}
	b, err := io.ReadAll(io.LimitReader(body, maxBody))
	if err != nil {
		r.fail()
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	events, err := Decode(b)
	if err != nil {
		r.fail()
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	r.mu.Lock()
	r.requests = append(r.requests, Request{Path: req.URL.Path, Header: req.Header.Clone(), Body: b})
	r.events = append(r.events, events...)
	if len(events) > 0 {
		close(r.changed)
		r.changed = make(chan struct{})
	}
	r.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	io.WriteString(w, "{}")
}

func (r *Receiver) fail() {
	r.mu.Lock()
	r.failures++
	r.mu.Unlock()
}

// Decode returns the error events of an envelope: a header line, then
// items, each an item header line ({"type":…,"length":…}) and its
// payload (length bytes, or up to the next newline without a length).
func Decode(b []byte) ([]Event, error) {
	br := bufio.NewReader(bytes.NewReader(b))
	if _, err := br.ReadBytes('\n'); err != nil && err != io.EOF {
		return nil, fmt.Errorf("sentrytest: envelope header: %w", err)
	}
	var events []Event
	for {
		line, err := br.ReadBytes('\n')
		if len(bytes.TrimSpace(line)) == 0 {
			if err == io.EOF {
				return events, nil
			}
			if err != nil {
				return nil, err
			}
			continue
		}
		var item struct {
			Type   string `json:"type"`
			Length *int   `json:"length"`
		}
		if err := json.Unmarshal(line, &item); err != nil {
			return nil, fmt.Errorf("sentrytest: item header %q: %w", line, err)
		}
		var payload []byte
		if item.Length != nil {
			payload = make([]byte, *item.Length)
			if _, err := io.ReadFull(br, payload); err != nil {
				return nil, fmt.Errorf("sentrytest: %s item of %d bytes: %w", item.Type, *item.Length, err)
			}
			if c, err := br.ReadByte(); err == nil && c != '\n' {
				_ = br.UnreadByte()
			}
		} else {
			payload, err = br.ReadBytes('\n')
			if err != nil && err != io.EOF {
				return nil, err
			}
			payload = bytes.TrimSuffix(payload, []byte("\n"))
		}
		if item.Type != "event" {
			continue
		}
		var ev Event
		if err := json.Unmarshal(payload, &ev); err != nil {
			return nil, fmt.Errorf("sentrytest: event: %w", err)
		}
		ev.Raw = append(json.RawMessage(nil), payload...)
		events = append(events, ev)
	}
}

// Events returns the events received so far.
func (r *Receiver) Events() []Event {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Event(nil), r.events...)
}

// Requests returns the envelope requests received so far.
func (r *Receiver) Requests() []Request {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Request(nil), r.requests...)
}

// Failures returns the number of requests that could not be decoded.
func (r *Receiver) Failures() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.failures
}

// WaitFor waits until an event for which match is true has arrived, and
// returns it; or returns ctx's error.
func (r *Receiver) WaitFor(ctx context.Context, match func(Event) bool) (Event, error) {
	for {
		r.mu.Lock()
		for _, ev := range r.events {
			if match(ev) {
				r.mu.Unlock()
				return ev, nil
			}
		}
		ch := r.changed
		r.mu.Unlock()
		select {
		case <-ctx.Done():
			return Event{}, fmt.Errorf("sentrytest: no matching event among %d: %w", len(r.Events()), ctx.Err())
		case <-ch:
		}
	}
}

// Fingerprinted returns a match for WaitFor: an event whose fingerprint
// is fp.
func Fingerprinted(fp string) func(Event) bool {
	return func(ev Event) bool { return len(ev.Fingerprint) == 1 && ev.Fingerprint[0] == fp }
}

// Contains reports whether any request (header or envelope) holds s.
func (r *Receiver) Contains(s string) bool {
	for _, req := range r.Requests() {
		if bytes.Contains(req.Body, []byte(s)) {
			return true
		}
		for k, vs := range req.Header {
			if strings.Contains(k, s) || strings.Contains(strings.Join(vs, "\n"), s) {
				return true
			}
		}
	}
	return false
}
