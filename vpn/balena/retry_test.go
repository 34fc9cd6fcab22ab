package balena

import (
	"net/http"
	"testing"
	"time"
)

// FuzzRetryAfter: any Retry-After header gives a wait that is not
// negative, or none; and a wait beyond MaxRetryAfter is never retried.
func FuzzRetryAfter(f *testing.F) {
	for _, s := range []string{"1", "3600", "-1", "", " 5 ", "Fri, 31 Dec 1999 23:59:59 GMT", "99999999999999999999", "9223372036854775807", "x"} {
		f.Add(s, 503)
	}
	f.Add("1", 429)
	f.Add("1", 500)
	f.Fuzz(func(t *testing.T, v string, status int) {
		resp := &http.Response{StatusCode: status, Header: http.Header{"Retry-After": {v}}}
		d, ok := retryAfter(resp)
		if d < 0 || !ok && d != 0 {
			t.Fatalf("retryAfter(%q) = %v, %v", v, d, ok)
		}
		if ok && status != 429 && status != 503 {
			t.Fatalf("retryAfter(%q) on a %d: %v", v, status, d)
		}
		if w := backoff(retryWaitMin, retryWaitMax, 3, resp); w < 0 {
			t.Fatalf("backoff %v", w)
		}
		retry, _ := checkRetry(t.Context(), resp, nil)
		if retry && ok && d > MaxRetryAfter {
			t.Fatalf("Retry-After %q (%v) retried, beyond MaxRetryAfter", v, d)
		}
	})
}

func TestBackoff(t *testing.T) {
	for attempt, want := range []time.Duration{100 * time.Millisecond, 200 * time.Millisecond, 400 * time.Millisecond, 800 * time.Millisecond, 1600 * time.Millisecond, 2 * time.Second, 2 * time.Second} {
		if got := backoff(retryWaitMin, retryWaitMax, attempt, nil); got != want {
			t.Errorf("attempt %d: %v, want %v", attempt, got, want)
		}
	}
	if got := backoff(retryWaitMin, retryWaitMax, 1000, nil); got != retryWaitMax {
		t.Errorf("attempt 1000: %v", got)
	}
}
