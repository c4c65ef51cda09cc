package endpoint

import (
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// Framing is how a link carries IP packets: behind an Ethernet header (a TAP
// device; a shared-memory link whose sides have MACs) or bare (a TUN device;
// a shared-memory link without MACs). Every link kind frames through it, so
// that the link header is written, parsed and read in one place.
type Framing uint8

const (
	// L3 frames are bare IPv4 or IPv6 packets; the version nibble says
	// which.
	L3 Framing = iota
	// Ethernet frames start with a 14-byte Ethernet header (no VLAN tag).
	Ethernet
)

// FramingOf returns Ethernet when ethernet is true, L3 otherwise.
func FramingOf(ethernet bool) Framing {
	if ethernet {
		return Ethernet
	}
	return L3
}

// HeaderLength is the length of the link header: 14 bytes or none.
func (f Framing) HeaderLength() uint32 {
	if f == Ethernet {
		return header.EthernetMinimumSize
	}
	return 0
}

// ARPHardwareType is what stack.LinkEndpoint.ARPHardwareType reports.
func (f Framing) ARPHardwareType() header.ARPHardwareType {
	if f == Ethernet {
		return header.ARPHardwareEther
	}
	return header.ARPHardwareNone
}

// Capabilities are the link capabilities the framing implies: an Ethernet
// link needs link-address resolution (ARP, NDP).
func (f Framing) Capabilities() stack.LinkEndpointCapabilities {
	if f == Ethernet {
		return stack.CapabilityResolutionRequired
	}
	return stack.CapabilityNone
}

// AddHeader is stack.LinkEndpoint.AddHeader: an Ethernet header from the
// packet's route (from self when the route names no local address), or
// nothing.
func (f Framing) AddHeader(pkt *stack.PacketBuffer, self tcpip.LinkAddress) {
	if f != Ethernet {
		return
	}
	src := pkt.EgressRoute.LocalLinkAddress
	if src == "" {
		src = self
	}
	eth := header.Ethernet(pkt.LinkHeader().Push(header.EthernetMinimumSize))
	eth.Encode(&header.EthernetFields{
		SrcAddr: src,
		DstAddr: pkt.EgressRoute.RemoteLinkAddress,
		Type:    pkt.NetworkProtocolNumber,
	})
}

// ParseHeader is stack.LinkEndpoint.ParseHeader: it consumes the Ethernet
// header, or infers IPv4 or IPv6 from the version nibble of a bare packet,
// and sets the packet's network protocol.
func (f Framing) ParseHeader(pkt *stack.PacketBuffer) bool {
	if f == Ethernet {
		b, ok := pkt.LinkHeader().Consume(header.EthernetMinimumSize)
		if !ok {
			return false
		}
		pkt.NetworkProtocolNumber = header.Ethernet(b).Type()
		return true
	}
	b, ok := pkt.Data().PullUp(1)
	if !ok {
		return false
	}
	proto, ok := ipProtocol(b)
	if ok {
		pkt.NetworkProtocolNumber = proto
	}
	return ok
}

// Protocol returns the network protocol of a received frame: the Ethernet
// type, or IPv4 or IPv6 by the version nibble. It reports false for a frame
// too short for its link header and for a bare packet that is neither.
func (f Framing) Protocol(frame []byte) (tcpip.NetworkProtocolNumber, bool) {
	if f == Ethernet {
		if len(frame) < header.EthernetMinimumSize {
			return 0, false
		}
		return header.Ethernet(frame).Type(), true
	}
	if len(frame) == 0 {
		return 0, false
	}
	return ipProtocol(frame)
}

// ConsumeHeader consumes the link header of a received packet, which
// Protocol accepted.
func (f Framing) ConsumeHeader(pkt *stack.PacketBuffer) {
	if f == Ethernet {
		pkt.LinkHeader().Consume(header.EthernetMinimumSize)
	}
}

// ipProtocol is the network protocol of the IP packet starting at b (not
// empty) by its version nibble.
func ipProtocol(b []byte) (tcpip.NetworkProtocolNumber, bool) {
	switch header.IPVersion(b) {
	case header.IPv4Version:
		return header.IPv4ProtocolNumber, true
	case header.IPv6Version:
		return header.IPv6ProtocolNumber, true
	}
	return 0, false
}
