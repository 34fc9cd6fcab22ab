package main

import (
	"bytes"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/obvpn/obvpn/vpn"
	"github.com/obvpn/obvpn/vpn/internalapi"
)

const device = "0123456789abcdef0123456789abcdef"

type states struct {
	mu  sync.Mutex
	log []string
}

func (s *states) Set(uuid string, st vpn.DeviceState) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.log = append(s.log, map[bool]string{true: "+", false: "-"}[st.Connected]+uuid)
}

func TestVPNClientEvent(t *testing.T) {
	st := &states{}
	srv := httptest.NewServer(&internalapi.Server{Clients: &vpn.ScriptClients{State: st}, Instances: 2})
	t.Cleanup(srv.Close)
	env := func(m map[string]string) func(string) string { return func(k string) string { return m[k] } }
	tests := []struct {
		name   string
		args   []string
		env    map[string]string
		code   int
		stderr string
	}{
		{"connect", []string{"-api", srv.URL, "-instance", "2", "/tmp/ignored-dynamic-config"},
			map[string]string{"script_type": "client-connect", "common_name": device}, 0, ""},
		{"disconnect", []string{"-api", srv.URL, "-instance", "2"},
			map[string]string{"script_type": "client-disconnect", "common_name": device, "bytes_received": "100", "bytes_sent": "200", "time_duration": "42"}, 0, ""},
		{"disconnect again is dropped", []string{"-api", srv.URL, "-instance", "2"},
			map[string]string{"script_type": "client-disconnect", "common_name": device}, 1, "400 Bad Request"},
		{"no common name", []string{"-api", srv.URL, "-instance", "1"},
			map[string]string{"script_type": "client-connect"}, 1, "400"},
		{"bad counter", []string{"-api", srv.URL, "-instance", "1"},
			map[string]string{"script_type": "client-disconnect", "common_name": device, "bytes_sent": "-1"}, 1, `bytes_sent="-1"`},
		{"unknown instance", []string{"-api", srv.URL, "-instance", "3"},
			map[string]string{"script_type": "client-connect", "common_name": device}, 1, "404"},
		{"wrong hook", []string{"-api", srv.URL, "-instance", "1"},
			map[string]string{"script_type": "up", "common_name": device}, 2, "script_type"},
		{"no instance", []string{"-api", srv.URL}, nil, 2, "usage"},
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
		})
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	if got := strings.Join(st.log, " "); got != "+"+device+" -"+device {
		t.Errorf("states %q", got)
	}
}
