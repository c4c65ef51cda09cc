package queue

import (
	"errors"
	"fmt"
)

// A ring index is 64 bits: the low 32 bits are a byte offset into the ring,
// the high 32 bits count revolutions, so that a full ring and an empty one
// have different indices. Indices wrap around 2^64: compare them only through
// their difference.
const (
	jump           uint64 = 1 << 32 // one revolution
	offsetMask     uint64 = jump - 1
	revolutionMask uint64 = ^offsetMask

	slotHeaderSize        = 8       // sizeof(uint64)
	slotFree       uint64 = 1 << 63 // header bit: the slot is free
	slotSizeMask   uint64 = 1<<32 - 1

	// initialIndex is where both ends of a fresh ring start: close to the
	// 32-bit wrap of the revolution counter, as in gVisor, so that wrapping
	// is exercised early.
	initialIndex = 0xfffffffe * jump
)

// ErrViolation is wrapped by every error that reports a protocol violation
// by the peer: a ring header, descriptor, offset or size that breaks the
// rules. The caller must stop using the queue.
var ErrViolation = errors.New("peer protocol violation")

func violation(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrViolation, fmt.Sprintf(format, args...))
}

// slotSize returns the size of a slot holding a payload of n bytes: header
// plus payload rounded up to 8 bytes.
func slotSize(n uint64) uint64 {
	return (slotHeaderSize + n + slotHeaderSize - 1) &^ (slotHeaderSize - 1)
}

// pipeCapacity returns how many records of recordSize bytes a ring of
// ringSize bytes holds at once.
func pipeCapacity(ringSize, recordSize uint64) uint64 {
	return (ringSize - slotHeaderSize) / slotSize(recordSize)
}

// ring is the memory of one pipe. Its length is a multiple of 8 and it is
// 8-byte aligned (it is a page-aligned mapping), so every header access is an
// aligned 64-bit word.
type ring struct {
	b []byte // immutable
}

func (r *ring) init(b []byte) { r.b = b[:len(b)&^(slotHeaderSize-1)] }

// size returns the ring's length as a uint64.
func (r *ring) size() uint64 { return uint64(len(r.b)) }

// payload returns the payload of the slot at idx. The caller has checked that
// the slot lies within the ring.
func (r *ring) payload(idx, n uint64) []byte {
	off := idx&offsetMask + slotHeaderSize
	return r.b[off : off+n : off+n]
}

// PipeReader is the consuming end of a ring. Pull returns payloads in order;
// their slots go back to the producer on Flush.
type PipeReader struct {
	r ring
	// head is the index of the next slot to pull.
	head uint64
	// tail is the index of the first slot pulled but not yet flushed.
	tail uint64
}

// Init starts reading the ring in b from its beginning.
func (p *PipeReader) Init(b []byte) {
	p.r.init(b)
	p.tail = initialIndex
	p.head = p.tail
}

// Ready reports whether a slot is ready to be pulled (a cheap check for a
// consumer deciding whether to sleep). It may be true for a slot that Pull
// then rejects as a violation.
func (p *PipeReader) Ready() bool {
	if p.head == p.tail+jump {
		return false
	}
	return p.r.load(p.head)&slotFree == 0
}

// Pull returns the payload of the next slot, or nil when there is none. The
// payload aliases shared memory that the peer may change at any moment: copy
// it before parsing it. A malformed ring yields an error wrapping ErrViolation.
func (p *PipeReader) Pull() ([]byte, error) {
	// At most one wrapping slot may precede a payload: at the start of a
	// revolution every payload fits.
	for wraps := 0; ; wraps++ {
		if p.head == p.tail+jump {
			// The whole ring was pulled without a Flush.
			return nil, nil
		}
		header := p.r.load(p.head)
		if header&slotFree != 0 {
			return nil, nil
		}
		n := header & slotSizeMask
		newHead := p.head + slotSize(n)
		if newHead-p.tail > jump {
			return nil, violation("ring slot of %d bytes at offset %d runs past the producer's free space", n, p.head&offsetMask)
		}
		headWrap := p.head&revolutionMask | p.r.size()
		if int64(newHead-headWrap) < 0 {
			b := p.r.payload(p.head, n)
			p.head = newHead
			return b, nil
		}
		// A slot that reaches the end of the ring is a wrapping slot:
		// it carries no data and must end exactly at the start of the
		// next revolution.
		if newHead&offsetMask != 0 || wraps > 0 {
			return nil, violation("wrapping ring slot at offset %d does not end at the ring's start", p.head&offsetMask)
		}
		if p.tail == p.head {
			// Give the wrapping slot back at once so the producer
			// can use the space.
			p.r.store(p.head, slotFree|(newHead-p.head-slotHeaderSize))
			p.tail = newHead
		}
		p.head = newHead
	}
}

