//go:build unix

package connectproxy

import (
	"net"
	"os"
	"syscall"
)

// relayReady copies a TCP source to dst, reading it with read(2) while
// it has bytes and waiting for it in Go's poller, without a buffer, while
// it has none. ok is false for other sources. The source's read deadline
// ends the wait (os.ErrDeadlineExceeded) and never a copy: bytes read are
// written whole first.
func (h *Handler) relayReady(dst, src net.Conn) (n int64, ok bool, err error) {
	tc, isTCP := src.(*net.TCPConn)
	if !isTCP {
		return 0, false, nil
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return 0, false, nil
	}
	var buf *[]byte
	defer func() {
		if buf != nil {
			h.bufs.Put(buf)
		}
	}()
	werr := rc.Read(func(fd uintptr) bool {
		for {
			if buf == nil {
				buf = h.getBuffer()
			}
			m, rerr := syscall.Read(int(fd), *buf)
			switch {
			case rerr == syscall.EINTR:
				continue
			case rerr == syscall.EAGAIN:
				h.bufs.Put(buf) // wait without it
				buf = nil
				return false
			case rerr != nil:
				err = os.NewSyscallError("read", rerr)
				return true
			case m == 0:
				return true // end of stream
			}
			if _, err = dst.Write((*buf)[:m]); err != nil {
				return true
			}
			n += int64(m)
		}
	})
	if err == nil {
		err = werr
	}
	return n, true, err
}
