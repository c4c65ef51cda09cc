package router

import (
	"encoding/binary"
	"io"
	"log/slog"
	"net/netip"
	"testing"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/shm-cni/shm-cni/internal/tcpipx"
)

// These tests send crafted frames from pod A through a router that was never
// started and check, for each, the filter's verdict (its counters) and what
// reached pod B.

// injectFrame delivers an Ethernet frame of type proto from src on link c.
func (c chanLink) injectFrame(src tcpip.LinkAddress, proto tcpip.NetworkProtocolNumber, payload []byte) {
	frame := make([]byte, header.EthernetMinimumSize+len(payload))
	header.Ethernet(frame).Encode(&header.EthernetFields{SrcAddr: src, DstAddr: gwMAC, Type: proto})
	copy(frame[header.EthernetMinimumSize:], payload)
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(frame)})
	defer pkt.DecRef()
	c.ch.InjectInbound(proto, pkt)
}

// arpPacket builds an ARP message from (sha, spa) about tpa.
func arpPacket(op header.ARPOp, sha tcpip.LinkAddress, spa, tpa netip.Addr) []byte {
	b := make([]byte, header.ARPSize)
	a := header.ARP(b)
	a.SetIPv4OverEthernet()
	a.SetOp(op)
	copy(a.HardwareAddressSender(), sha)
	copy(a.ProtocolAddressSender(), spa.AsSlice())
	copy(a.ProtocolAddressTarget(), tpa.AsSlice())
	return b
}

// icmpv6 builds an ICMPv6 message of type typ whose body is 4 zero bytes,
// target (for NS and NA) and a source link-layer address option with pod A's
// MAC, with a valid checksum.
func icmpv6(typ header.ICMPv6Type, src, dst, target netip.Addr) []byte {
	m := header.ICMPv6(make([]byte, header.ICMPv6HeaderSize+4+16+8))
	m.SetType(typ)
	copy(m[header.ICMPv6HeaderSize+4:], target.AsSlice())
	opt := m[header.ICMPv6HeaderSize+4+16:]
	opt[0], opt[1] = 1, 1 // source link-layer address, 8 bytes
	copy(opt[2:], macA)
	m.SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{Header: m, Src: tcpipx.Addr(src), Dst: tcpipx.Addr(dst)}))
	return m
}

// ndp builds an IPv6 packet with hop limit 255 carrying an NDP message.
func ndp(typ header.ICMPv6Type, src, dst, target netip.Addr) []byte {
	b := ipPacket(src, dst, header.ICMPv6ProtocolNumber, icmpv6(typ, src, dst, target))
	header.IPv6(b).SetHopLimit(header.NDPHopLimit)
	return b
}

// withExtHeader inserts an 8-byte extension header of type ext (whose next
// header is the packet's transport protocol) into an IPv6 packet; for a
// fragment header, a first fragment with more to come.
func withExtHeader(ip []byte, ext header.IPv6ExtensionHeaderIdentifier) []byte {
	h := header.IPv6(ip)
	out := make([]byte, len(ip)+8)
	copy(out, ip[:header.IPv6MinimumSize])
	eh := out[header.IPv6MinimumSize : header.IPv6MinimumSize+8]
	eh[0] = h.NextHeader()
	if ext == header.IPv6FragmentExtHdrIdentifier {
		binary.BigEndian.PutUint16(eh[2:], 1) // offset 0, M flag
		binary.BigEndian.PutUint32(eh[4:], 42)
	} else {
		// Length 0 (8 bytes): a PadN option filling the 6 bytes left.
		eh[2], eh[3] = 1, 4
	}
	copy(out[header.IPv6MinimumSize+8:], ip[header.IPv6MinimumSize:])
	o := header.IPv6(out)
	o.SetNextHeader(uint8(ext))
	o.SetPayloadLength(h.PayloadLength() + 8)
	return out
}

// solicited returns a's solicited-node multicast address.
func solicited(a netip.Addr) netip.Addr {
	return netip.AddrFrom16(header.SolicitedNodeAddr(tcpipx.Addr(a)).As16())
}

