package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// statusGlob copies a status file that OpenVPN 2.6 wrote (version 2) into
// a temporary directory as server-1.status and returns the glob that
// matches it.
func statusGlob(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("../../nss/testdata/openvpn-2.6-v2.status")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "server-1.status"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	return filepath.Join(dir, "server-*.status")
}

func TestLookup(t *testing.T) {
	glob := statusGlob(t)
	for _, tt := range []struct {
		name   string
		args   []string
		status int
		out    string
		errs   string
	}{
		{
			name: "found",
			args: []string{"0123456789abcdef0123456789abcdef.vpn", "FEDCBA9876543210FEDCBA9876543210"},
			out:  "0123456789abcdef0123456789abcdef.vpn 10.240.32.3\nFEDCBA9876543210FEDCBA9876543210 10.240.32.4\n",
		},
		{
			name:   "not found",
			args:   []string{"ffffffffffffffffffffffffffffffff.vpn", "0123456789abcdef0123456789abcdef.vpn"},
			status: 1,
			out:    "0123456789abcdef0123456789abcdef.vpn 10.240.32.3\n",
			errs:   "lookup: ffffffffffffffffffffffffffffffff.vpn: nss: no such device connected",
		},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var out, errs bytes.Buffer
			status := run(append([]string{"-glob", glob}, tt.args...), &out, &errs)
			if status != tt.status {
				t.Errorf("exit status %d, want %d; stderr: %s", status, tt.status, &errs)
			}
			if out.String() != tt.out {
				t.Errorf("stdout: got %q, want %q", &out, tt.out)
			}
			if !strings.Contains(errs.String(), tt.errs) {
				t.Errorf("stderr: got %q, want it to contain %q", &errs, tt.errs)
			}
		})
	}
}

func TestClients(t *testing.T) {
	var out, errs bytes.Buffer
	if status := run([]string{"-glob", statusGlob(t), "-clients"}, &out, &errs); status != 0 {
		t.Fatalf("exit status %d, want 0; stderr: %s", status, &errs)
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 3 {
		t.Fatalf("got %d lines, want a header and 2 clients:\n%s", len(lines), &out)
	}
	for i, want := range [][]string{
		{"1", "0123456789abcdef0123456789abcdef", "10.240.32.3", "127.0.0.1:37224"},
		{"1", "FEDCBA9876543210fedcba9876543210", "10.240.32.4", "127.0.0.1:37230"},
	} {
		if got := strings.Fields(lines[1+i]); len(got) < 4 || strings.Join(got[:4], " ") != strings.Join(want, " ") {
			t.Errorf("client %d: got %q, want it to start with %q", i+1, got, want)
		}
	}
}

func TestUsage(t *testing.T) {
	for _, args := range [][]string{nil, {"-nope"}} {
		var out, errs bytes.Buffer
		if status := run(args, &out, &errs); status != 2 {
			t.Errorf("%q: exit status %d, want 2", args, status)
		}
	}
}
