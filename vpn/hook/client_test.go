package hook_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/obvpn/obvpn/vpn/hook"
)

// fakeAPI answers auth 200 for the key "good", 401 for others, and
// records the client events it gets.
func fakeAPI(t *testing.T, events *[]string) *httptest.Server {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var body map[string]any
		_ = json.NewDecoder(r.Body).Decode(&body)
		switch r.URL.Path {
		case "/api/v1/auth/":
			if body["password"] != "good" {
				w.WriteHeader(http.StatusUnauthorized)
			}
		case "/api/v2/2/clients/":
			*events = append(*events, fmt.Sprint(r.Method, " ", body["common_name"], " ", body["bytes_sent"]))
		default:
			http.NotFound(w, r)
		}
	}))
	if t != nil {
		t.Cleanup(srv.Close)
	}
	return srv
}

func TestClient(t *testing.T) {
	var events []string
	c := &hook.Client{BaseURL: fakeAPI(t, &events).URL + "/"}
	ctx := context.Background()
	if err := c.Auth(ctx, "abc", "good"); err != nil {
		t.Fatal(err)
	}
	if err := c.Auth(ctx, "abc", "bad"); !errors.Is(err, hook.ErrDenied) {
		t.Fatalf("a denial: %v", err)
	}
	if err := c.Connected(ctx, 2, hook.ClientEvent{CommonName: "abc"}); err != nil {
		t.Fatal(err)
	}
	if err := c.Disconnected(ctx, 2, hook.ClientEvent{CommonName: "abc", BytesSent: 7}); err != nil {
		t.Fatal(err)
	}
	if err := c.Connected(ctx, 3, hook.ClientEvent{CommonName: "abc"}); err == nil || errors.Is(err, hook.ErrDenied) {
		t.Fatalf("a 404 is an error, not a denial: %v", err)
	}
	if fmt.Sprint(events) != "[POST abc <nil> DELETE abc 7]" {
		t.Errorf("events %q", events)
	}
}

func ExampleClient_Auth() {
	var events []string
	srv := fakeAPI(nil, &events)
	defer srv.Close()
	c := &hook.Client{BaseURL: srv.URL}
	err := c.Auth(context.Background(), "0123456789abcdef0123456789abcdef", "wrong-key")
	fmt.Println(errors.Is(err, hook.ErrDenied))
	// Output: true
}
