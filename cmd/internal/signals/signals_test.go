package signals

import (
	"context"
	"log/slog"
	"os"
	"syscall"
	"testing"
)

func TestHandle(t *testing.T) {
	level := new(slog.LevelVar)
	var stops, hards, reloads []os.Signal
	h := Handler{Level: level, Stop: func(s os.Signal) { stops = append(stops, s) }, Hard: func(s os.Signal) { hards = append(hards, s) },
		Reload: func(s os.Signal) { reloads = append(reloads, s) }}
	sigs := make(chan os.Signal, 16)
	for _, s := range []os.Signal{syscall.SIGHUP, syscall.SIGUSR2, syscall.SIGHUP, syscall.SIGTERM, syscall.SIGUSR2, syscall.SIGHUP, syscall.SIGUSR2, syscall.SIGINT, syscall.SIGTERM} {
		sigs <- s
	}
	close(sigs)
	h.handle(sigs)
	if len(stops) != 1 || stops[0] != syscall.SIGTERM {
		t.Errorf("graceful stops: %v", stops)
	}
	if len(hards) != 2 {
		t.Errorf("hard stops: %v", hards)
	}
	if len(reloads) != 2 { // not the one after SIGTERM
		t.Errorf("reloads: %v", reloads)
	}
	if level.Level() != slog.LevelDebug { // toggled three times
		t.Errorf("level %v", level.Level())
	}
}

// TestNotify: a real SIGUSR2 to this process toggles the level, and stop
// ends the handling.
func TestNotify(t *testing.T) {
	level := new(slog.LevelVar)
	toggled := make(chan struct{})
	h := Handler{Level: level, Logger: slog.New(notifyHandler{toggled})}
	stop := h.Notify()
	defer stop()
	if err := syscall.Kill(os.Getpid(), syscall.SIGUSR2); err != nil {
		t.Fatal(err)
	}
	<-toggled
	if level.Level() != slog.LevelDebug {
		t.Errorf("level %v after SIGUSR2", level.Level())
	}
	stop()
	stop() // twice is fine
}

// TestNotifySIGHUP: with Reload set, a real SIGHUP reaches it instead of
// ending the process.
func TestNotifySIGHUP(t *testing.T) {
	reloaded := make(chan os.Signal, 1)
	stop := Handler{Reload: func(s os.Signal) { reloaded <- s }}.Notify()
	defer stop()
	if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	if s := <-reloaded; s != syscall.SIGHUP {
		t.Errorf("got %v", s)
	}
	stop()
	// Without Reload, the loop passes over a SIGHUP (Notify does not
	// even ask for it).
	var nothing Handler
	sigs := make(chan os.Signal, 1)
	sigs <- syscall.SIGHUP
	close(sigs)
	nothing.handle(sigs)
}

// notifyHandler closes its channel at the first record.
type notifyHandler struct{ ch chan struct{} }

func (n notifyHandler) Enabled(context.Context, slog.Level) bool { return true }
func (n notifyHandler) Handle(context.Context, slog.Record) error {
	select {
	case <-n.ch:
	default:
		close(n.ch)
	}
	return nil
}
func (n notifyHandler) WithAttrs([]slog.Attr) slog.Handler { return n }
func (n notifyHandler) WithGroup(string) slog.Handler      { return n }
