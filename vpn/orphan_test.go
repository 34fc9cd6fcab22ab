package vpn

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/obvpn/obvpn/vpn/internal/proc"
)

// startFakeOpenVPN runs the test binary as a stand-in openvpn whose
// command line is this instance's ("openvpn --config <paths.Config>"),
// and writes its pid to the pid file. mode is "term" (it obeys SIGTERM) or
// "ignore-term". The process is killed and waited for when the test ends;
// the returned channel is closed once it has exited.
func startFakeOpenVPN(t *testing.T, paths InstancePaths, mode string) (*exec.Cmd, <-chan struct{}) {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := &exec.Cmd{Path: self, Args: []string{"openvpn", "--config", paths.Config},
		Env: append(os.Environ(), "OBVPN_TEST_FAKE_OPENVPN="+mode)}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	waited := make(chan struct{})
	go func() { cmd.Wait(); close(waited) }()
	t.Cleanup(func() { cmd.Process.Kill(); <-waited })
	// It says when its signals are set.
	if _, err := bufio.NewReader(out).ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(paths.PID, []byte(strconv.Itoa(cmd.Process.Pid)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return cmd, waited
}

// TestKillOrphan: this instance's openvpn named by the pid file is
// stopped with SIGTERM, or SIGKILL after 5 s when it ignores SIGTERM; a
// stale or absent pid file is no error, and a pid file that names another
// program leaves it alone.
func TestKillOrphan(t *testing.T) {
	dir := t.TempDir()
	paths := InstancePaths{Config: filepath.Join(dir, "server-1.conf"), PID: filepath.Join(dir, "server-1.pid")}
	if err := killOrphan(paths, nil); err != nil {
		t.Fatalf("no pid file: %v", err)
	}
	for _, c := range []struct {
		mode string
		min  time.Duration
	}{
		{"term", 0},
		{"ignore-term", orphanTermWait},
	} {
		t.Run(c.mode, func(t *testing.T) {
			_, waited := startFakeOpenVPN(t, paths, c.mode)
			start := time.Now()
			if err := killOrphan(paths, nil); err != nil {
				t.Fatal(err)
			}
			if took := time.Since(start); took < c.min || took > orphanKillWait {
				t.Errorf("took %v", took)
			}
			select {
			case <-waited:
			case <-time.After(5 * time.Second):
				t.Fatal("the orphan still runs")
			}
		})
	}
	t.Run("another program", func(t *testing.T) {
		cmd := exec.Command("sleep", "60")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		if err := os.WriteFile(paths.PID, []byte(strconv.Itoa(cmd.Process.Pid)+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := killOrphan(paths, nil); err != nil {
			t.Fatal(err)
		}
		if ownOpenVPN(paths) != 0 {
			t.Error("sleep taken for this instance's openvpn")
		}
		if err := syscall.Kill(cmd.Process.Pid, 0); err != nil {
			t.Errorf("another program was stopped: %v", err)
		}
	})
	// A pid file naming nobody.
	if err := os.WriteFile(paths.PID, []byte("999999999\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := killOrphan(paths, nil); err != nil {
		t.Errorf("stale pid file: %v", err)
	}
}

// TestProcessRelease: a watched process that is let go of runs on, and
// no goroutine of the watch remains (the package's leak check); a stopped
// one has exited.
func TestProcessRelease(t *testing.T) {
	dir := t.TempDir()
	paths := InstancePaths{Config: filepath.Join(dir, "server-1.conf"), PID: filepath.Join(dir, "server-1.pid")}
	cmd, waited := startFakeOpenVPN(t, paths, "term")
	p, err := proc.Open(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	p.Release()
	select {
	case <-p.Done():
		t.Fatal("released, and exited")
	case <-waited:
		t.Fatal("the process went when it was let go of")
	default:
	}
	if ownOpenVPN(paths) != cmd.Process.Pid {
		t.Fatal("the released process is not this instance's openvpn")
	}
	p, err = proc.Open(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	if err := stopProcess(p, nil); err != nil {
		t.Fatal(err)
	}
	<-p.Done()
	<-waited
}
