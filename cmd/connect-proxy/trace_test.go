package main

import (
	"bufio"
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/obvpn/obvpn/vpn/balena/balenatest"
	"github.com/obvpn/obvpn/vpn/vpntest/otlptest"
)

// TestTracing runs the command with OTEL_EXPORTER_OTLP_ENDPOINT pointing
// at an in-process OTLP/HTTP receiver: a CONNECT that carries a
// traceparent is a span of the caller's trace, the API calls it makes
// carry that trace, and the spans reach the receiver by the time the
// command has exited.
func TestTracing(t *testing.T) {
	echo, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer echo.Close()
	go func() {
		for {
			c, err := echo.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	port := echo.Addr().(*net.TCPAddr).Port

	api := balenatest.NewServer(t)
	si := api.AddServiceInstance(netip.MustParseAddr("127.0.0.1"))
	api.AddDevice(balenatest.Device{UUID: uuid, Key: "device-SECRET"})
	api.Grant("operator-SECRET", uuid, uint16(port))
	api.SetOnline(uuid, si.ID)
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "server-1.status"), []byte(statusFile(uuid, "127.0.0.1")), 0o644); err != nil {
		t.Fatal(err)
	}
	rcv := otlptest.NewServer(t)
	setenv(t, map[string]string{
		"VPN_CONNECT_PROXY_PORT":   "3128",
		"BALENA_API_INTERNAL_HOST": strings.TrimPrefix(api.URL, "http://"),
		"VPN_SERVICE_API_KEY":      api.ServiceKey,
		"VPN_SERVICE_ID":           strconv.FormatInt(si.ID, 10),
		"NSS_OPENVPN_STATUS_GLOB":  filepath.Join(dir, "server-*.status"),
		"VPN_NSS_INDEX":            "off",
	})
	for k, v := range map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": rcv.URL, "OTEL_SERVICE_NAME": "proxy-eu1",
		"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "", "OTEL_SDK_DISABLED": "", "OTEL_TRACES_SAMPLER": "",
		"OTEL_TRACES_EXPORTER": "", "OTEL_EXPORTER_OTLP_PROTOCOL": "", "OTEL_RESOURCE_ATTRIBUTES": ""} {
		t.Setenv(k, v)
	}
	t.Cleanup(func() { // as a process starts
		otel.SetTracerProvider(noop.NewTracerProvider())
		otel.SetTextMapPropagator(propagation.NewCompositeTextMapPropagator())
	})

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addrs := make(chan net.Addr, 1)
	exit := make(chan int, 1)
	go func() {
		exit <- run(ctx, []string{"-listen", "127.0.0.1:0"}, io.Discard, slog.New(slog.DiscardHandler), new(slog.LevelVar),
			func(a net.Addr) { addrs <- a })
	}()
	var addr string
	select {
	case a := <-addrs:
		addr = a.String()
	case code := <-exit:
		t.Fatalf("exited with %d", code)
	}

	const traceID = "4bf92f3577b34da6a3ce929d0e0e4736"
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	target := fmt.Sprintf("%s.balena:%d", uuid, port)
	fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\nProxy-Authorization: Basic %s\r\ntraceparent: 00-%s-00f067aa0ba902b7-01\r\n\r\n",
		target, target, base64.StdEncoding.EncodeToString([]byte(":operator-SECRET")), traceID)
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil || line != "HTTP/1.0 200 Connection Established\r\n" {
		t.Fatalf("answer %q, %v", line, err)
	}
	c.Close()
	cancel()
	select {
	case code := <-exit:
		if code != 0 {
			t.Fatalf("exit %d", code)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("connect-proxy did not stop")
	}

	for _, r := range api.Requests() {
		if h := r.Header.Get("traceparent"); !strings.HasPrefix(h, "00-"+traceID+"-") {
			t.Errorf("%s %s: traceparent %q, want one in trace %s", r.Method, r.URI, h, traceID)
		}
	}
	// Flushed on exit: no wait needed.
	spans := rcv.Spans()
	conn := otlptest.Named(spans, "connectproxy.connect")
	if len(conn) != 1 || conn[0].TraceID != traceID || conn[0].Resource["service.name"] != "proxy-eu1" {
		t.Fatalf("connect spans %+v, want one in trace %s of service proxy-eu1", conn, traceID)
	}
	// The device is in this server's status file: it is online here, and
	// the API is not asked whether it is.
	for _, name := range []string{"connectproxy.access", "connectproxy.lookup", "connectproxy.dial",
		"POST /v7/device(uuid=@uuid)/canAccess"} {
		if len(otlptest.Named(spans, name)) != 1 {
			t.Errorf("no span %s among %d", name, len(spans))
		}
	}
}
