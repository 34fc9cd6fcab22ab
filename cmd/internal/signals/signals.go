// Package signals is the signal handling that the long-running commands
// (open-balena-vpn, connect-proxy) share: SIGUSR2 toggles verbose logs, the
// first SIGTERM or SIGINT asks for a graceful stop (the drain), a second
// one for an immediate stop, and SIGHUP, where the command handles it, for
// an in-place upgrade.
package signals

import (
	"log/slog"
	"os"
	"os/signal"
	"sync"
	"syscall"
)

// Handler says what the signals do.
type Handler struct {
	// Level is the log level that SIGUSR2 toggles between info and debug.
	// Nil ignores SIGUSR2.
	Level *slog.LevelVar

	// Logger receives a line per signal. Nil means discard.
	Logger *slog.Logger

	// Stop is called on the first SIGTERM or SIGINT: a graceful stop.
	Stop func(os.Signal)

	// Hard is called on every later SIGTERM or SIGINT: stop at once. Nil
	// ignores them.
	Hard func(os.Signal)

	// Reload is called on every SIGHUP before the first SIGTERM or
	// SIGINT (a stopping command ignores SIGHUP). It runs on the loop
	// that handles the signals: one that takes long returns and carries
	// on elsewhere, so that a SIGTERM is not kept waiting. Nil leaves
	// SIGHUP to its default action, which ends the process.
	Reload func(os.Signal)
}

// Notify handles the signals until the returned function is called; that
// function stops the handling and waits for it to end.
func (h Handler) Notify() (stop func()) {
	sigs := make(chan os.Signal, 4)
	handled := []os.Signal{syscall.SIGTERM, syscall.SIGINT, syscall.SIGUSR2}
	if h.Reload != nil {
		handled = append(handled, syscall.SIGHUP)
	}
	signal.Notify(sigs, handled...)
	var wg sync.WaitGroup
	wg.Go(func() { h.handle(sigs) })
	var once sync.Once
	return func() {
		once.Do(func() {
			signal.Stop(sigs)
			close(sigs)
			wg.Wait()
		})
	}
}

// handle acts on the signals of sigs until it is closed.
func (h Handler) handle(sigs <-chan os.Signal) {
	log := h.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	stopping := false
	for sig := range sigs {
		switch {
		case sig == syscall.SIGUSR2:
			if h.Level == nil {
				continue
			}
			if h.Level.Level() == slog.LevelDebug {
				h.Level.Set(slog.LevelInfo)
			} else {
				h.Level.Set(slog.LevelDebug)
			}
			log.Info("verbose logs toggled", "level", h.Level.Level())
		case sig == syscall.SIGHUP:
			if h.Reload == nil {
				continue
			}
			if stopping {
				log.Warn("SIGHUP ignored: stopping", "signal", sig)
				continue
			}
			log.Info("upgrading in place", "signal", sig)
			h.Reload(sig)
		case stopping:
			log.Error("second signal: stopping at once, without the drain", "signal", sig)
			if h.Hard != nil {
				h.Hard(sig)
			}
		default:
			stopping = true
			log.Info("stopping", "signal", sig)
			if h.Stop != nil {
				h.Stop(sig)
			}
		}
	}
}
