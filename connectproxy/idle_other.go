//go:build !linux

package connectproxy

import (
	"net"
	"time"
)

// idleTime is not measurable without TCP_INFO: idle tunnels are not
// closed.
func idleTime(net.Conn) (time.Duration, bool) { return 0, false }
