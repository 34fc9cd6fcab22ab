package internalapi

// Deferred authentication in script mode. OpenVPN 2.6's manual
// (doc/man-sections/script-options.rst, --auth-user-pass-verify): the
// script may exit 0 (accept), 1 (reject) or 2 (deferred); "If the
// authentication is deferred, the script must fork/start a background or
// another non-blocking operation to continue the authentication in the
// background. When finishing the authentication, a 1 or 0 must be written
// to the file specified by the auth_control_file." OpenVPN makes that file
// (and auth_pending_file, which obvpn leaves empty) before it runs the
// script, in its --tmp-dir (default /tmp; the via-file credentials go
// there too, removed when the script returns), named
// openvpn_acf_<random>.tmp and created O_CREAT|O_EXCL with mode 0600 by
// OpenVPN's own user, and it reads the file's first byte while the client
// waits, within --hand-window; it needs script-security 2 and nothing more
// in the server's configuration. So cmd/vpn-auth posts the credentials
// and the file's name to the internal API and exits 2 at once, and OpenVPN
// goes on with its other clients while the API decides.
//
// The server runs as root and OpenVPN as nobody: the file is written only
// when it lies directly in the directory the server gave OpenVPN as its
// tmp-dir, carries OpenVPN's name for it, is opened without following a
// symbolic link and is a regular file with a single link. It is never
// created.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	devuuid "github.com/obvpn/obvpn/vpn/balena/uuid"
	"go.opentelemetry.io/otel/trace"
)

// controlFilePrefix and controlFileSuffix frame the names OpenVPN gives
// its auth control files (platform_create_temp_file with prefix "acf").
const (
	controlFilePrefix = "openvpn_acf_"
	controlFileSuffix = ".tmp"
)

// errControlFile reports an auth control file that may not be written.
var errControlFile = errors.New("not an auth control file of OpenVPN's tmp-dir")

// openControlFile opens name, an auth control file that OpenVPN made in
// dir, for writing, or says why it may not be written.
func openControlFile(dir, name string) (*os.File, error) {
	if !filepath.IsAbs(name) || filepath.Clean(name) != name || filepath.Dir(name) != filepath.Clean(dir) {
		return nil, fmt.Errorf("%q: %w %s", name, errControlFile, dir)
	}
	base := filepath.Base(name)
	if !strings.HasPrefix(base, controlFilePrefix) || !strings.HasSuffix(base, controlFileSuffix) {
		return nil, fmt.Errorf("%q: %w %s", name, errControlFile, dir)
	}
	// No O_CREAT: a file that is not there is not OpenVPN's. O_NOFOLLOW
	// refuses a symbolic link, O_NONBLOCK a FIFO without a reader, and
	// O_NOCTTY a terminal; the checks below refuse anything else that is
	// not a regular file of one link (a hard link to another file).
	fd, err := syscall.Open(name, syscall.O_WRONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK|syscall.O_NOCTTY|syscall.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("auth control file %s: %w", name, err)
	}
	var st syscall.Stat_t
	if err := syscall.Fstat(fd, &st); err != nil {
		syscall.Close(fd)
		return nil, fmt.Errorf("auth control file %s: %w", name, err)
	}
	if st.Mode&syscall.S_IFMT != syscall.S_IFREG || st.Nlink != 1 {
		syscall.Close(fd)
		return nil, fmt.Errorf("%q: %w %s (not a regular file of one link)", name, errControlFile, dir)
	}
	return os.NewFile(uintptr(fd), name), nil
}

