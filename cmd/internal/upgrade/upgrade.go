// Package upgrade is the in-place upgrade of a long-running command: the
// executable at the path it was started from is started again, inherits
// the listening sockets, and says when it serves; only then does the old
// process let go. It follows systemd's conventions on the way: a pid
// file written by the process that is ready, and sd_notify (READY=1 and
// MAINPID of the process that serves, RELOADING=1 during an upgrade,
// STOPPING=1 on a stop).
//
// The passing of the sockets and the handshake between the two processes
// are github.com/cloudflare/tableflip's. This package adds the
// notifications, the logs, and the rule that one upgrade runs at a time.
// It does not hand over anything but listeners: the data plane that the
// command leaves running is the new process's to adopt.
package upgrade

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/cloudflare/tableflip"

	"github.com/obvpn/obvpn/cmd/internal/sdnotify"
)

// ErrInProgress is what Upgrade returns while another upgrade runs.
var ErrInProgress = errors.New("upgrade: an upgrade is already under way")

// Options configure an Upgrader.
type Options struct {
	// PIDFile, when not empty, is written with the pid of the process
	// that is ready (this one at Ready, then its successor at its own).
	PIDFile string

	// Timeout bounds the start of a successor: one that is not ready by
	// then is killed and the upgrade fails. Zero means a minute.
	Timeout time.Duration

	// Notifier receives the sd_notify states. Nil sends none.
	Notifier *sdnotify.Notifier

	// Logger receives a line per upgrade. Nil means discard.
	Logger *slog.Logger
}

// Upgrader is a process's side of the upgrades: the listeners it
// inherited or opened, its readiness, and the upgrades to its successor.
// A process has one.
type Upgrader struct {
	t          *tableflip.Upgrader
	opts       Options
	running    atomic.Bool // an Upgrade is under way
	handedOver atomic.Bool // a successor is ready
	stopping   atomic.Bool // Stopping was called
}

// New returns the process's Upgrader, with the listeners that a
// predecessor passed on, if any. It checks that the pid file's directory
// takes files, so that Ready does not fail on it later.
func New(opts Options) (*Upgrader, error) {
	if opts.PIDFile != "" {
		f, err := os.CreateTemp(filepath.Dir(opts.PIDFile), "."+filepath.Base(opts.PIDFile)+".*")
		if err != nil {
			return nil, fmt.Errorf("upgrade: pid file: %w", err)
		}
		f.Close()
		os.Remove(f.Name())
	}
	// The pid file is written here rather than by tableflip, before
	// systemd is told (see Ready).
	t, err := tableflip.New(tableflip.Options{UpgradeTimeout: opts.Timeout})
	if err != nil {
		return nil, fmt.Errorf("upgrade: %w", err)
	}
	return &Upgrader{t: t, opts: opts}, nil
}

func (u *Upgrader) log() *slog.Logger {
	if u.opts.Logger != nil {
		return u.opts.Logger
	}
	return slog.New(slog.DiscardHandler)
}

// Listen returns the listener on network and addr that the predecessor
// passed on, or opens one; either way a successor inherits it. It has the
// signature of net.Listen.
func (u *Upgrader) Listen(network, addr string) (net.Listener, error) {
	return u.t.Listen(network, addr)
}

// HasParent reports whether this process was started by an upgrade.
func (u *Upgrader) HasParent() bool { return u.t.HasParent() }

// Ready says that this process serves, in this order: in the pid file,
// to systemd (READY=1 with this process as MAINPID), and to a
// predecessor, whose Upgrade then returns nil. So whoever hears of it
// finds the pid file current, and systemd hears of the new main process
// before the old one can exit (it reads notifications before exits), so
// that it does not take that exit for the service's. Listeners inherited
// but not asked for by then are closed. If the predecessor cannot be told,
// systemd is told that it is the main process again.
func (u *Upgrader) Ready() error {
	if u.opts.PIDFile != "" {
		if err := writePIDFile(u.opts.PIDFile); err != nil {
			return err
		}
	}
	u.notify(sdnotify.Ready, sdnotify.MainPID(os.Getpid()))
	if err := u.t.Ready(); err != nil {
		if u.t.HasParent() {
			u.notify(sdnotify.MainPID(os.Getppid()))
		}
		return fmt.Errorf("upgrade: %w", err)
	}
	if u.t.HasParent() {
		u.log().Info("upgrade: this process serves; its predecessor hands over", "pid", os.Getpid())
	}
	return nil
}

// writePIDFile replaces path atomically with this process's pid.
func writePIDFile(path string) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("upgrade: pid file: %w", err)
	}
	_, err = fmt.Fprintf(f, "%d\n", os.Getpid())
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(f.Name(), 0o644)
	}
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("upgrade: pid file: %w", err)
	}
	return nil
}

// Upgrade starts the executable again and waits until the successor is
// ready (nil: this process now hands over, and may not upgrade again) or
// has failed: it could not start, exited, or was not ready within the
// timeout (the error says which; this process keeps serving, and a later
// Upgrade may try again). While one runs, Upgrade returns ErrInProgress
// at once. A process started by an upgrade can upgrade once its
// predecessor has exited.
func (u *Upgrader) Upgrade() error {
	if !u.running.CompareAndSwap(false, true) {
		u.log().Warn("upgrade: SIGHUP ignored, an upgrade is already under way")
		return ErrInProgress
	}
	defer u.running.Store(false)
	if u.handedOver.Load() {
		u.log().Warn("upgrade: SIGHUP ignored, a successor already serves")
		return errors.New("upgrade: already handed over")
	}
	mono, err := sdnotify.MonotonicUsec()
	if err == nil {
		u.notify(sdnotify.Reloading, mono)
	}
	start := time.Now()
	self, _ := os.Executable()
	u.log().Info("upgrade: starting the executable again", "path", os.Args[0], "running", self)
	if err := u.t.Upgrade(); err != nil {
		err = fmt.Errorf("upgrade: %w", err)
		if u.stopping.Load() {
			u.log().Warn("upgrade interrupted: stopping", "err", err)
			return err
		}
		u.log().Error("upgrade failed: this process keeps serving", "err", err, "pid", os.Getpid(), "after", time.Since(start).Round(time.Millisecond))
		u.notify(sdnotify.Ready, sdnotify.MainPID(os.Getpid()), sdnotify.Status("upgrade failed: "+err.Error()))
		return err
	}
	u.handedOver.Store(true)
	u.log().Info("upgrade: the successor is ready; handing over", "after", time.Since(start).Round(time.Millisecond))
	return nil
}

// HandedOver reports whether a successor is ready, the process's own
// listeners closed, and the rest of the service is the successor's.
func (u *Upgrader) HandedOver() bool { return u.handedOver.Load() }

// Stopping tells systemd that the service stops (STOPPING=1), unless a
// successor serves: then it is only this process that goes. It interrupts
// an upgrade under way (its successor is killed) and prevents later ones.
func (u *Upgrader) Stopping() {
	u.stopping.Store(true)
	u.t.Stop()
	if !u.handedOver.Load() {
		u.notify(sdnotify.Stopping)
	}
}

// Stop prevents later upgrades; it interrupts one under way. Call it
// when the process exits.
func (u *Upgrader) Stop() { u.t.Stop() }

func (u *Upgrader) notify(states ...string) {
	if err := u.opts.Notifier.Notify(states...); err != nil {
		u.log().Warn("systemd not told", "states", states, "err", err)
	}
}
