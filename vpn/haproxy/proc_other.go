//go:build !linux

package haproxy

import (
	"errors"
	"syscall"
)

// errNoPidfd is what a managed haproxy needs and other systems lack.
var errNoPidfd = errors.New("a managed haproxy needs Linux (pidfd): use an external one")

type proc struct {
	pid   int
	done  chan struct{}
	ended chan struct{}
	err   error
}

func openProc(int) (*proc, error)                  { return nil, errNoPidfd }
func (p *proc) signal(syscall.Signal) error        { return errNoPidfd }
func (p *proc) release()                           {}
func cmdline(int) ([]string, error)                { return nil, errNoPidfd }
func parentPid(int) (int, error)                   { return 0, errNoPidfd }
func catches(int, ...syscall.Signal) (bool, error) { return false, errNoPidfd }
