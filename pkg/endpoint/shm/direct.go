package shm

import (
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/shm-cni/shm-cni/internal/hoptrace"
	"github.com/shm-cni/shm-cni/pkg/queue"
)

// One copy per hop.
//
// A frame a sandbox sends another sandbox through the router used to be
// copied twice in the agent: out of the sender's TX buffers into private
// memory, where the router checks and routes it, and from there into the
// receiver's RX buffers. The router reads only the headers; the payload
// just passes through. So a server whose router asks for it (HoldFrames)
// copies only the first headerSplit bytes of a large TCP frame flagged for
// segmentation offload (tso.go) out of the sender's memory and leaves the
// rest in the sender's buffers, withholding their completion. The packet it
// delivers holds the private head, and in place of the rest a shared,
// never written chunk of zeros of the same length (heldFill): the stack and
// the router see a packet of the right size whose headers, all within the
// head, were checked from private memory as any frame's are.
//
// While the router handles the packet, on the receive loop's goroutine, it
// may take the rest where it is (HeldRest) and write the frame to another
// server straight from the sender's buffers into the receiver's (WriteFrame):
// one copy. Anywhere else the packet goes (the router's own stack, a TAP
// device, the uplink, a queue of the bandwidth shaper) it must first have
// its data copied out for real (CopyHeld), which is the old second copy:
// nothing is lost. The router calls CopyHeld on every such path; the
// receive loop hands the buffers back once the delivery returned.
//
// What the rest holds is never parsed: it is copied from the sender's
// memory to the receiver's, whatever the sender writes there meanwhile,
// and only the sender's own stream can suffer from its changes. Its bounds
// were checked with the descriptor (queue.Receiver.RecvHead).

// maxHeld bounds the frames of one receive batch left in the sender's
// buffers: each holds its buffers until delivered.
const maxHeld = 16

// heldFill is the stand-in for the data of held frames: one chunk of zeros
// as large as the largest frame, shared (by reference) by every held packet
// and never written: a write to a shared chunk copies it first.
var heldFill = buffer.NewViewSize(int(maxMTU) + 1)

// heldState is the receive loop's record of held frames. Owned by the
// receive loop; the router reads it on that goroutine, during delivery.
type heldState struct {
	frames [maxHeld]queue.Held
	n      int // frames held in this batch
	// pkt is the packet being delivered whose data past head bytes is in
	// frame's buffers, nil when none.
	pkt   *stack.PacketBuffer
	frame *queue.Held
	head  int
}

// HoldFrames turns on holding large frames in the client's buffers (a
// server only; before it is attached). The caller (the stack's dispatcher)
// then promises that every packet it does not write on with WriteFrame has
// its data copied out with CopyHeld before the packet leaves the delivery
// call or is kept anywhere.
func (s *Server) HoldFrames() {
	if s.recv != nil {
		s.holding.Store(true)
	}
}

// HeldRest returns, when pkt is a packet being delivered whose data past its
// first head bytes is still in the client's buffers, those bytes' place
// there (trimmed to pkt's data): they are to be copied, not parsed. Call it
// only on the goroutine delivering pkt.
func (s *Server) HeldRest(pkt *stack.PacketBuffer) (head int, rest [][]byte, ok bool) {
	h := s.held
	if h == nil || h.pkt == nil || h.pkt != pkt {
		return 0, nil, false
	}
	return h.head, h.frame.Rest(), true
}

// CopyHeld copies the data of pkt that is still in the client's buffers
// into private memory, in place of the stand-in; a no-op for any other
// packet. Call it only on the goroutine delivering pkt.
func (s *Server) CopyHeld(pkt *stack.PacketBuffer) {
	h := s.held
	if h == nil || h.pkt == nil || h.pkt != pkt {
		return
	}
	v := buffer.NewView(h.frame.RestSize())
	for _, p := range h.frame.Rest() {
		v.Write(p)
	}
	d := pkt.Data()
	d.CapLength(h.head)
	d.AppendView(v)
	h.pkt, h.frame = nil, nil
}

// heldPayload is the payload of a held frame: its head, then the stand-in
// for the rest, size bytes in all.
func heldPayload(head *buffer.View, size int) buffer.Buffer {
	payload := buffer.MakeWithView(head)
	fill := heldFill.Clone()
	fill.CapLength(size - head.Size())
	payload.Append(fill)
	return payload
}

// WriteFrame writes one frame made of parts (total bytes: the link's
// framing, then an IP packet) to the client, copying parts once, into its
// buffers: with a partial TCP checksum when gso says so. It reports false,
// having written nothing, when the link does not take the frame as it is (a
// partial checksum the client did not accept, a frame larger than the
// link's): the caller then writes the packet the usual way. A full queue
// waits up to Options.TxWait as WritePacketsWaiting does, then drops the
// frame and counts it.
func (s *Server) WriteFrame(parts [][]byte, total int, gso *stack.GSO) bool {
	hoptrace.Mark(hoptrace.Tx)
	var meta uint32
	if gso.Type != stack.GSONone {
		if (gso.Type != stack.GSOTCPv4 && gso.Type != stack.GSOTCPv6) || !gso.NeedsCsum || gso.MSS == 0 || !s.rxOffload.Load() {
			return false
		}
		meta = encodeTxOffload(gso)
	}
	if total <= 0 || uint32(total) > s.maxFrame() {
		return false
	}
	var violation error
	defer func() {
		// After txMu is released: stop may release the link.
		if violation != nil {
			s.stop(violation)
		}
	}()
	s.txMu.Lock()
	defer s.txMu.Unlock()
	if s.tx == nil || s.stopping.Load() {
		s.stats.TxDrops.Add(1)
		return true
	}
	sent := s.stats.TxPackets.Load()
	waited := txWaiting{limit: s.podWait}
	if violation = s.sendLocked(parts, total, meta, &waited); violation != nil {
		return true
	}
	if s.stats.TxPackets.Load() != sent {
		s.stats.TxOneCopy.Add(1)
	}
	s.flushTxLocked()
	return true
}
