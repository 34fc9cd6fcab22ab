package openvpnmgmt

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/obvpn/obvpn/nss"
)

// MaxLineLength is the longest command line OpenVPN reads, its line end
// included. OpenVPN does not drop a longer line whole: it clears its
// buffer when full and runs what follows as a command. The client refuses
// such lines. A line longer than 768 bytes (plus its line end) is only
// safe when nothing follows it in the same read, so the client sends it
// alone (see [Client]), and refuses it inside a block of lines such as
// client-auth's.
const MaxLineLength = 1024

// MaxArgLength is the longest argument, after unquoting, that OpenVPN's
// lexer takes; it answers ERROR to a longer one.
const MaxArgLength = 256

// maxArgs is how many words OpenVPN's lexer takes from a line; it ignores
// the others.
const maxArgs = 16

// Errors of commands the client refuses to send, because OpenVPN would
// drop, misread or refuse them. Nothing is sent, and the connection goes
// on.
var (
	ErrLineTooLong = errors.New("openvpnmgmt: command line longer than OpenVPN reads")
	ErrBadArgument = errors.New("openvpnmgmt: control character in a command")
	ErrTooManyArgs = errors.New("openvpnmgmt: more than 16 words on a command line")
	ErrArgTooLong  = errors.New("openvpnmgmt: argument longer than OpenVPN takes")
)

