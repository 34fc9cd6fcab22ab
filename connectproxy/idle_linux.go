package connectproxy

import (
	"net"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// idleTime returns how long ago c last sent or received data, as the
// kernel counts it (TCP_INFO's tcpi_last_data_sent and
// tcpi_last_data_recv), without touching the byte path.
func idleTime(c net.Conn) (time.Duration, bool) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return 0, false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return 0, false
	}
	var info *unix.TCPInfo
	var serr error
	err = rc.Control(func(fd uintptr) {
		info, serr = unix.GetsockoptTCPInfo(int(fd), unix.SOL_TCP, unix.TCP_INFO)
	})
	if err != nil || serr != nil {
		return 0, false
	}
	ms := min(info.Last_data_sent, info.Last_data_recv)
	return time.Duration(ms) * time.Millisecond, true
}
