//go:build !linux

package vpn

// fileLimit returns 0: no limit known.
func fileLimit() uint64 { return 0 }
