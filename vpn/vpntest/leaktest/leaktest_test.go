package leaktest

import (
	"bytes"
	"fmt"
	"strings"
	"testing"
	"time"
)

// recorder is a testing.TB that keeps its cleanups and errors, so that a
// test can see what Check would report.
type recorder struct {
	testing.TB
	cleanups []func()
	errors   []string
}

func (r *recorder) Helper()                   {}
func (r *recorder) Cleanup(f func())          { r.cleanups = append(r.cleanups, f) }
func (r *recorder) Errorf(f string, a ...any) { r.errors = append(r.errors, fmt.Sprintf(f, a...)) }

// end runs the cleanups, the last registered first, as testing does.
func (r *recorder) end() {
	for i := len(r.cleanups) - 1; i >= 0; i-- {
		r.cleanups[i]()
	}
}

func blocked(stop <-chan struct{}) { <-stop }

func TestCheck(t *testing.T) {
	for _, tc := range []struct {
		name   string
		ignore []string
		run    func(r *recorder, stop chan struct{})
		leaked bool
	}{
		{"none started", nil, func(*recorder, chan struct{}) {}, false},
		{"ended by a later cleanup", nil, func(r *recorder, stop chan struct{}) {
			go blocked(stop)
			r.Cleanup(func() { close(stop) })
		}, false},
		{"ends soon after the test", nil, func(r *recorder, stop chan struct{}) {
			go blocked(stop)
			time.AfterFunc(20*time.Millisecond, func() { close(stop) })
		}, false},
		{"left running", nil, func(r *recorder, stop chan struct{}) {
			go blocked(stop)
			t.Cleanup(func() { close(stop) }) // after the check
		}, true},
		{"left running, ignored", []string{"github.com/obvpn/obvpn/vpn/vpntest/leaktest.blocked"}, func(r *recorder, stop chan struct{}) {
			go blocked(stop)
			t.Cleanup(func() { close(stop) })
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := &recorder{TB: t}
			checkWithin(r, 200*time.Millisecond, tc.ignore)
			tc.run(r, make(chan struct{}))
			r.end()
			if got := len(r.errors) > 0; got != tc.leaked {
				t.Fatalf("reported a leak: %v, want %v: %q", got, tc.leaked, r.errors)
			}
			if tc.leaked && !strings.Contains(r.errors[0], "leaktest.blocked") {
				t.Errorf("the report does not show the leaked goroutine's stack:\n%s", r.errors[0])
			}
		})
	}
}

// TestCheckMain: the check that Main runs after the tests writes the
// leaked goroutines' stacks and returns 1; 0 when there are none.
func TestCheckMain(t *testing.T) {
	before := ids(snapshot())
	var out bytes.Buffer
	if code := check(&out, before, nil); code != 0 || out.Len() > 0 {
		t.Fatalf("nothing started: code %d, output %q", code, out.String())
	}
}

func TestParse(t *testing.T) {
	const dump = "goroutine 1 [running]:\nmain.main()\n\t/src/main.go:10 +0x1d\n\n" +
		"goroutine 17 [chan receive]:\npkg.worker(0xc000010000)\n\t/src/pkg.go:5 +0x2a\n" +
		"created by pkg.Start in goroutine 1\n\t/src/pkg.go:3 +0x4f\n"
	gs := parse(dump)
	if len(gs) != 2 || gs[0].id != 1 || gs[1].id != 17 {
		t.Fatalf("got %+v", gs)
	}
	for _, tc := range []struct {
		name string
		want bool
	}{
		{"pkg.worker", true},
		{"pkg.Start", true}, // the "created by" line
		{"pkg.Other", false},
		{"/src/pkg.go", false}, // file lines are not functions
	} {
		if got := gs[1].runs([]string{tc.name}); got != tc.want {
			t.Errorf("runs(%q) = %v, want %v", tc.name, got, tc.want)
		}
	}
}
