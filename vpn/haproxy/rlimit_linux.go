package haproxy

import "syscall"

// FileLimit returns the hard limit of open files that the processes this
// one starts inherit, or 0 for none known.
func FileLimit() uint64 {
	var r syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &r); err != nil || r.Max == ^uint64(0) {
		return 0
	}
	return r.Max
}
