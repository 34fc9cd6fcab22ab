// Package openvpnmgmt is a client of OpenVPN's management interface: one
// connection, typed real-time events, typed commands with contexts.
//
// A [Client] owns one connection. A reader goroutine splits what OpenVPN
// sends into command replies and real-time events. Replies go to the
// command that waits for them, in order; events go to a queue that
// [Client.Events] drains. Replies never wait for events: a consumer that
// answers a CLIENT:CONNECT with [Client.ClientAuthNT] from its event loop
// cannot deadlock, and a slow consumer never stops the reader.
//
// When the consumer falls behind, events wait in the queue in memory, in
// order, without loss. The queue is bounded by [Client.MaxQueue] (a million
// events by default, far more than a reconnect storm of a full instance
// produces); beyond it the client closes the connection and reports
// [ErrQueueOverflow] from [Client.Err], because dropping a CONNECT would
// leave a device waiting for an answer that never comes.
//
// The package speaks the protocol only: what to answer to a device, and
// when, is the caller's business (package vpn).
package openvpnmgmt

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"time"
)

// ErrClosed reports a command on a closed client, or one whose connection
// ended before its reply.
var ErrClosed = errors.New("openvpnmgmt: connection closed")

// ErrQueueOverflow reports events that the consumer did not take in time:
// more than MaxQueue waited.
var ErrQueueOverflow = errors.New("openvpnmgmt: event queue overflow")

// ErrBadPassword reports a management password that OpenVPN refused.
var ErrBadPassword = errors.New("openvpnmgmt: management password refused")

// ServerError is an ERROR: reply.
type ServerError struct {
	Command string // the command's first word
	Message string // the text after "ERROR: "
}

func (e *ServerError) Error() string {
	return fmt.Sprintf("openvpnmgmt: %s: %s", e.Command, e.Message)
}

// DefaultMaxQueue is the default of Client.MaxQueue.
const DefaultMaxQueue = 1 << 20

// Options configure a Client. The zero value is fine.
type Options struct {
	// Password answers the management password prompt, if the server
	// has one (--management … pw-file).
	Password string
	// MaxQueue bounds the events waiting for the consumer. Zero means
	// DefaultMaxQueue.
	MaxQueue int
	// Logger receives protocol anomalies (lines that fit nothing). Nil
	// means discard.
	Logger *slog.Logger
}

// Client is a management-interface session over one connection. Its
// methods are safe for concurrent use.
type Client struct {
	conn net.Conn
	opts Options
	log  *slog.Logger

	writeMu sync.Mutex // a command's line(s) and its place in pending go together
	pending []*call    // the commands waiting for replies, in order; under writeMu

	qmu    sync.Mutex
	queue  []Event
	signal chan struct{} // an event was queued; buffered, 1
	events chan Event

	done    chan struct{} // closed when the connection is finished with
	closing chan struct{} // closed by Close: stop delivering events
	errOnce sync.Once
	err     error
	wg      sync.WaitGroup
	closeMu sync.Once
}

// call is one command waiting for its reply.
type call struct {
	name      string
	multiLine bool
	reply     chan reply // buffered, 1
}

type reply struct {
	lines []string // a single-line reply: SUCCESS text; multi-line: the lines before END
	err   error
}

// Dial connects to a management interface at addr ("127.0.0.1:7505", or a
// unix socket path with network "unix") and returns a Client once the
// connection, and the password if one is set, are through.
func Dial(ctx context.Context, network, addr string, opts Options) (*Client, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, fmt.Errorf("openvpnmgmt: %w", err)
	}
	c, err := NewClient(ctx, conn, opts)
	if err != nil {
		conn.Close()
		return nil, err
	}
	return c, nil
}

// NewClient starts a Client on conn, which it owns from now on. With a
// password in opts, it first answers OpenVPN's prompt, within ctx.
func NewClient(ctx context.Context, conn net.Conn, opts Options) (*Client, error) {
	c := &Client{
		conn:    conn,
		opts:    opts,
		log:     opts.Logger,
		signal:  make(chan struct{}, 1),
		events:  make(chan Event),
		done:    make(chan struct{}),
		closing: make(chan struct{}),
	}
	if c.log == nil {
		c.log = slog.New(slog.DiscardHandler)
	}
	if c.opts.MaxQueue <= 0 {
		c.opts.MaxQueue = DefaultMaxQueue
	}
	br := bufio.NewReaderSize(conn, 64<<10)
	if opts.Password != "" {
		if err := c.login(ctx, br, opts.Password); err != nil {
			return nil, err
		}
	}
	c.wg.Add(2)
	go c.read(br)
	go c.deliver()
	return c, nil
}

