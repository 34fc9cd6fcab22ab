// Package nss finds connected OpenVPN devices by name from the status files
// that OpenVPN writes.
//
// [ParseStatus] reads a status file of any version (1, 2 or 3) into a
// [Status]: its clients, its routing table and its global statistics. The
// columns are found by the names of the file's headers, not by position,
// so files from OpenVPN 2.4 to 2.7 parse alike, and the quirks of real files
// (torn writes, UNDEF names, cached and subnet routes, IPv6 and MAC
// routing rows, old timestamps, protocol prefixes) are handled.
//
// [Resolver] answers "<uuid>.vpn" names from an index over many status
// files, kept up to date by reading only the files that changed, plus
// what [Resolver.Learn] and [Resolver.Forget] record from OpenVPN's
// management interface before the files say it; [Find] answers one name
// by a scan. [Resolver.WriteIndex] and [IndexWriter] write what a
// resolver knows to an index file (see index.go for its format), which
// the glibc NSS module cmd/libnss_openvpn, a small C library, maps to
// answer every program on the host; [ReadIndex] reads it back.
//
// The package is not a DNS server and resolves IPv4 addresses only, as
// the routing table gives them; it reads files and nothing else: it
// neither talks to OpenVPN (see package openvpnmgmt, which uses
// ParseStatus for the management "status" command) nor knows about the
// balena API.
package nss

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strconv"
	"strings"
	"time"
)

// ErrIncomplete reports a status file without its closing END line: OpenVPN
// rewrites the file in place, so a reader can see it half written.
// ParseStatus returns it together with what it could read.
var ErrIncomplete = errors.New("nss: status file incomplete (no END line)")

// ErrFormat reports a file that is not an OpenVPN status file.
var ErrFormat = errors.New("nss: not an OpenVPN status file")

// Status is the content of one status file.
type Status struct {
	// Version is the status file version: 1, 2 or 3 (tab-separated).
	Version int
	// Title is OpenVPN's version banner (versions 2 and 3).
	Title string
	// Updated is when OpenVPN wrote the file.
	Updated time.Time
	// Clients are the connected clients, in file order.
	Clients []Client
	// Routes are the routing table's rows, in file order.
	Routes []Route
	// GlobalStats are the GLOBAL STATS name/value pairs.
	GlobalStats map[string]string

	onRoute func(Route) // if set, takes the routes instead of Routes
}

// Client is one row of the client list.
type Client struct {
	// CommonName is the client's common name: the device UUID, as OpenVPN
	// runs with username-as-common-name. Empty when OpenVPN printed UNDEF.
	CommonName string
	// RealAddress is the client's public address and port. Proto is the
	// protocol prefix of OpenVPN 2.7 ("udp4", "tcp4-server", …), if any.
	RealAddress netip.AddrPort
	Proto       string
	// VirtualAddress and VirtualIPv6 are the client's tunnel addresses;
	// zero when absent (status version 1 has neither).
	VirtualAddress netip.Addr
	VirtualIPv6    netip.Addr
	BytesReceived  uint64
	BytesSent      uint64
	ConnectedSince time.Time
	// Username is the authenticated user name; empty for UNDEF.
	Username string
	// ClientID and PeerID are OpenVPN's ids; -1 when absent.
	ClientID int64
	PeerID   int64
	// Cipher is the data channel cipher, when given.
	Cipher string
}

// Route is one row of the routing table.
type Route struct {
	// Virtual is the row's virtual address as written: an IPv4 or IPv6
	// address, an "a.b.c.d/nn" subnet, a MAC address (with "@vid"), and a
	// trailing "C" for a cached route.
	Virtual string
	// Addr is Virtual as a host address when, and only when, it is a plain
	// IPv4 address; otherwise it is the zero Addr. Only such rows answer
	// a name lookup.
	Addr        netip.Addr
	CommonName  string
	RealAddress netip.AddrPort
	Proto       string
	LastRef     time.Time
}

