package deploy

import (
	"encoding/json"
	"go/parser"
	"go/token"
	"maps"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
)

// commands are the repository's commands that the image holds in
// /usr/local/bin, and nssModule the shared library it installs for glibc.
var (
	commands  = []string{"open-balena-vpn", "connect-proxy", "vpn-auth", "vpn-client-event", "obvpnctl"}
	nssModule = "libnss_openvpn"
)

// runtimePackages are the Debian packages the server runs programs from:
// openvpn and haproxy, ip and tc (iproute2), and the CA certificates for
// the balena API over HTTPS.
var runtimePackages = []string{"openvpn", "haproxy", "iproute2", "ca-certificates"}

// packageOf names the Debian package of each program (not one of
// commands) that the deployments may run in the container.
var packageOf = map[string]string{
	"curl":    "curl",
	"ip":      "iproute2",
	"tc":      "iproute2",
	"openvpn": "openvpn",
	"haproxy": "haproxy",
}

const modulePath = "github.com/obvpn/obvpn"

// instruction is one Dockerfile instruction, continuation lines joined and
// comment lines left out.
type instruction struct {
	cmd   string // upper case: FROM, RUN, …
	args  string
	line  int
	stage int // the index of its FROM
}

type stage struct {
	image, name string
}

type dockerfile struct {
	text         string
	instructions []instruction
	// stages' images are as docker build makes them with no build
	// arguments: the global ARGs' defaults expanded.
	stages     []stage
	globalArgs map[string]string // ARG name → default, before the first FROM
}