// login answers the password prompt: "ENTER PASSWORD:" without a line end,
// then "SUCCESS: password is correct".
func (c *Client) login(ctx context.Context, br *bufio.Reader, password string) error {
	if strings.ContainsAny(password, "\r\n") {
		return errors.New("openvpnmgmt: password with a line end")
	}
	stop := context.AfterFunc(ctx, func() { c.conn.SetDeadline(time.Unix(1, 0)) })
	defer func() {
		if stop() {
			c.conn.SetDeadline(time.Time{})
		}
	}()
	const prompt = "ENTER PASSWORD:"
	var got []byte
	for !strings.HasSuffix(string(got), prompt) {
		b, err := br.ReadByte()
		if err != nil {
			return fmt.Errorf("openvpnmgmt: waiting for the password prompt: %w", ctxErr(ctx, err))
		}
		got = append(got, b)
		if len(got) > 4096 {
			return errors.New("openvpnmgmt: no password prompt")
		}
	}
	if _, err := io.WriteString(c.conn, password+"\n"); err != nil {
		return fmt.Errorf("openvpnmgmt: %w", ctxErr(ctx, err))
	}
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			return fmt.Errorf("openvpnmgmt: after the password: %w", ctxErr(ctx, err))
		}
		line = strings.TrimRight(line, "\r\n")
		switch {
		case strings.HasPrefix(line, "SUCCESS:"):
			return nil
		case strings.HasPrefix(line, "ERROR:"), strings.Contains(line, prompt):
			return ErrBadPassword
		}
	}
}

func ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}

// Events returns the channel of real-time events. It is closed when the
// connection ends; [Client.Err] then says why.
func (c *Client) Events() <-chan Event { return c.events }

// Done returns a channel that is closed when the connection has ended.
func (c *Client) Done() <-chan struct{} { return c.done }

// Err returns why the connection ended: nil while it runs, ErrClosed
// after Close, io.EOF when OpenVPN closed it, ErrQueueOverflow, or a read
// error.
func (c *Client) Err() error {
	select {
	case <-c.done:
		return c.err
	default:
		return nil
	}
}

// Close ends the connection and every goroutine of the client, and waits
// for them. Commands in flight return ErrClosed. It is safe to call more
// than once.
func (c *Client) Close() error {
	c.finish(ErrClosed)
	c.closeMu.Do(func() { close(c.closing) })
	c.wg.Wait()
	return nil
}

// finish records why the connection ends and ends it, once.
func (c *Client) finish(err error) {
	c.errOnce.Do(func() {
		c.err = err
		close(c.done) // before the connection, so that a failed write sees why
		c.conn.Close()
	})
}

// maxLine bounds a line from OpenVPN; status lines are the longest.
const maxLine = 1 << 20

