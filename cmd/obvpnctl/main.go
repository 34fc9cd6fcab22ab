// Command obvpnctl is the operator's command line for an obvpn deployment.
//
// Usage:
//
//	obvpnctl <command> [flags] [arguments]
//
// Run "obvpnctl help" for the list of commands. Configuration errors are
// printed on standard error and exit with status 2.
package main

import (
	"fmt"
	"io"
	"os"
	"sort"
)

// A command is one obvpnctl subcommand. run gets the arguments after the
// command's name and returns the process exit status.
type command struct {
	summary string
	run     func(args []string, stdout, stderr io.Writer) int
}

// commands is the table of subcommands; each lives in a file of its own.
var commands = map[string]command{
	"plan":      {"print the address and port plan of the configured deployment", runPlan},
	"lookup":    {"print the VPN address of a connected device", runLookup},
	"clients":   {"list the clients connected to the OpenVPN instances", runClients},
	"nss-index": {"write the NSS module's index of the status files (--watch: keep it current)", runNSSIndex},
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
		usage(stdout)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	c, ok := commands[args[0]]
	if !ok {
		fmt.Fprintf(stderr, "obvpnctl: unknown command %q (run \"obvpnctl help\")\n", args[0])
		return 2
	}
	return c.run(args[1:], stdout, stderr)
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: obvpnctl <command> [flags] [arguments]")
	fmt.Fprintln(w, "\ncommands:")
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(w, "  %-10s %s\n", n, commands[n].summary)
	}
}
