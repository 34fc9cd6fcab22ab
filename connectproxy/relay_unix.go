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
//
// The write happens outside the source's RawConn.Read: a Close of the
// source waits for the reads in progress, so a write blocked on a full
// destination inside one would keep the tunnel from closing.
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
	// One closure for the whole copy, not one per read.
	var m int
	var rerr error
	read := func(fd uintptr) bool {
		if buf == nil {
			buf = h.getBuffer()
		}
		for {
			m, rerr = syscall.Read(int(fd), *buf)
			switch rerr {
			case syscall.EINTR:
				continue
			case syscall.EAGAIN:
				h.bufs.Put(buf) // wait without it
				buf = nil
				return false
			}
			return true
		}
	}
	for {
		if err := rc.Read(read); err != nil {
			return n, true, err
		}
		switch {
		case rerr != nil:
			return n, true, os.NewSyscallError("read", rerr)
		case m <= 0:
			return n, true, nil // end of stream
		}
		if _, err := dst.Write((*buf)[:m]); err != nil {
			return n, true, err
		}
		n += int64(m)
	}
}
