package queue

import "fmt"

// The TX queue carries frames from client to server. The client's Sender
// copies a frame into free buffers of the data region and pushes a
// descriptor; the server's Receiver copies the frame out and pushes the
// descriptor's id back as a completion, which frees the buffers.

// noBuffer ends a buffer chain.
const noBuffer = -1

// reclaimWindow is how many buffers a Sender uses before it frees the frames
// the server completed, at the first Send after a Flush. The free list is a
// stack: frames freed last, which the server has just read, go out first.
// A Sender that freed only when the list ran dry had a stream cycle through
// the whole data region (4 MiB by default), every buffer cold in the cache
// and, on a link's first pass, every page a fresh one (see postWindow): a
// sandbox's copy into the region cost five times its copy of the same
// bytes into its netstack's own pooled buffers. Freeing after every Flush
// would cost a link of small frames (a receiver's ACKs) a pass over the
// completion ring, whose lines the server writes, for every frame; after
// reclaimWindow buffers it is a pass per reclaimWindow buffers at most.
const reclaimWindow = postWindow

// Sender is the client (producer) side of the TX queue. It is not safe for
// concurrent use.
type Sender struct {
	m       *mapping
	descs   PipeWriter // frame descriptors, to the server
	comps   PipeReader // completed ids, from the server
	peer    producerState
	bufSize uint32
	// next chains buffers: the buffers of an in-flight frame, then -1; or
	// the free list. Indexed by buffer number.
	next []int32
	// inFlight marks the first buffer of each in-flight frame; its number
	// is the frame's id.
	inFlight []bool
	free     int32 // head of the free list
	nFree    int
	scratch  []BufferDesc
	// reclaimDue asks the next Send to take the completed frames back
	// first; Flush sets it. See SendMeta.
	reclaimDue bool
}

// NewSender maps the TX queue q for a client using buffers of bufSize bytes.
func NewSender(q QueueFDs, bufSize uint32, opts MapOptions) (*Sender, error) {
	m, err := mapQueue(q, opts)
	if err != nil {
		return nil, fmt.Errorf("map TX queue: %w", err)
	}
	if bufSize < MinBufferSize || uint64(len(m.data)) < uint64(bufSize) {
		m.unmap()
		return nil, fmt.Errorf("map TX queue: buffer size %d does not fit a data region of %d bytes", bufSize, len(m.data))
	}
	n := len(m.data) / int(bufSize)
	s := &Sender{m: m, peer: producerState{m}, bufSize: bufSize, next: make([]int32, n), inFlight: make([]bool, n), nFree: n}
	for i := range s.next {
		s.next[i] = int32(i + 1)
	}
	s.next[n-1] = noBuffer
	s.descs.Init(m.txPipe)
	s.comps.Init(m.rxPipe)
	return s, nil
}

// Send copies a frame made of parts (total bytes) into the queue. It returns
// false when there is no room: the caller drops the frame. The frame is
// published by Flush. An error is a violation by the server.
func (s *Sender) Send(parts [][]byte, total int) (bool, error) {
	return s.SendMeta(parts, total, 0)
}

// SendMeta is Send with the descriptor's meta word (see desc.go): non-zero
// only where the link config gives it a meaning.
func (s *Sender) SendMeta(parts [][]byte, total int, meta uint32) (bool, error) {
	need := (total + int(s.bufSize) - 1) / int(s.bufSize)
	if total <= 0 || need > MaxBuffersPerFrame {
		return false, nil
	}
	// Once reclaimWindow buffers are in use, the first Send after a Flush
	// frees the completed frames, even with buffers to spare: see
	// reclaimWindow.
	if s.nFree < need || (s.reclaimDue && len(s.next)-s.nFree >= reclaimWindow) {
		s.reclaimDue = false
		if err := s.reclaim(); err != nil {
			return false, err
		}
		if s.nFree < need {
			return false, nil
		}
	}
	desc := s.descs.Push(uint64(txPacketHeaderSize + need*txBufferDescSize))
	if desc == nil {
		return false, nil
	}
	// Take need buffers off the free list; they stay chained in order.
	first := s.free
	bufs := s.scratch[:0]
	b := first
	for i := range need {
		off := uint64(b) * uint64(s.bufSize)
		bufs = append(bufs, BufferDesc{Offset: off, Size: s.bufSize})
		if i == need-1 {
			s.free = s.next[b]
			s.next[b] = noBuffer
		} else {
			b = s.next[b]
		}
	}
	s.nFree -= need
	s.inFlight[first] = true
	bufs[need-1].Size = uint32(total - (need-1)*int(s.bufSize))
	copyToBuffers(s.m.data, bufs, parts)
	encodeTxDesc(desc, uint64(first), uint32(total), meta, bufs)
	s.scratch = bufs
	return true, nil
}

