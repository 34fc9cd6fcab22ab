package bandwidth

import (
	"errors"
	"testing"
)

func TestParseRate(t *testing.T) {
	tests := []struct {
		in   string
		want Rate
		str  string
	}{
		{"1kbit", 1000, "1kbit"},
		{"512kbit", 512_000, "512kbit"},
		{"1500kbit", 1_500_000, "1500kbit"},
		{"1000kbit", 1_000_000, "1mbit"},
		{"10mbit", 10_000_000, "10mbit"},
		{"10MBit", 10_000_000, "10mbit"},
		{"2gbit", 2_000_000_000, "2gbit"},
		{"18446744073gbit", 18_446_744_073_000_000_000, "18446744073gbit"},
	}
	for _, tt := range tests {
		got, err := ParseRate(tt.in)
		if err != nil || got != tt.want {
			t.Errorf("ParseRate(%q) = %d, %v; want %d", tt.in, got, err, tt.want)
		}
		if got.String() != tt.str {
			t.Errorf("Rate(%d).String() = %q, want %q", got, got.String(), tt.str)
		}
	}
	for _, bad := range []string{"", "10", "mbit", "0kbit", "-1mbit", "+1mbit", "1.5mbit", "10mb", "10 mbit",
		"10mbits", "1e3kbit", "0x10kbit", "10kbps", "18446744074gbit", "99999999999999999999kbit"} {
		if r, err := ParseRate(bad); err == nil {
			t.Errorf("ParseRate(%q) = %d, want an error", bad, r)
		}
	}
	if _, err := ParseRate("10mb"); !errors.Is(err, ErrRateSyntax) {
		t.Errorf("ParseRate(10mb): %v is not ErrRateSyntax", err)
	}
	if s := Rate(0).String(); s != "0kbit" {
		t.Errorf("Rate(0) = %q", s)
	}
	if s := Rate(1234).String(); s != "1234bit" {
		t.Errorf("Rate(1234) = %q", s)
	}
}
