package sentrysetup

import (
	"testing"

	"github.com/getsentry/sentry-go"
)

func TestScrubberString(t *testing.T) {
	s := NewScrubber("SECRET-service-key", "SECRET-service", "", "k")
	tests := []struct{ name, in, want string }{
		{"plain, and a short value is no secret", "dial tcp 127.0.0.1:80: connection refused (keep-alive)", "dial tcp 127.0.0.1:80: connection refused (keep-alive)"},
		{"a known secret, the longest first", "key SECRET-service-key and SECRET-service", "key [Filtered] and [Filtered]"},
		{"bearer", "Authorization: Bearer SECRETtok.en_1/2+3=", "Authorization: Bearer [Filtered]"},
		{"basic", "proxy-authorization: basic U0VDUkVUOnBhc3M=", "proxy-authorization: basic [Filtered]"},
		{"userinfo", `Get "https://user:SECRETpass@api.example.com/v7/device": EOF`, `Get "https://[Filtered]@api.example.com/v7/device": EOF`},
		{"user only", "http://SECRETpublic@127.0.0.1:9000/1", "http://[Filtered]@127.0.0.1:9000/1"},
		{"query", "/v7/device?apikey=SECRETq&$select=id", "/v7/device?apikey=[Filtered]&$select=id"},
		{"query token", "/x?a=1&access_token=SECRETt#f", "/x?a=1&access_token=[Filtered]#f"},
		{"json", `{"username":"abc","password":"SECRET \"pw\"","api_key" : "SECRETk"}`, `{"username":"abc","password":"[Filtered]","api_key" : "[Filtered]"}`},
		{"an e-mail is not a URL", "ops@example.com", "ops@example.com"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := s.String(tt.in); got != tt.want {
				t.Errorf("got %q, want %q", got, tt.want)
			}
		})
	}
}

func TestSecretName(t *testing.T) {
	for name, want := range map[string]bool{
		"api_key": true, "VPN_SERVICE_API_KEY": true, "Authorization": true, "Proxy-Authorization": true,
		"token": true, "password": true, "secret": true, "Cookie": true, "dsn": true, "credentials": true,
		"uuid": false, "err": false, "instance": false, "status": false, "fingerprint": false, "addr": false,
	} {
		if got := SecretName(name); got != want {
			t.Errorf("SecretName(%q) = %v, want %v", name, got, want)
		}
	}
}

func TestScrubberEvent(t *testing.T) {
	s := NewScrubber("SECRET")
	ev := sentry.NewEvent()
	ev.Message = "x SECRET"
	ev.Exception = []sentry.Exception{{Type: "*errors.errorString", Value: "y SECRET"}}
	ev.Tags = map[string]string{"uuid": "SECRET", "api_key": "z"}
	ev.Contexts["log"] = map[string]any{"a": "SECRET", "token": 42, "n": map[string]any{"b": "SECRET"}, "l": []string{"SECRET"}}
	ev.Breadcrumbs = []*sentry.Breadcrumb{{Message: "SECRET", Data: map[string]any{"c": "SECRET"}}}
	ev.Request = &sentry.Request{URL: "http://h/", Headers: map[string]string{"Authorization": "Bearer SECRET"}}
	ev.User = sentry.User{IPAddress: "192.0.2.1"}
	s.Event(ev)
	if ev.Message != "x [Filtered]" || ev.Exception[0].Value != "y [Filtered]" || ev.Tags["uuid"] != Filtered || ev.Tags["api_key"] != Filtered {
		t.Errorf("not scrubbed: %q %q %v", ev.Message, ev.Exception[0].Value, ev.Tags)
	}
	log := ev.Contexts["log"]
	if log["a"] != Filtered || log["token"] != Filtered || log["n"].(map[string]any)["b"] != Filtered || log["l"].([]string)[0] != Filtered {
		t.Errorf("context not scrubbed: %v", log)
	}
	if ev.Breadcrumbs[0].Message != Filtered || ev.Breadcrumbs[0].Data["c"] != Filtered {
		t.Errorf("breadcrumb not scrubbed: %+v", ev.Breadcrumbs[0])
	}
	if ev.Request != nil || ev.User.IPAddress != "" {
		t.Errorf("request or user kept: %+v %+v", ev.Request, ev.User)
	}
	if s.Event(nil) != nil {
		t.Error("nil event")
	}
}

func FuzzScrubber(f *testing.F) {
	f.Add("https://u:SECRET@h/?key=SECRET Bearer SECRET")
	f.Add(`{"password":"SECRET"}`)
	s := NewScrubber("SECRET")
	f.Fuzz(func(t *testing.T, in string) {
		out := s.String(in)
		if s.String(out) != out {
			t.Errorf("not idempotent: %q -> %q -> %q", in, out, s.String(out))
		}
	})
}