func parseDockerfile(t *testing.T) *dockerfile {
	t.Helper()
	d := &dockerfile{text: string(readFile(t, dockerfilePath)), globalArgs: map[string]string{}}
	var cur strings.Builder
	start, stageIdx := 0, -1
	for i, line := range strings.Split(d.text, "\n") {
		trimmed := strings.TrimSpace(line)
		if trimmed == "" || strings.HasPrefix(trimmed, "#") {
			continue
		}
		if cur.Len() == 0 {
			start = i + 1
		}
		if strings.HasSuffix(trimmed, `\`) {
			cur.WriteString(strings.TrimSuffix(trimmed, `\`) + " ")
			continue
		}
		cur.WriteString(trimmed)
		cmd, args, _ := strings.Cut(cur.String(), " ")
		cur.Reset()
		in := instruction{cmd: strings.ToUpper(cmd), args: strings.TrimSpace(args), line: start}
		if in.cmd == "ARG" && stageIdx < 0 {
			// A global build argument, which FROM lines may name: its
			// default is what docker build uses.
			k, v, _ := strings.Cut(in.args, "=")
			d.globalArgs[k] = v
		}
		if in.cmd == "FROM" {
			f := strings.Fields(in.args)
			st := stage{image: os.Expand(f[0], func(k string) string { return d.globalArgs[k] })}
			if len(f) == 3 && strings.EqualFold(f[1], "AS") {
				st.name = f[2]
			}
			d.stages = append(d.stages, st)
			stageIdx++
		}
		in.stage = stageIdx
		d.instructions = append(d.instructions, in)
	}
	if cur.Len() > 0 {
		t.Fatalf("%s: ends in a continuation line", dockerfilePath)
	}
	if len(d.stages) == 0 {
		t.Fatalf("%s: no FROM", dockerfilePath)
	}
	return d
}

func (d *dockerfile) final() int { return len(d.stages) - 1 }

// in returns the instructions named cmd in stage st (any stage if st < 0).
func (d *dockerfile) in(st int, cmd string) []instruction {
	var out []instruction
	for _, in := range d.instructions {
		if in.cmd == cmd && (st < 0 || in.stage == st) {
			out = append(out, in)
		}
	}
	return out
}

// shellWords splits a shell command line into words, with quotes and
// backslashes as sh reads them (no expansions).
func shellWords(s string) []string {
	var words []string
	var w strings.Builder
	inWord := false
	var quote byte
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case quote == '\'':
			if c == '\'' {
				quote = 0
			} else {
				w.WriteByte(c)
			}
		case quote == '"':
			switch {
			case c == '"':
				quote = 0
			case c == '\\' && i+1 < len(s):
				i++
				w.WriteByte(s[i])
			default:
				w.WriteByte(c)
			}
		case c == '\'' || c == '"':
			quote, inWord = c, true
		case c == '\\' && i+1 < len(s):
			i++
			w.WriteByte(s[i])
			inWord = true
		case c == ' ' || c == '\t' || c == '\n':
			if inWord {
				words = append(words, w.String())
				w.Reset()
				inWord = false
			}
		default:
			w.WriteByte(c)
			inWord = true
		}
	}
	if inWord {
		words = append(words, w.String())
	}
	return words
}

// simpleCommand is one command of a RUN line: its variable assignments
// and its words.
type simpleCommand struct {
	env  map[string]string
	args []string
}

var assignment = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*=`)

// simpleCommands splits a RUN line at &&, ||, ;, | and braces.
func simpleCommands(run string) []simpleCommand {
	var out []simpleCommand
	cur := simpleCommand{env: map[string]string{}}
	flush := func() {
		if len(cur.args) > 0 {
			out = append(out, cur)
		}
		cur = simpleCommand{env: map[string]string{}}
	}
	for _, w := range shellWords(run) {
		switch w {
		case "&&", "||", ";", "|", "{", "}":
			flush()
			continue
		}
		end := strings.HasSuffix(w, ";")
		w = strings.TrimSuffix(w, ";")
		if len(cur.args) == 0 && assignment.MatchString(w) {
			k, v, _ := strings.Cut(w, "=")
			cur.env[k] = v
		} else if w != "" {
			cur.args = append(cur.args, w)
		}
		if end {
			flush()
		}
	}
	flush()
	return out
}

// goBuild is a go build command of the Dockerfile.
type goBuild struct {
	env            map[string]string
	out, buildmode string
	packages       []string
}

func (d *dockerfile) goBuilds(st int) []goBuild {
	var out []goBuild
	for _, in := range d.in(st, "RUN") {
		for _, c := range simpleCommands(in.args) {
			if len(c.args) < 2 || c.args[0] != "go" || c.args[1] != "build" {
				continue
			}
			b := goBuild{env: c.env}
			for i := 2; i < len(c.args); i++ {
				a := c.args[i]
				switch {
				case a == "-o" && i+1 < len(c.args):
					i++
					b.out = c.args[i]
				case strings.HasPrefix(a, "-buildmode="):
					b.buildmode = strings.TrimPrefix(a, "-buildmode=")
				case strings.HasPrefix(a, "./"):
					b.packages = append(b.packages, path.Clean(a))
				}
			}
			out = append(out, b)
		}
	}
	return out
}

// aptPackages is every package the stage installs with apt-get install.
func (d *dockerfile) aptPackages(st int) map[string]bool {
	pkgs := make(map[string]bool)
	for _, in := range d.in(st, "RUN") {
		for _, c := range simpleCommands(in.args) {
			if len(c.args) < 2 || c.args[0] != "apt-get" {
				continue
			}
			i := slices.Index(c.args, "install")
			if i < 0 {
				continue
			}
			for _, a := range c.args[i+1:] {
				if !strings.HasPrefix(a, "-") {
					pkgs[a] = true
				}
			}
		}
	}
	return pkgs
}

// copies returns the stage's COPY instructions as (from, sources, dest).
func (d *dockerfile) copies(st int) (out []struct {
	from string
	srcs []string
	dest string
}) {
	for _, in := range d.in(st, "COPY") {
		w := shellWords(in.args)
		var from string
		for len(w) > 0 && strings.HasPrefix(w[0], "--") {
			if v, ok := strings.CutPrefix(w[0], "--from="); ok {
				from = v
			}
			w = w[1:]
		}
		if len(w) < 2 {
			continue
		}
		out = append(out, struct {
			from string
			srcs []string
			dest string
		}{from, w[:len(w)-1], w[len(w)-1]})
	}
	return out
}

// dockerfileEnv is every variable the Dockerfile's ENV lines set.
func dockerfileEnv(t *testing.T, d *dockerfile) map[string]string {
	t.Helper()
	env := make(map[string]string)
	for _, in := range d.in(-1, "ENV") {
		w := shellWords(in.args)
		if len(w) == 0 {
			t.Fatalf("%s:%d: empty ENV", dockerfilePath, in.line)
		}
		if !strings.Contains(w[0], "=") { // ENV NAME value
			env[w[0]] = strings.Join(w[1:], " ")
			continue
		}
		for _, kv := range w {
			k, v, ok := strings.Cut(kv, "=")
			if !ok {
				t.Fatalf("%s:%d: ENV %q: want NAME=value", dockerfilePath, in.line, kv)
			}
			env[k] = v
		}
	}
	return env
}

// TestDockerfile checks the image: a Go 1.26 build stage on bookworm that
// builds every command without cgo and the NSS module with it; a
// bookworm-slim runtime stage with openvpn, haproxy, iproute2 and
// ca-certificates, the commands in /usr/local/bin, the NSS module in the
// multiarch lib dir and on the hosts line after files; the default ports
// exposed; SIGTERM; open-balena-vpn as the entrypoint, run as root; and a
// header that says how to build it and what it needs.
func TestDockerfile(t *testing.T) {
	d := parseDockerfile(t)
	for _, s := range []string{`docker build -f examples/deploy/Dockerfile( -t \S+)? \.\n`, "NET_ADMIN", "/dev/net/tun", "root"} {
		if !regexp.MustCompile(s).MatchString(d.text) {
			t.Errorf("%s: the comments do not say %q", dockerfilePath, s)
		}
	}

	if len(d.stages) < 2 {
		t.Fatalf("%d stages, want a build stage and a runtime stage", len(d.stages))
	}
	build := d.stages[0]
	if !regexp.MustCompile(`^golang:1\.26(\.[0-9]+)?-bookworm$`).MatchString(build.image) || build.name == "" {
		t.Errorf("build stage FROM %s AS %q, want golang:1.26-bookworm (the runtime's glibc) with a name", build.image, build.name)
	}
	if img := d.stages[d.final()].image; img != "debian:bookworm-slim" {
		t.Errorf("runtime stage FROM %s, want debian:bookworm-slim", img)
	}

	// The builds.
	var static *goBuild
	builds := d.goBuilds(0)
	for i, b := range builds {
		if b.buildmode == "" {
			static = &builds[i]
		}
	}
	if static == nil {
		t.Fatal("build stage: no go build of the commands")
	}
	if static.env["CGO_ENABLED"] != "0" {
		t.Errorf("build stage: the commands are built with CGO_ENABLED=%q, want 0", static.env["CGO_ENABLED"])
	}
	for _, c := range commands {
		if !slices.Contains(static.packages, "cmd/"+c) {
			t.Errorf("build stage: ./cmd/%s not built (go build %q)", c, static.packages)
		}
	}
	if !strings.HasSuffix(static.out, "/") {
		t.Errorf("build stage: go build -o %q, want a directory (ending in /)", static.out)
	}
	// The NSS module is C, built as make nss builds it: no Go runtime in
	// other programs' processes. A go build of cmd/libnss_openvpn would
	// make a library without the module's functions.
	for _, b := range builds {
		if slices.Contains(b.packages, "cmd/"+nssModule) {
			t.Errorf("build stage: go build of ./cmd/%s: the module is C (cmd/%s/csrc)", nssModule, nssModule)
		}
	}
	gccBuild := regexp.MustCompile(`gcc [^\n]*-shared[^\n]*`)
	nssBuild := strings.Join(strings.Fields(strings.ReplaceAll(d.text, "\\\n", " ")), " ")
	for _, want := range []string{"-shared", "-fPIC", "-Wl,--version-script=cmd/" + nssModule + "/csrc/exports.map",
		"-o /out/nss/" + nssModule + ".so.2", "cmd/" + nssModule + "/csrc/" + nssModule + ".c"} {
		if !strings.Contains(nssBuild, want) {
			t.Errorf("build stage: the NSS module's gcc build lacks %q", want)
		}
	}
	if !gccBuild.MatchString(nssBuild) {
		t.Error("build stage: no gcc -shared build of the NSS module")
	}
	if !strings.Contains(d.text, "gcc -print-multiarch") {
		t.Error("the NSS module's directory does not come from gcc -print-multiarch")
	}

	// The runtime stage.
	fin := d.final()
	pkgs := d.aptPackages(fin)
	for _, p := range runtimePackages {
		if !pkgs[p] {
			t.Errorf("runtime stage: apt-get install lacks %s (installs %q)", p, slices.Sorted(maps.Keys(pkgs)))
		}
	}
	var binCopied, libCopied bool
	for _, c := range d.copies(fin) {
		if c.from != build.name {
			continue
		}
		for _, src := range c.srcs {
			if path.Clean(src) == path.Clean(static.out) && path.Clean(c.dest) == "/usr/local/bin" {
				binCopied = true
			}
		}
		libCopied = libCopied || path.Clean(c.dest) == "/usr/lib" || path.Clean(c.dest) == "/lib"
	}
	if !binCopied {
		t.Errorf("runtime stage: no COPY --from=%s %s /usr/local/bin/ (vpn-auth and vpn-client-event go beside open-balena-vpn)", build.name, static.out)
	}
	if !libCopied {
		t.Errorf("runtime stage: no COPY --from=%s of the NSS module to /usr/lib/<multiarch>", build.name)
	}
	nsswitch := false
	for _, in := range d.in(fin, "RUN") {
		nsswitch = nsswitch || strings.Contains(in.args, "/etc/nsswitch.conf") && strings.Contains(in.args, "files openvpn")
	}
	if !nsswitch {
		t.Error("runtime stage: no RUN puts openvpn after files on the hosts line of /etc/nsswitch.conf")
	}
	for _, in := range d.in(fin, "USER") {
		if in.args != "root" && in.args != "0" {
			t.Errorf("%s:%d: USER %s: the server runs as root (NET_ADMIN)", dockerfilePath, in.line, in.args)
		}
	}

	if s := d.in(fin, "STOPSIGNAL"); len(s) != 1 || s[0].args != "SIGTERM" {
		t.Errorf("runtime stage: STOPSIGNAL %v, want SIGTERM", s)
	}
	if ep := entrypoint(t, d); !slices.Equal(ep, []string{"/usr/local/bin/open-balena-vpn"}) {
		t.Errorf("ENTRYPOINT %q, want [\"/usr/local/bin/open-balena-vpn\"]", ep)
	}

	// The ports of the image's own configuration: its ENV and the required
	// variables.
	env := dockerfileEnv(t, d)
	maps.Copy(env, requiredTestValues(t))
	cfg, err := loadConfig(t, env, 0)
	if err != nil {
		t.Fatalf("the image's ENV with the required variables does not load: %v", err)
	}
	ports := portsOf(t, cfg)
	exposed := make(map[int]bool)
	for _, in := range d.in(fin, "EXPOSE") {
		for _, p := range strings.Fields(in.args) {
			n, proto, _ := strings.Cut(p, "/")
			port, err := strconv.Atoi(n)
			if err != nil {
				t.Errorf("%s:%d: EXPOSE %s: %v", dockerfilePath, in.line, p, err)
			}
			if proto == "" || proto == "tcp" {
				exposed[port] = true
			}
		}
	}
	for name, port := range map[string]int{"VPN_PORT": ports.VPN, "VPN_CONNECT_PROXY_PORT": ports.Proxy, "VPN_HAPROXY_MONITOR_ADDR": ports.Monitor, "VPN_METRICS_ADDR": ports.Metrics} {
		if port != 0 && !exposed[port] {
			t.Errorf("EXPOSE lacks %d/tcp (%s)", port, name)
		}
	}
}

// entrypoint is the runtime stage's ENTRYPOINT, which must be the exec
// (JSON) form so that open-balena-vpn is PID 1 and gets SIGTERM itself.
func entrypoint(t *testing.T, d *dockerfile) []string {
	t.Helper()
	eps := d.in(d.final(), "ENTRYPOINT")
	if len(eps) != 1 {
		t.Fatalf("runtime stage: %d ENTRYPOINTs, want 1", len(eps))
	}
	var ep []string
	if err := json.Unmarshal([]byte(eps[0].args), &ep); err != nil {
		t.Fatalf("%s:%d: ENTRYPOINT %s: want the exec form [\"…\"]: %v", dockerfilePath, eps[0].line, eps[0].args, err)
	}
	return ep
}

// TestImageHoldsWhatDeploymentsRun checks that every program the
// manifests and compose.yaml run in the container (their command, or the
// image's entrypoint, and compose's healthcheck) is in the image: built
// into /usr/local/bin, or from a package the runtime stage installs.
func TestImageHoldsWhatDeploymentsRun(t *testing.T) {
	d := parseDockerfile(t)
	ep := entrypoint(t, d)
	pkgs := d.aptPackages(d.final())
	runs := make(map[string]string) // program → where
	run := func(where string, argv []string) {
		if len(argv) > 0 {
			runs[argv[0]] = where
		}
	}
	for _, w := range loadManifests(t).workloads {
		for _, c := range podContainers(&w.template.Spec) {
			where := w.source + ": container " + c.Name
			if len(c.Command) > 0 {
				run(where, c.Command)
			} else {
				run(where+" (the image's entrypoint)", ep)
			}
			for _, p := range []*corev1.Probe{c.ReadinessProbe, c.LivenessProbe, c.StartupProbe} {
				if p != nil && p.Exec != nil {
					run(where+" probe", p.Exec.Command)
				}
			}
		}
	}
	svc := composeService(t)
	switch {
	case len(svc.Entrypoint) > 0:
		run(composePath+" entrypoint", svc.Entrypoint)
	default:
		run(composePath+" (the image's entrypoint)", ep)
	}
	if hc := svc.Healthcheck.Test; len(hc) > 1 {
		switch hc[0] {
		case "CMD":
			run(composePath+" healthcheck", hc[1:])
		case "CMD-SHELL":
			run(composePath+" healthcheck", shellWords(hc[1]))
		}
	}
	if len(runs) == 0 {
		t.Fatal("found no program that the deployments run")
	}
	for prog, where := range runs {
		name := path.Base(prog)
		switch {
		case slices.Contains(commands, name):
			if dir := path.Dir(prog); prog != name && dir != "/usr/local/bin" {
				t.Errorf("%s runs %s, but the image has it in /usr/local/bin", where, prog)
			}
		case packageOf[name] != "":
			if !pkgs[packageOf[name]] {
				t.Errorf("%s runs %s, but the runtime stage does not install %s", where, prog, packageOf[name])
			}
		default:
			t.Errorf("%s runs %s, which these tests do not know to be in the image (add it to commands or packageOf)", where, prog)
		}
	}
}

// TestDockerfileCopiesEveryPackage checks that the build stage copies every
// directory of the repository that the commands' packages (and the
// packages they import from this module) live in, with go.mod and go.sum:
// the Dockerfile copies a list rather than the whole context.
func TestDockerfileCopiesEveryPackage(t *testing.T) {
	d := parseDockerfile(t)
	copied := make(map[string]bool)
	for _, c := range d.copies(0) {
		if c.from != "" {
			continue
		}
		for _, src := range c.srcs {
			copied[path.Clean(src)] = true
		}
	}
	for _, f := range []string{"go.mod", "go.sum"} {
		if !copied[f] {
			t.Errorf("build stage: %s not copied", f)
		}
	}
	start := []string{"cmd/" + nssModule}
	for _, c := range commands {
		start = append(start, "cmd/"+c)
	}
	dirs := localImports(t, start)
	for _, dir := range slices.Sorted(maps.Keys(dirs)) {
		top := strings.SplitN(dir, "/", 2)[0]
		if top == "." {
			t.Errorf("the commands import the module's root package, which the build stage does not copy")
			continue
		}
		if !copied[top] {
			t.Errorf("build stage: %s not copied (the commands need %s/%s)", top, modulePath, dir)
		}
	}
}

// localImports returns the directory of every package of this repository
// that the packages in dirs import, directly or not, dirs included;
// relative to the repository root. Test files are left out.
func localImports(t *testing.T, dirs []string) map[string]bool {
	t.Helper()
	seen := make(map[string]bool)
	fset := token.NewFileSet()
	var visit func(dir string)
	visit = func(dir string) {
		if seen[dir] {
			return
		}
		seen[dir] = true
		entries, err := os.ReadDir(filepath.Join(repoRoot, dir))
		if err != nil {
			t.Fatalf("package %s/%s: %v", modulePath, dir, err)
		}
		found := false
		for _, e := range entries {
			name := e.Name()
			if e.IsDir() || !strings.HasSuffix(name, ".go") || strings.HasSuffix(name, "_test.go") {
				continue
			}
			found = true
			f, err := parser.ParseFile(fset, filepath.Join(repoRoot, dir, name), nil, parser.ImportsOnly)
			if err != nil {
				t.Fatal(err)
			}
			for _, imp := range f.Imports {
				p, _ := strconv.Unquote(imp.Path.Value)
				if p == modulePath {
					visit(".")
				} else if rest, ok := strings.CutPrefix(p, modulePath+"/"); ok {
					visit(rest)
				}
			}
		}
		if !found {
			t.Fatalf("%s: no Go files", filepath.Join(repoRoot, dir))
		}
	}
	for _, d := range dirs {
		visit(d)
	}
	return seen
}
