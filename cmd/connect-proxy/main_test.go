package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/matryer/is"

	"github.com/obvpn/obvpn/nss"
	"github.com/obvpn/obvpn/vpn/balena/balenatest"
)

const uuid = "0123456789abcdef0123456789abcdef"

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// statusFile is an OpenVPN 2.6 status file (version 2) with one client.
func statusFile(uuid, addr string) string {
	return "TITLE,OpenVPN 2.6.14 x86_64-pc-linux-gnu\n" +
		"TIME,2026-11-25 04:26:21,1795580781\n" +
		"HEADER,CLIENT_LIST,Common Name,Real Address,Virtual Address,Virtual IPv6 Address,Bytes Received,Bytes Sent,Connected Since,Connected Since (time_t),Username,Client ID,Peer ID,Data Channel Cipher\n" +
		"CLIENT_LIST," + uuid + ",192.0.2.9:37224," + addr + ",,991,1737,2026-11-25 04:26:18,1795580778," + uuid + ",0,0,AES-256-GCM\n" +
		"HEADER,ROUTING_TABLE,Virtual Address,Common Name,Real Address,Last Ref,Last Ref (time_t)\n" +
		"ROUTING_TABLE," + addr + "," + uuid + ",192.0.2.9:37224,2026-11-25 04:26:18,1795580778\n" +
		"GLOBAL_STATS,Max bcast/mcast queue length,0\n" +
		"END\n"
}

// setenv sets the proxy's environment, clearing what the test does not
// set.
func setenv(t *testing.T, env map[string]string) {
	for _, k := range []string{"VPN_CONNECT_PROXY_PORT", "BALENA_API_HOST", "BALENA_API_INTERNAL_HOST",
		"VPN_SERVICE_API_KEY", "VPN_GUEST_API_KEY", "VPN_SERVICE_ID", "VPN_FORWARD_PROXY_PORT",
		"VPN_STATUS_FILE_WRITE_INTERVAL_SECONDS", "NSS_OPENVPN_STATUS_GLOB", "VPN_RUN_DIR",
		"VPN_VERBOSE_LOGS", "DEFAULT_VERBOSE_LOGS", "VPN_NSS_INDEX", "NSS_OPENVPN_INDEX"} {
		t.Setenv(k, env[k])
	}
}

