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
// A command's ctx bounds all of it: the wait for its turn to write, the
// write itself (OpenVPN stops reading its management socket while its own
// output waits, so a write can block), and the wait for the reply. A
// command whose ctx ends before any of its bytes is written is withdrawn,
// and the client stays usable; one cut off in the middle of its write
// closes the connection, since OpenVPN would read the rest of the stream
// as garbage ([ErrWriteCut]).
//
// The package speaks the protocol only: what to answer to a device, and
// when, is the caller's business (package vpn).
package openvpnmgmt

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
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

// ErrWriteCut is what [Client.Err] reports after a command's context ended
// while only part of its line(s) was written: OpenVPN would take the rest
// of the stream for garbage, so the client closed the connection. A
// command whose context ends before any of its bytes is written leaves the
// client usable.
var ErrWriteCut = errors.New("openvpnmgmt: a command's write was cut short by its context")

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

	// wlock is the write lock, a channel of one slot so that a command
	// waiting for it gives up when its ctx ends: a command takes its place
	// in pending and writes its line(s) under it. mu guards pending and
	// the rest; the reader takes only mu, so that a write that blocks
	// (OpenVPN not reading while its own output waits) never keeps replies
	// from being read. wlock is taken before mu.
	wlock     chan struct{}
	wdl       time.Time // the connection's write deadline; under wlock
	mu        sync.Mutex
	pending   []*call         // the commands waiting for replies, in order; under mu
	aloneBusy bool            // a line that goes alone is waiting or in flight; under mu
	waiters   []chan struct{} // commands waiting for aloneBusy to clear; under mu

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
	alone     bool       // written alone: its reply clears aloneBusy
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
		wlock:   make(chan struct{}, 1),
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
	stop := cutOnDone(ctx, c.conn.SetDeadline)
	defer func() {
		stop()
		c.conn.SetDeadline(time.Time{}) // the reader has not started yet
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

// aLongTimeAgo is a deadline in the past: it makes blocked I/O return.
var aLongTimeAgo = time.Unix(1, 0)

// cutOnDone makes set(aLongTimeAgo) run when ctx ends, to interrupt I/O
// that blocks (set is a conn's SetDeadline or SetWriteDeadline). The
// returned function cancels that and reports whether it ran; when it did,
// it has finished by the time the function returns, so that the caller
// can set the deadline again without a late set undoing it.
func cutOnDone(ctx context.Context, set func(time.Time) error) (stop func() (cut bool)) {
	if ctx.Done() == nil {
		return func() bool { return false }
	}
	ran := make(chan struct{})
	stopFunc := context.AfterFunc(ctx, func() {
		set(aLongTimeAgo)
		close(ran)
	})
	return func() bool {
		if stopFunc() {
			return false
		}
		<-ran
		return true
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
// after Close, io.EOF when OpenVPN closed it, ErrQueueOverflow, ErrWriteCut
// (wrapped) after a write that a command's context cut short, or a read or
// write error.
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

// lineReader returns OpenVPN's lines without their line ends. A line is
// valid until the next call: the reader copies what it keeps.
type lineReader struct {
	br   *bufio.Reader
	long []byte // a line longer than br's buffer, assembled
}

func (r *lineReader) next() ([]byte, error) {
	line, err := r.br.ReadSlice('\n')
	if err == bufio.ErrBufferFull {
		r.long = append(r.long[:0], line...)
		for err == bufio.ErrBufferFull {
			line, err = r.br.ReadSlice('\n')
			r.long = append(r.long, line...)
			if len(r.long) > maxLine {
				return nil, fmt.Errorf("openvpnmgmt: a line longer than %d bytes", maxLine)
			}
		}
		line = r.long
	}
	if err != nil {
		return nil, err
	}
	return bytes.TrimRight(line, "\r\n"), nil
}

// block collects the ENV lines of a CLIENT or UPDOWN event. The lines are
// copied into one buffer and become one string when the block ends: an
// event costs a handful of allocations however long its ENV is.
type block struct {
	client *ClientEvent // the event being collected, or
	updown *UpDownEvent // this one
	prefix string       // "CLIENT:ENV," or "UPDOWN:ENV,"
	buf    []byte       // the ENV lines, back to back
	ends   []int        // where each line ends in buf
}

// start begins a block if ev (a real-time line without ">") is the first
// line of an event with an ENV block.
func (b *block) start(ev []byte) bool {
	switch {
	case bytes.HasPrefix(ev, []byte("CLIENT:")):
		head, ok := clientHead(string(ev))
		if !ok {
			return false
		}
		b.client, b.prefix = head, "CLIENT:ENV,"
	case string(ev) == "UPDOWN:UP" || string(ev) == "UPDOWN:DOWN":
		b.updown = &UpDownEvent{raw: raw{string(ev)}, Up: string(ev) == "UPDOWN:UP"}
		b.prefix = "UPDOWN:ENV,"
	default:
		return false
	}
	b.buf, b.ends = b.buf[:0], b.ends[:0]
	return true
}

func (b *block) active() bool { return b.client != nil || b.updown != nil }

// add takes an ENV line; it reports false if ev is not one of the
// block's, and true when it was the closing END.
func (b *block) add(ev []byte) (isEnv, end bool) {
	env, ok := bytes.CutPrefix(ev, []byte(b.prefix))
	if !ok {
		return false, false
	}
	if string(env) == "END" {
		return true, true
	}
	b.buf = append(b.buf, env...)
	b.ends = append(b.ends, len(b.buf))
	return true, false
}

// finish returns the event with its ENV, and resets the block.
func (b *block) finish() Event {
	var env Env
	if len(b.ends) > 0 {
		s := string(b.buf)
		env = make(Env, len(b.ends))
		from := 0
		for i, to := range b.ends {
			name, value, _ := strings.Cut(s[from:to], "=")
			env[i] = EnvVar{name, value}
			from = to
		}
	}
	var ev Event
	if b.client != nil {
		b.client.Env = env
		ev = b.client
	} else {
		b.updown.Env = env
		ev = b.updown
	}
	b.client, b.updown = nil, nil
	if cap(b.buf) > 1<<16 { // do not keep a freak block's memory
		b.buf, b.ends = nil, nil
	}
	return ev
}

// read splits the stream into replies and events. It never waits for the
// consumer. Each line is copied before it leaves the reader.
func (c *Client) read(br *bufio.Reader) {
	defer c.wg.Done()
	defer func() {
		// Fail the commands still waiting.
		c.mu.Lock()
		for _, p := range c.pending {
			p.reply <- reply{err: ErrClosed}
		}
		c.pending = nil
		c.mu.Unlock()
	}()
	var (
		lr      = lineReader{br: br}
		blk     block
		multi   []string // a multi-line reply in progress
		inMulti bool
	)
	for {
		line, err := lr.next()
		if err != nil {
			if blk.active() {
				c.enqueue(blk.finish())
			}
			c.finish(err)
			return
		}
		if ev, ok := bytes.CutPrefix(line, []byte(">")); ok {
			if blk.active() {
				// ENV lines follow their first line without interleaving.
				isEnv, end := blk.add(ev)
				if end {
					c.enqueue(blk.finish())
				}
				if isEnv {
					continue
				}
				c.log.Warn("openvpnmgmt: an ENV block cut short", "event", blk.rawHead())
				c.enqueue(blk.finish())
			}
			if blk.start(ev) {
				continue
			}
			c.enqueue(parseEvent(string(ev)))
			continue
		}
		// A reply line.
		c.mu.Lock()
		var p *call
		if len(c.pending) > 0 {
			p = c.pending[0]
		}
		c.mu.Unlock()
		if p == nil {
			c.log.Warn("openvpnmgmt: a line that answers no command", "line", string(line))
			continue
		}
		var r reply
		complete := true
		switch {
		case inMulti && string(line) == "END":
			r.lines, multi, inMulti = multi, nil, false
		case inMulti:
			multi = append(multi, string(line))
			complete = false
		case bytes.HasPrefix(line, []byte("ERROR:")):
			r.err = &ServerError{Command: p.name, Message: string(bytes.TrimSpace(line[len("ERROR:"):]))}
		case p.multiLine && string(line) == "END":
			r.lines = []string{}
		case p.multiLine:
			multi, inMulti = []string{string(line)}, true
			complete = false
		case bytes.HasPrefix(line, []byte("SUCCESS:")):
			r.lines = []string{string(bytes.TrimSpace(line[len("SUCCESS:"):]))}
		default:
			c.log.Warn("openvpnmgmt: an unexpected reply line", "command", p.name, "line", string(line))
			r.lines = []string{string(line)}
		}
		if !complete {
			continue
		}
		c.mu.Lock()
		c.pending = c.pending[1:]
		if p.alone {
			c.aloneBusy = false
		}
		c.wakeLocked()
		c.mu.Unlock()
		p.reply <- r
	}
}

func (b *block) rawHead() string {
	if b.client != nil {
		return b.client.Raw()
	}
	return b.updown.Raw()
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
	var spare []Event // the slice delivered last time, for the reader to fill next
	for {
		c.qmu.Lock()
		batch := c.queue
		c.queue = spare[:0]
		c.qmu.Unlock()
		for i, ev := range batch {
			select {
			case c.events <- ev:
				batch[i] = nil
			case <-c.closing:
				return
			}
		}
		if cap(batch) <= 4096 {
			spare = batch
		} else {
			spare = nil // let a storm's queue go
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

// pipelinedLineLength is the longest line, its line end included, that
// can be followed at once by more lines. OpenVPN reads its management
// socket 256 bytes at a time into a 1024-byte line buffer, and clears the
// buffer when one read does not fit: a line of more than 1024-255 bytes
// can be lost, and its tail run as a command, when the next command
// comes in the same read.
const pipelinedLineLength = MaxLineLength - 255

// roundTrip sends a command (its lines joined by "\n") and waits for its
// reply. Commands are pipelined: written at once, in the order of the
// calls, before the earlier ones are answered; a line longer than
// pipelinedLineLength is written alone, once every earlier command is
// answered, and no later one is written before its reply.
//
// ctx bounds the whole command: the wait for the write lock and for the
// turn of a line that goes alone, the write (its deadline is ctx's, and
// ctx's end interrupts it), and the wait for the reply. When ctx ends
// before any byte is written, the command is withdrawn and the client
// stays usable; when it ends in the middle of the write, the client
// closes the connection (Err reports ErrWriteCut). A command written in
// full keeps its place in the reply order even when ctx ends first; its
// reply is then dropped.
func (c *Client) roundTrip(ctx context.Context, name string, multiLine bool, lines ...string) ([]string, error) {
	alone := false
	for _, l := range lines {
		if err := checkLine(l); err != nil {
			return nil, err
		}
		if len(l)+1 > pipelinedLineLength {
			if len(lines) > 1 {
				return nil, fmt.Errorf("%w: a line of %d bytes in a block of lines (at most %d)", ErrLineTooLong, len(l)+1, pipelinedLineLength)
			}
			alone = true
		}
	}
	p := &call{name: name, multiLine: multiLine, alone: alone, reply: make(chan reply, 1)}
	if err := c.enter(ctx, alone); err != nil {
		return nil, err
	}
	// The write lock and mu are held.
	c.pending = append(c.pending, p)
	if alone {
		c.aloneBusy = true
	}
	c.mu.Unlock()
	if err := c.write(ctx, p, strings.Join(lines, "\n")+"\n"); err != nil {
		return nil, err
	}
	select {
	case r := <-p.reply:
		return r.lines, r.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// write writes p's bytes s, with the write lock held, and releases the
// lock. The write's deadline is ctx's, and ctx's end interrupts it.
func (c *Client) write(ctx context.Context, p *call, s string) error {
	defer c.unlockWrite()
	dl, _ := ctx.Deadline()
	if !dl.Equal(c.wdl) {
		c.conn.SetWriteDeadline(dl)
		c.wdl = dl
	}
	stop := cutOnDone(ctx, c.conn.SetWriteDeadline)
	n, err := io.WriteString(c.conn, s)
	if stop() {
		c.wdl = aLongTimeAgo // the next write sets its own
	}
	if err == nil {
		return nil
	}
	select {
	case <-c.done:
		return ErrClosed // closed while we wrote
	default:
	}
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		c.finish(err)
		return fmt.Errorf("openvpnmgmt: %s: %w", p.name, err)
	}
	cerr := ctx.Err()
	if cerr == nil {
		cerr = context.DeadlineExceeded // ctx's deadline, a moment before ctx knows it
	}
	if n > 0 {
		c.finish(fmt.Errorf("%w (%s: %d of %d bytes written)", ErrWriteCut, p.name, n, len(s)))
		return fmt.Errorf("openvpnmgmt: %s: written in part, the connection is closed: %w", p.name, cerr)
	}
	c.withdraw(p)
	return cerr
}

// withdraw takes p, of which nothing was written, out of pending. It is
// the last entry: the write lock is held since it was added.
func (c *Client) withdraw(p *call) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if i := len(c.pending) - 1; i >= 0 && c.pending[i] == p {
		c.pending = c.pending[:i]
		if p.alone {
			c.aloneBusy = false
			c.wakeLocked()
		}
	}
}

// lockWrite takes the write lock, unless ctx ends or the client is closed
// first.
func (c *Client) lockWrite(ctx context.Context) error {
	select {
	case c.wlock <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-c.done:
		return ErrClosed
	}
}

func (c *Client) unlockWrite() { <-c.wlock }

// enter returns with the write lock and mu held once a command may be
// written: at once unless a line that goes alone is waiting or in flight;
// for a line that goes alone (alone), once it has the connection to
// itself.
func (c *Client) enter(ctx context.Context, alone bool) error {
	reserved := false // this call holds aloneBusy
	for {
		err := c.lockWrite(ctx)
		if err == nil {
			c.mu.Lock()
			select {
			case <-c.done:
				err = ErrClosed
			default:
				err = ctx.Err()
			}
			if err != nil {
				c.mu.Unlock()
				c.unlockWrite()
			}
		}
		if err != nil {
			if reserved {
				c.mu.Lock()
				c.aloneBusy = false
				c.wakeLocked()
				c.mu.Unlock()
			}
			return err
		}
		switch {
		case !alone && !c.aloneBusy:
			return nil
		case alone && !reserved && !c.aloneBusy:
			// Keep later commands out while the earlier ones drain.
			c.aloneBusy, reserved = true, true
		}
		if reserved && len(c.pending) == 0 {
			return nil // aloneBusy stays set, now for the call itself
		}
		wake := make(chan struct{})
		c.waiters = append(c.waiters, wake)
		c.mu.Unlock()
		c.unlockWrite()
		select {
		case <-wake:
		case <-ctx.Done():
		case <-c.done:
		}
	}
}

// wakeLocked wakes the commands waiting in enter, to look again. mu is
// held.
func (c *Client) wakeLocked() {
	for _, w := range c.waiters {
		close(w)
	}
	c.waiters = nil
}