// reclaim frees the buffers of every completed frame.
func (s *Sender) reclaim() error {
	defer s.comps.Flush()
	for {
		b, err := s.comps.Pull()
		if err != nil || b == nil {
			return err
		}
		if len(b) != txCompletionSize {
			return violation("TX completion of %d bytes, want %d", len(b), txCompletionSize)
		}
		id := le.Uint64(b)
		if id >= uint64(len(s.inFlight)) || !s.inFlight[id] {
			return violation("TX completion for unknown frame id %d", id)
		}
		s.inFlight[id] = false
		last := int32(id)
		n := 1
		for s.next[last] != noBuffer {
			last = s.next[last]
			n++
		}
		s.next[last] = s.free
		s.free = int32(id)
		s.nFree += n
	}
}

// Flush publishes the frames sent since the last Flush and reports whether
// the server asked to be notified (the caller then writes the eventfd).
func (s *Sender) Flush() (notify bool) {
	s.descs.Flush()
	s.reclaimDue = true
	return s.peer.wantsNotification()
}

// Close unmaps the queue.
func (s *Sender) Close() { s.m.unmap() }

// Receiver is the server (consumer) side of the TX queue. It is not safe for
// concurrent use.
type Receiver struct {
	consumerState
	m        *mapping
	descs    PipeReader // frame descriptors, from the client
	comps    PipeWriter // completed ids, to the client
	maxFrame uint32
	// d and raw hold the current descriptor in private memory.
	d   TxDesc
	raw [maxTxDescSize]byte
}

// NewReceiver maps the TX queue q for a server accepting frames of at most
// maxFrame bytes. Servers set opts.RequireSeals.
func NewReceiver(q QueueFDs, maxFrame uint32, opts MapOptions) (*Receiver, error) {
	m, err := mapQueue(q, opts)
	if err != nil {
		return nil, fmt.Errorf("map TX queue: %w", err)
	}
	r := &Receiver{consumerState: consumerState{m}, m: m, maxFrame: maxFrame}
	r.d.Buffers = make([]BufferDesc, 0, MaxBuffersPerFrame)
	r.descs.Init(m.txPipe)
	r.comps.Init(m.rxPipe)
	return r, nil
}

// Ready reports whether a descriptor is waiting.
func (r *Receiver) Ready() bool { return r.descs.Ready() }

// Recv copies the next frame out of the queue into a buffer from alloc and
// returns it, or nil when the queue is empty. An error is a violation by the
// client.
func (r *Receiver) Recv(alloc func(n int) []byte) ([]byte, error) {
	f, _, err := r.RecvHead(alloc, nil, nil)
	return f, err
}

// Held is a frame RecvHead left in the client's buffers: its head was copied
// out, the rest stays where the client wrote it until Complete hands the
// buffers back. The rest's bounds were checked against the data region; its
// bytes are the client's, which may change them at any moment: they are to
// be copied, never parsed.
type Held struct {
	id      uint64
	pending bool     // not completed yet
	rest    [][]byte // the frame past its head, slices of the data region
	size    int      // bytes in rest
}

// Rest returns the frame's bytes past its head, in the client's buffers,
// valid until Complete or Close.
func (h *Held) Rest() [][]byte { return h.rest }

// RestSize returns how many bytes Rest holds.
func (h *Held) RestSize() int { return h.size }

// Truncate keeps the first n bytes of the rest (no more than it has): the
// frame is shorter than its descriptor said (link-layer padding).
func (h *Held) Truncate(n int) {
	if n >= h.size {
		return
	}
	left := n
	for i, p := range h.rest {
		if len(p) >= left {
			h.rest[i] = p[:left]
			clear(h.rest[i+1:])
			h.rest = h.rest[:i+1]
			break
		}
		left -= len(p)
	}
	h.size = n
}