// Quote returns s as one argument for OpenVPN's lexer (the one of its
// configuration files): as is when it needs no quoting, else in double
// quotes, with backslashes and double quotes escaped by a backslash.
func Quote(s string) string {
	if s != "" && !strings.ContainsAny(s, " \t\"'\\#;") {
		return s
	}
	return `"` + strings.NewReplacer(`\`, `\\`, `"`, `\"`).Replace(s) + `"`
}

// checkLine refuses what OpenVPN would drop or misread: a line longer
// than MaxLineLength, and bytes it drops silently (controls, tab
// included, and DEL).
func checkLine(line string) error {
	if len(line)+1 > MaxLineLength {
		return fmt.Errorf("%w: %d bytes, at most %d with the line end", ErrLineTooLong, len(line)+1, MaxLineLength)
	}
	for i := 0; i < len(line); i++ {
		if c := line[i]; c < ' ' || c == 0x7f {
			return fmt.Errorf("%w: byte %#02x at %d", ErrBadArgument, c, i)
		}
	}
	return nil
}

// command builds a line from a command word and its arguments, quoted.
func command(name string, args ...string) (string, error) {
	if 1+len(args) > maxArgs {
		return "", ErrTooManyArgs
	}
	var b strings.Builder
	b.WriteString(name)
	for _, a := range args {
		if len(a) > MaxArgLength {
			return "", fmt.Errorf("%w: %d bytes, at most %d", ErrArgTooLong, len(a), MaxArgLength)
		}
		b.WriteByte(' ')
		b.WriteString(Quote(a))
	}
	return b.String(), nil
}

// simple sends a command with a single-line reply.
func (c *Client) simple(ctx context.Context, name string, args ...string) (string, error) {
	line, err := command(name, args...)
	if err != nil {
		return "", err
	}
	lines, err := c.roundTrip(ctx, name, false, line)
	if err != nil {
		return "", err
	}
	return strings.Join(lines, "\n"), nil
}

// multi sends a command whose reply is lines closed by END.
func (c *Client) multi(ctx context.Context, name string, args ...string) ([]string, error) {
	line, err := command(name, args...)
	if err != nil {
		return nil, err
	}
	return c.roundTrip(ctx, name, true, line)
}

// HoldRelease releases OpenVPN from --management-hold.
func (c *Client) HoldRelease(ctx context.Context) error {
	_, err := c.simple(ctx, "hold", "release")
	return err
}

// ByteCount sets the interval of BYTECOUNT/BYTECOUNT_CLI events, in
// seconds; 0 turns them off.
func (c *Client) ByteCount(ctx context.Context, seconds int) error {
	_, err := c.simple(ctx, "bytecount", strconv.Itoa(seconds))
	return err
}

// ClientAuth allows the client cid's key kid, with configuration lines for
// it (such as "push \"route 10.0.0.0 255.0.0.0\""), as for a client-connect
// script's output.
func (c *Client) ClientAuth(ctx context.Context, cid, kid uint64, config []string) error {
	lines := []string{fmt.Sprintf("client-auth %d %d", cid, kid)}
	for _, l := range config {
		if l == "END" || strings.ContainsAny(l, "\r\n") {
			return fmt.Errorf("%w: config line %q", ErrBadArgument, l)
		}
		lines = append(lines, l)
	}
	lines = append(lines, "END")
	_, err := c.roundTrip(ctx, "client-auth", false, lines...)
	return err
}

// ClientAuthNT allows the client cid's key kid, without configuration.
func (c *Client) ClientAuthNT(ctx context.Context, cid, kid uint64) error {
	_, err := c.simple(ctx, "client-auth-nt", u(cid), u(kid))
	return err
}

// ClientDeny denies the client cid's key kid. reason goes to OpenVPN's
// log; clientReason, if set, to the client (AUTH_FAILED,<clientReason>).
// A denied REAUTH only drops the new key: end the session with ClientKill.
func (c *Client) ClientDeny(ctx context.Context, cid, kid uint64, reason, clientReason string) error {
	args := []string{u(cid), u(kid), reason}
	if clientReason != "" {
		args = append(args, clientReason)
	}
	_, err := c.simple(ctx, "client-deny", args...)
	return err
}

// ClientPendingAuth defers the decision on the client cid's key kid for up
// to timeoutSeconds, passing extra (such as "WEB_AUTH::<url>") to the
// client.
func (c *Client) ClientPendingAuth(ctx context.Context, cid, kid uint64, extra string, timeoutSeconds int) error {
	_, err := c.simple(ctx, "client-pending-auth", u(cid), u(kid), extra, strconv.Itoa(timeoutSeconds))
	return err
}

// KillMessage is the message client-kill sends: HALT ends the client,
// RESTART makes it reconnect.
type KillMessage string

// The messages of ClientKill.
const (
	KillDefault KillMessage = ""
	KillHalt    KillMessage = "HALT"
	KillRestart KillMessage = "RESTART"
)

// ClientKill ends the session of client cid.
func (c *Client) ClientKill(ctx context.Context, cid uint64, msg KillMessage) error {
	args := []string{u(cid)}
	if msg != KillDefault {
		args = append(args, string(msg))
	}
	_, err := c.simple(ctx, "client-kill", args...)
	return err
}

// Kill ends every session with common name cn.
func (c *Client) Kill(ctx context.Context, cn string) error {
	_, err := c.simple(ctx, "kill", cn)
	return err
}

// KillAddr ends the session from the real address proto:ip:port, such as
// "tcp:192.0.2.1:40000".
func (c *Client) KillAddr(ctx context.Context, protoAddrPort string) error {
	_, err := c.simple(ctx, "kill", protoAddrPort)
	return err
}

// Status returns OpenVPN's status, version 2 or 3 (the status file
// formats), parsed by package nss.
func (c *Client) Status(ctx context.Context, version int) (*nss.Status, error) {
	lines, err := c.StatusLines(ctx, version)
	if err != nil {
		return nil, err
	}
	return nss.ParseStatus(strings.NewReader(strings.Join(append(lines, "END"), "\n") + "\n"))
}

// StatusLines returns the lines of "status <version>" (1, 2 or 3), without
// the closing END.
func (c *Client) StatusLines(ctx context.Context, version int) ([]string, error) {
	if version < 1 || version > 3 {
		return nil, fmt.Errorf("openvpnmgmt: status version %d: want 1, 2 or 3", version)
	}
	lines, err := c.multi(ctx, "status", strconv.Itoa(version))
	if err != nil {
		return nil, err
	}
	// The status output's own END closes the reply.
	return lines, nil
}

// LoadStats are the figures of "load-stats".
type LoadStats struct {
	Clients           int
	BytesIn, BytesOut uint64
}

// LoadStats returns the number of clients and the traffic totals.
func (c *Client) LoadStats(ctx context.Context) (LoadStats, error) {
	s, err := c.simple(ctx, "load-stats")
	if err != nil {
		return LoadStats{}, err
	}
	// "nclients=1,bytesin=5174,bytesout=5406"
	var ls LoadStats
	for _, kv := range strings.Split(s, ",") {
		k, v, _ := strings.Cut(kv, "=")
		n, _ := strconv.ParseUint(v, 10, 64)
		switch k {
		case "nclients":
			ls.Clients = int(n)
		case "bytesin":
			ls.BytesIn = n
		case "bytesout":
			ls.BytesOut = n
		}
	}
	return ls, nil
}

// Version returns the lines of "version": OpenVPN's and the management
// interface's versions.
func (c *Client) Version(ctx context.Context) ([]string, error) {
	return c.multi(ctx, "version")
}

// PID returns OpenVPN's process id.
func (c *Client) PID(ctx context.Context) (int, error) {
	s, err := c.simple(ctx, "pid")
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(strings.TrimPrefix(s, "pid="))
}

// Signal sends OpenVPN a signal: SIGHUP, SIGTERM, SIGUSR1 or SIGUSR2.
func (c *Client) Signal(ctx context.Context, sig string) error {
	_, err := c.simple(ctx, "signal", sig)
	return err
}

// Log turns the real-time >LOG events on or off.
func (c *Client) Log(ctx context.Context, on bool) error {
	_, err := c.simple(ctx, "log", onOff(on))
	return err
}

// LogHistory returns the log lines OpenVPN keeps ("log all").
func (c *Client) LogHistory(ctx context.Context) ([]string, error) {
	return c.multi(ctx, "log", "all")
}

// State turns the real-time >STATE events on or off.
func (c *Client) State(ctx context.Context, on bool) error {
	_, err := c.simple(ctx, "state", onOff(on))
	return err
}

// StateHistory returns the state changes OpenVPN keeps ("state all").
func (c *Client) StateHistory(ctx context.Context) ([]string, error) {
	return c.multi(ctx, "state", "all")
}

// Echo turns the real-time >ECHO events on or off.
func (c *Client) Echo(ctx context.Context, on bool) error {
	_, err := c.simple(ctx, "echo", onOff(on))
	return err
}

// EchoHistory returns the echo messages OpenVPN keeps ("echo all").
func (c *Client) EchoHistory(ctx context.Context) ([]string, error) {
	return c.multi(ctx, "echo", "all")
}

// EnvFilter sets how much of the environment CLIENT events carry (0 is
// everything OpenVPN gives by default).
func (c *Client) EnvFilter(ctx context.Context, level int) error {
	_, err := c.simple(ctx, "env-filter", strconv.Itoa(level))
	return err
}

// Raw sends line as it is and returns the reply's lines: the SUCCESS text,
// or with multiLine the lines before END.
func (c *Client) Raw(ctx context.Context, line string, multiLine bool) ([]string, error) {
	name, _, _ := strings.Cut(line, " ")
	return c.roundTrip(ctx, name, multiLine, line)
}

func u(n uint64) string { return strconv.FormatUint(n, 10) }

func onOff(on bool) string {
	if on {
		return "on"
	}
	return "off"
}
