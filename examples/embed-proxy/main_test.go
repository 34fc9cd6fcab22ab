package main

import (
	"bufio"
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/obvpn/obvpn/vpn/vpntest/leaktest"
)

const uuid = "0123456789abcdef0123456789abcdef"

// TestProxy runs the example against a loopback echo server as the device:
// the allowed key gets a tunnel that echoes, a wrong key gets 407, and
// /healthz answers next to the proxy. Cancelling the context shuts it all
// down with exit status 0.
func TestProxy(t *testing.T) {
	leaktest.Check(t)
	device := echoServer(t)
	port := device.Port()

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addrs, done := make(chan net.Addr, 1), make(chan int, 1)
	args := []string{"-listen", "127.0.0.1:0", "-device", strings.ToUpper(uuid) + "=127.0.0.1", "-key", fmt.Sprint("good-key=", port)}
	go func() { done <- run(ctx, args, io.Discard, t.Output(), func(a net.Addr) { addrs <- a }) }()
	var proxy string
	select {
	case a := <-addrs:
		proxy = a.String()
	case code := <-done:
		t.Fatalf("the example exited with status %d before serving", code)
	}
	target := fmt.Sprintf("%s.balena:%d", uuid, port)

	conn, status := dialConnect(t, proxy, target, "good-key")
	if !strings.HasPrefix(status, "HTTP/1.0 200 ") && !strings.HasPrefix(status, "HTTP/1.1 200 ") {
		t.Fatalf("CONNECT with the allowed key: got %q, want 200", status)
	}
	io.WriteString(conn, "hello")
	reply := make([]byte, 5)
	if _, err := io.ReadFull(conn, reply); err != nil || string(reply) != "hello" {
		t.Errorf("through the tunnel: got %q, %v, want %q", reply, err, "hello")
	}
	conn.Close()

	for _, key := range []string{"bad-key", ""} {
		conn, status = dialConnect(t, proxy, target, key)
		conn.Close()
		if !strings.Contains(status, " 407 ") {
			t.Errorf("CONNECT with key %q: got %q, want 407", key, status)
		}
	}
	conn, status = dialConnect(t, proxy, fmt.Sprintf("%s.balena:%d", uuid, port+1), "good-key")
	conn.Close()
	if !strings.Contains(status, " 407 ") {
		t.Errorf("CONNECT to a port the key may not reach: got %q, want 407", status)
	}

	tr := &http.Transport{}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Get("http://" + proxy + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || string(body) != "ok\n" {
		t.Errorf("GET /healthz: got %d %q, want 200 %q", resp.StatusCode, body, "ok\n")
	}

	cancel()
	if code := <-done; code != 0 {
		t.Errorf("exit status %d, want 0", code)
	}
}

func TestBadFlags(t *testing.T) {
	for _, args := range [][]string{{"-nope"}, {"-device", "0123=not-an-address"}, {"-key", "k=65536"}, {"-key", "k"}, {"extra"}} {
		if code := run(context.Background(), args, io.Discard, io.Discard, func(net.Addr) {}); code != 2 {
			t.Errorf("%q: exit status %d, want 2", args, code)
		}
	}
}

// dialConnect sends a CONNECT request for target with key as the proxy
// password ("" for none) and returns the connection, positioned after the
// answer's head, and the answer's status line.
func dialConnect(t *testing.T, proxy, target, key string) (net.Conn, string) {
	t.Helper()
	c, err := net.Dial("tcp", proxy)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	req := "CONNECT " + target + " HTTP/1.1\r\nHost: " + target + "\r\n"
	if key != "" {
		req += "Proxy-Authorization: Basic " + base64.StdEncoding.EncodeToString([]byte("me:"+key)) + "\r\n"
	}
	io.WriteString(c, req+"\r\n")
	br := bufio.NewReader(c)
	status, err := br.ReadString('\n')
	for err == nil {
		var line string
		if line, err = br.ReadString('\n'); line == "\r\n" {
			break
		}
	}
	if br.Buffered() > 0 {
		t.Errorf("%d bytes after the answer's head", br.Buffered())
	}
	return c, strings.TrimSpace(status)
}

type echo struct {
	net.Listener
	wg sync.WaitGroup
}

func (e *echo) Port() int { return e.Addr().(*net.TCPAddr).Port }

// echoServer starts a TCP server on loopback that echoes what it reads; it
// is closed, and its goroutines waited for, when the test ends.
func echoServer(t *testing.T) *echo {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e := &echo{Listener: l}
	var mu sync.Mutex
	var conns []net.Conn
	e.wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			e.wg.Go(func() {
				io.Copy(c, c)
				c.Close()
			})
		}
	})
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		e.wg.Wait()
	})
	return e
}