// maxLine bounds a status file line; real lines are a few hundred bytes.
const maxLine = 64 << 10

// ParseStatus reads a status file of version 1, 2 or 3. A file without its
// END line yields the rows read so far and [ErrIncomplete]; a file that is
// not a status file yields [ErrFormat]. Malformed rows are skipped, never
// guessed at: a row that does not parse cannot give a name an address.
func ParseStatus(r io.Reader) (*Status, error) {
	return parseStatus(r, nil)
}

// parseStatus is ParseStatus; with onRoute set it skips the client list,
// which the resolver's index does not need, and passes each routing row
// to onRoute instead of keeping it.
func parseStatus(r io.Reader, onRoute func(Route)) (*Status, error) {
	br := bufio.NewReaderSize(r, 64<<10)
	st := &Status{GlobalStats: map[string]string{}, onRoute: onRoute}
	routesOnly := onRoute != nil
	first, err := readLine(br)
	switch {
	case err == io.EOF:
		return nil, fmt.Errorf("%w: empty", ErrFormat)
	case err == errTornLine:
		return st, ErrIncomplete // the first line is still being written
	case err != nil:
		return nil, err
	}
	switch {
	case first == "OpenVPN CLIENT LIST":
		st.Version = 1
		err = parseV1(br, st, routesOnly)
	case strings.HasPrefix(first, "TITLE,"), strings.HasPrefix(first, "TIME,"), strings.HasPrefix(first, "HEADER,"):
		st.Version = 2
		err = parseV23(br, st, first, ",", routesOnly)
	case strings.HasPrefix(first, "TITLE\t"), strings.HasPrefix(first, "TIME\t"), strings.HasPrefix(first, "HEADER\t"):
		st.Version = 3
		err = parseV23(br, st, first, "\t", routesOnly)
	default:
		return nil, fmt.Errorf("%w: first line %q", ErrFormat, truncate(first))
	}
	return st, err
}

// readLine returns the next line without its end; io.EOF only when no
// byte is left. A line longer than maxLine is an error.
func readLine(br *bufio.Reader) (string, error) {
	b, err := readBytes(br)
	if err != nil && err != errTornLine {
		return "", err
	}
	return string(b), err
}

// readBytes is readLine without the copy: the line is valid until the
// next read from br.
func readBytes(br *bufio.Reader) ([]byte, error) {
	chunk, err := br.ReadSlice('\n')
	if err == nil {
		return bytes.TrimRight(chunk, "\r\n"), nil // the common case: no copy
	}
	buf := append([]byte(nil), chunk...)
	for err == bufio.ErrBufferFull {
		if len(buf) > maxLine {
			return nil, fmt.Errorf("%w: a line longer than %d bytes", ErrFormat, maxLine)
		}
		chunk, err = br.ReadSlice('\n')
		buf = append(buf, chunk...)
	}
	switch {
	case len(buf) > maxLine:
		return nil, fmt.Errorf("%w: a line longer than %d bytes", ErrFormat, maxLine)
	case err == nil:
		return bytes.TrimRight(buf, "\r\n"), nil
	case err == io.EOF && len(buf) == 0:
		return nil, io.EOF
	case err == io.EOF:
		// A last line without its newline is a torn write: END without
		// "\n" does not count as END.
		return buf, errTornLine
	}
	return nil, err
}

// addRoute keeps r, or passes it on.
func (st *Status) addRoute(r Route) {
	if st.onRoute != nil {
		st.onRoute(r)
		return
	}
	st.Routes = append(st.Routes, r)
}

// errTornLine marks a last line that has no newline.
var errTornLine = errors.New("torn line")

// Column names of the headers, by the field they fill.
const (
	colCommonName = iota
	colRealAddress
	colVirtualAddress
	colVirtualIPv6
	colBytesReceived
	colBytesSent
	colConnectedSince
	colConnectedSinceT
	colUsername
	colClientID
	colPeerID
	colCipher
	colLastRef
	colLastRefT
	nCols
)

