package router

import (
	"net/netip"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/shm-cni/shm-cni/internal/testutil"
)

// twoLinks returns a router, with the fast path unless noFastPath, and pod
// links a and b; the router is closed when t ends.
func twoLinks(t *testing.T, noFastPath bool) (*Router, chanLink, chanLink) {
	t.Helper()
	r, err := New(Config{PodCIDRs: []netip.Prefix{podCIDR4, podCIDR6}, NoFastPath: noFastPath}, testutil.Logger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := r.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	a, b := newChanLink(), newChanLink()
	if err := r.AddLink("a", a.ep, Link{Addrs: []netip.Addr{podA4, podA6}, PodMAC: macA}); err != nil {
		t.Fatal(err)
	}
	if err := r.AddLink("b", b.ep, Link{Addrs: []netip.Addr{podB4, podB6}, PodMAC: macB}); err != nil {
		t.Fatal(err)
	}
	return r, a, b
}

func udpDatagram(n int) []byte {
	udp := make([]byte, header.UDPMinimumSize+n)
	header.UDP(udp).Encode(&header.UDPFields{SrcPort: 1000, DstPort: 2000, Length: uint16(len(udp))})
	return udp
}

// TestFastPathForwards checks that pod-to-pod packets take the fast path
// and leave it as the slow path would send them: to the pod's MAC from the
// gateway's, TTL or hop limit one less, a valid IPv4 header checksum, the
// payload unchanged; and that with NoFastPath the same packets go through
// gVisor with the same result.
func TestFastPathForwards(t *testing.T) {
	for _, noFast := range []bool{false, true} {
		r, a, b := twoLinks(t, noFast)
		udp := udpDatagram(100)
		for i := range udp[header.UDPMinimumSize:] {
			udp[header.UDPMinimumSize+i] = byte(i)
		}
		for _, tc := range []struct{ src, dst netip.Addr }{{podA4, podB4}, {podA6, podB6}} {
			sent := ipPacket(tc.src, tc.dst, header.UDPProtocolNumber, udp)
			a.inject(macA, sent)
			frame := b.read()
			if frame == nil {
				t.Fatalf("noFastPath=%t: %s -> %s not forwarded", noFast, tc.src, tc.dst)
			}
			if frame.DestinationAddress() != macB || frame.SourceAddress() != gwMAC {
				t.Errorf("noFastPath=%t: frame %s -> %s, want %s -> %s", noFast, frame.SourceAddress(), frame.DestinationAddress(), gwMAC, macB)
			}
			ip := frame[header.EthernetMinimumSize:]
			src, dst, hops, payload := ipFields(ip)
			// gVisor fills in a zero UDP checksum towards a link without
			// checksum offload (the test's); the data is the same.
			same := len(payload) == len(udp) && string(payload[header.UDPMinimumSize:]) == string(udp[header.UDPMinimumSize:])
			if src != tc.src || dst != tc.dst || hops != 63 || !same {
				t.Errorf("noFastPath=%t: forwarded %s -> %s hop limit %d (data same: %t)", noFast, src, dst, hops, same)
			}
			if tc.src.Is4() && !header.IPv4(ip).IsChecksumValid() {
				t.Errorf("noFastPath=%t: forwarded IPv4 header checksum invalid", noFast)
			}
			if len(ip) != len(sent) {
				t.Errorf("noFastPath=%t: forwarded %d bytes, sent %d", noFast, len(ip), len(sent))
			}
		}
		sa, _ := r.LinkStats("a")
		sb, _ := r.LinkStats("b")
		wantFast := uint64(2)
		if noFast {
			wantFast = 0
		}
		if sa.RxPackets != 2 || sb.TxPackets != 2 || sa.FastRxPackets != wantFast || sb.FastTxPackets != wantFast {
			t.Errorf("noFastPath=%t: a rx %d (fast %d), b tx %d (fast %d); want 2 each, %d fast",
				noFast, sa.RxPackets, sa.FastRxPackets, sb.TxPackets, sb.FastTxPackets, wantFast)
		}
	}
}

// TestFastPathLeavesTheRest checks that what needs more than forwarding
// goes to gVisor, which answers or drops it as before: an exhausted TTL or
// hop limit gets ICMP time exceeded, a packet larger than the destination's
// MTU gets ICMP fragmentation needed or packet too big, a bad IPv4 header
// checksum is dropped, IPv6 hop-by-hop options are forwarded by gVisor,
// packets for the gateway are answered.
func TestFastPathLeavesTheRest(t *testing.T) {
	r, a, b := twoLinks(t, false)
	small := udpDatagram(8)
	big := udpDatagram(1500)
	expired4 := ipPacket(podA4, podB4, header.UDPProtocolNumber, small)
	// gVisor's IPv4 forwarding answers TTL 0 (it forwards TTL 1, with 0).
	header.IPv4(expired4).SetTTL(0)
	header.IPv4(expired4).SetChecksum(0)
	header.IPv4(expired4).SetChecksum(^header.IPv4(expired4).CalculateChecksum())
	expired6 := ipPacket(podA6, podB6, header.UDPProtocolNumber, small)
	header.IPv6(expired6).SetHopLimit(1)
	big4 := ipPacket(podA4, podB4, header.UDPProtocolNumber, big)
	header.IPv4(big4).SetFlagsFragmentOffset(header.IPv4FlagDontFragment, 0)
	header.IPv4(big4).SetChecksum(0)
	header.IPv4(big4).SetChecksum(^header.IPv4(big4).CalculateChecksum())
	badSum := ipPacket(podA4, podB4, header.UDPProtocolNumber, small)
	header.IPv4(badSum).SetChecksum(header.IPv4(badSum).Checksum() + 1)

	for _, tc := range []struct {
		name      string
		pkt       []byte
		forwarded bool  // b gets it
		icmp      uint8 // a gets an ICMP error of this type (0: nothing)
	}{
		{"ttl 0", expired4, false, uint8(header.ICMPv4TimeExceeded)},
		{"hop limit 1", expired6, false, uint8(header.ICMPv6TimeExceeded)},
		{"too big, don't fragment", big4, false, uint8(header.ICMPv4DstUnreachable)},
		{"too big ipv6", ipPacket(podA6, podB6, header.UDPProtocolNumber, big), false, uint8(header.ICMPv6PacketTooBig)},
		{"bad ipv4 header checksum", badSum, false, 0},
		{"ipv6 hop-by-hop options", withExtHeader(ipPacket(podA6, podB6, header.UDPProtocolNumber, small), header.IPv6HopByHopOptionsExtHdrIdentifier), true, 0},
	} {
		before, _ := r.LinkStats("a")
		a.inject(macA, tc.pkt)
		got := b.read()
		if (got != nil) != tc.forwarded {
			t.Errorf("%s: forwarded %t, want %t", tc.name, got != nil, tc.forwarded)
		}
		reply := a.read()
		switch {
		case tc.icmp == 0 && reply != nil:
			t.Errorf("%s: unexpected reply to the pod", tc.name)
		case tc.icmp != 0 && reply == nil:
			t.Errorf("%s: no ICMP error to the pod", tc.name)
		case tc.icmp != 0:
			_, _, _, payload := ipFields(reply[header.EthernetMinimumSize:])
			if len(payload) == 0 || payload[0] != tc.icmp {
				t.Errorf("%s: reply ICMP type %v, want %d", tc.name, payload[:min(1, len(payload))], tc.icmp)
			}
		}
		after, _ := r.LinkStats("a")
		if after.FastRxPackets != before.FastRxPackets {
			t.Errorf("%s: took the fast path", tc.name)
		}
	}
	// The gateway answers echo requests itself.
	a.inject(macA, echoRequest(podA4, GatewayV4))
	if reply := a.read(); reply == nil {
		t.Error("no echo reply from the gateway")
	}
	if st, _ := r.LinkStats("a"); st.FastRxPackets != 0 {
		t.Errorf("fast path took %d packets, want none", st.FastRxPackets)
	}
}

// TestFastPathFollowsLinks checks that the fast path forgets a removed link
// (its packets are dropped as unrouted by gVisor) and learns a new one.
func TestFastPathFollowsLinks(t *testing.T) {
	r, a, b := twoLinks(t, false)
	small := udpDatagram(8)
	if err := r.RemoveLink("b"); err != nil {
		t.Fatal(err)
	}
	drops := r.UnroutedDrops()
	a.inject(macA, ipPacket(podA4, podB4, header.UDPProtocolNumber, small))
	if got := r.UnroutedDrops(); got != drops+1 {
		t.Errorf("packet for a removed link: unrouted drops %d -> %d", drops, got)
	}
	if b.read() != nil {
		t.Error("removed link got a frame")
	}
	c := newChanLink()
	if err := r.AddLink("c", c.ep, Link{Addrs: []netip.Addr{podB4}, PodMAC: tcpip.LinkAddress("\x02\x00\x00\x00\x00\x0c")}); err != nil {
		t.Fatal(err)
	}
	a.inject(macA, ipPacket(podA4, podB4, header.UDPProtocolNumber, small))
	if c.read() == nil {
		t.Fatal("new link got nothing")
	}
	if st, _ := r.LinkStats("c"); st.FastTxPackets != 1 {
		t.Errorf("new link: %d fast packets, want 1", st.FastTxPackets)
	}
}

// TestFastPathDropsUnassigned checks that a packet for one of the node's pod
// addresses without a link is dropped and counted as unrouted on the fast
// path, as the blackhole would, while one for the node gateway (the host)
// is left to gVisor.
func TestFastPathDropsUnassigned(t *testing.T) {
	r, a, b := twoLinks(t, false)
	small := udpDatagram(8)
	nobody4 := netip.MustParseAddr("10.244.1.99")
	nobody6 := netip.MustParseAddr("2001:db8:0:1::99")
	for _, dst := range []netip.Addr{nobody4, nobody6} {
		if !podCIDR4.Contains(dst) && !podCIDR6.Contains(dst) {
			t.Fatalf("%s is not in the test's pod CIDRs", dst)
		}
		src := podA4
		if dst.Is6() {
			src = podA6
		}
		drops := r.UnroutedDrops()
		before, _ := r.LinkStats("a")
		a.inject(macA, ipPacket(src, dst, header.UDPProtocolNumber, small))
		after, _ := r.LinkStats("a")
		if got := r.UnroutedDrops(); got != drops+1 {
			t.Errorf("%s: unrouted drops %d -> %d, want +1", dst, drops, got)
		}
		if after.FastRxPackets != before.FastRxPackets+1 {
			t.Errorf("%s: not taken by the fast path", dst)
		}
		if a.read() != nil || b.read() != nil {
			t.Errorf("%s: a frame came out", dst)
		}
	}
	gw, err := NodeGateway(podCIDR4)
	if err != nil {
		t.Fatal(err)
	}
	before, _ := r.LinkStats("a")
	a.inject(macA, ipPacket(podA4, gw, header.UDPProtocolNumber, small))
	if after, _ := r.LinkStats("a"); after.FastRxPackets != before.FastRxPackets {
		t.Errorf("a packet for the node gateway %s took the fast path", gw)
	}
	for a.read() != nil {
	}
}
