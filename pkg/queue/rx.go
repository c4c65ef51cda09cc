package queue

import "fmt"

// The RX queue carries frames from server to client. The client's Poster
// posts empty buffers; the server's Filler copies a frame into as many posted
// buffers as it needs and pushes a completion naming them with the bytes
// used in each; the Poster copies the frame out and posts the buffers again.

// Filler is the server (producer) side of the RX queue. It is not safe for
// concurrent use.
type Filler struct {
	m      *mapping
	posted PipeReader // posted buffers, from the client
	comps  PipeWriter // filled buffers, to the client
	peer   producerState
	bufs   []BufferDesc
}

// NewFiller maps the RX queue q for a server. Servers set opts.RequireSeals.
func NewFiller(q QueueFDs, opts MapOptions) (*Filler, error) {
	m, err := mapQueue(q, opts)
	if err != nil {
		return nil, fmt.Errorf("map RX queue: %w", err)
	}
	f := &Filler{m: m, peer: producerState{m}, bufs: make([]BufferDesc, 0, MaxBuffersPerFrame)}
	f.posted.Init(m.txPipe)
	f.comps.Init(m.rxPipe)
	return f, nil
}

// Send copies a frame made of parts (total bytes) into buffers the client
// posted. It returns false when the client has not posted enough buffers or
// has not consumed its completions: the caller drops the frame. The frame is
// published by Flush. An error is a violation by the client.
func (f *Filler) Send(parts [][]byte, total int) (bool, error) {
	return f.SendMeta(parts, total, 0)
}

// SendMeta is Send with the completion's meta word (see desc.go): non-zero
// only where the link config gives it a meaning the client accepted.
func (f *Filler) SendMeta(parts [][]byte, total int, meta uint32) (bool, error) {
	if total <= 0 {
		return false, nil
	}
	bufs := f.bufs[:0]
	for have := 0; have < total; {
		shared, err := f.posted.Pull()
		if err != nil {
			return false, err
		}
		if shared == nil {
			f.posted.Abort()
			return false, nil
		}
		b, err := decodePosted(shared)
		if err != nil {
			return false, err
		}
		if b.Size == 0 || !inRegion(b.Offset, b.Size, len(f.m.data)) {
			return false, violation("posted RX buffer [%d, +%d) empty or outside the %d-byte data region", b.Offset, b.Size, len(f.m.data))
		}
		if len(bufs) == MaxBuffersPerFrame {
			return false, violation("posted RX buffers too small: a %d-byte frame needs more than %d", total, MaxBuffersPerFrame)
		}
		if rest := total - have; int(b.Size) > rest {
			b.Size = uint32(rest) // report what is used, not what was posted
		}
		have += int(b.Size)
		bufs = append(bufs, b)
	}
	c := f.comps.Push(uint64(rxCompletionHeaderSize + len(bufs)*rxCompletionBufferSize))
	if c == nil {
		f.posted.Abort()
		return false, nil
	}
	copyToBuffers(f.m.data, bufs, parts)
	encodeRxCompletion(c, uint32(total), meta, bufs)
	// Consume the posted slots now: an Abort for a later frame must not
	// give these buffers out twice.
	f.posted.Flush()
	f.bufs = bufs
	return true, nil
}

// Flush publishes the frames sent since the last Flush and reports whether
// the client asked to be notified (the caller then writes the eventfd).
func (f *Filler) Flush() (notify bool) {
	f.comps.Flush()
	return f.peer.wantsNotification()
}

// Close unmaps the queue.
func (f *Filler) Close() { f.m.unmap() }

// Poster is the client (consumer) side of the RX queue. It is not safe for
// concurrent use.
type Poster struct {
	consumerState
	m        *mapping
	posts    PipeWriter // posted buffers, to the server
	comps    PipeReader // filled buffers, from the server
	bufSize  uint32
	maxFrame uint32
	// posted marks the buffers the server holds, by buffer number (= id).
	posted []bool
	// repost lists buffers to post again on the next Flush.
	repost []uint32
	// held counts the buffers the server holds; window is how many it
	// is to hold (see postWindow); fresh is the first buffer never
	// posted (they are posted in order).
	held, window, fresh uint32
	d                   RxDesc
	raw                 [maxRxCompletionDescSize]byte
}

// The posting window.
//
// The server fills posted buffers in the order they were posted, so a
// client that posted every buffer of its data region at once would have
// its frames cycle through all of them: a link's first pass touches every
// page of the region (4 MiB by default), each first touch a page fault in
// both processes and a fresh page of the memfd, and every link that ever
// carried a frame per buffer keeps the whole region resident. Between two
// sandboxes the first thousand 64-byte round trips of a connection, fresh
// pages all, took up to five times as long as the rest (a p99 of 460-840
// µs where the same run with the regions populated up front had 160-310).
// So a Poster posts at first only postWindow buffers and recycles those:
// buffers come back and are posted again before any fresh one. It posts
// more, doubling the window up to the whole region, when the server held
// half or less of the window at a Flush (it filled the rest since the
// last): a stream's bursts open it in a few batches, as they grow, and a
// request/response link stays within its first pages.
const postWindow = 256

