package connectproxy

import (
	"cmp"
	"errors"
	"net"
	"os"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// poller holds the directions of tunnels in which no byte moved for
// parkAfter: they wait in an epoll instance of the handler's, with no
// goroutine and no buffer or splice pipe, until their source has bytes
// (or ends).
// One goroutine waits on the epoll instance, through Go's own poller,
// while any tunnel direction is registered; it ends when none is.
type poller struct {
	mu   sync.Mutex
	file *os.File // the epoll instance; nil while nothing is registered
	epfd int      // file's descriptor (file.Fd would make it blocking)
	m    map[uint64]parked
	next uint64
	wg   sync.WaitGroup // the goroutine that waits
}

// parked is a tunnel direction registered with the poller.
type parked struct {
	t *tunnel
	d int
}

const pollBatch = 64

// canPark reports whether c can wait in the poller: a TCP connection,
// whose read deadline ends a splice without losing bytes.
func canPark(c net.Conn) bool {
	_, ok := c.(*net.TCPConn)
	return ok
}

// arm registers direction d of t, reading src, and arms it: one event,
// when src is readable or ends, wakes the direction. id is 0 on the
// direction's first registration; arm returns the id to use next time.
func (p *poller) arm(t *tunnel, d int, src net.Conn, id uint64) (uint64, error) {
	rc, err := src.(syscall.Conn).SyscallConn()
	if err != nil {
		return id, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.file == nil {
		if err := p.start(); err != nil {
			return id, err
		}
	}
	op, next := unix.EPOLL_CTL_MOD, id
	if id == 0 {
		op, next = unix.EPOLL_CTL_ADD, p.next+1
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLONESHOT, Fd: int32(next), Pad: int32(next >> 32)}
	var cerr error
	if err := rc.Control(func(fd uintptr) { cerr = unix.EpollCtl(p.epfd, op, int(fd), &ev) }); err != nil || cerr != nil {
		p.closeIfEmpty()
		return id, cmp.Or(err, cerr)
	}
	p.next = max(p.next, next)
	p.m[next] = parked{t, d}
	return next, nil
}

// start makes the epoll instance and its goroutine. The caller holds p.mu.
func (p *poller) start() error {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return err
	}
	if err := unix.SetNonblock(epfd, true); err != nil {
		unix.Close(epfd)
		return err
	}
	f := os.NewFile(uintptr(epfd), "connectproxy-poller")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return err
	}
	p.file, p.epfd = f, epfd
	if p.m == nil {
		p.m = map[uint64]parked{}
	}
	p.wg.Go(func() { p.wait(rc) })
	return nil
}

// forget drops a direction's registration, once its tunnel has ended (its
// connections closed, which took them out of the epoll instance). The
// last one closes the instance.
func (p *poller) forget(id uint64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.m, id)
	p.closeIfEmpty()
}

// closeIfEmpty closes the epoll instance when nothing is registered, which
// ends wait. The caller holds p.mu.
func (p *poller) closeIfEmpty() {
	if len(p.m) == 0 && p.file != nil {
		p.file.Close()
		p.file = nil
	}
}

// wait wakes the directions whose events come, until the instance is
// closed. Go's poller watches the epoll instance (edge-triggered), so
// each call drains the events before it waits again.
func (p *poller) wait(rc syscall.RawConn) {
	var evs [pollBatch]unix.EpollEvent
	var wake []parked
	for {
		err := rc.Read(func(fd uintptr) bool {
			for {
				n, err := unix.EpollWait(int(fd), evs[:], 0)
				if errors.Is(err, unix.EINTR) {
					continue
				}
				if n <= 0 {
					return false
				}
				wake = wake[:0]
				p.mu.Lock()
				for _, ev := range evs[:n] {
					if e, ok := p.m[uint64(uint32(ev.Fd))|uint64(uint32(ev.Pad))<<32]; ok {
						wake = append(wake, e)
					}
				}
				p.mu.Unlock()
				for _, e := range wake {
					e.t.wake(e.d)
				}
				if n < len(evs) {
					return false
				}
			}
		})
		if err != nil {
			return // closed
		}
	}
}
