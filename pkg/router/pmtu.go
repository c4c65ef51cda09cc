package router

import (
	"net/netip"
	"sync/atomic"

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
// stack is sending without one, and reports whether it did. pkt is the
// stack's own packet at postrouting: its network header is pushed, its
// transport header is the ICMPv6 header, its data the quoted packet.
func (m *linkMTUs) fillPacketTooBig(pkt *stack.PacketBuffer) bool {
	if pkt.NetworkProtocolNumber != header.IPv6ProtocolNumber || pkt.TransportProtocolNumber != header.ICMPv6ProtocolNumber {
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
