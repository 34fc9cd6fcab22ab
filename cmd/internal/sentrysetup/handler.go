package sentrysetup

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"

	"github.com/getsentry/sentry-go"
)

// Handler returns a slog.Handler that passes every record on to next and
// sends those at warn level or above that carry a [FingerprintKey]
// attribute (with a non-empty string value, in a group or not) to Sentry; see the package
// comment for what an event holds. Records below warn level are never
// sent. When r sends nothing (no DSN), Handler returns next itself.
//
// The logger name of the events is logger (such as "open-balena-vpn").
func (r *Reporter) Handler(next slog.Handler, logger string) slog.Handler {
	if !r.Enabled() {
		return next
	}
	return &handler{next: next, r: r, logger: logger}
}

// handler is Reporter.Handler's slog.Handler.
type handler struct {
	next   slog.Handler
	r      *Reporter
	logger string
	attrs  []slog.Attr // from WithAttrs, their keys qualified by the groups
	group  string      // the groups so far, "a.b." or ""
}

// minLevel is the lowest level that is sent; maxErrorDepth bounds the
// errors of a chain in an event.
const (
	minLevel      = slog.LevelWarn
	maxErrorDepth = 10
)

func (h *handler) Enabled(ctx context.Context, l slog.Level) bool {
	return l >= minLevel || h.next.Enabled(ctx, l)
}

func (h *handler) Handle(ctx context.Context, rec slog.Record) error {
	if rec.Level >= minLevel {
		h.report(rec)
	}
	if !h.next.Enabled(ctx, rec.Level) {
		return nil
	}
	return h.next.Handle(ctx, rec)
}

func (h *handler) WithAttrs(as []slog.Attr) slog.Handler {
	c := *h
	c.next = h.next.WithAttrs(as)
	c.attrs = slices.Clip(h.attrs)
	for _, a := range as {
		c.attrs = append(c.attrs, slog.Attr{Key: h.group + a.Key, Value: a.Value})
	}
	return &c
}

func (h *handler) WithGroup(name string) slog.Handler {
	if name == "" {
		return h
	}
	c := *h
	c.next = h.next.WithGroup(name)
	c.group = h.group + name + "."
	return &c
}

// report sends rec if it carries a fingerprint.
func (h *handler) report(rec slog.Record) {
	attrs := slices.Clone(h.attrs)
	rec.Attrs(func(a slog.Attr) bool {
		attrs = append(attrs, slog.Attr{Key: h.group + a.Key, Value: a.Value})
		return true
	})
	var fingerprint string
	var err error
	for _, a := range attrs {
		// The attributes' own names, whatever group holds them.
		switch a.Key[strings.LastIndex(a.Key, ".")+1:] {
		case FingerprintKey:
			if v := a.Value.Resolve(); v.Kind() == slog.KindString {
				fingerprint = v.String()
			}
		case "err", "error":
			if e, ok := a.Value.Resolve().Any().(error); ok {
				err = e
			}
		}
	}
	if fingerprint == "" {
		return
	}
	s := h.r.scrub
	ev := sentry.NewEvent()
	ev.Level = levelOf(rec.Level)
	ev.Message = rec.Message
	ev.Logger = h.logger
	ev.Fingerprint = []string{fingerprint}
	if !rec.Time.IsZero() {
		ev.Timestamp = rec.Time
	}
	if err != nil {
		ev.SetException(err, maxErrorDepth)
	}
	fields := map[string]any{}
	for _, a := range attrs {
		flatten(fields, a.Key, a.Value)
	}
	ev.Tags = map[string]string{FingerprintKey: fingerprint}
	for _, k := range TagKeys {
		if v, ok := fields[k]; ok {
			ev.Tags[k] = fmt.Sprint(v)
		}
	}
	ev.Contexts["log"] = fields
	h.r.capture(s.Event(ev))
}

// flatten puts the attribute's value into fields under key, a group's
// members under "key.member", as JSON-friendly values: strings, numbers
// and booleans; errors, durations, times and everything else as text.
// LogValuers are resolved first, so that a value that hides its secrets
// from logs (vpn.Config) hides them here too.
func flatten(fields map[string]any, key string, v slog.Value) {
	v = v.Resolve()
	switch v.Kind() {
	case slog.KindGroup:
		prefix := key + "."
		if key == "" {
			prefix = ""
		}
		for _, a := range v.Group() {
			flatten(fields, prefix+a.Key, a.Value)
		}
		return
	case slog.KindString:
		fields[key] = v.String()
	case slog.KindInt64:
		fields[key] = v.Int64()
	case slog.KindUint64:
		fields[key] = v.Uint64()
	case slog.KindFloat64:
		fields[key] = v.Float64()
	case slog.KindBool:
		fields[key] = v.Bool()
	case slog.KindDuration:
		fields[key] = v.Duration().String()
	case slog.KindTime:
		fields[key] = v.Time().Format(time.RFC3339Nano)
	default:
		// fmt.Sprint uses Error and String, and survives their panics.
		if b, ok := v.Any().([]byte); ok {
			fields[key] = fmt.Sprintf("[%d bytes]", len(b))
		} else {
			fields[key] = fmt.Sprint(v.Any())
		}
	}
	if key == "" {
		delete(fields, key)
	}
}