var colNames = [nCols]string{
	colCommonName:      "Common Name",
	colRealAddress:     "Real Address",
	colVirtualAddress:  "Virtual Address",
	colVirtualIPv6:     "Virtual IPv6 Address",
	colBytesReceived:   "Bytes Received",
	colBytesSent:       "Bytes Sent",
	colConnectedSince:  "Connected Since",
	colConnectedSinceT: "Connected Since (time_t)",
	colUsername:        "Username",
	colClientID:        "Client ID",
	colPeerID:          "Peer ID",
	colCipher:          "Data Channel Cipher",
	colLastRef:         "Last Ref",
	colLastRefT:        "Last Ref (time_t)",
}

// columns holds, for each known column, its position in a header's rows,
// or -1.
type columns [nCols]int

func newColumns(names []string) *columns {
	var c columns
	for i := range c {
		c[i] = -1
	}
	for pos, n := range names {
		for i, want := range colNames {
			if n == want {
				c[i] = pos
			}
		}
	}
	return &c
}

// get returns the field of column col, or "".
func (c *columns) get(f []string, col int) string {
	if i := c[col]; i >= 0 && i < len(f) {
		return f[i]
	}
	return ""
}

// splitInto splits s at sep into dst's storage, to spare an allocation
// per line.
func splitInto(dst []string, s, sep string) []string {
	dst = dst[:0]
	for {
		i := strings.Index(s, sep)
		if i < 0 {
			return append(dst, s)
		}
		dst = append(dst, s[:i])
		s = s[i+len(sep):]
	}
}

func parseV1(br *bufio.Reader, st *Status, routesOnly bool) error {
	var section string
	var cols *columns
	var f []string
	for {
		line, err := readLine(br)
		if err == io.EOF || err == errTornLine {
			return ErrIncomplete
		}
		if err != nil {
			return err
		}
		switch {
		case line == "END":
			return nil
		case line == "ROUTING TABLE", line == "GLOBAL STATS":
			section, cols = line, nil
			continue
		}
		f = splitInto(f, line, ",")
		switch {
		case section == "" && f[0] == "Updated" && len(f) > 1:
			st.Updated = parseTime(f[1], "")
		case section == "GLOBAL STATS":
			if len(f) >= 2 {
				st.GlobalStats[strings.Clone(f[0])] = strings.Join(f[1:], ",")
			}
		case cols == nil:
			// The first line of a section names its columns.
			cols = newColumns(f)
		case section == "":
			if routesOnly {
				continue
			}
			if c, ok := clientRow(cols, f); ok {
				st.Clients = append(st.Clients, c)
			}
		case section == "ROUTING TABLE":
			if r, ok := routeRow(cols, f, routesOnly); ok {
				st.addRoute(r)
			}
		}
	}
}

// The sections of a version 2 or 3 file, in the order OpenVPN writes
// them.
const (
	stageHead    = iota // TITLE, TIME
	stageClients        // after HEADER CLIENT_LIST
	stageRoutes         // after HEADER ROUTING_TABLE
	stageGlobal         // after the first GLOBAL_STATS
)

