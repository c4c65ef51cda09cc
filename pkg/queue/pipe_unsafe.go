package queue

import (
	"sync/atomic"
	"unsafe"
)

// word returns the aligned 64-bit word at the ring offset of idx. The offset
// is masked to the ring and is a multiple of 8 below len(r.b), and the ring is
// page aligned, so the word is in bounds and aligned.
func (r *ring) word(idx uint64) *uint64 {
	return (*uint64)(unsafe.Pointer(&r.b[idx&offsetMask:][:8][0]))
}

// load reads the slot header at idx atomically.
func (r *ring) load(idx uint64) uint64 { return atomic.LoadUint64(r.word(idx)) }

// store writes the slot header at idx atomically.
func (r *ring) store(idx, v uint64) { atomic.StoreUint64(r.word(idx), v) }
