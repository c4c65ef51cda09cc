package router

import (
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/shm-cni/shm-cni/pkg/endpoint"
)

// Large segments from a sandbox to a kernel pod.
//
// A kernel pod's link is a TAP device with a virtio-net header: the kernel
// takes TCP super-packets written to it whole (GSO), as a veth pair
// carries them, and its TCP receives them as one. A sandbox's TCP sends
// segments of up to its own link's MTU (64 KiB) but no larger than its
// peer's MSS, which a kernel pod derives from its own link (1460 bytes at
// MTU 1500). So the fast path, which already forwards SYNs between the
// two, raises the MSS a kernel pod announces to a sandbox to what the
// sandbox's link carries, and hands the sandbox's large segments to the
// kernel pod's link as super-packets: TCP GSO with the kernel pod's MSS,
// the checksum left partial for the kernel (CHECKSUM_PARTIAL, as a kernel's
// own TSO leaves it). The kernel pod's TCP then sees its usual super-packets;
// only the router knows they were one segment.
//
// The other way, a kernel pod's TCP sends super-packets (TSO) through its
// TAP device, which delivers each whole, its checksum partial and marked
// with the kernel's MSS (endpoint.ForwardedGSO). The fast path takes them
// too: to another kernel pod's link as they are (GSO at the kernel's MSS, or
// what fits that link), to a link that takes no GSO but fits them (a
// sandbox's, at MTU 65000) whole with the checksum completed, a plain
// segment the sandbox's TCP receives as one. gVisor's forwarding would copy
// each (64 KiB) and, for a sandbox, the link would copy it again to flatten
// it; the fast path copies the headers and the link copies the segment into
// its queue. A sandbox's link that took checksum offload (shm.Options.RxGSO)
// gets the super-packet with its checksum partial, as a virtio-net guest
// would: neither the router nor the sandbox sums its 64 KiB. A super-packet
// that a link without GSO does not fit (one of 64 KiB from a veth pod,
// whose kernel keeps its own gso_max_size, to a sandbox's link of 65000)
// is cut into the fewest pieces of whole segments that fit (splitSuper):
// two, on the fast path, where it went through gVisor's forwarding (a copy
// of the packet) to the link's software GSO, which cuts it the same way.
//
// The sandbox's own checksum is replaced by the partial one: a sandbox that
// sends a bad checksum gets its own data through unchecked, which is all a
// checksum could protect here (the memory in between does not flip bits).

// tcpGSOWriter is a link endpoint that may write TCP super-packets whole to
// a kernel that takes them (tap.Endpoint).
type tcpGSOWriter interface {
	WritesTCPGSO() bool
}

// partialChecksumWriter is a link endpoint that may write TCP packets with
// a partial checksum whole, for its peer to take as they are (a
// shm.Server whose sandbox took checksum offload).
type partialChecksumWriter interface {
	TakesPartialTCPChecksum() bool
}

// partialWriter returns ep as a partialChecksumWriter, or nil.
func partialWriter(ep stack.LinkEndpoint) partialChecksumWriter {
	w, _ := ep.(partialChecksumWriter)
	return w
}

// takesTCPGSO reports whether ep writes TCP super-packets whole to a
// kernel that takes them (a TAP device with a virtio-net header).
func takesTCPGSO(ep stack.LinkEndpoint) bool {
	w, ok := ep.(tcpGSOWriter)
	return ok && w.WritesTCPGSO()
}

// tcpSegment is a TCP segment the fast path hands to a link as a
// super-packet: its IP and TCP header lengths and addresses.
type tcpSegment struct {
	l3, l4   int
	v6       bool
	src, dst tcpip.Address
}

// parseTCPSegment parses pkt (size bytes, its IP header checked by the
// fast path: IPv4 without options or IPv6 without hop-by-hop options) as a
// TCP segment with data into s, and returns s, or nil: not TCP, an IPv4
// fragment, a TCP header that does not parse, or no data past it. s is the
// caller's (on its stack: one allocation less per packet).
func parseTCPSegment(s *tcpSegment, protocol tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer, size int) *tcpSegment {
	switch protocol {
	case header.IPv4ProtocolNumber:
		b, _ := pkt.Data().PullUp(header.IPv4MinimumSize) // checked by forward
		h := header.IPv4(b)
		if h.Protocol() != uint8(header.TCPProtocolNumber) || h.More() || h.FragmentOffset() != 0 {
			return nil
		}
		s.l3, s.src, s.dst = header.IPv4MinimumSize, h.SourceAddress(), h.DestinationAddress()
	case header.IPv6ProtocolNumber:
		b, _ := pkt.Data().PullUp(header.IPv6MinimumSize) // checked by forward
		h := header.IPv6(b)
		if h.NextHeader() != uint8(header.TCPProtocolNumber) {
			return nil
		}
		s.l3, s.v6, s.src, s.dst = header.IPv6MinimumSize, true, h.SourceAddress(), h.DestinationAddress()
	default:
		return nil
	}
	b, ok := pkt.Data().PullUp(s.l3 + header.TCPMinimumSize)
	if !ok {
		return nil
	}
	s.l4 = int(header.TCP(b[s.l3:]).DataOffset())
	if s.l4 < header.TCPMinimumSize || s.l3+s.l4 >= size {
		return nil
	}
	return s
}

