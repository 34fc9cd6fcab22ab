package internalapi

import (
	"context"
	"net/http/httptest"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/obvpn/obvpn/vpn/hook"

	"github.com/matryer/is"
)

// controlFile makes an empty auth control file in dir, as OpenVPN does
// before it runs the hook.
func controlFile(t *testing.T, dir, name string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// waitContent waits until the file holds want, or fails after 5 s.
func waitContent(t *testing.T, path, want string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		b, err := os.ReadFile(path)
		if err == nil && string(b) == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s holds %q (%v), want %q", path, b, err, want)
		}
		time.Sleep(5 * time.Millisecond) // polling a file OpenVPN would poll too
	}
}

func TestOpenControlFile(t *testing.T) {
	dir := t.TempDir()
	other := t.TempDir()
	good := controlFile(t, dir, "openvpn_acf_0123456789abcdef.tmp")
	if f, err := openControlFile(dir, good); err != nil {
		t.Fatalf("OpenVPN's own control file refused: %v", err)
	} else {
		f.Close()
	}
	if f, err := openControlFile(dir+"/", good); err != nil {
		t.Errorf("a trailing slash on the directory refused the file: %v", err)
	} else {
		f.Close()
	}

	secret := controlFile(t, other, "shadow")
	link := filepath.Join(dir, "openvpn_acf_link.tmp")
	if err := os.Symlink(secret, link); err != nil {
		t.Fatal(err)
	}
	hard := filepath.Join(dir, "openvpn_acf_hard.tmp")
	if err := os.Link(controlFile(t, dir, "victim"), hard); err != nil {
		t.Fatal(err)
	}
	fifo := filepath.Join(dir, "openvpn_acf_fifo.tmp")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	sub := filepath.Join(dir, "openvpn_acf_dir.tmp")
	if err := os.Mkdir(sub, 0o700); err != nil {
		t.Fatal(err)
	}
	nested := filepath.Join(dir, "x")
	if err := os.Mkdir(nested, 0o700); err != nil {
		t.Fatal(err)
	}
	for name, path := range map[string]string{
		"relative":           "openvpn_acf_0123456789abcdef.tmp",
		"dot-dot":            dir + "/x/../openvpn_acf_0123456789abcdef.tmp",
		"another directory":  controlFile(t, other, "openvpn_acf_0123456789abcdef.tmp"),
		"a subdirectory":     controlFile(t, nested, "openvpn_acf_0123456789abcdef.tmp"),
		"not OpenVPN's name": controlFile(t, dir, "server.key"),
		"credentials file":   controlFile(t, dir, "openvpn_up_0123456789abcdef.tmp"),
		"missing":            filepath.Join(dir, "openvpn_acf_missing.tmp"),
		"symbolic link":      link,
		"hard link":          hard,
		"FIFO":               fifo,
		"directory":          sub,
		"empty":              "",
	} {
		if f, err := openControlFile(dir, path); err == nil {
			f.Close()
			t.Errorf("%s (%s): opened", name, path)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "openvpn_acf_missing.tmp")); err == nil {
		t.Error("a missing control file was created")
	}
	if b, _ := os.ReadFile(secret); len(b) != 0 {
		t.Errorf("the symbolic link's target was written: %q", b)
	}
}

// gatedAuth allows the key "good" once gate is closed (nil: at once),
// and counts its calls.
type gatedAuth struct {
	gate  chan struct{}
	mu    sync.Mutex
	calls int
}

func (g *gatedAuth) Authenticate(ctx context.Context, uuid, key string) (bool, error) {
	g.mu.Lock()
	g.calls++
	g.mu.Unlock()
	if g.gate != nil {
		select {
		case <-g.gate:
		case <-ctx.Done():
			return false, ctx.Err()
		}
	}
	return key == "good", nil
}