// NewPoster maps the RX queue q for a client using buffers of bufSize bytes
// and accepting frames of at most maxFrame bytes, and posts the first
// buffers of its window.
func NewPoster(q QueueFDs, bufSize, maxFrame uint32, opts MapOptions) (*Poster, error) {
	m, err := mapQueue(q, opts)
	if err != nil {
		return nil, fmt.Errorf("map RX queue: %w", err)
	}
	if bufSize < MinBufferSize || uint64(len(m.data)) < uint64(bufSize) {
		m.unmap()
		return nil, fmt.Errorf("map RX queue: buffer size %d does not fit a data region of %d bytes", bufSize, len(m.data))
	}
	n := uint64(len(m.data)) / uint64(bufSize)
	p := &Poster{consumerState: consumerState{m}, m: m, bufSize: bufSize, maxFrame: maxFrame}
	p.posts.Init(m.txPipe)
	p.comps.Init(m.rxPipe)
	n = min(n, p.posts.Capacity(postedBufferSize))
	p.posted = make([]bool, n)
	p.d.Buffers = make([]BufferDesc, 0, MaxBuffersPerFrame)
	p.repost = make([]uint32, 0, n)
	// At least two of the largest frames.
	perFrame := (uint64(maxFrame) + uint64(bufSize) - 1) / uint64(bufSize)
	p.window = uint32(min(n, max(postWindow, 2*perFrame)))
	p.Flush()
	return p, nil
}

// Ready reports whether a completion is waiting.
func (p *Poster) Ready() bool { return p.comps.Ready() }

// Recv copies the next frame out of the queue into a buffer from alloc and
// returns it, or nil when the queue is empty. An error is a violation by the
// server.
func (p *Poster) Recv(alloc func(n int) []byte) ([]byte, error) {
	shared, err := p.comps.Pull()
	if err != nil || shared == nil {
		return nil, err
	}
	if len(shared) > len(p.raw) {
		return nil, violation("RX completion of %d bytes, more than %d", len(shared), len(p.raw))
	}
	raw := p.raw[:copy(p.raw[:], shared)]
	if err := decodeRxCompletion(raw, &p.d); err != nil {
		return nil, err
	}
	if p.d.Size == 0 || p.d.Size > p.maxFrame {
		return nil, violation("RX frame of %d bytes, want 1..%d", p.d.Size, p.maxFrame)
	}
	var sum uint64
	for _, b := range p.d.Buffers {
		if b.ID >= uint64(len(p.posted)) || !p.posted[b.ID] || b.Offset != b.ID*uint64(p.bufSize) || b.Size > p.bufSize {
			return nil, violation("RX completion names buffer id %d at [%d, +%d), not one posted", b.ID, b.Offset, b.Size)
		}
		p.posted[b.ID] = false
		p.held--
		sum += uint64(b.Size)
	}
	for _, b := range p.d.Buffers {
		p.repost = append(p.repost, uint32(b.ID))
	}
	if sum < uint64(p.d.Size) {
		return nil, violation("RX buffers hold %d bytes of a %d-byte frame", sum, p.d.Size)
	}
	frame := alloc(int(p.d.Size))[:p.d.Size]
	copyFromBuffers(frame, p.m.data, p.d.Buffers)
	return frame, nil
}

// Meta returns the meta word of the frame Recv returned last (see desc.go).
func (p *Poster) Meta() uint32 { return p.d.Meta }

// Flush returns the pulled completions' slots, posts the consumed buffers
// again and, as the window allows, fresh ones.
func (p *Poster) Flush() {
	p.comps.Flush()
	n := uint32(len(p.posted))
	if p.fresh > 0 && p.held <= p.window/2 && p.window < n {
		p.window = min(2*p.window, n)
	}
	i := 0
	for ; i < len(p.repost); i++ {
		if !p.post(p.repost[i]) {
			break
		}
	}
	p.repost = p.repost[:copy(p.repost, p.repost[i:])]
	for p.held < p.window && p.fresh < n && len(p.repost) == 0 && p.post(p.fresh) {
		p.fresh++
	}
	p.posts.Flush()
}

// post posts buffer id, or reports false when the ring has no room.
func (p *Poster) post(id uint32) bool {
	b := p.posts.Push(postedBufferSize)
	if b == nil {
		return false
	}
	encodePosted(b, BufferDesc{Offset: uint64(id) * uint64(p.bufSize), Size: p.bufSize, ID: uint64(id)})
	p.posted[id] = true
	p.held++
	return true
}

// Close unmaps the queue.
func (p *Poster) Close() { p.m.unmap() }