// mssFor returns the MSS to cut the segment at for a link of IP MTU mtu:
// what fits the link; for a kernel's super-packet (super), the kernel's own
// MSS as a link's software segmentation takes it (endpoint.SegmentMSS).
func (s *tcpSegment) mssFor(mtu uint32, kernelMSS uint16, super bool) uint16 {
	fit := int(mtu) - s.l3 - s.l4
	if !super {
		return uint16(fit)
	}
	return uint16(endpoint.SegmentMSS(kernelMSS, fit))
}

// completeChecksum turns the partial TCP checksum of a kernel's super-packet
// (the pseudo-header sum, left for the device) into the full one, in hdr,
// the private copy of the packet's IP and TCP headers at the front of
// payload (the whole packet).
func (s *tcpSegment) completeChecksum(hdr []byte, payload *buffer.Buffer) {
	th := header.TCP(hdr[s.l3:])
	th.SetChecksum(0)
	n := int(payload.Size()) - s.l3
	xsum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, s.src, s.dst, uint16(n))
	th.SetChecksum(^checksum.Combine(xsum, payload.Checksum(s.l3)))
}

// toGSO makes out, a private copy of the segment's headers in front of its
// data (network protocol set), a TCP super-packet to be cut at mss: the
// headers consumed as the link endpoint expects, the TCP checksum replaced
// by the pseudo-header sum of the whole segment, GSO options.
func (s *tcpSegment) toGSO(out *stack.PacketBuffer, mss uint16) {
	out.NetworkHeader().Consume(s.l3)
	th, _ := out.TransportHeader().Consume(s.l4)
	tcp := header.TCP(th)
	tcp.SetChecksum(header.PseudoHeaderChecksum(header.TCPProtocolNumber, s.src, s.dst, uint16(out.Data().Size()+s.l4)))
	out.TransportProtocolNumber = header.TCPProtocolNumber
	out.GSOOptions = s.gsoOptions(mss)
}

// gsoOptions are the GSO options of the segment as a super-packet to be cut
// at mss, its checksum partial.
func (s *tcpSegment) gsoOptions(mss uint16) stack.GSO {
	typ := stack.GSOTCPv4
	if s.v6 {
		typ = stack.GSOTCPv6
	}
	return stack.GSO{
		Type:       typ,
		NeedsCsum:  true,
		CsumOffset: header.TCPChecksumOffset,
		MSS:        mss,
		L3HdrLen:   uint16(s.l3),
	}
}

// setSynMSS sets the MSS option of ip, a private copy of an IPv4 (no
// options) or IPv6 packet, when it is a TCP SYN, to what a link of IP MTU
// mtu carries: when it is smaller (raise), or larger (not raise).
func setSynMSS(protocol tcpip.NetworkProtocolNumber, ip []byte, mtu uint32, raise bool) {
	l3 := header.IPv4MinimumSize
	if protocol == header.IPv6ProtocolNumber {
		if header.IPv6(ip).NextHeader() != uint8(header.TCPProtocolNumber) {
			return
		}
		l3 = header.IPv6MinimumSize
	} else if h := header.IPv4(ip); h.Protocol() != uint8(header.TCPProtocolNumber) || h.More() || h.FragmentOffset() != 0 {
		return
	}
	if len(ip) < l3+header.TCPMinimumSize {
		return
	}
	t := header.TCP(ip[l3:])
	if t.Flags()&header.TCPFlagSyn == 0 || int(t.DataOffset()) < header.TCPMinimumSize || int(t.DataOffset()) > len(t) {
		return
	}
	i := mssOptionOffset(t[header.TCPMinimumSize:t.DataOffset()])
	if i < 0 {
		return
	}
	mss := uint16(min(int(mtu), maxMTU) - l3 - header.TCPMinimumSize)
	setMSS(t, i, func(old uint16) bool { return (old < mss) == raise && old != mss }, mss)
}

// splitSuper cuts a kernel's super-packet that a link without GSO does not
// fit (a sandbox's, for a kernel pod whose TCP sends 64 KiB super-packets)
// into pieces that fit it, each a whole number of segments of mss, as a
// link's software GSO cuts it (endpoint.PieceSize: as few as fit; headers
// made by endpoint.SuperHeaders). hb is the private copy of its IP and TCP
// headers (the TTL decremented), at the front of payload, the whole packet,
// which splitSuper takes. Each piece shares payload's data; emit gets it,
// with its private headers at its front, the TCP checksum left as it was
// (the caller completes it or makes it partial). It returns the number of
// pieces. The headers fit mtu (hdrLen < mtu) and mss is at most what fits.
func (s *tcpSegment) splitSuper(hb []byte, payload buffer.Buffer, mtu uint32, mss uint16, emit func(buffer.Buffer, []byte)) int {
	hl := s.l3 + s.l4
	// The headers first: hb may lie in the view the trim releases.
	var tmpl [header.IPv6MinimumSize + header.TCPHeaderMaximumSize]byte
	hb = tmpl[:copy(tmpl[:], hb[:hl])]
	sh := endpoint.ReadSuperHeaders(hb, s.l3, s.v6)
	data := payload
	data.TrimFront(int64(hl))
	n := int(data.Size())
	per := endpoint.PieceSize(mss, mtu, hl)
	pieces := 0
	for off := 0; off < n; off += per {
		size := min(per, n-off)
		hv := buffer.NewViewWithData(hb)
		h := hv.AsSlice()
		sh.Piece(h, off, size, n, int(mss))
		piece := buffer.MakeWithView(hv)
		d := data.Clone()
		d.TrimFront(int64(off))
		d.Truncate(int64(size))
		piece.Merge(&d)
		emit(piece, h)
		pieces++
	}
	data.Release()
	return pieces
}
