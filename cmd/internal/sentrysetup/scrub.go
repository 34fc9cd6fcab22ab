package sentrysetup

import (
	"cmp"
	"regexp"
	"slices"
	"strings"

	"github.com/getsentry/sentry-go"
)

// Filtered replaces what the Scrubber removes.
const Filtered = "[Filtered]"

// Scrubber removes keys, passwords and tokens from what goes into an
// event:
//
//   - the values it was given (the service and guest API keys, the
//     monitoring token, the DSN's key), wherever they appear;
//   - credentials after "Bearer " and "Basic ";
//   - the user information of URLs ("https://user:password@host");
//   - query parameters and JSON fields named like a key, token, password
//     or secret ("?apikey=…", `"password":"…"`);
//   - the whole value of an attribute whose name speaks of a key, token,
//     password, passphrase, secret, credential, cookie, DSN or
//     authorization ([SecretName]);
//   - an event's request (the SDK's own; this package sets none) and
//     user.
type Scrubber struct {
	secrets []string // longest first, so that none is left half replaced
}

// MinSecretLen is the length below which NewScrubber ignores a value:
// replacing every "k" or "test" would make the events unreadable, and
// such a value guards nothing.
const MinSecretLen = 6

// NewScrubber returns a Scrubber that also removes the given values.
// Values shorter than MinSecretLen are ignored.
func NewScrubber(secrets ...string) *Scrubber {
	s := &Scrubber{}
	for _, v := range secrets {
		if len(v) >= MinSecretLen && !slices.Contains(s.secrets, v) {
			s.secrets = append(s.secrets, v)
		}
	}
	slices.SortFunc(s.secrets, func(a, b string) int { return cmp.Compare(len(b), len(a)) })
	return s
}

var (
	// Bearer and Basic credentials, in headers and in error texts.
	authScheme = regexp.MustCompile(`(?i)\b(bearer|basic)([ \t]+)[A-Za-z0-9._~+/=-]+`)
	// scheme://userinfo@ in URLs.
	userinfo = regexp.MustCompile(`(?i)\b([a-z][a-z0-9+.-]*://)[^/?#\s@"']+@`)
	// Query parameters and form fields with secret names.
	secretParam = regexp.MustCompile(`(?i)([?&;](?:[a-z0-9_.-]*(?:key|token|password|passwd|secret|signature|auth)[a-z0-9_.-]*)=)[^&;#\s"']*`)
	// JSON fields with secret names.
	secretField = regexp.MustCompile(`(?i)("(?:[a-z0-9_.-]*(?:key|token|password|passwd|secret|authorization)[a-z0-9_.-]*)"\s*:\s*)"(?:[^"\\]|\\.)*"`)
)

// secretWords are the parts of an attribute's or header's name that make
// its value a secret.
var secretWords = []string{"key", "token", "password", "passwd", "passphrase", "secret", "credential", "cookie", "dsn", "authorization"}

// SecretName reports whether an attribute or header named name holds a
// secret: its name, in any case, contains "key", "token", "password",
// "passwd", "passphrase", "secret", "credential", "cookie", "dsn" or
// "authorization".
func SecretName(name string) bool {
	name = strings.ToLower(name)
	for _, w := range secretWords {
		if strings.Contains(name, w) {
			return true
		}
	}
	return false
}

// String returns s without the secrets it holds.
func (s *Scrubber) String(v string) string {
	if v == "" {
		return v
	}
	for _, sec := range s.secrets {
		v = strings.ReplaceAll(v, sec, Filtered)
	}
	v = authScheme.ReplaceAllString(v, "${1}${2}"+Filtered)
	v = userinfo.ReplaceAllString(v, "${1}"+Filtered+"@")
	v = secretParam.ReplaceAllString(v, "${1}"+Filtered)
	v = secretField.ReplaceAllString(v, `${1}"`+Filtered+`"`)
	return v
}

// Event scrubs every text of ev that can carry data of the program's:
// the message, the exceptions, the tags, the contexts' strings, the
// breadcrumbs; it drops the request and the user. It returns ev.
func (s *Scrubber) Event(ev *sentry.Event) *sentry.Event {
	if ev == nil {
		return nil
	}
	ev.Message = s.String(ev.Message)
	for i := range ev.Exception {
		ev.Exception[i].Value = s.String(ev.Exception[i].Value)
	}
	for k, v := range ev.Tags {
		if SecretName(k) {
			ev.Tags[k] = Filtered
		} else {
			ev.Tags[k] = s.String(v)
		}
	}
	for _, c := range ev.Contexts {
		s.context(c)
	}
	for _, b := range ev.Breadcrumbs {
		b.Message = s.String(b.Message)
		s.context(b.Data)
	}
	ev.Request = nil
	ev.User = sentry.User{}
	return ev
}

// context scrubs a context's values in place.
func (s *Scrubber) context(c map[string]any) {
	for k, v := range c {
		if SecretName(k) {
			c[k] = Filtered
			continue
		}
		switch v := v.(type) {
		case string:
			c[k] = s.String(v)
		case map[string]any:
			s.context(v)
		case []string:
			out := make([]string, len(v))
			for i := range v {
				out[i] = s.String(v[i])
			}
			c[k] = out
		}
	}
}
