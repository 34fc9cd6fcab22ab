package bandwidth

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// Rate is a bandwidth in bits per second, written as tc writes it:
// <n>kbit, <n>mbit or <n>gbit (1 kbit = 1000 bit/s). The zero Rate means no
// limit.
type Rate uint64

// ErrRateSyntax reports a rate that is not <n>kbit, <n>mbit or <n>gbit.
var ErrRateSyntax = errors.New("want <n>kbit, <n>mbit or <n>gbit with n a positive integer")

var rateUnits = [...]struct {
	suffix string
	mult   uint64
}{{"gbit", 1e9}, {"mbit", 1e6}, {"kbit", 1e3}}

// ParseRate parses <n>kbit, <n>mbit or <n>gbit (case-insensitive) with n a
// positive decimal integer. The error wraps [ErrRateSyntax].
func ParseRate(s string) (Rate, error) {
	lower := strings.ToLower(s)
	for _, u := range rateUnits {
		num, ok := strings.CutSuffix(lower, u.suffix)
		if !ok {
			continue
		}
		// ParseUint accepts neither signs nor spaces; underscores only with
		// base 0, which is not used here.
		n, err := strconv.ParseUint(num, 10, 64)
		if err != nil || n == 0 {
			break
		}
		if n > (1<<64-1)/u.mult {
			return 0, fmt.Errorf("rate %q: too large", s)
		}
		return Rate(n * u.mult), nil
	}
	return 0, fmt.Errorf("rate %q: %w", s, ErrRateSyntax)
}

// String returns the rate in the largest unit that divides it exactly, as
// tc accepts it: "10mbit", "1500kbit". The zero Rate is "0kbit"; a rate
// below 1 kbit/s or not a whole number of kbit is given in "bit".
func (r Rate) String() string {
	for _, u := range rateUnits {
		if r != 0 && uint64(r)%u.mult == 0 {
			return strconv.FormatUint(uint64(r)/u.mult, 10) + u.suffix
		}
	}
	if r == 0 {
		return "0kbit"
	}
	return strconv.FormatUint(uint64(r), 10) + "bit"
}