var (
	spoof4 = netip.MustParseAddr("192.0.2.7")
	spoof6 = netip.MustParseAddr("2001:db8::7")
	podALL = netip.MustParseAddr("fe80::a")
)

// TestFilter: what pod A may send reaches the stack (and pod B where it is
// addressed to B); everything else is dropped and counted with its reason.
func TestFilter(t *testing.T) {
	udp := make([]byte, header.UDPMinimumSize+8)
	header.UDP(udp).Encode(&header.UDPFields{SrcPort: 1000, DstPort: 2000, Length: uint16(len(udp))})
	const pass = DropReason(-1)
	for _, tc := range []struct {
		name  string
		mac   tcpip.LinkAddress
		proto tcpip.NetworkProtocolNumber
		pkt   []byte
		want  DropReason // pass: not dropped
		toB   bool       // forwarded to pod B
		reply bool       // the router answers on link A
	}{
		{"ipv4 own source", macA, header.IPv4ProtocolNumber, ipPacket(podA4, podB4, header.UDPProtocolNumber, udp), pass, true, false},
		{"ipv6 own source", macA, header.IPv6ProtocolNumber, ipPacket(podA6, podB6, header.UDPProtocolNumber, udp), pass, true, false},
		{"ipv4 echo to the gateway", macA, header.IPv4ProtocolNumber, echoRequest(podA4, GatewayV4), pass, false, true},
		{"ipv4 another pod's MAC", macB, header.IPv4ProtocolNumber, ipPacket(podA4, podB4, header.UDPProtocolNumber, udp), DropSourceMAC, false, false},
		{"ipv6 another pod's MAC", macB, header.IPv6ProtocolNumber, ipPacket(podA6, podB6, header.UDPProtocolNumber, udp), DropSourceMAC, false, false},
		{"ipv4 another pod's address", macA, header.IPv4ProtocolNumber, ipPacket(podB4, podB4, header.UDPProtocolNumber, udp), DropSourceAddress, false, false},
		{"ipv4 an outside address", macA, header.IPv4ProtocolNumber, ipPacket(spoof4, podB4, header.UDPProtocolNumber, udp), DropSourceAddress, false, false},
		{"ipv4 unspecified source", macA, header.IPv4ProtocolNumber, ipPacket(netip.IPv4Unspecified(), podB4, header.UDPProtocolNumber, udp), DropSourceAddress, false, false},
		{"ipv6 another pod's address", macA, header.IPv6ProtocolNumber, ipPacket(podB6, podB6, header.UDPProtocolNumber, udp), DropSourceAddress, false, false},
		{"ipv6 an outside address", macA, header.IPv6ProtocolNumber, ipPacket(spoof6, podB6, header.UDPProtocolNumber, udp), DropSourceAddress, false, false},
		{"ipv6 link-local source to a global address", macA, header.IPv6ProtocolNumber, ipPacket(podALL, podB6, header.UDPProtocolNumber, udp), DropSourceAddress, false, false},
		{"ipv4 to the host's loopback", macA, header.IPv4ProtocolNumber, ipPacket(podA4, netip.MustParseAddr("127.0.0.1"), header.TCPProtocolNumber, udp), DropDestination, false, false},
		{"ipv6 to the host's loopback", macA, header.IPv6ProtocolNumber, ipPacket(podA6, netip.IPv6Loopback(), header.TCPProtocolNumber, udp), DropDestination, false, false},
		{"arp request for the gateway", macA, header.ARPProtocolNumber, arpPacket(header.ARPRequest, macA, podA4, GatewayV4), pass, false, true},
		{"arp probe", macA, header.ARPProtocolNumber, arpPacket(header.ARPRequest, macA, netip.IPv4Unspecified(), podA4), pass, false, false},
		{"arp reply for another pod's address", macA, header.ARPProtocolNumber, arpPacket(header.ARPReply, macA, podB4, GatewayV4), DropARP, false, false},
		{"arp claiming the gateway", macA, header.ARPProtocolNumber, arpPacket(header.ARPReply, macA, GatewayV4, GatewayV4), DropARP, false, false},
		{"arp with another sender MAC", macA, header.ARPProtocolNumber, arpPacket(header.ARPReply, macB, podA4, GatewayV4), DropARP, false, false},
		{"ndp solicitation for the gateway", macA, header.IPv6ProtocolNumber, ndp(header.ICMPv6NeighborSolicit, podALL, solicited(GatewayV6), GatewayV6), pass, false, true},
		{"ndp advertisement of its own address", macA, header.IPv6ProtocolNumber, ndp(header.ICMPv6NeighborAdvert, podA6, GatewayV6, podA6), pass, false, false},
		{"ndp advertisement of another pod's address", macA, header.IPv6ProtocolNumber, ndp(header.ICMPv6NeighborAdvert, podA6, GatewayV6, podB6), DropNDP, false, false},
		{"ndp advertisement of the gateway", macA, header.IPv6ProtocolNumber, ndp(header.ICMPv6NeighborAdvert, podALL, GatewayV6, GatewayV6), DropNDP, false, false},
		{"ndp advertisement behind a hop-by-hop header", macA, header.IPv6ProtocolNumber, withExtHeader(ndp(header.ICMPv6NeighborAdvert, podA6, GatewayV6, podB6), header.IPv6HopByHopOptionsExtHdrIdentifier), DropNDP, false, false},
		{"ndp advertisement behind destination options", macA, header.IPv6ProtocolNumber, withExtHeader(ndp(header.ICMPv6NeighborAdvert, podA6, GatewayV6, podB6), header.IPv6DestinationOptionsExtHdrIdentifier), DropNDP, false, false},
		{"fragmented ndp solicitation", macA, header.IPv6ProtocolNumber, withExtHeader(ndp(header.ICMPv6NeighborSolicit, podALL, solicited(GatewayV6), GatewayV6), header.IPv6FragmentExtHdrIdentifier), DropNDP, false, false},
		{"router advertisement", macA, header.IPv6ProtocolNumber, ndp(header.ICMPv6RouterAdvert, podALL, netip.AddrFrom16(header.IPv6AllNodesMulticastAddress.As16()), netip.IPv6Unspecified()), DropNDP, false, false},
		{"redirect", macA, header.IPv6ProtocolNumber, ndp(header.ICMPv6RedirectMsg, podALL, GatewayV6, podB6), DropNDP, false, false},
		{"truncated ipv4", macA, header.IPv4ProtocolNumber, ipPacket(podA4, podB4, header.UDPProtocolNumber, udp)[:12], DropMalformed, false, false},
		{"ipv6 in an ipv4 frame", macA, header.IPv4ProtocolNumber, ipPacket(podA6, podB6, header.UDPProtocolNumber, udp), DropMalformed, false, false},
		{"truncated arp", macA, header.ARPProtocolNumber, arpPacket(header.ARPRequest, macA, podA4, GatewayV4)[:20], DropMalformed, false, false},
		{"lldp", macA, tcpip.NetworkProtocolNumber(0x88cc), make([]byte, 64), DropEtherType, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newUnstartedRouter(t)
			a, b := newChanLink(), newChanLink()
			if err := r.AddLink("a", a.ep, Link{Addrs: []netip.Addr{podA4, podA6}, PodMAC: macA, GatewayMAC: gwMAC}); err != nil {
				t.Fatal(err)
			}
			if err := r.AddLink("b", b.ep, Link{Addrs: []netip.Addr{podB4, podB6}, PodMAC: macB, GatewayMAC: gwMAC}); err != nil {
				t.Fatal(err)
			}
			a.injectFrame(tc.mac, tc.proto, tc.pkt)
			st, err := r.LinkStats("a")
			if err != nil {
				t.Fatal(err)
			}
			var want FilterDrops
			if tc.want != pass {
				want[tc.want] = 1
			}
			if st.Filtered != want {
				t.Errorf("filtered %v, want %v", st.Filtered, want)
			}
			if got := b.read() != nil; got != tc.toB {
				t.Errorf("reached pod B: %t, want %t", got, tc.toB)
			}
			if got := a.read() != nil; got != tc.reply {
				t.Errorf("router answered on link A: %t, want %t", got, tc.reply)
			}
		})
	}
}