// RecvHead is Recv for a server that may forward a frame without copying it
// whole. For each frame, hold (if not nil) is given its size and meta word
// and returns how many of its first bytes to copy out, or 0 for all of
// them. A frame copied in part (held true) is described in h: the caller
// reads the rest in place and hands its buffers back with Complete (until
// then the client cannot reuse them). A frame copied whole is completed
// here, as by Recv.
func (r *Receiver) RecvHead(alloc func(n int) []byte, hold func(size, meta uint32) int, h *Held) (frame []byte, held bool, err error) {
	shared, err := r.descs.Pull()
	if err != nil || shared == nil {
		return nil, false, err
	}
	if len(shared) > len(r.raw) {
		return nil, false, violation("TX descriptor of %d bytes, more than %d", len(shared), len(r.raw))
	}
	raw := r.raw[:copy(r.raw[:], shared)]
	if err := decodeTxDesc(raw, &r.d); err != nil {
		return nil, false, err
	}
	if r.d.Size == 0 || r.d.Size > r.maxFrame {
		return nil, false, violation("TX frame of %d bytes, want 1..%d", r.d.Size, r.maxFrame)
	}
	var sum uint64
	for _, b := range r.d.Buffers {
		if !inRegion(b.Offset, b.Size, len(r.m.data)) {
			return nil, false, violation("TX buffer [%d, +%d) outside the %d-byte data region", b.Offset, b.Size, len(r.m.data))
		}
		sum += uint64(b.Size)
	}
	if sum < uint64(r.d.Size) {
		return nil, false, violation("TX buffers hold %d bytes of a %d-byte frame", sum, r.d.Size)
	}
	n := int(r.d.Size)
	if hold != nil {
		if head := hold(r.d.Size, r.d.Meta); head > 0 && head < n {
			frame = alloc(head)[:head]
			copyFromBuffers(frame, r.m.data, r.d.Buffers)
			h.id, h.pending = r.d.ID, true
			h.rest, h.size = sliceBuffers(h.rest[:0], r.m.data, r.d.Buffers, head, n), n-head
			return frame, true, nil
		}
	}
	frame = alloc(n)[:n]
	copyFromBuffers(frame, r.m.data, r.d.Buffers)
	if err := r.complete(r.d.ID); err != nil {
		return nil, false, err
	}
	return frame, false, nil
}

// Complete hands the buffers of a frame RecvHead held back to the client
// (published by Flush), once: a second call does nothing. h's rest is
// invalid from then on.
func (r *Receiver) Complete(h *Held) error {
	if !h.pending {
		return nil
	}
	clear(h.rest)
	h.rest, h.size, h.pending = h.rest[:0], 0, false
	return r.complete(h.id)
}

func (r *Receiver) complete(id uint64) error {
	c := r.comps.Push(txCompletionSize)
	if c == nil {
		return violation("TX completion ring full: the client does not reclaim")
	}
	le.PutUint64(c, id)
	return nil
}

// Meta returns the meta word of the frame Recv returned last (see
// desc.go), as the client wrote it: untrusted, for the caller to check.
func (r *Receiver) Meta() uint32 { return r.d.Meta }

// Flush returns the pulled descriptors' slots and publishes completions.
func (r *Receiver) Flush() {
	r.descs.Flush()
	r.comps.Flush()
}

// Close unmaps the queue.
func (r *Receiver) Close() { r.m.unmap() }

// copyToBuffers copies parts into the data region's buffers in order.
func copyToBuffers(data []byte, bufs []BufferDesc, parts [][]byte) {
	bi, boff := 0, 0
	for _, p := range parts {
		for len(p) > 0 && bi < len(bufs) {
			b := bufs[bi]
			dst := data[b.Offset+uint64(boff) : b.Offset+uint64(b.Size)]
			n := copy(dst, p)
			p = p[n:]
			boff += n
			if boff == int(b.Size) {
				bi, boff = bi+1, 0
			}
		}
	}
}

// sliceBuffers appends to dst the bytes [from, to) of the frame in the data
// region's buffers, as slices of data. The buffers are in bounds and hold at
// least to bytes.
func sliceBuffers(dst [][]byte, data []byte, bufs []BufferDesc, from, to int) [][]byte {
	off := 0
	for _, b := range bufs {
		if off >= to {
			break
		}
		lo, hi := max(from-off, 0), min(int(b.Size), to-off)
		if lo < hi {
			dst = append(dst, data[b.Offset+uint64(lo):b.Offset+uint64(hi)])
		}
		off += int(b.Size)
	}
	return dst
}

// copyFromBuffers fills frame from the data region's buffers in order. The
// buffers are in bounds and hold at least len(frame) bytes.
func copyFromBuffers(frame, data []byte, bufs []BufferDesc) {
	for _, b := range bufs {
		if len(frame) == 0 {
			return
		}
		n := copy(frame, data[b.Offset:b.Offset+uint64(b.Size)])
		frame = frame[n:]
	}
}