// parseV23 reads a version 2 or 3 file. OpenVPN rewrites the file in
// place, so a read can join the start of a new file to the tail of the
// old one, END included; such a junction shows as a line cut short (whose
// first field is not an upper-case keyword, or is a known one cut short),
// as a section out of order, or as a row whose width is not its header's,
// and makes the file incomplete. Lines of unknown keywords are ignored.
func parseV23(br *bufio.Reader, st *Status, line, sep string, routesOnly bool) error {
	clientPrefix := []byte("CLIENT_LIST" + sep)
	var clientCols, routeCols *columns
	var clientWidth, routeWidth int // fields in a row, from the headers
	var f []string
	stage := stageHead
	for {
		f = splitInto(f, line, sep)
		ok := true // in its place
		switch f[0] {
		case "END":
			if len(f) == 1 {
				return nil
			}
		case "TITLE", "TIME":
			ok = stage == stageHead
			if f[0] == "TITLE" {
				st.Title = strings.Join(f[1:], sep)
			} else if len(f) >= 3 {
				st.Updated = parseTime(f[1], f[2])
			} else if len(f) == 2 {
				st.Updated = parseTime(f[1], "")
			}
		case "HEADER":
			if len(f) >= 2 {
				switch f[1] {
				case "CLIENT_LIST":
					ok = stage == stageHead
					stage, clientCols, clientWidth = stageClients, newColumns(f[2:]), len(f)-2
				case "ROUTING_TABLE":
					ok = stage < stageRoutes
					stage, routeCols, routeWidth = stageRoutes, newColumns(f[2:]), len(f)-2
				}
			}
		case "CLIENT_LIST":
			ok = stage == stageClients && len(f)-1 == clientWidth
			if ok {
				if c, ok := clientRow(clientCols, f[1:]); ok {
					st.Clients = append(st.Clients, c)
				}
			}
		case "ROUTING_TABLE":
			ok = stage == stageRoutes && len(f)-1 == routeWidth
			if ok {
				if r, ok := routeRow(routeCols, f[1:], routesOnly); ok {
					st.addRoute(r)
				}
			}
		case "GLOBAL_STATS":
			stage = stageGlobal
			if len(f) >= 3 {
				st.GlobalStats[strings.Clone(f[1])] = strings.Join(f[2:], sep)
			}
		default:
			ok = isKeyword(f[0]) && !cutKeyword(f[0])
		}
		if !ok || stage == stageGlobal && f[0] != "GLOBAL_STATS" {
			return ErrIncomplete
		}
		// The next line; with routesOnly, client rows are skipped before
		// they cost a copy.
		for {
			b, err := readBytes(br)
			if err == io.EOF || err == errTornLine {
				return ErrIncomplete
			}
			if err != nil {
				return err
			}
			if routesOnly && bytes.HasPrefix(b, clientPrefix) {
				if stage != stageClients {
					return ErrIncomplete
				}
				continue
			}
			line = string(b)
			break
		}
	}
}

// cutKeyword says whether s is a known keyword cut short, as at a junction.
func cutKeyword(s string) bool {
	for _, k := range [...]string{"TITLE", "TIME", "HEADER", "CLIENT_LIST", "ROUTING_TABLE", "GLOBAL_STATS", "END"} {
		if len(s) < len(k) && strings.HasPrefix(k, s) {
			return true
		}
	}
	return false
}

// isKeyword says whether s could be the first field of a line OpenVPN
// wrote whole: upper-case letters, digits and underscores, starting with a
// letter.
func isKeyword(s string) bool {
	if s == "" || s[0] < 'A' || s[0] > 'Z' {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; !(c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_') {
			return false
		}
	}
	return true
}

func clientRow(c *columns, f []string) (Client, bool) {
	// The strings are copied out of the line, so that a Client does not
	// keep the whole line alive.
	cl := Client{
		CommonName: strings.Clone(undef(c.get(f, colCommonName))),
		Cipher:     internCipher(c.get(f, colCipher)),
		ClientID:   -1,
		PeerID:     -1,
	}
	if u := undef(c.get(f, colUsername)); u == cl.CommonName {
		cl.Username = cl.CommonName
	} else {
		cl.Username = strings.Clone(u)
	}
	cl.Proto, cl.RealAddress = parseReal(c.get(f, colRealAddress))
	cl.VirtualAddress = parseHost(c.get(f, colVirtualAddress), true)
	cl.VirtualIPv6 = parseHost(c.get(f, colVirtualIPv6), false)
	cl.BytesReceived, _ = strconv.ParseUint(c.get(f, colBytesReceived), 10, 64)
	cl.BytesSent, _ = strconv.ParseUint(c.get(f, colBytesSent), 10, 64)
	cl.ConnectedSince = parseTime(c.get(f, colConnectedSince), c.get(f, colConnectedSinceT))
	if n, err := strconv.ParseInt(c.get(f, colClientID), 10, 64); err == nil {
		cl.ClientID = n
	}
	if n, err := strconv.ParseInt(c.get(f, colPeerID), 10, 64); err == nil {
		cl.PeerID = n
	}
	// A header without a common name column has no client rows.
	return cl, c[colCommonName] >= 0
}

