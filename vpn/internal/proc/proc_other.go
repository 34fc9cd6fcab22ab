//go:build !linux

// Package proc watches and signals a process by its pidfd; it needs Linux.
package proc

import (
	"errors"
	"syscall"
)

// ErrUnsupported is what this system lacks: pidfds.
var ErrUnsupported = errors.New("proc: watching a process needs Linux (pidfd)")

// Process is a process being watched; on this system there is none.
type Process struct{ Pid int }

func Open(int) (*Process, error)                   { return nil, ErrUnsupported }
func (p *Process) Done() <-chan struct{}           { return nil }
func (p *Process) Ended() <-chan struct{}          { return nil }
func (p *Process) Err() error                      { return ErrUnsupported }
func (p *Process) Signal(syscall.Signal) error     { return ErrUnsupported }
func (p *Process) Release()                        {}
func Cmdline(int) ([]string, error)                { return nil, ErrUnsupported }
func ParentPid(int) (int, error)                   { return 0, ErrUnsupported }
func IsZombie(int) bool                            { return false }
func Catches(int, ...syscall.Signal) (bool, error) { return false, ErrUnsupported }
