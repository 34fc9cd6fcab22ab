package connectproxy

import (
	"io"
	"net"
)

// relayBuffer is the size of the buffers that tunnels copy through. With
// 64 KiB the black-box benchmark's tunnels moved about a fifth fewer
// bytes than with 128 or 256 KiB; larger ones gained nothing more. A direction keeps its
// buffer while its destination does not take the bytes it read: a tunnel
// that sends to a slow device holds one for as long as the device is
// behind.
const relayBuffer = 256 << 10

// relay copies src to dst until src ends, fails or passes its read
// deadline: with io.Copy when the handler splices, else through a buffer
// of its pool. A TCP source holds the buffer only while it has bytes to
// read: it waits for them without one (relayReady), so that a tunnel
// that waits for its next bytes holds no buffer. Other sources hold one
// for the call.
func (h *Handler) relay(dst, src net.Conn) (int64, error) {
	if h.Splice {
		return io.Copy(dst, src)
	}
	if n, ok, err := h.relayReady(dst, src); ok {
		return n, err
	}
	buf := h.getBuffer()
	defer h.bufs.Put(buf)
	// Neither connection's ReadFrom or WriteTo: they would splice.
	return io.CopyBuffer(writerOnly{dst}, readerOnly{src}, *buf)
}

// getBuffer takes a buffer from the pool, or makes one.
func (h *Handler) getBuffer() *[]byte {
	if b, ok := h.bufs.Get().(*[]byte); ok {
		return b
	}
	b := make([]byte, relayBuffer)
	return &b
}

// writerOnly and readerOnly hide a connection's ReadFrom and WriteTo
// from io.CopyBuffer.
type (
	writerOnly struct{ io.Writer }
	readerOnly struct{ io.Reader }
)