// Flush gives every pulled slot back to the producer.
func (p *PipeReader) Flush() {
	if p.head == p.tail {
		return
	}
	p.r.store(p.tail, slotFree|(p.head-p.tail-slotHeaderSize))
	p.tail = p.head
}

// Abort un-pulls every slot pulled since the last Flush.
func (p *PipeReader) Abort() { p.head = p.tail }

// PipeWriter is the producing end of a ring. Push reserves a payload; Flush
// publishes every payload pushed since the last Flush at once.
type PipeWriter struct {
	r ring
	// maxPayload is the largest payload that can ever fit: the ring less
	// its own header and a wrapping slot's header.
	maxPayload uint64
	// head is the index of the first slot not yet known to be free.
	head uint64
	// tail is the index of the first unpublished slot.
	tail uint64
	// next is the index where the next Push goes.
	next uint64
	// tailHeader is the header to write at tail on Flush: the first
	// pushed slot's header is written last, which publishes the batch.
	tailHeader uint64
}

// Init starts writing the ring in b from its beginning, marking its first
// slot free.
func (p *PipeWriter) Init(b []byte) {
	p.r.init(b)
	p.maxPayload = p.r.size() - 2*slotHeaderSize
	p.tail = initialIndex
	p.next = p.tail
	p.head = p.tail + jump
	p.r.store(p.tail, slotFree)
}

// Capacity returns how many payloads of n bytes fit in the ring at once.
func (p *PipeWriter) Capacity(n uint64) uint64 { return pipeCapacity(p.r.size(), n) }

// Push reserves a payload of n bytes and returns it for the caller to fill,
// or nil when the ring has no room. The payload is published by Flush.
func (p *PipeWriter) Push(n uint64) []byte {
	if n > p.maxPayload {
		return nil
	}
	for {
		messageAhead := p.next != p.tail
		newNext := p.next + slotSize(n)
		nextWrap := p.next&revolutionMask | p.r.size()
		if int64(newNext-nextWrap) < 0 {
			if !p.reclaim(newNext) {
				return nil
			}
			if messageAhead {
				p.r.store(p.next, n)
			} else {
				p.tailHeader = n
			}
			b := p.r.payload(p.next, n)
			p.next = newNext
			return b
		}
		// The payload would cross the end of the ring: fill the rest
		// with a wrapping slot and retry at the start, where it fits.
		newNext = newNext&revolutionMask + jump
		if !p.reclaim(newNext) {
			return nil
		}
		wrap := newNext - p.next - slotHeaderSize
		old := p.next
		p.next = newNext
		if messageAhead {
			p.r.store(old, wrap)
		} else {
			p.tailHeader = wrap
			p.Flush()
		}
	}
}

// reclaim advances head over slots the consumer has freed until newNext is
// covered, and reports whether it could. A consumer that writes nonsense only
// makes its own ring look full.
func (p *PipeWriter) reclaim(newNext uint64) bool {
	for int64(newNext-p.head) > 0 {
		header := p.r.load(p.head)
		if header&slotFree == 0 {
			return false
		}
		newHead := p.head + slotSize(header&slotSizeMask)
		if newHead-p.tail > jump || newHead&offsetMask >= p.r.size() {
			return false
		}
		p.head = newHead
	}
	return true
}

// Abort drops every payload pushed since the last Flush.
func (p *PipeWriter) Abort() { p.next = p.tail }

// Flush publishes every payload pushed since the last Flush.
func (p *PipeWriter) Flush() {
	if p.next == p.tail {
		return
	}
	if p.next != p.head {
		// The consumer stops at next: mark it free.
		p.r.store(p.next, slotFree)
	}
	p.r.store(p.tail, p.tailHeader)
	p.tail = p.next
}
