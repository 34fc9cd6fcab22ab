// Command vpn-auth checks a device's credentials for OpenVPN in script
// mode (VPN_AUTH_MODE=script), replacing the reference system's curl
// script. OpenVPN runs it for auth-user-pass-verify:
//
//	auth-user-pass-verify "/usr/local/bin/vpn-auth -api http://127.0.0.1:30001" via-file
//	auth-user-pass-verify "/usr/local/bin/vpn-auth -api http://127.0.0.1:30001" via-env
//
// With via-file, OpenVPN appends the name of a file that holds the user name
// (the device UUID) and the password (the device API key) on two lines; with
// via-env they are in the variables username and password. vpn-auth reads
// them (OpenVPN deletes the file once vpn-auth exits) and posts them to the
// internal API's /api/v1/auth/.
//
// OpenVPN 2.6 names a file in the variable auth_control_file for deferred
// authentication (its manual, --auth-user-pass-verify: exit 2 defers the
// decision, and a 1 or 0 written into that file later makes it). vpn-auth
// hands the file's name to the internal API, which answers at once and
// writes the decision there when it has it, and exits 2, so that OpenVPN
// goes on with its other clients meanwhile. Without that variable, with
// -sync, or when the API answers at once (a server that does not defer),
// vpn-auth waits for the answer: it exits 0 when the device is allowed
// and 1 when it is denied or the API cannot be asked. A usage error exits
// 3 (never 2, which OpenVPN would take for a deferral). The key is never
// printed.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/obvpn/obvpn/vpn/balena/uuid"
	"github.com/obvpn/obvpn/vpn/hook"
)

// Exit statuses, as OpenVPN reads them.
const (
	exitAllowed  = 0
	exitDenied   = 1
	exitDeferred = 2 // the decision goes to auth_control_file
	exitUsage    = 3
)

func main() {
	os.Exit(run(os.Args[1:], os.Getenv, os.Stderr))
}

func run(args []string, getenv func(string) string, stderr io.Writer) int {
	fs := flag.NewFlagSet("vpn-auth", flag.ContinueOnError)
	fs.SetOutput(stderr)
	api := fs.String("api", "", "the internal API's URL, e.g. http://127.0.0.1:30001 (required)")
	timeout := fs.Duration("timeout", time.Minute, "how long to wait for the answer")
	sync := fs.Bool("sync", false, "wait for the answer, even when OpenVPN could defer it")
	if err := fs.Parse(args); err != nil {
		return exitUsage
	}
	if *api == "" || fs.NArg() > 1 {
		fmt.Fprintln(stderr, "usage: vpn-auth -api URL [-sync] [credentials-file]")
		return exitUsage
	}
	var user, pass string
	if fs.NArg() == 1 {
		var err error
		if user, pass, err = readCredentials(fs.Arg(0)); err != nil {
			fmt.Fprintf(stderr, "vpn-auth: %v\n", err)
			return exitDenied
		}
	} else {
		user, pass = getenv("username"), getenv("password")
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	client := &hook.Client{BaseURL: *api}
	var err error
	if acf := getenv("auth_control_file"); acf != "" && !*sync {
		var deferred bool
		if deferred, err = client.AuthDeferred(ctx, user, pass, acf); deferred {
			return exitDeferred
		}
	} else {
		err = client.Auth(ctx, user, pass)
	}
	switch {
	case err == nil:
		return exitAllowed
	case errors.Is(err, hook.ErrDenied):
		fmt.Fprintf(stderr, "vpn-auth: device %s denied\n", printable(user))
	default:
		fmt.Fprintf(stderr, "vpn-auth: device %s: %v\n", printable(user), err)
	}
	return exitDenied
}

// readCredentials reads OpenVPN's via-file: the user name on the first
// line, the password on the second.
func readCredentials(name string) (user, pass string, err error) {
	f, err := os.Open(name)
	if err != nil {
		return "", "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(io.LimitReader(f, 64<<10))
	lines := make([]string, 0, 2)
	for len(lines) < 2 && sc.Scan() {
		lines = append(lines, strings.TrimRight(sc.Text(), "\r"))
	}
	if err := sc.Err(); err != nil {
		return "", "", fmt.Errorf("reading %s: %w", name, err)
	}
	if len(lines) < 2 {
		return "", "", fmt.Errorf("%s: want the user name and the password on two lines", name)
	}
	return lines[0], lines[1], nil
}

// printable returns the user name for a log line when it looks like a
// UUID: anything else might be a key typed into the wrong field.
func printable(user string) string {
	if uuid.Valid(user) {
		return user
	}
	return "(malformed user name)"
}
