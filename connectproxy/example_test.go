package connectproxy_test

import (
	"bufio"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"strings"
	"time"

	"golang.org/x/net/proxy"

	"github.com/obvpn/obvpn/connectproxy"
	"github.com/obvpn/obvpn/vpn/balena/balenatest"
)

// The handler embedded in an application's existing http.Server, with an
// authorizer of the application's own: CONNECT requests go to the proxy,
// everything else to the application's mux.
func Example() {
	// A device's service: an echo server on loopback.
	device := listenEcho()
	defer device.Close()
	devicePort := uint16(device.Addr().(*net.TCPAddr).Port)

	mux := http.NewServeMux()
	mux.HandleFunc("/ping", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "pong") })
	proxy := &connectproxy.Handler{
		// Only the key "let-me-in" may reach the device's service.
		Authorizer: connectproxy.AuthorizerFunc(func(ctx context.Context, uuid string, port uint16, key string) (int64, bool, error) {
			return 0, key == "let-me-in" && port == devicePort, nil
		}),
		// Every device is on loopback here; nss.Resolver reads OpenVPN's
		// status files instead.
		Resolver: connectproxy.ResolverFunc(func(name string) (netip.Addr, error) {
			return netip.MustParseAddr("127.0.0.1"), nil
		}),
		Next: mux,
	}
	srv := &http.Server{Handler: proxy, ReadHeaderTimeout: 10 * time.Second, MaxHeaderBytes: 8 << 10}
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	go srv.Serve(l)
	defer func() {
		ctx := context.Background()
		srv.Shutdown(ctx)   // the listener and the requests in flight
		proxy.Shutdown(ctx) // the tunnels, which the http.Server forgot when they were hijacked
	}()

	target := fmt.Sprintf("0123456789abcdef.balena:%d", devicePort)
	conn, status := dialConnect(l.Addr().String(), target, "let-me-in")
	fmt.Println(status)
	io.WriteString(conn, "hello")
	reply := make([]byte, 5)
	io.ReadFull(conn, reply)
	fmt.Println(string(reply))
	conn.Close()

	_, status = dialConnect(l.Addr().String(), target, "")
	fmt.Println(status)

	resp, _ := http.Get("http://" + l.Addr().String() + "/ping")
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	fmt.Println(string(body))
	// Output:
	// HTTP/1.0 200 Connection Established
	// hello
	// HTTP/1.0 407 Proxy Authorization Required
	// pong
}

// A VPN server's proxy against the balena API (here the in-memory one):
// the balena client answers the handler's three questions.
func ExampleServer() {
	device := listenEcho()
	defer device.Close()
	port := uint16(device.Addr().(*net.TCPAddr).Port)

	api := balenatest.NewServer(nil)
	defer api.Close()
	me := api.AddServiceInstance(netip.MustParseAddr("127.0.0.1"))
	api.AddDevice(balenatest.Device{UUID: "0123456789abcdef", Key: "device-key", PublicPorts: []uint16{port}})
	api.SetOnline("0123456789abcdef", me.ID)
	client := api.Client()

	srv := &connectproxy.Server{Handler: &connectproxy.Handler{
		Authorizer: client, // canAccess, with the guest key for callers without a key
		Online:     client, // is_connected_to_vpn
		Locator:    client, // which service instance holds the device
		Resolver: connectproxy.ResolverFunc(func(name string) (netip.Addr, error) {
			return netip.MustParseAddr("127.0.0.1"), nil // nss.Resolver in production
		}),
		ServiceID: me.ID,
	}}
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	go srv.Serve(l)
	defer srv.Shutdown(context.Background())

	conn, status := dialConnect(l.Addr().String(), fmt.Sprintf("0123456789abcdef.balena:%d", port), "")
	fmt.Println(status)
	conn.Close()
	_, status = dialConnect(l.Addr().String(), "example.com:443", "")
	fmt.Println(status)
	// Output:
	// HTTP/1.0 200 Connection Established
	// HTTP/1.0 403 Forbidden
}

