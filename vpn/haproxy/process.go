package haproxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"
)

// Process is a managed haproxy: Start writes its configuration and runs
// it in master-worker mode, in the foreground, until the context ends.
type Process struct {
	// Config and Site are what is rendered (see [Config.Render]).
	Config Config
	Site   Site
	// File is where the configuration is written, readable by its owner
	// only (it may hold the monitoring token).
	File string
	// Command makes the haproxy command; nil means exec.CommandContext.
	// Tests and callers in a network namespace replace it.
	Command func(ctx context.Context, name string, args ...string) *exec.Cmd
	// StartTimeout bounds how long Start waits for the admin socket to
	// answer. Zero means 10 s.
	StartTimeout time.Duration
	// StopTimeout is how long haproxy has to exit after SIGTERM before it
	// is killed. Zero means 5 s.
	StopTimeout time.Duration
	// Logger receives haproxy's own output, line by line, at debug level,
	// and the start; nil means discard.
	Logger *slog.Logger

	exited chan struct{}
	err    error // haproxy's exit, once exited is closed
}

func (p *Process) log() *slog.Logger {
	if p.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return p.Logger
}

// Start writes the configuration, starts haproxy and returns once its
// admin socket answers (Config.Socket, a stale one removed first). haproxy
// runs until ctx ends, when it gets SIGTERM; [Process.Done] is closed once
// it has exited, for whatever reason.
func (p *Process) Start(ctx context.Context) error {
	c := p.Config.WithDefaults()
	if err := os.MkdirAll(filepath.Dir(p.File), 0o755); err != nil {
		return fmt.Errorf("haproxy: %w", err)
	}
	if err := writePrivate(p.File, []byte(p.Config.Render(p.Site))); err != nil {
		return fmt.Errorf("haproxy: %w", err)
	}
	if n, from := p.Config.MaxConnFor(FileLimit()); from > 0 {
		p.log().Warn("HAProxy's maxconn lowered to what the file descriptor limit allows", "maxconn", n, "wanted", from, "file_limit", FileLimit())
	}
	_ = os.Remove(c.Socket) // a stale socket from an earlier run
	cmdf := p.Command
	if cmdf == nil {
		cmdf = exec.CommandContext
	}
	cmd := cmdf(ctx, "haproxy", "-W", "-db", "-f", p.File)
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = orDefault(p.StopTimeout, 5*time.Second)
	out := &lineLogger{log: p.log().With("source", "haproxy")}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("haproxy: starting: %w", err)
	}
	p.exited = make(chan struct{})
	go func() {
		p.err = cmd.Wait()
		close(p.exited)
	}()
	rt := &Runtime{Socket: c.Socket}
	timeout := orDefault(p.StartTimeout, 10*time.Second)
	deadline := time.Now().Add(timeout)
	for {
		qctx, cancel := context.WithTimeout(ctx, time.Second)
		_, err := rt.Command(qctx, "show info")
		cancel()
		if err == nil {
			p.log().Info("HAProxy running", "pid", cmd.Process.Pid, "port", c.Port, "monitor", c.MonitorAddr)
			return nil
		}
		select {
		case <-p.exited:
			return fmt.Errorf("haproxy: exited at start (see its log): %v", p.err)
		case <-ctx.Done():
			<-p.exited
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			<-p.exited
			return fmt.Errorf("haproxy: the admin socket %s did not answer within %v: %w", c.Socket, timeout, err)
		}
	}
}

// Done is closed once haproxy has exited; nil before Start.
func (p *Process) Done() <-chan struct{} { return p.exited }

// Err returns how haproxy exited, once Done is closed.
func (p *Process) Err() error {
	select {
	case <-p.exited:
		return p.err
	default:
		return errors.New("haproxy: still running")
	}
}

func orDefault(d, def time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return def
}

// writePrivate replaces name with data, mode 0600, through a temporary
// file in its directory, so that haproxy never reads half a file.
func writePrivate(name string, data []byte) error {
	tmp := name + ".new"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return err
	}
	if err := os.Chmod(tmp, 0o600); err != nil { // an older file's mode
		os.Remove(tmp)
		return err
	}
	return os.Rename(tmp, name)
}

// lineLogger logs what a child process writes, line by line, at debug
// level.
type lineLogger struct {
	log *slog.Logger
	mu  sync.Mutex
	buf []byte
}

func (l *lineLogger) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf = append(l.buf, p...)
	for {
		i := bytes.IndexByte(l.buf, '\n')
		if i < 0 {
			break
		}
		l.log.Debug(string(l.buf[:i]))
		l.buf = l.buf[i+1:]
	}
	return len(p), nil
}
