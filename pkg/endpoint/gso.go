package endpoint

import (
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// TCP super-packets forwarded whole (GSO pass-through).
//
// A kernel pod's TCP sends super-packets of up to 64 KiB through its TAP
// device (TSO). Cutting them into MTU-sized segments at the router's ingress
// costs one stack traversal and one write syscall per 1500 bytes; a veth
// pair carries them whole. With tap.Options.Forwarding the TAP endpoint
// delivers such a super-packet to the router's stack as one packet, and the
// egress link writes it whole to a TAP or TUN device with a virtio-net
// header (the receiving kernel takes it as a veth would), or cuts it into
// segments in software when its link cannot take it (a sandbox link).
//
// gVisor's forwarding loses the packet's GSO metadata on the way:
// PacketBuffer.DeepCopyForForwarding copies the bytes, Mark, InputNICID and
// the conntrack tuple, not GSOOptions; and without GSOOptions a packet
// larger than the egress MTU is refused (IPv4 DF: "fragmentation needed";
// IPv6: "packet too big"). So the ingress records the metadata in
// PacketBuffer.Mark, which the router does not otherwise use (it has no
// iptables rules), and the router's postrouting hook, which runs on the
// forwarded copy before the MTU check, turns it back into GSOOptions with
// RestoreForwardedGSO.
//
// The mark says: the packet is a TCP packet whose checksum field holds the
// pseudo-header sum (a partial checksum, VIRTIO_NET_HDR_F_NEEDS_CSUM, as
// the sending kernel left it), to be cut into segments of at most the MSS
// in its low 16 bits. Forwarding changes neither the addresses nor the
// length, so the partial sum stays right.
const (
	gsoMarkFlag = 1 << 31
	gsoMarkMSS  = 1<<16 - 1
)

// minSegmentMSS is the smallest segment payload software segmentation
// produces, whatever MSS a super-packet asks for: 536 bytes is the MSS every
// IPv4 host must accept (RFC 9293 section 3.7.1) and fits the IPv6 minimum
// MTU. It bounds the work a pod can cause with a tiny gso_size.
const minSegmentMSS = 536

// MarkForwardedGSO records on pkt, about to be delivered to a forwarding
// stack, that it is a TCP super-packet with a partial checksum, to be
// segmented at mss. A Forwarding TAP endpoint marks what it delivers so.
func MarkForwardedGSO(pkt *stack.PacketBuffer, mss uint16) {
	pkt.Mark = gsoMarkFlag | uint32(mss)
}

// ForwardedGSO reports whether pkt carries the GSO mark of a Forwarding
// endpoint (a TCP super-packet from a kernel, its checksum partial) and the
// MSS to cut it at. It leaves the mark: for a router that forwards the packet
// itself instead of through its stack.
func ForwardedGSO(pkt *stack.PacketBuffer) (mss uint16, ok bool) {
	if pkt.Mark&gsoMarkFlag == 0 {
		return 0, false
	}
	return uint16(pkt.Mark & gsoMarkMSS), true
}

// RestoreForwardedGSO turns the GSO mark a Forwarding TAP endpoint put on a
// TCP super-packet back into pkt.GSOOptions, and reports whether it did. A
// forwarding stack calls it from its postrouting hook (for example
// stack.NFTablesInterface.CheckPostrouting), which sees the forwarded copy
// before the stack checks it against the egress MTU. Every endpoint of this
// package writes a packet with GSOOptions whole, or segments it.
func RestoreForwardedGSO(pkt *stack.PacketBuffer) bool {
	if pkt.Mark&gsoMarkFlag == 0 {
		return false
	}
	mss := uint16(pkt.Mark & gsoMarkMSS)
	pkt.Mark = 0
	var typ stack.GSOType
	switch pkt.NetworkProtocolNumber {
	case header.IPv4ProtocolNumber:
		typ = stack.GSOTCPv4
	case header.IPv6ProtocolNumber:
		typ = stack.GSOTCPv6
	default:
		return false
	}
	pkt.GSOOptions = stack.GSO{
		Type:       typ,
		NeedsCsum:  true,
		CsumOffset: header.TCPChecksumOffset,
		MSS:        mss,
		L3HdrLen:   uint16(len(pkt.NetworkHeader().Slice())),
	}
	return true
}

// IsTCPGSO reports whether pkt carries TCP GSO metadata: a super-packet to
// segment, or at least a partial checksum to complete.
func IsTCPGSO(pkt *stack.PacketBuffer) bool {
	t := pkt.GSOOptions.Type
	return t == stack.GSOTCPv4 || t == stack.GSOTCPv6
}

// SegmentMSS returns the MSS a TCP super-packet asking for mss is cut at
// for a link that fits fit bytes of TCP payload in a packet: mss, at most
// fit and at least minSegmentMSS (or fit, if less), which bounds the work a
// pod's tiny segment size can cause at the receiver.
func SegmentMSS(mss uint16, fit int) int {
	return min(max(int(mss), min(minSegmentMSS, fit)), fit)
}

// PieceSize returns the payload of each piece a TCP super-packet asking
// for mss is cut into for a link of IP MTU mtu, its IP and TCP headers
// hdrLen bytes: segments of SegmentMSS, as many whole ones as fit the
// link (a sandbox's, at MTU 65000, fits several), as a receiver's GRO would
// join them. A kernel's 64 KiB super-packet of 1448-byte segments is 65212
// bytes of IP: two pieces for a sandbox, not 45. The receiver's TCP takes
// any segment within its own MSS, which its link's MTU bounds. It returns
// 0 when no payload fits.
func PieceSize(mss uint16, mtu uint32, hdrLen int) int {
	fit := int(mtu) - hdrLen
	s := SegmentMSS(mss, fit)
	if s <= 0 {
		return 0
	}
	return s * (fit / s)
}

// SoftwareGSO calls emit with the frames a link that takes no GSO must send
// for the TCP GSO packet in frame (a private, writable copy of the whole
// frame, link header included): the frame itself with its checksum completed
// when it fits the link's IP MTU, otherwise segments of it with full
// checksums. It reports false for a frame whose headers do not parse, which
// the caller drops.
func SoftwareGSO(frame []byte, ethernet bool, gso stack.GSO, mtu uint32, emit func([]byte, bool)) bool {
	f, err := ParseTCPFrame(frame, ethernet, gso.Type == stack.GSOTCPv6)
	if err != nil {
		return false
	}
	if len(f.Frame)-f.L2 <= int(mtu) {
		if !f.V6 {
			// As segmentParsed does: every frame out has valid
			// checksums whatever came in.
			h := header.IPv4(f.Frame[f.L2:])
			h.SetChecksum(0)
			h.SetChecksum(^h.CalculateChecksum())
		}
		if gso.NeedsCsum {
			start := f.L2 + f.L3
			t := header.TCP(f.Frame[start:])
			t.SetChecksum(0)
			xsum := PseudoHeaderSum(&f, len(f.Frame)-start)
			t.SetChecksum(^checksum.Checksum(f.Frame[start:], xsum))
		}
		emit(f.Frame, true)
		return true
	}
	hl := f.L3 + f.L4
	size := PieceSize(gso.MSS, mtu, hl)
	if size <= 0 {
		return false
	}
	return segmentParsed(f, size, SegmentMSS(gso.MSS, int(mtu)-hl), emit) == nil
}

// PseudoHeaderSum is the TCP pseudo-header sum of f with a TCP length of n:
// what a partial checksum holds.
func PseudoHeaderSum(f *ParsedTCP, n int) uint16 {
	ip := f.Frame[f.L2:]
	var src, dst tcpip.Address
	if f.V6 {
		h := header.IPv6(ip)
		src, dst = h.SourceAddress(), h.DestinationAddress()
	} else {
		h := header.IPv4(ip)
		src, dst = h.SourceAddress(), h.DestinationAddress()
	}
	return header.PseudoHeaderChecksum(header.TCPProtocolNumber, src, dst, uint16(n))
}
