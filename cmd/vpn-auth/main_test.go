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
	"time"

	"github.com/obvpn/obvpn/vpn/internalapi"
)

const device = "0123456789abcdef0123456789abcdef"

type allowOne struct{}

func (allowOne) Authenticate(_ context.Context, uuid, key string) (bool, error) {
	return uuid == device && key == "right-key", nil
}

func TestVPNAuth(t *testing.T) {
	srv := httptest.NewServer(&internalapi.Server{Auth: allowOne{}})
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
		{"no API", nil, nil, 3, "usage"},
		{"too many arguments", []string{"-api", srv.URL, "a", "b"}, nil, 3, "usage"},
		{"bad flag", []string{"-api", srv.URL, "-nope"}, nil, 3, "not defined"},
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

// TestVPNAuthDeferred: with OpenVPN's auth_control_file, vpn-auth hands
// the check to the internal API and exits 2 at once, and the API writes
// the decision into the file; -sync, a server without deferral and a file
// the server refuses get the synchronous answer (exit 0 or 1).
func TestVPNAuthDeferred(t *testing.T) {
	dir := t.TempDir()
	api := &internalapi.Server{Auth: allowOne{}, ControlDir: dir}
	t.Cleanup(api.Close)
	srv := httptest.NewServer(api)
	t.Cleanup(srv.Close)
	old := httptest.NewServer(&internalapi.Server{Auth: allowOne{}})
	t.Cleanup(old.Close)
	n := 0
	acf := func() string {
		n++
		f := filepath.Join(dir, fmt.Sprintf("openvpn_acf_%016x.tmp", n))
		if err := os.WriteFile(f, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		return f
	}
	creds := filepath.Join(t.TempDir(), "openvpn_up_1.tmp")
	if err := os.WriteFile(creds, []byte(device+"\nright-key\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name     string
		args     []string
		user     string
		key      string
		acf      string
		code     int
		decision string // what the file holds in the end
	}{
		{"allowed", []string{"-api", srv.URL}, device, "right-key", acf(), 2, "1"},
		{"denied", []string{"-api", srv.URL}, device, "wrong-key", acf(), 2, "0"},
		{"via-file", []string{"-api", srv.URL, creds}, "", "", acf(), 2, "1"},
		{"-sync", []string{"-api", srv.URL, "-sync"}, device, "right-key", acf(), 0, ""},
		{"-sync denied", []string{"-api", srv.URL, "-sync"}, device, "wrong-key", acf(), 1, ""},
		{"server without deferral", []string{"-api", old.URL}, device, "right-key", acf(), 0, ""},
		{"server without deferral, denied", []string{"-api", old.URL}, device, "wrong-key", acf(), 1, ""},
		{"file refused", []string{"-api", srv.URL}, device, "right-key", filepath.Join(t.TempDir(), "openvpn_acf_x.tmp"), 0, ""},
		{"API down", []string{"-api", "http://127.0.0.1:1"}, device, "right-key", acf(), 1, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			env := map[string]string{"auth_control_file": tt.acf}
			if tt.user != "" {
				env["username"], env["password"] = tt.user, tt.key
			}
			var stderr bytes.Buffer
			if code := run(tt.args, func(k string) string { return env[k] }, &stderr); code != tt.code {
				t.Fatalf("exit %d, want %d; stderr %q", code, tt.code, stderr.String())
			}
			if strings.Contains(stderr.String(), "-key") {
				t.Errorf("stderr shows a key: %q", stderr.String())
			}
			if tt.decision == "" {
				if b, _ := os.ReadFile(tt.acf); len(b) != 0 {
					t.Errorf("answered synchronously, yet the file holds %q", b)
				}
				return
			}
			deadline := time.Now().Add(5 * time.Second)
			for {
				b, _ := os.ReadFile(tt.acf)
				if string(b) == tt.decision {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("the control file holds %q, want %q", b, tt.decision)
				}
				time.Sleep(5 * time.Millisecond) // OpenVPN polls the file too
			}
		})
	}
}
