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
	var stops, hards []os.Signal
	h := Handler{Level: level, Stop: func(s os.Signal) { stops = append(stops, s) }, Hard: func(s os.Signal) { hards = append(hards, s) }}
	sigs := make(chan os.Signal, 8)
	for _, s := range []os.Signal{syscall.SIGUSR2, syscall.SIGTERM, syscall.SIGUSR2, syscall.SIGUSR2, syscall.SIGINT, syscall.SIGTERM} {
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
