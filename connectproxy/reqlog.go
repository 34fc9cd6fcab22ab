package connectproxy

import (
	"context"
	"log/slog"
)

// reqLog logs for one CONNECT request. Its lines carry the device's uuid
// and port, as a logger made by With would, but they are added when a
// line is written: a request that logs nothing costs no logger and no
// attributes (With makes a new handler, which formats them, on every
// request).
type reqLog struct {
	l    *slog.Logger
	uuid string
	port uint16
}

// reqLog returns the log of a request for t.
func (h *Handler) reqLog(t Target) reqLog {
	return reqLog{l: h.logger(), uuid: t.UUID, port: t.Port}
}

// Enabled reports whether lines at level are written.
func (r reqLog) Enabled(level slog.Level) bool {
	return r.logger().Enabled(context.Background(), level)
}

func (r reqLog) logger() *slog.Logger {
	if r.l == nil {
		return discard
	}
	return r.l
}

// Log writes a line at level, with args after the request's uuid and
// port (none before the target is known).
func (r reqLog) Log(ctx context.Context, level slog.Level, msg string, args ...any) {
	l := r.logger()
	if !l.Enabled(ctx, level) {
		return
	}
	if r.uuid != "" {
		args = append([]any{"uuid", r.uuid, "port", r.port}, args...)
	}
	l.Log(ctx, level, msg, args...)
}

// Debug, Info and Warn write a line at their level.
func (r reqLog) Debug(msg string, args ...any) {
	r.Log(context.Background(), slog.LevelDebug, msg, args...)
}

func (r reqLog) Info(msg string, args ...any) {
	r.Log(context.Background(), slog.LevelInfo, msg, args...)
}

func (r reqLog) Warn(msg string, args ...any) {
	r.Log(context.Background(), slog.LevelWarn, msg, args...)
}
