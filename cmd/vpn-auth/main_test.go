package main

import (
	"bytes"
	"context"
	"fmt"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/obvpn/obvpn/vpn"
)

const device = "0123456789abcdef0123456789abcdef"

type allowOne struct{}

func (allowOne) Authenticate(_ context.Context, uuid, key string) (bool, error) {
	return uuid == device && key == "right-key", nil
}

func TestVPNAuth(t *testing.T) {
	srv := httptest.NewServer(&vpn.InternalAPI{Auth: allowOne{}})
	t.Cleanup(srv.Close)
	dir := t.TempDir()
	n := 0
	file := func(content string) string {
		n++
		f := filepath.Join(dir, fmt.Sprintf("credentials-%d", n))
		if err := os.WriteFile(f, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return f
	}
	env := func(m map[string]string) func(string) string { return func(k string) string { return m[k] } }
	tests := []struct {
		name   string
		args   []string
		env    map[string]string
		code   int
		stderr string
	}{
		{"via-env allowed", []string{"-api", srv.URL}, map[string]string{"username": device, "password": "right-key"}, 0, ""},
		{"via-env denied", []string{"-api", srv.URL}, map[string]string{"username": device, "password": "wrong-key"}, 1, "vpn-auth: device " + device + " denied\n"},
		{"via-env missing", []string{"-api", srv.URL}, nil, 1, "denied"},
		{"via-file allowed", []string{"-api", srv.URL, file(device + "\nright-key\n")}, nil, 0, ""},
		{"via-file CRLF", []string{"-api", srv.URL, file(device + "\r\nright-key\r\n")}, nil, 0, ""},
		{"via-file denied", []string{"-api", srv.URL, file(device + "\nwrong-key\n")}, nil, 1, "denied"},
		{"via-file one line", []string{"-api", srv.URL, file(device + "\n")}, nil, 1, "two lines"},
		{"via-file missing", []string{"-api", srv.URL, filepath.Join(dir, "nope")}, nil, 1, "no such file"},
		{"key in the user name is not printed", []string{"-api", srv.URL}, map[string]string{"username": "secret key", "password": "x"}, 1, "(malformed user name)"},
		{"API down", []string{"-api", "http://127.0.0.1:1"}, map[string]string{"username": device, "password": "right-key"}, 1, "connection refused"},
		{"no API", nil, nil, 2, "usage"},
		{"too many arguments", []string{"-api", srv.URL, "a", "b"}, nil, 2, "usage"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stderr bytes.Buffer
			if code := run(tt.args, env(tt.env), &stderr); code != tt.code {
				t.Errorf("exit %d, want %d; stderr %q", code, tt.code, stderr.String())
			}
			if !strings.Contains(stderr.String(), tt.stderr) {
				t.Errorf("stderr %q lacks %q", stderr.String(), tt.stderr)
			}
			if strings.Contains(stderr.String(), "right-key") || strings.Contains(stderr.String(), "wrong-key") {
				t.Errorf("stderr shows a key: %q", stderr.String())
			}
		})
	}
}
