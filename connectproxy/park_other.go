//go:build !linux

package connectproxy

import (
	"errors"
	"net"
	"sync"
)

// poller is a stand-in where there is no epoll: tunnels keep their
// goroutines while idle.
type poller struct{ wg sync.WaitGroup }

func canPark(net.Conn) bool { return false }

func (p *poller) arm(*tunnel, int, net.Conn, uint64) (uint64, error) {
	return 0, errors.ErrUnsupported
}

func (p *poller) forget(uint64) {}