// read splits the stream into replies and events. It never waits for the
// consumer.
func (c *Client) read(br *bufio.Reader) {
	defer c.wg.Done()
	defer func() {
		// Fail the commands still waiting.
		c.writeMu.Lock()
		for _, p := range c.pending {
			p.reply <- reply{err: ErrClosed}
		}
		c.pending = nil
		c.writeMu.Unlock()
	}()
	var (
		block    *ClientEvent // a CLIENT event collecting its ENV
		updown   *UpDownEvent
		multi    []string // a multi-line reply in progress
		inMulti  bool
		readLine = func() (string, error) {
			var buf []byte
			for {
				chunk, err := br.ReadSlice('\n')
				buf = append(buf, chunk...)
				if len(buf) > maxLine {
					return "", fmt.Errorf("openvpnmgmt: a line longer than %d bytes", maxLine)
				}
				if err == bufio.ErrBufferFull {
					continue
				}
				if err != nil {
					return "", err
				}
				return strings.TrimRight(string(buf), "\r\n"), nil
			}
		}
	)
	for {
		line, err := readLine()
		if err != nil {
			c.finish(err)
			return
		}
		if ev, ok := strings.CutPrefix(line, ">"); ok {
			switch {
			case block != nil:
				// ENV lines follow their CLIENT line without interleaving.
				if env, ok := strings.CutPrefix(ev, "CLIENT:ENV,"); ok {
					if env == "END" {
						c.enqueue(block)
						block = nil
					} else {
						block.Env = append(block.Env, envVar(env))
					}
					continue
				}
				c.log.Warn("openvpnmgmt: CLIENT ENV block cut short", "event", block.Raw())
				c.enqueue(block)
				block = nil
			case updown != nil:
				if env, ok := strings.CutPrefix(ev, "UPDOWN:ENV,"); ok {
					if env == "END" {
						c.enqueue(updown)
						updown = nil
					} else {
						updown.Env = append(updown.Env, envVar(env))
					}
					continue
				}
				c.enqueue(updown)
				updown = nil
			}
			if head, ok := clientHead(ev); ok {
				block = head
				continue
			}
			if s, ok := strings.CutPrefix(ev, "UPDOWN:"); ok && (s == "UP" || s == "DOWN") {
				updown = &UpDownEvent{raw: raw{ev}, Up: s == "UP"}
				continue
			}
			c.enqueue(parseEvent(ev))
			continue
		}
		// A reply line.
		c.writeMu.Lock()
		var p *call
		if len(c.pending) > 0 {
			p = c.pending[0]
		}
		c.writeMu.Unlock()
		if p == nil {
			c.log.Warn("openvpnmgmt: a line that answers no command", "line", line)
			continue
		}
		var r reply
		complete := true
		switch {
		case inMulti && line == "END":
			r.lines, multi, inMulti = multi, nil, false
		case inMulti:
			multi = append(multi, line)
			complete = false
		case strings.HasPrefix(line, "ERROR:"):
			r.err = &ServerError{Command: p.name, Message: strings.TrimSpace(strings.TrimPrefix(line, "ERROR:"))}
		case p.multiLine && line == "END":
			r.lines = []string{}
		case p.multiLine:
			multi, inMulti = []string{line}, true
			complete = false
		case strings.HasPrefix(line, "SUCCESS:"):
			r.lines = []string{strings.TrimSpace(strings.TrimPrefix(line, "SUCCESS:"))}
		default:
			c.log.Warn("openvpnmgmt: an unexpected reply line", "command", p.name, "line", line)
			r.lines = []string{line}
		}
		if !complete {
			continue
		}
		c.writeMu.Lock()
		c.pending = c.pending[1:]
		c.writeMu.Unlock()
		p.reply <- r
	}
}

func envVar(s string) EnvVar {
	name, value, _ := strings.Cut(s, "=")
	return EnvVar{name, value}
}

// enqueue queues an event for the consumer; it never blocks.
func (c *Client) enqueue(ev Event) {
	c.qmu.Lock()
	if len(c.queue) >= c.opts.MaxQueue {
		c.qmu.Unlock()
		c.finish(ErrQueueOverflow)
		return
	}
	c.queue = append(c.queue, ev)
	c.qmu.Unlock()
	select {
	case c.signal <- struct{}{}:
	default:
	}
}

// deliver hands the queued events to the consumer, in order. When the
// connection ends, it still delivers what was queued before, then closes
// the channel; Close stops it at once.
func (c *Client) deliver() {
	defer c.wg.Done()
	defer close(c.events)
	for {
		c.qmu.Lock()
		batch := c.queue
		c.queue = nil
		c.qmu.Unlock()
		for i, ev := range batch {
			select {
			case c.events <- ev:
				batch[i] = nil
			case <-c.closing:
				return
			}
		}
		if len(batch) > 0 {
			continue // more may have come meanwhile
		}
		select {
		case <-c.signal:
		case <-c.done:
			// The reader has stopped: nothing more will be queued once
			// the queue is empty.
			c.qmu.Lock()
			empty := len(c.queue) == 0
			c.qmu.Unlock()
			if empty {
				return
			}
		case <-c.closing:
			return
		}
	}
}

// roundTrip sends a command (its lines joined by "\n") and waits for its
// reply. The command keeps its place in the reply order even when ctx ends
// first; its reply is then dropped.
func (c *Client) roundTrip(ctx context.Context, name string, multiLine bool, lines ...string) ([]string, error) {
	for _, l := range lines {
		if err := checkLine(l); err != nil {
			return nil, err
		}
	}
	p := &call{name: name, multiLine: multiLine, reply: make(chan reply, 1)}
	c.writeMu.Lock()
	select {
	case <-c.done:
		c.writeMu.Unlock()
		return nil, ErrClosed
	default:
	}
	if err := ctx.Err(); err != nil {
		c.writeMu.Unlock()
		return nil, err
	}
	c.pending = append(c.pending, p)
	_, err := io.WriteString(c.conn, strings.Join(lines, "\n")+"\n")
	c.writeMu.Unlock()
	if err != nil {
		select {
		case <-c.done:
			return nil, ErrClosed // closed while we wrote
		default:
		}
		c.finish(err)
		return nil, fmt.Errorf("openvpnmgmt: %s: %w", name, err)
	}
	select {
	case r := <-p.reply:
		return r.lines, r.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}
