package vpn

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// TestKillOrphan: a process named by the pid file is stopped with SIGTERM,
// or SIGKILL after 5 s when it ignores SIGTERM; a stale or absent pid file
// is no error.
func TestKillOrphan(t *testing.T) {
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "server-1.pid")
	if err := killOrphan(pidFile, nil); err != nil {
		t.Fatalf("no pid file: %v", err)
	}
	for _, c := range []struct {
		name   string
		script string
		min    time.Duration
	}{
		{"obeys SIGTERM", "echo ready; exec sleep 60", 0},
		{"ignores SIGTERM", "trap '' TERM; echo ready; while :; do sleep 1; done", orphanTermWait},
	} {
		t.Run(c.name, func(t *testing.T) {
			cmd := exec.Command("sh", "-c", c.script)
			out, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			// The shell says when its trap is set.
			if _, err := bufio.NewReader(out).ReadString('\n'); err != nil {
				t.Fatal(err)
			}
			waited := make(chan struct{})
			go func() { cmd.Wait(); close(waited) }()
			t.Cleanup(func() { cmd.Process.Kill(); <-waited })
			if err := os.WriteFile(pidFile, []byte(strconv.Itoa(cmd.Process.Pid)+"\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			if err := killOrphan(pidFile, nil); err != nil {
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
	// A pid file naming nobody.
	if err := os.WriteFile(pidFile, []byte("999999999\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := killOrphan(pidFile, nil); err != nil {
		t.Errorf("stale pid file: %v", err)
	}
}