// TestProxy runs the command against an in-memory balena API, with the
// device found in a status file, and reaches an echo service through it.
func TestProxy(t *testing.T) {
	is := is.New(t)
	echo, err := net.Listen("tcp", "127.0.0.1:0")
	is.NoErr(err)
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
	api.ServiceKey, api.GuestKey = "service-SECRET", "guest-SECRET"
	si := api.AddServiceInstance(netip.MustParseAddr("127.0.0.1"))
	api.AddDevice(balenatest.Device{UUID: uuid, Key: "device-SECRET"})
	api.Grant("operator-SECRET", uuid, uint16(port))
	api.SetOnline(uuid, si.ID)

	dir := t.TempDir()
	is.NoErr(os.WriteFile(filepath.Join(dir, "server-1.status"), []byte(statusFile(uuid, "127.0.0.1")), 0o644))
	setenv(t, map[string]string{
		"VPN_CONNECT_PROXY_PORT":                 "3128",
		"BALENA_API_INTERNAL_HOST":               strings.TrimPrefix(api.URL, "http://"),
		"VPN_SERVICE_API_KEY":                    api.ServiceKey,
		"VPN_GUEST_API_KEY":                      api.GuestKey,
		"VPN_SERVICE_ID":                         strconv.FormatInt(si.ID, 10),
		"VPN_STATUS_FILE_WRITE_INTERVAL_SECONDS": "1",
		"NSS_OPENVPN_STATUS_GLOB":                filepath.Join(dir, "server-*.status"),
		"VPN_VERBOSE_LOGS":                       "true",
	})

	var logs syncBuffer
	log := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	ctx, cancel := context.WithCancel(context.Background())
	addrs := make(chan net.Addr, 1)
	exit := make(chan int, 1)
	go func() {
		exit <- run(ctx, []string{"-listen", "127.0.0.1:0"}, io.Discard, log, new(slog.LevelVar), func(a net.Addr) { addrs <- a })
	}()
	var addr string
	select {
	case a := <-addrs:
		addr = a.String()
	case code := <-exit:
		t.Fatalf("exited with %d:\n%s", code, logs.String())
	}

	// The NSS index next to the status files, kept while the proxy runs;
	// its writer's renames have no hook outside it: poll, with a deadline.
	index := filepath.Join(dir, "nss.index")
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if ix, err := nss.ReadIndex(index); err == nil {
			a, err := ix.Lookup(uuid + ".vpn")
			is.NoErr(err)
			is.Equal(a.String(), "127.0.0.1")
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no NSS index")
		}
	}

	c, err := net.Dial("tcp", addr)
	is.NoErr(err)
	defer c.Close()
	target := fmt.Sprintf("%s.balena:%d", uuid, port)
	fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\nProxy-Authorization: Basic %s\r\n\r\n",
		target, target, base64.StdEncoding.EncodeToString([]byte("me:operator-SECRET")))
	br := bufio.NewReader(c)
	line, err := br.ReadString('\n')
	is.NoErr(err)
	is.Equal(line, "HTTP/1.0 200 Connection Established\r\n")
	blank, _ := br.ReadString('\n')
	is.Equal(blank, "\r\n")
	io.WriteString(c, "through connect-proxy")
	got := make([]byte, len("through connect-proxy"))
	_, err = io.ReadFull(br, got)
	is.NoErr(err)
	is.Equal(string(got), "through connect-proxy")

	resp, err := http.Get("http://" + addr + "/ping")
	is.NoErr(err)
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	is.Equal(string(b), "OK")
	resp, err = http.Get("http://" + addr + "/metrics")
	is.NoErr(err)
	b, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	is.True(strings.Contains(string(b), "vpn_proxy_total_tunnels 1"))
	is.True(strings.Contains(string(b), "vpn_proxy_active_tunnels 1"))

	c.Close()
	cancel()
	select {
	case code := <-exit:
		is.Equal(code, 0)
	case <-time.After(15 * time.Second):
		t.Fatal("connect-proxy did not stop")
	}
	_, err = os.Stat(index)
	is.True(os.IsNotExist(err)) // removed when the proxy stopped
	s := logs.String()
	is.True(strings.Contains(s, "tunnel open"))
	is.True(strings.Contains(s, "connect-proxy stopped"))
	if strings.Contains(s, "SECRET") {
		t.Fatalf("a key was logged:\n%s", s)
	}
}

func TestConfigErrors(t *testing.T) {
	for _, tt := range []struct {
		name string
		env  map[string]string
		want string
	}{
		{"no port", map[string]string{"BALENA_API_HOST": "api.example.com", "VPN_SERVICE_API_KEY": "k"}, "VPN_CONNECT_PROXY_PORT"},
		{"no key", map[string]string{"BALENA_API_HOST": "api.example.com", "VPN_CONNECT_PROXY_PORT": "3128"}, "VPN_SERVICE_API_KEY"},
		{"no API", map[string]string{"VPN_SERVICE_API_KEY": "k", "VPN_CONNECT_PROXY_PORT": "3128"}, "BALENA_API_HOST"},
		{"bad service id", map[string]string{"BALENA_API_HOST": "api.example.com", "VPN_SERVICE_API_KEY": "k",
			"VPN_CONNECT_PROXY_PORT": "3128", "VPN_SERVICE_ID": "x"}, "VPN_SERVICE_ID"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			setenv(t, tt.env)
			var stderr bytes.Buffer
			code := run(context.Background(), nil, &stderr, slog.New(slog.DiscardHandler), new(slog.LevelVar), nil)
			if code != 2 || !strings.Contains(stderr.String(), tt.want) {
				t.Fatalf("exit %d, %q; want 2 and a line naming %s", code, stderr.String(), tt.want)
			}
		})
	}
}

func TestNSSIndexPath(t *testing.T) {
	t.Setenv("VPN_NSS_INDEX", "")
	t.Setenv("NSS_OPENVPN_INDEX", "")
	globs := []string{"/srv/vpn/server-*.status"}
	for _, tt := range []struct{ flag, vpnEnv, nssEnv, want string }{
		{"", "", "", "/srv/vpn/nss.index"},
		{"", "", "/x/nss.index", "/x/nss.index"},
		{"", "off", "/x/nss.index", "off"},
		{"/y.index", "off", "", "/y.index"},
	} {
		t.Setenv("VPN_NSS_INDEX", tt.vpnEnv)
		t.Setenv("NSS_OPENVPN_INDEX", tt.nssEnv)
		if got := nssIndexPath(tt.flag, globs); got != tt.want {
			t.Errorf("%+v: %s", tt, got)
		}
	}
}