func TestInternalAPIDeferred(t *testing.T) {
	dir := t.TempDir()
	body := func(key, acf string) string {
		return `{"username":"` + uuidA + `","password":"` + key + `","auth_control_file":"` + acf + `"}`
	}
	t.Run("answered at once, decided later", func(t *testing.T) {
		is := is.New(t)
		auth := &gatedAuth{gate: make(chan struct{})}
		const delay = 50 * time.Millisecond
		api := &Server{Auth: auth, ControlDir: dir, DelayOnAuthFail: delay}
		defer api.Close()
		good := controlFile(t, dir, "openvpn_acf_good.tmp")
		bad := controlFile(t, dir, "openvpn_acf_bad.tmp")
		w := do(api, "127.0.0.1:5000", "POST", "/api/v1/auth/", body("good", good))
		is.Equal(w.Code, 202)
		w = do(api, "127.0.0.1:5000", "POST", "/api/v1/auth/", body("bad", bad))
		is.Equal(w.Code, 202)
		if b, _ := os.ReadFile(good); len(b) != 0 {
			t.Fatalf("decided before the API answered: %q", b)
		}
		close(auth.gate)
		waitContent(t, good, "1")
		waitContent(t, bad, "0")
	})
	t.Run("denial after DelayOnAuthFail", func(t *testing.T) {
		const delay = 200 * time.Millisecond
		api := &Server{Auth: &gatedAuth{}, ControlDir: dir, DelayOnAuthFail: delay}
		defer api.Close()
		bad := controlFile(t, dir, "openvpn_acf_late.tmp")
		start := time.Now()
		if w := do(api, "127.0.0.1:5000", "POST", "/api/v1/auth/", body("bad", bad)); w.Code != 202 {
			t.Fatalf("status %d, want 202", w.Code)
		}
		if took := time.Since(start); took >= delay {
			t.Errorf("the deferred request was answered after %v: the delay held it", took)
		}
		waitContent(t, bad, "0")
		if took := time.Since(start); took < delay {
			t.Errorf("denied after %v, want DelayOnAuthFail (%v) first", took, delay)
		}
	})
	t.Run("refused files are 400, and never written", func(t *testing.T) {
		is := is.New(t)
		auth := &gatedAuth{}
		api := &Server{Auth: auth, ControlDir: dir}
		defer api.Close()
		elsewhere := controlFile(t, t.TempDir(), "openvpn_acf_x.tmp")
		for _, acf := range []string{elsewhere, filepath.Join(dir, "openvpn_acf_missing.tmp"), "relative.tmp"} {
			w := do(api, "127.0.0.1:5000", "POST", "/api/v1/auth/", body("good", acf))
			is.Equal(w.Code, 400)
		}
		api.Close()
		if b, _ := os.ReadFile(elsewhere); len(b) != 0 {
			t.Errorf("a refused file was written: %q", b)
		}
		is.Equal(auth.calls, 0)
		// Missing credentials are 400 before the file is looked at.
		w := do(api, "127.0.0.1:5000", "POST", "/api/v1/auth/", `{"username":"`+uuidA+`","auth_control_file":"x"}`)
		is.Equal(w.Code, 400)
	})
	t.Run("no ControlDir: answered synchronously", func(t *testing.T) {
		is := is.New(t)
		api := &Server{Auth: &gatedAuth{}}
		acf := controlFile(t, dir, "openvpn_acf_sync.tmp")
		is.Equal(do(api, "127.0.0.1:5000", "POST", "/api/v1/auth/", body("good", acf)).Code, 200)
		is.Equal(do(api, "127.0.0.1:5000", "POST", "/api/v1/auth/", body("bad", acf)).Code, 401)
		b, _ := os.ReadFile(acf)
		is.Equal(len(b), 0)
	})
	t.Run("Close ends the decisions in flight", func(t *testing.T) {
		is := is.New(t)
		auth := &gatedAuth{gate: make(chan struct{})} // never opens
		api := &Server{Auth: auth, ControlDir: dir}
		acf := controlFile(t, dir, "openvpn_acf_closed.tmp")
		is.Equal(do(api, "127.0.0.1:5000", "POST", "/api/v1/auth/", body("good", acf)).Code, 202)
		api.Close() // returns: the decision ended with it
		b, _ := os.ReadFile(acf)
		is.Equal(len(b), 0) // unanswered: OpenVPN's hand-window decides
		is.Equal(do(api, "127.0.0.1:5000", "POST", "/api/v1/auth/", body("good", acf)).Code, 503)
	})
	t.Run("through hook.Client", func(t *testing.T) {
		is := is.New(t)
		api := &Server{Auth: &gatedAuth{}, ControlDir: dir}
		defer api.Close()
		srv := httptest.NewServer(api)
		defer srv.Close()
		c := &hook.Client{BaseURL: srv.URL}
		ctx := context.Background()
		acf := controlFile(t, dir, "openvpn_acf_client.tmp")
		deferred, err := c.AuthDeferred(ctx, uuidA, "good", acf)
		is.NoErr(err)
		is.True(deferred)
		waitContent(t, acf, "1")
		// A file the API refuses: asked again synchronously.
		deferred, err = c.AuthDeferred(ctx, uuidA, "good", "/etc/passwd")
		is.NoErr(err)
		is.True(!deferred)
		deferred, err = c.AuthDeferred(ctx, uuidA, "bad", "/etc/passwd")
		is.True(!deferred)
		is.True(err != nil)
		// A server without deferral answers at once.
		old := httptest.NewServer(&Server{Auth: &gatedAuth{}})
		defer old.Close()
		deferred, err = (&hook.Client{BaseURL: old.URL}).AuthDeferred(ctx, uuidA, "good", acf)
		is.NoErr(err)
		is.True(!deferred)
	})
}

