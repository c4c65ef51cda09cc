package router

import (
	"sync"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// One copy from a sandbox.
//
// A sandbox's link (shm.Server) can deliver a large TCP frame with only its
// headers copied out of the sandbox's memory, the rest left in its buffers
// (held: see the shm package's direct.go). When the fast path sends such a
// packet whole, its checksum partial, to a link that takes it (another
// sandbox's that took checksum offload; a kernel pod's TAP device or the
// uplink, with a virtio-net header), it writes the frame straight from the
// sandbox's buffers: into the other sandbox's, or with one writev that the
// kernel copies from. The headers come from the private copy the router
// checked and rewrote; the data is copied once. Every other way out of the
// router first copies the held data into private memory (copyHeld): the
// filter before the router's stack and the hairpin, the fast path before
// any other destination. A link with a bandwidth limit neither holds (its
// shaper may keep a packet past its delivery) nor is written this way (its
// shaper sees every packet written to it).

// heldSource is a link endpoint that may deliver packets whose data past
// their headers is still in its peer's memory (shm.Server).
type heldSource interface {
	// HoldFrames turns holding on: the router promises to copy the data of
	// every packet it does not write on with frameWriter (copyHeld).
	HoldFrames()
	// HeldRest returns where the data of pkt past its first head bytes
	// is, if pkt is held.
	HeldRest(pkt *stack.PacketBuffer) (head int, rest [][]byte, ok bool)
	// CopyHeld copies a held packet's data into private memory.
	CopyHeld(pkt *stack.PacketBuffer)
}

// frameWriter is a link endpoint that writes a frame given as parts to its
// peer in one copy (shm.Server, tap.Endpoint).
type frameWriter interface {
	// WriteFrame writes the frame (its headers, link to TCP, in
	// parts[0]), or reports false without writing when the link does not
	// take it as it is.
	WriteFrame(parts [][]byte, total int, gso *stack.GSO) bool
}

// packetsWaiter is a link endpoint whose writes may wait a little for room
// in its peer's ring (shm.Server): the fast path writes a pod's packets to
// it so, and the pod's link waits, not the router's shared ones.
type packetsWaiter interface {
	WritePacketsWaiting(pkts stack.PacketBufferList) (int, tcpip.Error)
}

// setWaiter gives the fast path's view of a new link the endpoint's waiting
// writes, when it has them and no bandwidth limit (whose shaper must see
// every packet written to the link).
func setWaiter(d *fastDst, ep stack.LinkEndpoint, limited bool) {
	if w, ok := ep.(packetsWaiter); ok && !limited {
		d.waiter = w
	}
}

// setDirect gives the fast path's view of a new link the endpoint's held
// frames and one-copy writes, when the router has them on (Config.OneCopy)
// and the fast path, and the link has no bandwidth limit.
func setDirect(d *fastDst, ep stack.LinkEndpoint, limited bool, cfg *Config) {
	if limited || cfg.NoFastPath || !cfg.OneCopy {
		return
	}
	if h, ok := ep.(heldSource); ok {
		h.HoldFrames()
		d.held = h
	}
	if w, ok := ep.(frameWriter); ok {
		d.direct = w
	}
}

// copyHeld copies pkt's data out of the peer's memory if src delivered it
// held.
func (src *fastDst) copyHeld(pkt *stack.PacketBuffer) {
	if src.held != nil {
		src.held.CopyHeld(pkt)
	}
}

// maxDirectHeaders bounds the headers writeDirect rewrites: Ethernet, IPv6
// or IPv4 (no options: the fast path's) and TCP with options.
const maxDirectHeaders = header.EthernetMinimumSize + header.IPv6MinimumSize + header.TCPHeaderMaximumSize

// directScratch is writeDirect's room for a frame's rewritten headers, its
// parts and its GSO options, which would otherwise be allocated for every
// frame (they reach an interface method).
type directScratch struct {
	headers [maxDirectHeaders]byte
	parts   [2 + 40][]byte
	gso     stack.GSO
}

var directScratches = sync.Pool{New: func() any { return new(directScratch) }}

// put returns sc to the pool, holding no packet's memory.
func (sc *directScratch) put() {
	clear(sc.parts[:])
	directScratches.Put(sc)
}

// writeDirect writes pkt, a TCP super-packet of size bytes that src holds
// and the fast path routes whole to d with a partial checksum, as one frame
// from src's peer memory to d's peer, and reports whether d took it. It makes the
// rewrites route makes of a copy: the TTL or hop limit, the IPv4 header
// checksum, the TCP checksum's pseudo-header sum.
func writeDirect(src, d *fastDst, protocol tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer, tcp *tcpSegment, mss uint16, size int) bool {
	if d.direct == nil || (!d.tcpGSO && (d.partial == nil || !d.partial.TakesPartialTCPChecksum())) {
		return false
	}
	head, rest, ok := src.held.HeldRest(pkt)
	hdrLen := tcp.l3 + tcp.l4
	if !ok || head < hdrLen {
		return false
	}
	ip, ok := pkt.Data().PullUp(head) // the private head
	if !ok {
		return false
	}
	sc := directScratches.Get().(*directScratch)
	defer sc.put()
	hbuf := &sc.headers
	eth := 0
	if d.podMAC != "" {
		header.Ethernet(hbuf[:]).Encode(&header.EthernetFields{SrcAddr: d.gwMAC, DstAddr: d.podMAC, Type: protocol})
		eth = header.EthernetMinimumSize
	}
	hb := hbuf[eth : eth+hdrLen]
	copy(hb, ip)
	decrementTTL(protocol, hb)
	th := header.TCP(hb[tcp.l3:])
	th.SetChecksum(header.PseudoHeaderChecksum(header.TCPProtocolNumber, tcp.src, tcp.dst, uint16(size-tcp.l3)))
	parts := append(sc.parts[:0], hbuf[:eth+hdrLen], ip[hdrLen:head])
	parts = append(parts, rest...)
	sc.gso = tcp.gsoOptions(mss)
	if !d.direct.WriteFrame(parts, eth+size, &sc.gso) {
		return false
	}
	src.counters.rxPackets.Add(1)
	src.counters.rxBytes.Add(uint64(size))
	d.counters.txPackets.Add(1)
	d.counters.txBytes.Add(uint64(size))
	return true
}
