// Command embed-proxy shows how to mount connectproxy.Handler in your own
// http.Server next to your own routes (/healthz), with your own authorizer
// (-key) and device lookup (-device) instead of the balena API and status files.
//
//	embed-proxy -device 0123456789abcdef=127.0.0.1 -key demo-key=80 -key demo-key=8080
//	curl -p -x http://me:demo-key@127.0.0.1:3128 http://0123456789abcdef.balena:8080/
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"time"

	"github.com/obvpn/obvpn/connectproxy"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr, func(net.Addr) {})
	stop()
	os.Exit(code)
}

// run serves until ctx ends; it calls ready with the bound address.
func run(ctx context.Context, args []string, stdout, stderr io.Writer, ready func(net.Addr)) int {
	fs := flag.NewFlagSet("embed-proxy", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", "127.0.0.1:3128", "the address to serve on")
	devices, allowed := map[string]netip.Addr{}, map[string]bool{} // "<uuid>.vpn", "<key>:<port>"
	fs.Func("device", "a device, as `uuid=address`; repeatable", func(s string) (err error) {
		uuid, addr, _ := strings.Cut(s, "=")
		devices[strings.ToLower(uuid)+".vpn"], err = netip.ParseAddr(addr)
		return err
	})
	fs.Func("key", "an API key and a device port it may reach, as `key=port`; repeatable", func(s string) error {
		key, port, _ := strings.Cut(s, "=")
		n, err := strconv.ParseUint(port, 10, 16)
		if err == nil {
			allowed[fmt.Sprint(key, ":", n)] = true
		}
		return err
	})
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "embed-proxy: unexpected arguments %q\n", fs.Args())
		return 2
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok\n") })
	proxy := &connectproxy.Handler{
		Authorizer: connectproxy.AuthorizerFunc(func(ctx context.Context, uuid string, port uint16, key string) (int64, bool, error) {
			return 0, allowed[fmt.Sprint(key, ":", port)], nil
		}),
		Resolver: connectproxy.ResolverFunc(func(name string) (netip.Addr, error) {
			if a, ok := devices[strings.ToLower(name)]; ok {
				return a, nil
			}
			return netip.Addr{}, fmt.Errorf("%s: no such device", name)
		}),
		Next: mux, // every request that is not a CONNECT
	}
	srv := &http.Server{Handler: proxy, ReadHeaderTimeout: 10 * time.Second, MaxHeaderBytes: 8 << 10}
	l, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintf(stderr, "embed-proxy: %v\n", err)
		return 1
	}
	fmt.Fprintf(stdout, "serving on %s\n", l.Addr())
	ready(l.Addr())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	select {
	case err = <-served: // the listener failed: close what is open
		err = errors.Join(err, srv.Close(), proxy.Close())
	case <-ctx.Done():
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		err = srv.Shutdown(sctx)                     // the listener and the requests in flight
		err = errors.Join(err, proxy.Shutdown(sctx)) // the tunnels, which srv forgot when they were hijacked
		<-served                                     // http.ErrServerClosed
	}
	if err != nil {
		fmt.Fprintf(stderr, "embed-proxy: %v\n", err)
		return 1
	}
	return 0
}
