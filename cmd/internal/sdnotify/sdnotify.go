// Package sdnotify tells systemd how a service is doing, as sd_notify(3)
// does: one datagram of "KEY=value" lines to the unix socket that
// $NOTIFY_SOCKET names (a path, or "@name" in the abstract namespace).
// Without a socket every notification is a no-op, so that a command can
// notify unconditionally.
//
// It is not libsystemd: no file-descriptor store, no watchdog, no
// credentials passed along.
package sdnotify

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// The states a service sends. See sd_notify(3).
const (
	Ready     = "READY=1"     // started, or done reloading
	Reloading = "RELOADING=1" // reloading; Ready follows
	Stopping  = "STOPPING=1"  // stopping
)

// EnvSocket is the variable that systemd sets for a Type=notify service;
// EnvKept is where [FromEnv] keeps its value for a successor process.
const (
	EnvSocket = "NOTIFY_SOCKET"
	EnvKept   = "OBVPN_NOTIFY_SOCKET"
)

// MainPID is the state that names pid as the service's main process:
// what a successor started for an upgrade sends, so that systemd follows
// it.
func MainPID(pid int) string { return "MAINPID=" + strconv.Itoa(pid) }

// Status is a free-form status line, shown by systemctl status.
func Status(s string) string { return "STATUS=" + strings.ReplaceAll(s, "\n", " ") }

// MonotonicUsec is the state that goes with [Reloading]: the time of
// CLOCK_MONOTONIC in microseconds, as systemd wants it.
func MonotonicUsec() (string, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return "", fmt.Errorf("sdnotify: CLOCK_MONOTONIC: %w", err)
	}
	return "MONOTONIC_USEC=" + strconv.FormatInt(ts.Nano()/1000, 10), nil
}

// Notifier sends notifications to one socket.
type Notifier struct {
	// Socket is the socket's address: a path, or "@name" in the abstract
	// namespace. Empty means that notifications are not sent.
	Socket string
}

// FromEnv returns a Notifier for the socket that $NOTIFY_SOCKET names, or
// for the one a predecessor kept in $OBVPN_NOTIFY_SOCKET. It removes
// NOTIFY_SOCKET from the environment and keeps its value in
// OBVPN_NOTIFY_SOCKET instead: the processes the command starts (OpenVPN
// and HAProxy speak sd_notify themselves, and OpenVPN names itself the
// main process when it is ready) must not find it, while a successor
// started for an upgrade, which inherits the environment, must.
func FromEnv() *Notifier {
	sock := os.Getenv(EnvSocket)
	if sock == "" {
		sock = os.Getenv(EnvKept)
	}
	os.Unsetenv(EnvSocket)
	if sock != "" {
		os.Setenv(EnvKept, sock)
	}
	return &Notifier{Socket: sock}
}

// Enabled reports whether n sends notifications.
func (n *Notifier) Enabled() bool { return n != nil && n.Socket != "" }

// Notify sends the states, one a line, in one datagram. It does nothing
// when n is not enabled.
func (n *Notifier) Notify(states ...string) error {
	if !n.Enabled() {
		return nil
	}
	if len(states) == 0 {
		return errors.New("sdnotify: no state to send")
	}
	if s := n.Socket; !strings.HasPrefix(s, "/") && !strings.HasPrefix(s, "@") {
		return fmt.Errorf("sdnotify: %s=%q: neither a path nor an abstract socket", EnvSocket, s)
	}
	// Go reads a leading '@' as the abstract namespace.
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: n.Socket, Net: "unixgram"})
	if err != nil {
		return fmt.Errorf("sdnotify: %w", err)
	}
	defer c.Close()
	if _, err := c.Write([]byte(strings.Join(states, "\n") + "\n")); err != nil {
		return fmt.Errorf("sdnotify: %w", err)
	}
	return nil
}
