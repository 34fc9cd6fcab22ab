package internalapi_test

import (
	"context"
	"errors"
	"fmt"
	"net/http/httptest"

	"github.com/obvpn/obvpn/vpn/hook"
	"github.com/obvpn/obvpn/vpn/internalapi"
)

// authFunc adapts a function to internalapi.Authenticator.
type authFunc func(uuid, key string) bool

func (f authFunc) Authenticate(_ context.Context, uuid, key string) (bool, error) {
	return f(uuid, key), nil
}

// The internal API behind an HTTP server on loopback, asked as OpenVPN's
// auth hook asks it, through package vpn/hook's client.
func ExampleServer() {
	api := &internalapi.Server{Auth: authFunc(func(uuid, key string) bool { return key == "device-key" })}
	srv := httptest.NewServer(api)
	defer srv.Close()
	c := &hook.Client{BaseURL: srv.URL}
	ctx := context.Background()
	fmt.Println(c.Auth(ctx, "0123456789abcdef0123456789abcdef", "device-key"))
	err := c.Auth(ctx, "0123456789abcdef0123456789abcdef", "stolen")
	fmt.Println(errors.Is(err, hook.ErrDenied))
	// Output:
	// <nil>
	// true
}
