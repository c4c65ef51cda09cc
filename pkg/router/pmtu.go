package router

import (
	"encoding/binary"
	"math/bits"
	"net/netip"
	"sync/atomic"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// Path MTU answers of the router.
//
// Links differ in MTU: sandbox links carry large packets (64 KiB TCP
// segments), kernel pods' links and the uplink 1500 bytes by default. A
// packet too large for its next link that may not be fragmented (IPv4 with
// don't-fragment, all IPv6) is answered by gVisor's forwarding with ICMP
// "fragmentation needed" (carrying the next link's MTU) or ICMPv6 "packet
// too big". The pinned gVisor leaves the MTU field of its packet too big at
// zero (ipv6.(*endpoint).forwardPacketWithRoute returns
// icmpReasonPacketTooBig{} without the MTU; RFC 4443 section 3.2 wants the
// next-hop link's), which leaves the sender to guess: Linux then falls back
// to the IPv6 minimum of 1280. The router fills it in at postrouting, where
// every packet the stack sends passes, from what it knows of its links: the
// MTU of the pod link of the quoted packet's destination, else the uplink's
// (every other destination is routed there).
// TODO: remove once gVisor puts the MTU in its packet too big.

// linkMTUs is what the router knows of its links' MTUs: an immutable
// snapshot of the pod links' by address, replaced whenever a link comes or
// goes, and the uplink's.
type linkMTUs struct {
	pods   atomic.Pointer[map[netip.Addr]uint32]
	uplink uint32 // immutable
	// uplinkNIC is the uplink's NIC while the router runs, else 0.
	uplinkNIC atomic.Uint32
}

// isPod reports whether a is a pod link's address.
func (m *linkMTUs) isPod(a netip.Addr) bool {
	if pods := m.pods.Load(); pods != nil {
		_, ok := (*pods)[a]
		return ok
	}
	return false
}

// mtuTo returns the MTU of the link the router sends packets for dst to.
func (m *linkMTUs) mtuTo(dst netip.Addr) uint32 {
	if pods := m.pods.Load(); pods != nil {
		if mtu, ok := (*pods)[dst]; ok {
			return mtu
		}
	}
	return m.uplink
}

// fillPacketTooBig puts the next-hop MTU into an ICMPv6 packet too big the
// stack itself is sending without one, and reports whether it did. pkt is the
// stack's own packet at postrouting: its network header is pushed, its
// transport header is the ICMPv6 header, its data the quoted packet.
func (m *linkMTUs) fillPacketTooBig(pkt *stack.PacketBuffer) bool {
	// Only the stack's own: a packet too big a pod sends through the
	// router is forwarded as it is.
	if pkt.NetworkPacketInfo.IsForwardedPacket ||
		pkt.NetworkProtocolNumber != header.IPv6ProtocolNumber || pkt.TransportProtocolNumber != header.ICMPv6ProtocolNumber {
		return false
	}
	icmp := header.ICMPv6(pkt.TransportHeader().Slice())
	if len(icmp) < header.ICMPv6PacketTooBigMinimumSize || icmp.Type() != header.ICMPv6PacketTooBig || icmp.MTU() != 0 {
		return false
	}
	ip := header.IPv6(pkt.NetworkHeader().Slice())
	quoted, ok := pkt.Data().PullUp(header.IPv6MinimumSize)
	if len(ip) < header.IPv6MinimumSize || !ok {
		return false
	}
	dst := netip.AddrFrom16(header.IPv6(quoted).DestinationAddress().As16())
	icmp.SetMTU(m.mtuTo(dst))
	icmp.SetChecksum(0)
	icmp.SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{
		Header:      icmp,
		Src:         ip.SourceAddress(),
		Dst:         ip.DestinationAddress(),
		PayloadCsum: pkt.Data().Checksum(),
		PayloadLen:  pkt.Data().Size(),
	}))
	return true
}

// TCP MSS clamping at the uplink.
//
// A pod's TCP announces the MSS of its own link in its SYN, and learns its
// peer's from the peer's: between pods of this node every link's MTU is
// known to both ends. Beyond the uplink it is not: a peer out there
// announces what its own network carries (9000-byte jumbo frames, say),
// while the uplink carries --mtu (1500); and a sandbox announces its link's
// 65000 to a peer whose path back crosses the uplink. The first segments
// of such a connection are then too big for the uplink and cost a round of
// ICMP errors and retransmissions (gVisor's TCP in a sandbox took about a
// second and a half to recover in TestPathMTU's narrowed path). So, as
// routers do at a narrower link (Linux: iptables TCPMSS
// --clamp-mss-to-pmtu), the router lowers the MSS option of every TCP SYN
// it forwards to or from the uplink to what the uplink carries.

