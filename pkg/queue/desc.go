package queue

import "encoding/binary"

// Descriptor formats, little endian, as in gVisor's sharedmem/queue package.
//
// TX queue, TxPipe (client to server), one per frame:
//
//	 0  id        u64   echoed in the completion
//	 8  size      u32   frame length
//	12  meta      u32   zero in gVisor's format (reserved there); a word
//	                    about the frame the link config may give a meaning
//	                    (pkg/endpoint: TCP segmentation offload)
//	16  buffers   {offset u64, size u32} x n, 12 B each
//
// TX queue, RxPipe (server to client): the completed frame's id, u64.
//
// RX queue, TxPipe (client to server), one per posted buffer, 32 B:
//
//	 0  offset          u64
//	 8  size            u32
//	12  remainingInGroup u32 (unused, 0)
//	16  userData        u64  echoed
//	24  id              u64  echoed
//
// RX queue, RxPipe (server to client), one per frame:
//
//	0  size      u32   frame length
//	4  meta      u32   reserved (zero) in gVisor's format; a word about
//	                   the frame the link config may give a meaning
//	                   (pkg/endpoint/shm: checksum offload to the client)
//	8  buffers   {offset u64, size u32, userData u64, id u64} x n, 28 B each
const (
	txPacketHeaderSize = 16
	txBufferDescSize   = 12
	txCompletionSize   = 8

	postedBufferSize = 32

	rxCompletionHeaderSize = 8
	rxCompletionBufferSize = 28

	// MaxBuffersPerFrame bounds the buffers one frame may span, so that
	// descriptors have a fixed private size: 64 KiB frames over 2 KiB
	// buffers need 33 (frame plus headers); 64 leaves room for smaller
	// buffers posted by a peer.
	MaxBuffersPerFrame = 64

	maxTxDescSize           = txPacketHeaderSize + MaxBuffersPerFrame*txBufferDescSize
	maxRxCompletionDescSize = rxCompletionHeaderSize + MaxBuffersPerFrame*rxCompletionBufferSize
)

var le = binary.LittleEndian

// BufferDesc is one buffer of a frame: where it lies in the data region and
// how many bytes of it are used.
type BufferDesc struct {
	Offset uint64
	Size   uint32
	// ID and UserData are the posted buffer's id and user data (RX only).
	ID       uint64
	UserData uint64
}

// TxDesc is a TX descriptor read into private memory.
type TxDesc struct {
	ID      uint64
	Size    uint32
	Meta    uint32
	Buffers []BufferDesc
}

// decodeTxDesc parses a TX descriptor of b (private memory) into d, reusing
// d.Buffers.
func decodeTxDesc(b []byte, d *TxDesc) error {
	if len(b) < txPacketHeaderSize || (len(b)-txPacketHeaderSize)%txBufferDescSize != 0 {
		return violation("TX descriptor of %d bytes is not 16 + 12n", len(b))
	}
	n := (len(b) - txPacketHeaderSize) / txBufferDescSize
	if n == 0 || n > MaxBuffersPerFrame {
		return violation("TX descriptor with %d buffers, want 1..%d", n, MaxBuffersPerFrame)
	}
	d.ID = le.Uint64(b[0:])
	d.Size = le.Uint32(b[8:])
	d.Meta = le.Uint32(b[12:])
	d.Buffers = d.Buffers[:0]
	for i := range n {
		o := txPacketHeaderSize + i*txBufferDescSize
		d.Buffers = append(d.Buffers, BufferDesc{Offset: le.Uint64(b[o:]), Size: le.Uint32(b[o+8:])})
	}
	return nil
}

// encodeTxDesc writes a TX descriptor of id, size and meta with bufs into b,
// which is txPacketHeaderSize + len(bufs)*txBufferDescSize long.
func encodeTxDesc(b []byte, id uint64, size, meta uint32, bufs []BufferDesc) {
	le.PutUint64(b[0:], id)
	le.PutUint32(b[8:], size)
	le.PutUint32(b[12:], meta)
	for i, buf := range bufs {
		o := txPacketHeaderSize + i*txBufferDescSize
		le.PutUint64(b[o:], buf.Offset)
		le.PutUint32(b[o+8:], buf.Size)
	}
}

// decodePosted parses a posted RX buffer from b (private memory).
func decodePosted(b []byte) (BufferDesc, error) {
	if len(b) != postedBufferSize {
		return BufferDesc{}, violation("posted buffer descriptor of %d bytes, want %d", len(b), postedBufferSize)
	}
	return BufferDesc{
		Offset:   le.Uint64(b[0:]),
		Size:     le.Uint32(b[8:]),
		UserData: le.Uint64(b[16:]),
		ID:       le.Uint64(b[24:]),
	}, nil
}

// encodePosted writes a posted RX buffer into b (postedBufferSize bytes).
func encodePosted(b []byte, d BufferDesc) {
	le.PutUint64(b[0:], d.Offset)
	le.PutUint32(b[8:], d.Size)
	le.PutUint32(b[12:], 0)
	le.PutUint64(b[16:], d.UserData)
	le.PutUint64(b[24:], d.ID)
}

// RxDesc is an RX completion read into private memory.
type RxDesc struct {
	Size    uint32
	Meta    uint32
	Buffers []BufferDesc
}

// decodeRxCompletion parses an RX completion of b (private memory) into d,
// reusing d.Buffers.
func decodeRxCompletion(b []byte, d *RxDesc) error {
	if len(b) < rxCompletionHeaderSize || (len(b)-rxCompletionHeaderSize)%rxCompletionBufferSize != 0 {
		return violation("RX completion of %d bytes is not 8 + 28n", len(b))
	}
	n := (len(b) - rxCompletionHeaderSize) / rxCompletionBufferSize
	if n == 0 || n > MaxBuffersPerFrame {
		return violation("RX completion with %d buffers, want 1..%d", n, MaxBuffersPerFrame)
	}
	d.Size = le.Uint32(b[0:])
	d.Meta = le.Uint32(b[4:])
	d.Buffers = d.Buffers[:0]
	for i := range n {
		o := rxCompletionHeaderSize + i*rxCompletionBufferSize
		d.Buffers = append(d.Buffers, BufferDesc{
			Offset:   le.Uint64(b[o:]),
			Size:     le.Uint32(b[o+8:]),
			UserData: le.Uint64(b[o+12:]),
			ID:       le.Uint64(b[o+20:]),
		})
	}
	return nil
}

// encodeRxCompletion writes an RX completion of size and meta with bufs
// into b.
func encodeRxCompletion(b []byte, size, meta uint32, bufs []BufferDesc) {
	le.PutUint32(b[0:], size)
	le.PutUint32(b[4:], meta)
	for i, buf := range bufs {
		o := rxCompletionHeaderSize + i*rxCompletionBufferSize
		le.PutUint64(b[o:], buf.Offset)
		le.PutUint32(b[o+8:], buf.Size)
		le.PutUint64(b[o+12:], buf.UserData)
		le.PutUint64(b[o+20:], buf.ID)
	}
}

// inRegion reports whether [off, off+size) lies within a region of n bytes,
// without overflow.
func inRegion(off uint64, size uint32, n int) bool {
	return off <= uint64(n) && uint64(size) <= uint64(n)-off
}
