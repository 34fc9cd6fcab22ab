//go:build !linux

package haproxy

// FileLimit returns 0, no limit known, where the limit is not read.
func FileLimit() uint64 { return 0 }
