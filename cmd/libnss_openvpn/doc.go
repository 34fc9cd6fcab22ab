// Command libnss_openvpn is the glibc NSS module that resolves the names
// of devices connected to this host's OpenVPN servers, "<uuid>.vpn", for
// every program on the host: getent, curl, ssh, Python, the reference
// system's proxy. It is a small C library, csrc/libnss_openvpn.c, not Go:
// the module is loaded into every process that resolves a name, and such
// processes fork (Apache with prefork, shells, sshd); a Go runtime does not
// survive fork and would bring threads and signal handlers into programs
// that never asked for them. The module links only libc, starts no thread
// and allocates nothing beyond the caller's buffer. Build and install it
// with make:
//
//	make nss           # bin/libnss_openvpn.so.2
//	make install-nss   # installs it and adds "openvpn" to the hosts line
//
// It answers only names ending in ".vpn" (in any case) and only for IPv4
// (AF_INET); names it does not hold are NOTFOUND, so that the next source
// on the hosts line is asked. The exported functions are
// _nss_openvpn_gethostbyname_r, _nss_openvpn_gethostbyname2_r and
// _nss_openvpn_gethostbyname3_r (which getaddrinfo uses).
//
// Where the answers come from. The status files are
// /run/openvpn/server-*.status and /var/run/openvpn/server-*.status, or
// the colon-separated globs of NSS_OPENVPN_STATUS_GLOB. The index file
// that package nss writes (nss.IndexWriter: vpn.Server, connect-proxy,
// "obvpnctl nss-index --watch") is NSS_OPENVPN_INDEX, else nss.index in
// the directory of the first glob, else /run/openvpn/nss.index
// (nss.IndexPathFor). Both variables are read with secure_getenv, so a
// set-uid or set-gid program uses the defaults. The module maps the index
// and probes its hash table; it checks that every status file is still
// the one the index was built from (device, inode, size, modification
// time) and that no other status file has appeared; the files that did
// change are scanned and their rows compete with the index's answer by
// Last Ref. A process trusts an index it found fresh for 100 ms before it
// checks the files again; a forked child checks at once. With no index,
// or one that is cut short or corrupted, the module scans every status
// file as the reference module does, with the fixes of SPEC §6c:
// NOTFOUND for unknown names, case-insensitive names, the buffer length
// checked (ERANGE), an address only from a routing row that is a plain
// IPv4 address, no read before the start of a name shorter than 4 bytes,
// and a file without its END line (being rewritten) ignored.
//
// This directory holds a Go package only so that its tests (which build
// the module with gcc and run getent through it) have a home and so that
// "go build ./..." and "go vet ./..." see the directory; the C file lives
// in csrc/, where the Go tool does not look for cgo sources. Running the
// command only says how to build the module.
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "libnss_openvpn is a C library: build it with \"make nss\" (bin/libnss_openvpn.so.2)")
	os.Exit(2)
}