func TestPrepareControlDir(t *testing.T) {
	is := is.New(t)
	base := t.TempDir()
	// Let others search down to base, as /run/openvpn's parents do.
	for _, d := range []string{filepath.Dir(base), base} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	run := filepath.Join(base, "run")
	dir := filepath.Join(run, "openvpn-tmp")
	got, err := PrepareControlDir(dir, "/tmp", "nobody", "nogroup")
	is.NoErr(err)
	is.Equal(got, dir)
	fi, err := os.Stat(dir)
	is.NoErr(err)
	rfi, err := os.Stat(run)
	is.NoErr(err)
	is.Equal(rfi.Mode().Perm(), os.FileMode(0o755)) // the run directory stays searchable
	st := fi.Sys().(*syscall.Stat_t)
	if os.Geteuid() == 0 {
		g, err := user.LookupGroup("nogroup")
		is.NoErr(err)
		is.Equal(strconv.Itoa(int(st.Gid)), g.Gid)
		is.Equal(st.Uid, uint32(0))
		is.Equal(fi.Mode().Perm(), os.FileMode(0o770))
	} else {
		is.Equal(fi.Mode().Perm(), os.FileMode(0o700))
	}

	// An earlier run's files go; others stay.
	stale := controlFile(t, dir, "openvpn_up_stale.tmp")
	keep := controlFile(t, dir, "README")
	_, _ = PrepareControlDir(dir, "/tmp", "nobody", "nogroup")
	_, err = os.Stat(stale)
	is.True(os.IsNotExist(err))
	_, err = os.Stat(keep)
	is.NoErr(err)

	// A run directory that OpenVPN's user cannot search: the fallback,
	// with the reason.
	closed := filepath.Join(base, "closed")
	if err := os.Mkdir(closed, 0o700); err != nil {
		t.Fatal(err)
	}
	got, err = PrepareControlDir(filepath.Join(closed, "openvpn-tmp"), "/tmp", "nobody", "nogroup")
	is.Equal(got, "/tmp")
	is.True(err != nil && strings.Contains(err.Error(), closed))
	// Unless OpenVPN stays root.
	got, err = PrepareControlDir(filepath.Join(closed, "openvpn-tmp"), "/tmp", "root", "root")
	is.NoErr(err)
	is.Equal(got, filepath.Join(closed, "openvpn-tmp"))
	// A file in the way is an error.
	blocked := filepath.Join(base, "blocked")
	controlFile(t, base, "blocked")
	got, err = PrepareControlDir(blocked, "/tmp", "nobody", "nogroup")
	is.Equal(got, "")
	is.True(err != nil)
}

// FuzzOpenControlFile: whatever name a caller sends, only OpenVPN's
// control files directly in the directory are opened.
func FuzzOpenControlFile(f *testing.F) {
	dir := f.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "openvpn_acf_1.tmp"), nil, 0o600); err != nil {
		f.Fatal(err)
	}
	for _, s := range []string{dir + "/openvpn_acf_1.tmp", dir + "/../openvpn_acf_1.tmp", "/etc/passwd", dir + "//openvpn_acf_1.tmp", "", dir} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		fh, err := openControlFile(dir, name)
		if err != nil {
			return
		}
		fh.Close()
		if filepath.Dir(name) != dir || !strings.HasPrefix(filepath.Base(name), controlFilePrefix) || !strings.HasSuffix(name, controlFileSuffix) {
			t.Fatalf("opened %q", name)
		}
	})
}