// clampMSS lowers the MSS option of pkt, a forwarded packet at postrouting
// leaving through NIC out, to what the uplink carries when pkt is a TCP SYN
// (or SYN-ACK) entering or leaving through the uplink, and reports whether
// it did. The TCP checksum is updated incrementally (RFC 1624), so a packet
// that came with a bad one keeps it bad.
func (m *linkMTUs) clampMSS(pkt *stack.PacketBuffer, out tcpip.NICID) bool {
	up := tcpip.NICID(m.uplinkNIC.Load())
	if up == 0 || (out != up && pkt.InputNICID != up) {
		return false
	}
	ip := pkt.NetworkHeader().Slice()
	var ipHdr int // the IP header counted against the MTU
	switch pkt.NetworkProtocolNumber {
	case header.IPv4ProtocolNumber:
		h := header.IPv4(ip)
		if len(ip) < header.IPv4MinimumSize || h.Protocol() != uint8(header.TCPProtocolNumber) || h.FragmentOffset() != 0 || h.More() {
			return false
		}
		ipHdr = header.IPv4MinimumSize
	case header.IPv6ProtocolNumber:
		if len(ip) < header.IPv6MinimumSize || header.IPv6(ip).NextHeader() != uint8(header.TCPProtocolNumber) {
			return false
		}
		ipHdr = header.IPv6MinimumSize
	default:
		return false
	}
	// The TCP header is the transport header when the stack parsed it, or
	// the start of the data; either way a slice of pkt's own (forwarded,
	// private) buffer.
	tcp := pkt.TransportHeader().Slice()
	if len(tcp) == 0 {
		b, ok := pkt.Data().PullUp(header.TCPMinimumSize)
		if !ok {
			return false
		}
		if tcp, ok = pkt.Data().PullUp(int(header.TCP(b).DataOffset())); !ok {
			return false
		}
	}
	t := header.TCP(tcp)
	if len(t) < header.TCPMinimumSize || t.Flags()&header.TCPFlagSyn == 0 ||
		int(t.DataOffset()) < header.TCPMinimumSize || int(t.DataOffset()) > len(t) {
		return false
	}
	opts := t[header.TCPMinimumSize:t.DataOffset()]
	i := mssOptionOffset(opts)
	if i < 0 {
		return false
	}
	limit := m.uplink - uint32(ipHdr) - header.TCPMinimumSize
	return setMSS(t, i, func(old uint16) bool { return uint32(old) > limit }, uint16(limit))
}

// setMSS sets the MSS option at offset i of t's options to mss when want
// says so of its value, updating the checksum incrementally (RFC 1624: a
// bad one stays bad), and reports whether it did.
func setMSS(t header.TCP, i int, want func(old uint16) bool, mss uint16) bool {
	opts := t[header.TCPMinimumSize:t.DataOffset()]
	old := binary.BigEndian.Uint16(opts[i+2:])
	if !want(old) {
		return false
	}
	binary.BigEndian.PutUint16(opts[i+2:], mss)
	// The checksum sums 16-bit words from the segment's start: a value at
	// an odd offset adds in byte-swapped.
	if (header.TCPMinimumSize+i+2)%2 != 0 {
		old, mss = bits.ReverseBytes16(old), bits.ReverseBytes16(mss)
	}
	t.SetChecksum(^checksum.Combine(checksum.Combine(^t.Checksum(), ^old), mss))
	return true
}

// mssOptionOffset returns the offset in opts, a TCP header's options, of a
// well-formed MSS option (kind 2, length 4), or -1.
func mssOptionOffset(opts []byte) int {
	for i := 0; i < len(opts); {
		switch opts[i] {
		case header.TCPOptionEOL:
			return -1
		case header.TCPOptionNOP:
			i++
			continue
		}
		if i+1 >= len(opts) {
			return -1
		}
		l := int(opts[i+1])
		if l < 2 || i+l > len(opts) {
			return -1
		}
		if opts[i] == header.TCPOptionMSS {
			if l != header.TCPOptionMSSLength {
				return -1
			}
			return i
		}
		i += l
	}
	return -1
}
