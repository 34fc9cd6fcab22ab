//go:build !unix

package connectproxy

import "net"

// relayReady is not available here: every source holds its buffer for
// the copy.
func (h *Handler) relayReady(dst, src net.Conn) (int64, bool, error) { return 0, false, nil }