// routeRow parses a routing row. With passed, the Route is only passed to
// the resolver's callback, which keeps none of its strings and needs no
// real address: the strings are not copied out of the line, and the real
// address is not parsed.
func routeRow(c *columns, f []string, passed bool) (Route, bool) {
	r := Route{
		Virtual:    c.get(f, colVirtualAddress),
		CommonName: undef(c.get(f, colCommonName)),
		LastRef:    parseTime(c.get(f, colLastRef), c.get(f, colLastRefT)),
	}
	if !passed {
		r.Virtual, r.CommonName = strings.Clone(r.Virtual), strings.Clone(r.CommonName)
		r.Proto, r.RealAddress = parseReal(c.get(f, colRealAddress))
	}
	r.Addr = parseHost(r.Virtual, true)
	return r, r.Virtual != ""
}

// parseHost returns s as an address when it is a plain host address of the
// wanted family (IPv4 when v4, else IPv6): no "/nn", no cached-route "C",
// no MAC address, no zone.
func parseHost(s string, v4 bool) netip.Addr {
	a, err := netip.ParseAddr(s)
	if err != nil || a.Zone() != "" {
		return netip.Addr{}
	}
	if v4 != a.Is4() {
		return netip.Addr{}
	}
	return a
}

// parseReal parses a real address, "1.2.3.4:5678" or "[2001:db8::1]:5678"
// or OpenVPN 2.7's "udp4:1.2.3.4:5678", into its protocol prefix and
// address.
func parseReal(s string) (proto string, ap netip.AddrPort) {
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return "", ap
	}
	if p, rest, ok := strings.Cut(s, ":"); ok && p != "" && !strings.ContainsAny(p, ".[") {
		if ap, err := netip.ParseAddrPort(rest); err == nil {
			return p, ap
		}
		// OpenVPN prints a bare IPv6 address with its port after a colon.
		if i := strings.LastIndexByte(rest, ':'); i > 0 {
			if a, err := netip.ParseAddr(rest[:i]); err == nil {
				if port, err := strconv.ParseUint(rest[i+1:], 10, 16); err == nil {
					return p, netip.AddrPortFrom(a, uint16(port))
				}
			}
		}
	}
	return "", netip.AddrPort{}
}

// parseTime prefers a time_t column; else it reads OpenVPN's formatted
// time, "2006-01-02 15:04:05" since 2.5 or ctime-style before, as local
// time.
func parseTime(formatted, timeT string) time.Time {
	if n, err := strconv.ParseInt(timeT, 10, 64); err == nil && n > 0 {
		return time.Unix(n, 0)
	}
	for _, layout := range []string{time.DateTime, time.ANSIC} {
		if t, err := time.ParseInLocation(layout, formatted, time.Local); err == nil {
			return t
		}
	}
	return time.Time{}
}

// internCipher returns the common cipher names without a copy of their
// own.
func internCipher(s string) string {
	for _, c := range [...]string{"AES-256-GCM", "AES-128-GCM", "AES-192-GCM", "CHACHA20-POLY1305", "AES-256-CBC", "AES-128-CBC", "BF-CBC", "none"} {
		if s == c {
			return c
		}
	}
	return strings.Clone(s)
}

func undef(s string) string {
	if s == "UNDEF" {
		return ""
	}
	return s
}

func truncate(s string) string {
	if len(s) > 64 {
		return s[:64] + "…"
	}
	return s
}