func ExampleParseTarget() {
	t, err := connectproxy.ParseTarget("0123456789abcdef.balena:22222")
	fmt.Println(t.UUID, t.TLD, t.Port, err)
	t, _ = connectproxy.ParseTarget("0123456789abcdef.resin")
	fmt.Println(t)
	_, err = connectproxy.ParseTarget("example.com:443")
	fmt.Println(err)
	// Output:
	// 0123456789abcdef balena 22222 <nil>
	// 0123456789abcdef.resin:80
	// connectproxy: invalid target "example.com:443": want <uuid>.balena[:<port>]
}

// An http.Client that reaches a device's web page through the proxy: the
// Dialer is its Transport's DialContext, and asks the proxy for a tunnel
// to "<uuid>.balena:<port>" with the caller's key.
func ExampleDialer() {
	// A device's web page, and a proxy that lets the key "let-me-in" reach
	// it (every device is on loopback here).
	page := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		host, _, _ := net.SplitHostPort(r.Host)
		fmt.Fprintf(w, "hello from %s", host)
	}))
	defer page.Close()
	pagePort := uint16(page.Listener.Addr().(*net.TCPAddr).Port)
	srv := &connectproxy.Server{Handler: &connectproxy.Handler{
		Authorizer: connectproxy.AuthorizerFunc(func(ctx context.Context, uuid string, port uint16, key string) (int64, bool, error) {
			return 0, key == "let-me-in" && port == pagePort, nil
		}),
		Resolver: connectproxy.ResolverFunc(func(name string) (netip.Addr, error) {
			return netip.MustParseAddr("127.0.0.1"), nil
		}),
	}}
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	go srv.Serve(l)
	defer srv.Shutdown(context.Background())

	d := &connectproxy.Dialer{ProxyAddr: l.Addr().String(), Key: "let-me-in"}
	client := &http.Client{Transport: &http.Transport{DialContext: d.DialContext}}
	defer client.CloseIdleConnections()
	resp, err := client.Get(fmt.Sprintf("http://0123456789abcdef.balena:%d/", pagePort))
	if err != nil {
		fmt.Println(err)
		return
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	fmt.Println(resp.Status, string(body))

	// Without the key, the proxy refuses the tunnel.
	d = &connectproxy.Dialer{ProxyAddr: l.Addr().String()}
	_, err = d.DialContext(context.Background(), "tcp", fmt.Sprintf("0123456789abcdef.balena:%d", pagePort))
	var ce *connectproxy.ConnectError
	fmt.Println(errors.As(err, &ce), ce.StatusCode)
	// Output:
	// 200 OK hello from 0123456789abcdef.balena
	// true 407
}

// A program registers the Dialer once, from main; proxy.FromURL then
// makes one of an "http://" proxy URL with the key as its password.
func ExampleRegisterDialerType() {
	connectproxy.RegisterDialerType()
	u, _ := url.Parse("http://balena:let-me-in@vpn.example.com:3128")
	d, err := proxy.FromURL(u, proxy.Direct)
	if err != nil {
		fmt.Println(err)
		return
	}
	cd := d.(proxy.ContextDialer) // for an http.Transport's DialContext
	fmt.Printf("%T %s\n", cd, d.(*connectproxy.Dialer).ProxyAddr)
	// Output:
	// *connectproxy.Dialer vpn.example.com:3128
}

// dialConnect sends a CONNECT request with key as the proxy password and
// returns the connection and the answer's status line.
func dialConnect(proxy, target, key string) (net.Conn, string) {
	c, err := net.Dial("tcp", proxy)
	if err != nil {
		return nil, err.Error()
	}
	req := "CONNECT " + target + " HTTP/1.1\r\nHost: " + target + "\r\n"
	if key != "" {
		req += "Proxy-Authorization: Basic " + base64.StdEncoding.EncodeToString([]byte("me:"+key)) + "\r\n"
	}
	io.WriteString(c, req+"\r\n")
	br := bufio.NewReader(c)
	status, _ := br.ReadString('\n')
	for {
		line, err := br.ReadString('\n')
		if err != nil || line == "\r\n" {
			break
		}
	}
	return c, strings.TrimSpace(status) // the tunnel's bytes come after the head: none yet
}

func listenEcho() net.Listener {
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				io.Copy(c, c)
				c.Close()
			}()
		}
	}()
	return l
}
