// Package leaktest checks that tests leave no goroutines behind.
//
// [Check] does it for one test, [Main] for a package's whole run from its
// TestMain. Both note the goroutines running at the start and, at the end,
// wait up to [Timeout] for every goroutine started since to end: a
// goroutine that is told to stop needs a moment to notice, and there is no
// event that says "the last one has gone", so this is a poll, with a
// deadline. The ones still running then are reported with their stacks.
//
// It counts goroutines only; descriptors, processes and files are the
// tests' own business. It does not tell apart the goroutines of tests that
// run in parallel: use [Check] in tests that do not call t.Parallel, or
// [Main] for the lot.
package leaktest

import (
	"fmt"
	"io"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Timeout is how long [Check] and [Main] wait for the goroutines started
// during a test to end.
const Timeout = 10 * time.Second

// pollEvery is how often the goroutines are listed while waiting.
const pollEvery = 10 * time.Millisecond

// alwaysIgnored are functions whose goroutines are not a test's leak:
// other tests' runners (subtests, parallel tests), and the signal loop that
// the first signal.Notify starts for the rest of the process.
var alwaysIgnored = []string{
	"testing.tRunner",
	"testing.runFuzzing",
	"os/signal.loop",
	"os/signal.signal_recv",
}

// Check notes the goroutines running now and, when tb's test and its
// subtests have ended (in a tb.Cleanup registered now, so it runs after
// the cleanups registered later), waits up to [Timeout] for every
// goroutine started since to end. It fails tb with the stacks of those
// still running then. A goroutine with a frame (or a "created by" line)
// whose function name begins with one of ignore is not counted: for
// goroutines that a package starts once and keeps on purpose.
func Check(tb testing.TB, ignore ...string) {
	tb.Helper()
	checkWithin(tb, Timeout, ignore)
}

func checkWithin(tb testing.TB, timeout time.Duration, ignore []string) {
	tb.Helper()
	before := ids(snapshot())
	tb.Cleanup(func() {
		tb.Helper()
		if left := wait(before, timeout, ignore); len(left) > 0 {
			tb.Errorf("%s", report(left, timeout))
		}
	})
}

// Main runs the tests of m and then, when they passed, checks as [Check]
// does that they left no goroutine behind. It returns the exit code for
// TestMain to pass to os.Exit: m's, or 1 when goroutines remain, whose
// stacks it then writes to os.Stderr.
//
//	func TestMain(m *testing.M) { os.Exit(leaktest.Main(m)) }
func Main(m *testing.M, ignore ...string) int {
	before := ids(snapshot())
	code := m.Run()
	if code != 0 {
		return code
	}
	return check(os.Stderr, before, ignore)
}

func check(w io.Writer, before map[int64]bool, ignore []string) int {
	left := wait(before, Timeout, ignore)
	if len(left) == 0 {
		return 0
	}
	fmt.Fprintln(w, "FAIL:", report(left, Timeout))
	return 1
}

func report(left []goroutine, timeout time.Duration) string {
	var b strings.Builder
	fmt.Fprintf(&b, "leaktest: %d goroutine(s) still running %v after the test:", len(left), timeout)
	for _, g := range left {
		b.WriteString("\n\n")
		b.WriteString(g.stack)
	}
	return b.String()
}

// wait polls until no goroutine other than those of before and the
// ignored ones runs, or timeout passes, and returns those left.
func wait(before map[int64]bool, timeout time.Duration, ignore []string) []goroutine {
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(pollEvery)
	defer tick.Stop()
	for {
		left := extra(snapshot(), before, ignore)
		if len(left) == 0 || time.Now().After(deadline) {
			return left
		}
		<-tick.C
	}
}

type goroutine struct {
	id    int64
	stack string // as runtime.Stack writes it, header included
}

func ids(gs []goroutine) map[int64]bool {
	m := make(map[int64]bool, len(gs))
	for _, g := range gs {
		m[g.id] = true
	}
	return m
}

func extra(gs []goroutine, before map[int64]bool, ignore []string) []goroutine {
	return slices.DeleteFunc(gs, func(g goroutine) bool {
		return before[g.id] || g.runs(alwaysIgnored) || g.runs(ignore)
	})
}

// runs reports whether a function of g's stack, or the one that created
// g, begins with one of names.
func (g goroutine) runs(names []string) bool {
	for line := range strings.Lines(g.stack) {
		if strings.HasPrefix(line, "\t") || strings.HasPrefix(line, "goroutine ") {
			continue
		}
		fn := strings.TrimPrefix(line, "created by ")
		for _, n := range names {
			if strings.HasPrefix(fn, n) {
				return true
			}
		}
	}
	return false
}

// snapshot lists every goroutine with its stack.
func snapshot() []goroutine {
	buf := make([]byte, 64<<10)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	return parse(string(buf))
}

// parse reads the output of runtime.Stack: blocks separated by blank
// lines, each beginning "goroutine <id> [<state>]:".
func parse(dump string) []goroutine {
	var gs []goroutine
	for block := range strings.SplitSeq(dump, "\n\n") {
		rest, ok := strings.CutPrefix(block, "goroutine ")
		if !ok {
			continue
		}
		num, _, _ := strings.Cut(rest, " ")
		id, err := strconv.ParseInt(num, 10, 64)
		if err != nil {
			continue
		}
		gs = append(gs, goroutine{id: id, stack: strings.TrimRight(block, "\n")})
	}
	return gs
}