// TestDropReasonNames: every reason has its own label.
func TestDropReasonNames(t *testing.T) {
	seen := map[string]bool{}
	for _, d := range DropReasons() {
		s := d.String()
		if s == "unknown" || seen[s] {
			t.Errorf("reason %d has label %q", d, s)
		}
		seen[s] = true
	}
}

// FuzzFilter sends arbitrary frames from pod A: the router must not panic;
// nothing sent with another pod's MAC reaches pod B; and what reaches pod B
// (by the fast path or gVisor's forwarding) is a whole IP packet carrying one
// of A's addresses as its source and, for IPv4, a valid header checksum.
func FuzzFilter(f *testing.F) {
	udp := make([]byte, header.UDPMinimumSize+8)
	header.UDP(udp).Encode(&header.UDPFields{SrcPort: 1000, DstPort: 2000, Length: uint16(len(udp))})
	f.Add(uint16(header.IPv4ProtocolNumber), false, ipPacket(podA4, podB4, header.UDPProtocolNumber, udp))
	f.Add(uint16(header.IPv6ProtocolNumber), false, ipPacket(podA6, podB6, header.UDPProtocolNumber, udp))
	f.Add(uint16(header.IPv4ProtocolNumber), false, ipPacket(podB4, podB4, header.UDPProtocolNumber, udp))
	f.Add(uint16(header.ARPProtocolNumber), false, arpPacket(header.ARPReply, macA, podB4, GatewayV4))
	f.Add(uint16(header.IPv6ProtocolNumber), false, withExtHeader(ndp(header.ICMPv6NeighborAdvert, podA6, GatewayV6, podB6), header.IPv6HopByHopOptionsExtHdrIdentifier))
	f.Add(uint16(header.IPv6ProtocolNumber), true, withExtHeader(ipPacket(podA6, podB6, header.UDPProtocolNumber, udp), header.IPv6FragmentExtHdrIdentifier))
	r, err := New(Config{PodCIDRs: []netip.Prefix{podCIDR4, podCIDR6}}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		f.Fatal(err)
	}
	defer r.Close()
	a, b := newChanLink(), newChanLink()
	if err := r.AddLink("a", a.ep, Link{Addrs: []netip.Addr{podA4, podA6}, PodMAC: macA, GatewayMAC: gwMAC}); err != nil {
		f.Fatal(err)
	}
	if err := r.AddLink("b", b.ep, Link{Addrs: []netip.Addr{podB4, podB6}, PodMAC: macB, GatewayMAC: gwMAC}); err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, proto uint16, spoofMAC bool, pkt []byte) {
		mac := macA
		if spoofMAC {
			mac = macB
		}
		a.injectFrame(mac, tcpip.NetworkProtocolNumber(proto), pkt)
		for a.read() != nil {
		}
		for frame := b.read(); frame != nil; frame = b.read() {
			if spoofMAC {
				t.Fatalf("pod B got a frame from a pod with a spoofed MAC (frame % x)", []byte(frame))
			}
			if len(frame) < header.EthernetMinimumSize {
				t.Fatalf("pod B got a short frame % x", []byte(frame))
			}
			ip := []byte(frame[header.EthernetMinimumSize:])
			switch typ := frame.Type(); {
			case typ == header.IPv4ProtocolNumber && len(ip) >= header.IPv4MinimumSize:
			case typ == header.IPv6ProtocolNumber && len(ip) >= header.IPv6MinimumSize:
			default:
				t.Fatalf("pod B got a frame that is no whole IP packet (frame % x)", []byte(frame))
			}
			src, _, _, _ := ipFields(ip)
			if src != podA4 && src != podA6 {
				t.Fatalf("pod B got a packet from %s (frame % x)", src, []byte(frame))
			}
			// Forwarded, by the fast path or gVisor: a valid IPv4 header.
			if header.IPVersion(ip) == header.IPv4Version && !header.IPv4(ip).IsChecksumValid() {
				t.Fatalf("pod B got an IPv4 packet with a bad header (frame % x)", []byte(frame))
			}
		}
	})
}