// PrepareControlDir makes dir the directory where OpenVPN, running as
// account's user and group, keeps its temporary files (tmp-dir): the
// server's, writable by OpenVPN's group (root's own when the server is
// not root), emptied of an earlier run's files. It returns dir, or
// fallback (OpenVPN's default) with the reason when OpenVPN's user could
// not reach dir: a directory above it does not let others search it.
func PrepareControlDir(dir, fallback, account, group string) (string, error) {
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return "", fmt.Errorf("internalapi: OpenVPN's tmp-dir: %w", err)
	}
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return "", fmt.Errorf("internalapi: OpenVPN's tmp-dir: %w", err)
	}
	fi, err := os.Lstat(dir)
	if err != nil {
		return "", fmt.Errorf("internalapi: OpenVPN's tmp-dir: %w", err)
	}
	if !fi.IsDir() {
		return "", fmt.Errorf("internalapi: OpenVPN's tmp-dir %s is not a directory", dir)
	}
	mode := os.FileMode(0o700)
	if os.Geteuid() == 0 && account != "root" {
		g, err := user.LookupGroup(group)
		if err != nil {
			return "", fmt.Errorf("internalapi: OpenVPN's tmp-dir: group %q (VPN_OPENVPN_GROUP): %w", group, err)
		}
		gid, err := strconv.Atoi(g.Gid)
		if err != nil {
			return "", fmt.Errorf("internalapi: OpenVPN's tmp-dir: group %q: gid %q: %w", group, g.Gid, err)
		}
		if err := os.Lchown(dir, 0, gid); err != nil {
			return "", fmt.Errorf("internalapi: OpenVPN's tmp-dir: %w", err)
		}
		mode = 0o770
	}
	if err := os.Chmod(dir, mode); err != nil {
		return "", fmt.Errorf("internalapi: OpenVPN's tmp-dir: %w", err)
	}
	// What an OpenVPN that was killed left: credentials files among them.
	if entries, err := os.ReadDir(dir); err == nil {
		for _, e := range entries {
			if strings.HasPrefix(e.Name(), "openvpn_") && e.Type().IsRegular() {
				_ = os.Remove(filepath.Join(dir, e.Name()))
			}
		}
	}
	if account == "root" {
		return dir, nil
	}
	for p := filepath.Dir(dir); ; p = filepath.Dir(p) {
		fi, err := os.Stat(p)
		if err != nil {
			return "", fmt.Errorf("internalapi: OpenVPN's tmp-dir: %w", err)
		}
		if fi.Mode().Perm()&0o001 == 0 {
			return fallback, fmt.Errorf("OpenVPN runs as %q, but %s (mode %v) does not let others search it", account, p, fi.Mode().Perm())
		}
		if p == filepath.Dir(p) {
			return dir, nil
		}
	}
}

// serveDeferred answers a deferred authentication: 202 at once, and the
// decision written to the auth control file name when the Authenticator
// has it, a denial after DelayOnAuthFail. The file must be one that
// OpenVPN made in ControlDir (400 otherwise).
func (a *Server) serveDeferred(w http.ResponseWriter, r *http.Request, username, password, name string) {
	f, err := openControlFile(a.ControlDir, name)
	if err != nil {
		a.logger().Warn("auth: deferred authentication refused", "uuid", devuuid.ForLog(username),
			"client", clientAddr(r, a.TrustProxy), "err", err)
		http.Error(w, "Bad Request: auth_control_file", http.StatusBadRequest)
		return
	}
	a.deferMu.Lock()
	if a.deferCtx == nil {
		a.deferCtx, a.deferStop = context.WithCancel(context.Background())
	}
	if a.deferCtx.Err() != nil {
		a.deferMu.Unlock()
		f.Close()
		http.Error(w, "Service Unavailable", http.StatusServiceUnavailable)
		return
	}
	// The decision outlives the request, but stays in its trace: its
	// vpn.auth span is a child of the request's span.
	ctx := trace.ContextWithSpanContext(a.deferCtx, trace.SpanContextFromContext(r.Context()))
	a.deferred.Add(1)
	a.deferMu.Unlock()
	w.WriteHeader(http.StatusAccepted)
	io.WriteString(w, "Accepted")
	client := clientAddr(r, a.TrustProxy)
	go func() {
		defer a.deferred.Done()
		defer f.Close()
		a.decideDeferred(ctx, f, username, password, client.String())
	}()
}

// decideDeferred decides one deferred authentication and writes the
// answer into f, unless ctx ends first (then OpenVPN's hand-window
// denies the client).
func (a *Server) decideDeferred(ctx context.Context, f *os.File, username, password, client string) {
	var ok bool
	var err error
	if a.Auth != nil {
		ok, err = a.Auth.Authenticate(ctx, username, password)
	}
	answer := []byte{'1'}
	if !ok {
		if ctx.Err() != nil {
			return
		}
		a.logger().Info("auth: device denied", "uuid", devuuid.ForLog(username), "client", client, "deferred", true, "err", err)
		if a.Denied != nil {
			a.Denied()
		}
		if a.DelayOnAuthFail > 0 {
			t := time.NewTimer(a.DelayOnAuthFail)
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				return
			}
		}
		answer[0] = '0'
	}
	if _, err := f.Write(answer); err != nil {
		a.logger().Warn("auth: could not write the auth control file", "uuid", devuuid.ForLog(username), "file", f.Name(), "err", err)
	}
}

// Close ends the deferred authentications in flight, leaving their
// control files unanswered (OpenVPN's hand-window denies those clients),
// and waits for them; later deferred requests are answered 503. The
// synchronous form is not affected.
func (a *Server) Close() {
	a.deferMu.Lock()
	if a.deferCtx == nil {
		a.deferCtx, a.deferStop = context.WithCancel(context.Background())
	}
	a.deferStop()
	a.deferMu.Unlock()
	a.deferred.Wait()
}
