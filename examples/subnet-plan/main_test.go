package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/obvpn/obvpn/subnet"
)

// TestSeed prints the seed's plan, 10.240.0.0/12 cut into /20s, and checks
// its numbers in the table.
func TestSeed(t *testing.T) {
	var out, errs bytes.Buffer
	if code := run([]string{"-bits", "20", "-count", "2"}, &out, &errs); code != 0 {
		t.Fatalf("exit status %d, want 0; stderr: %s", code, &errs)
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 4 {
		t.Fatalf("got %d lines, want a summary, a header and 2 rows:\n%s", len(lines), &out)
	}
	if want := "10.240.0.0/12 at /20: 2 of 256 instances, 4092 clients each"; lines[0] != want {
		t.Errorf("summary: got %q, want %q", lines[0], want)
	}
	for i, want := range [][]string{
		{"1", "10.240.0.0/20", "10.240.0.1", "10.240.0.2", "10.240.0.3-10.240.15.254", "10001", "20001", "4092"},
		{"2", "10.240.16.0/20", "10.240.16.1", "10.240.16.2", "10.240.16.3-10.240.31.254", "10002", "20002", "4092"},
	} {
		if got := strings.Fields(lines[2+i]); strings.Join(got, " ") != strings.Join(want, " ") {
			t.Errorf("row %d: got %q, want %q", i+1, got, want)
		}
	}
}

// TestDefaultBits leaves -bits out: four instances of a /12 get the
// shortest length OpenVPN takes, /16.
func TestDefaultBits(t *testing.T) {
	var out, errs bytes.Buffer
	if code := run([]string{"-json"}, &out, &errs); code != 0 {
		t.Fatalf("exit status %d, want 0; stderr: %s", code, &errs)
	}
	var got []subnet.Instance
	if err := json.Unmarshal(out.Bytes(), &got); err != nil {
		t.Fatalf("output is not a JSON array of instances: %v\n%s", err, &out)
	}
	if len(got) != 4 {
		t.Fatalf("got %d instances, want 4", len(got))
	}
	if s := got[3].Subnet.String(); s != "10.243.0.0/16" {
		t.Errorf("instance 4: got %s, want 10.243.0.0/16", s)
	}
}

func TestBadInput(t *testing.T) {
	for _, tt := range []struct {
		name string
		args []string
	}{
		{"unknown flag", []string{"-nope"}},
		{"argument", []string{"extra"}},
		{"base", []string{"-base", "10.240.0.0"}},
		{"host bits", []string{"-base", "10.240.1.0/12"}},
		{"too long", []string{"-bits", "30"}},
		{"too many", []string{"-bits", "20", "-count", "257"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var out, errs bytes.Buffer
			if code := run(tt.args, &out, &errs); code != 2 {
				t.Errorf("exit status %d, want 2", code)
			}
			if errs.Len() == 0 {
				t.Error("nothing on stderr")
			}
		})
	}
}
