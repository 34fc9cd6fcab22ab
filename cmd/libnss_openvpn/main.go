// Command libnss_openvpn is a glibc NSS module that resolves the names of
// devices connected to this host's OpenVPN servers, "<uuid>.vpn", for
// every program on the host: getent, curl, ssh, the reference system's
// proxy. Build it as a shared library and enable it in /etc/nsswitch.conf:
//
//	go build -buildmode=c-shared -o libnss_openvpn.so.2 ./cmd/libnss_openvpn
//	make install-nss   # installs it and adds "openvpn" to the hosts line
//
// It answers only names ending in ".vpn" and only for IPv4 (AF_INET),
// from the routing tables of the status files /run/openvpn/server-*.status
// and /var/run/openvpn/server-*.status, or of the files that the glob in
// NSS_OPENVPN_STATUS_GLOB matches (read with secure_getenv, so never for
// set-uid programs). Names it does not hold are NOTFOUND, so that the
// next source on the hosts line is asked. The index of package nss is
// built on the first lookup and refreshed at most once a second, reading
// only the files that changed.
//
// Exported: _nss_openvpn_gethostbyname_r, _nss_openvpn_gethostbyname2_r and
// _nss_openvpn_gethostbyname3_r (which getaddrinfo uses).
package main

/*
#cgo CFLAGS: -D_GNU_SOURCE
#include <errno.h>
#include <netdb.h>
#include <nss.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

// fill_hostent packs a hostent for one IPv4 address into buffer: the name,
// an empty alias list, the address and the address list. It fails with
// ERANGE (NSS_STATUS_TRYAGAIN) when buffer is too small.
static enum nss_status fill_hostent(const char *name, const unsigned char addr[4],
		struct hostent *result, char *buffer, size_t buflen,
		int *errnop, int *h_errnop) {
	size_t namelen = strlen(name) + 1;
	size_t align = (sizeof(char *) - ((uintptr_t)buffer % sizeof(char *))) % sizeof(char *);
	// [align][aliases: 1 ptr][addr_list: 2 ptrs][address: 4][name]
	size_t need = align + 3 * sizeof(char *) + 4 + namelen;
	if (buflen < need) {
		*errnop = ERANGE;
		*h_errnop = NETDB_INTERNAL;
		return NSS_STATUS_TRYAGAIN;
	}
	char **aliases = (char **)(buffer + align);
	char **addrs = aliases + 1;
	char *addr_buf = (char *)(addrs + 2);
	char *name_buf = addr_buf + 4;
	aliases[0] = NULL;
	memcpy(addr_buf, addr, 4);
	addrs[0] = addr_buf;
	addrs[1] = NULL;
	memcpy(name_buf, name, namelen);
	result->h_name = name_buf;
	result->h_aliases = aliases;
	result->h_addrtype = AF_INET;
	result->h_length = 4;
	result->h_addr_list = addrs;
	*errnop = 0;
	*h_errnop = 0;
	return NSS_STATUS_SUCCESS;
}

static enum nss_status not_found(int *errnop, int *h_errnop) {
	*errnop = ENOENT;
	*h_errnop = HOST_NOT_FOUND;
	return NSS_STATUS_NOTFOUND;
}

static const char *status_glob(void) {
	return secure_getenv("NSS_OPENVPN_STATUS_GLOB");
}
*/
import "C"

import (
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"unsafe"

	"github.com/obvpn/obvpn/nss"
)

// The process's first lookup scans the status files (nss.Find): most
// processes that resolve a .vpn name resolve one, and an index of the
// whole fleet would cost more than the scan. From the second lookup on,
// the process keeps an index (nss.Resolver) that it refreshes at most once
// a second from the files that changed.
var (
	once     sync.Once
	globs    []string // nil: nss.DefaultGlobs
	lookups  atomic.Int64
	resolver nss.Resolver
)

func setup() {
	once.Do(func() {
		if g := C.status_glob(); g != nil {
			if s := C.GoString(g); s != "" {
				globs = strings.Split(s, ":")
			}
		}
		resolver.Globs = globs
	})
}

// lookup resolves name (a NUL-terminated C string, read up to its NUL and
// no further) into addr.
func lookup(name *C.char, addr *[4]byte) bool {
	if name == nil {
		return false
	}
	s := C.GoString(name)
	if len(s) <= len(".vpn") || !strings.EqualFold(s[len(s)-4:], ".vpn") {
		return false // not ours: let the next source answer
	}
	setup()
	var a netip.Addr
	var err error
	if lookups.Add(1) == 1 {
		a, err = nss.Find(globs, s)
	} else {
		a, err = resolver.Lookup(s)
	}
	if err != nil || !a.Is4() {
		return false
	}
	*addr = a.As4()
	return true
}

func gethostbyname(name *C.char, af C.int, result *C.struct_hostent, buffer *C.char, buflen C.size_t, errnop, herrnop *C.int) C.enum_nss_status {
	var addr [4]byte
	if af != C.AF_INET || !lookup(name, &addr) {
		return C.not_found(errnop, herrnop)
	}
	return C.fill_hostent(name, (*C.uchar)(unsafe.Pointer(&addr[0])), result, buffer, buflen, errnop, herrnop)
}

//export _nss_openvpn_gethostbyname_r
func _nss_openvpn_gethostbyname_r(name *C.char, result *C.struct_hostent, buffer *C.char, buflen C.size_t, errnop, herrnop *C.int) C.enum_nss_status {
	return gethostbyname(name, C.AF_INET, result, buffer, buflen, errnop, herrnop)
}

//export _nss_openvpn_gethostbyname2_r
func _nss_openvpn_gethostbyname2_r(name *C.char, af C.int, result *C.struct_hostent, buffer *C.char, buflen C.size_t, errnop, herrnop *C.int) C.enum_nss_status {
	return gethostbyname(name, af, result, buffer, buflen, errnop, herrnop)
}

//export _nss_openvpn_gethostbyname3_r
func _nss_openvpn_gethostbyname3_r(name *C.char, af C.int, result *C.struct_hostent, buffer *C.char, buflen C.size_t, errnop, herrnop *C.int, ttlp *C.int32_t, canonp **C.char) C.enum_nss_status {
	status := gethostbyname(name, af, result, buffer, buflen, errnop, herrnop)
	if status == C.NSS_STATUS_SUCCESS {
		if ttlp != nil {
			*ttlp = 0 // status files change every few seconds: do not cache
		}
		if canonp != nil {
			*canonp = result.h_name
		}
	}
	return status
}

func main() {}
