package router

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net/netip"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/link/ethernet"
)

// Links of different MTUs: sandbox links carry large packets (64 KiB TCP
// segments), kernel pods' links and the uplink 1500 bytes.

const (
	largeMTU = 65000
	smallMTU = 1500
)

var (
	macC  = tcpip.LinkAddress("\x02\x00\x00\x00\x00\x0c")
	podC4 = netip.MustParseAddr("10.244.1.30")
	podC6 = netip.MustParseAddr("2001:db8:0:1::30")
)

// newChanLinkMTU is newChanLink with an IP MTU of mtu (the channel's MTU
// counts the Ethernet header, which the ethernet wrapper takes off).
func newChanLinkMTU(mtu uint32) chanLink {
	ch := channel.New(64, mtu+header.EthernetMinimumSize, gwMAC)
	return chanLink{ch: ch, ep: ethernet.New(ch)}
}

// mtuLinks returns a router with pod links a and b of largeMTU and c of
// smallMTU.
func mtuLinks(t testing.TB) (r *Router, a, b, c chanLink) {
	t.Helper()
	r = newUnstartedRouter(t)
	a, b, c = newChanLinkMTU(largeMTU), newChanLinkMTU(largeMTU), newChanLinkMTU(smallMTU)
	for _, l := range []struct {
		id    string
		cl    chanLink
		addrs []netip.Addr
		mac   tcpip.LinkAddress
	}{{"a", a, []netip.Addr{podA4, podA6}, macA}, {"b", b, []netip.Addr{podB4, podB6}, macB}, {"c", c, []netip.Addr{podC4, podC6}, macC}} {
		if err := r.AddLink(l.id, l.cl.ep, Link{Addrs: l.addrs, PodMAC: l.mac}); err != nil {
			t.Fatal(err)
		}
	}
	return r, a, b, c
}

// patterned is a UDP datagram of n payload bytes, each its offset's low byte.
func patterned(n int) []byte {
	udp := udpDatagram(n)
	for i := range n {
		udp[header.UDPMinimumSize+i] = byte(i)
	}
	return udp
}

// withDF sets IPv4's don't-fragment flag on ip and fixes its checksum.
func withDF(ip []byte) []byte {
	h := header.IPv4(ip)
	h.SetFlagsFragmentOffset(header.IPv4FlagDontFragment, 0)
	h.SetChecksum(0)
	h.SetChecksum(^h.CalculateChecksum())
	return ip
}

// TestLargePacketsBetweenLargeLinks: a packet of nearly 64 KiB from one
// large-MTU link to another crosses whole, through the fast path, its bytes
// unchanged but for the TTL or hop limit (and the IPv4 header checksum).
func TestLargePacketsBetweenLargeLinks(t *testing.T) {
	r, a, b, _ := mtuLinks(t)
	for _, tc := range []struct{ src, dst netip.Addr }{{podA4, podB4}, {podA6, podB6}} {
		udp := patterned(largeMTU - header.IPv6MinimumSize - header.UDPMinimumSize)
		sent := ipPacket(tc.src, tc.dst, header.UDPProtocolNumber, udp)
		before, _ := r.LinkStats("a")
		a.inject(macA, sent)
		frame := b.read()
		if frame == nil {
			t.Fatalf("%s -> %s: %d bytes not forwarded", tc.src, tc.dst, len(sent))
		}
		if a.read() != nil {
			t.Errorf("%s -> %s: the sender got a reply", tc.src, tc.dst)
		}
		ip := frame[header.EthernetMinimumSize:]
		if len(ip) != len(sent) {
			t.Fatalf("%s -> %s: forwarded %d bytes, sent %d", tc.src, tc.dst, len(ip), len(sent))
		}
		want := bytes.Clone(sent)
		if tc.src.Is4() {
			h := header.IPv4(want)
			h.SetTTL(63)
			h.SetChecksum(0)
			h.SetChecksum(^h.CalculateChecksum())
		} else {
			header.IPv6(want).SetHopLimit(63)
		}
		if !bytes.Equal(ip, want) {
			t.Errorf("%s -> %s: forwarded packet differs from the sent one beyond the hop limit", tc.src, tc.dst)
		}
		if after, _ := r.LinkStats("a"); after.FastRxPackets != before.FastRxPackets+1 {
			t.Errorf("%s -> %s: did not take the fast path", tc.src, tc.dst)
		}
	}
}

// TestLargePacketsToSmallLink: towards a link of a smaller MTU, the router
// answers an IPv4 packet that may not be fragmented with ICMP
// "fragmentation needed" and an IPv6 packet with "packet too big", both
// naming the link's MTU and quoting the packet; it fragments IPv4 that may
// be, into fragments the link carries that add up to the packet.
func TestLargePacketsToSmallLink(t *testing.T) {
	_, a, _, c := mtuLinks(t)
	const n = 4000
	for _, tc := range []struct {
		name string
		pkt  []byte
	}{
		{"ipv4 don't fragment", withDF(ipPacket(podA4, podC4, header.UDPProtocolNumber, patterned(n)))},
		{"ipv6", ipPacket(podA6, podC6, header.UDPProtocolNumber, patterned(n))},
	} {
		a.inject(macA, tc.pkt)
		if got := c.read(); got != nil {
			t.Errorf("%s: %d bytes reached the %d-byte link", tc.name, len(got)-header.EthernetMinimumSize, smallMTU)
		}
		reply := a.read()
		if reply == nil {
			t.Fatalf("%s: no ICMP error to the sender", tc.name)
		}
		src, dst, _, payload := ipFields(reply[header.EthernetMinimumSize:])
		if src4, _ := netip.AddrFromSlice(tc.pkt[12:16]); tc.pkt[0]>>4 == 4 && dst != src4 {
			t.Errorf("%s: ICMP error to %s, want the sender %s", tc.name, dst, src4)
		}
		if tc.pkt[0]>>4 == 4 {
			m := header.ICMPv4(payload)
			if len(m) < header.ICMPv4MinimumSize || m.Type() != header.ICMPv4DstUnreachable || m.Code() != header.ICMPv4FragmentationNeeded {
				t.Fatalf("%s: reply from %s is not ICMP fragmentation needed: % x", tc.name, src, payload[:min(8, len(payload))])
			}
			if m.MTU() != smallMTU {
				t.Errorf("%s: next-hop MTU %d, want %d", tc.name, m.MTU(), smallMTU)
			}
			if header.ICMPv4Checksum(m, 0) != m.Checksum() {
				t.Errorf("%s: ICMP checksum invalid", tc.name)
			}
			if quoted := m.Payload(); len(quoted) < header.IPv4MinimumSize+8 || !bytes.Equal(quoted[:header.IPv4MinimumSize+8], tc.pkt[:header.IPv4MinimumSize+8]) {
				t.Errorf("%s: the error does not quote the packet's header", tc.name)
			}
			continue
		}
		m := header.ICMPv6(payload)
		if len(m) < header.ICMPv6MinimumSize || m.Type() != header.ICMPv6PacketTooBig {
			t.Fatalf("%s: reply from %s is not ICMPv6 packet too big: % x", tc.name, src, payload[:min(8, len(payload))])
		}
		if got := binary.BigEndian.Uint32(m[4:8]); got != smallMTU {
			t.Errorf("%s: packet too big MTU %d, want %d", tc.name, got, smallMTU)
		}
		ip := header.IPv6(reply[header.EthernetMinimumSize:])
		if sum := header.ICMPv6Checksum(header.ICMPv6ChecksumParams{
			Header: m, Src: ip.SourceAddress(), Dst: ip.DestinationAddress(),
		}); sum != m.Checksum() {
			t.Errorf("%s: ICMPv6 checksum %#04x, want %#04x", tc.name, m.Checksum(), sum)
		}
		if quoted := m[header.ICMPv6MinimumSize:]; !bytes.HasPrefix(tc.pkt, quoted[:min(len(quoted), header.IPv6MinimumSize+8)]) || len(quoted) < header.IPv6MinimumSize+8 {
			t.Errorf("%s: the error does not quote the packet's header", tc.name)
		}
	}

	// IPv4 without don't-fragment: fragments of at most the link's MTU.
	sent := ipPacket(podA4, podC4, header.UDPProtocolNumber, patterned(n))
	a.inject(macA, sent)
	var data []byte
	for {
		f := c.read()
		if f == nil {
			break
		}
		ip := header.IPv4(f[header.EthernetMinimumSize:])
		if len(ip) > smallMTU || !ip.IsChecksumValid() {
			t.Fatalf("fragment of %d bytes (checksum valid %t) on a %d-byte link", len(ip), ip.IsChecksumValid(), smallMTU)
		}
		if int(ip.FragmentOffset()) != len(data) {
			t.Fatalf("fragment at offset %d, want %d", ip.FragmentOffset(), len(data))
		}
		data = append(data, ip.Payload()...)
	}
	// gVisor fills in the UDP checksum (zero as sent) towards a link
	// without checksum offload; the rest is as sent.
	want := bytes.Clone(sent[header.IPv4MinimumSize:])
	if len(data) == len(want) {
		copy(want[6:8], data[6:8])
	}
	if !bytes.Equal(data, want) {
		t.Errorf("fragments carry %d bytes, want the packet's %d", len(data), len(sent)-header.IPv4MinimumSize)
	}
	if a.read() != nil {
		t.Error("the sender got a reply to a packet that may be fragmented")
	}
}

// TestPacketTooBigMTU: the MTU the router puts into a packet too big is the
// one of the pod link of the quoted packet's destination, else the
// uplink's.
func TestPacketTooBigMTU(t *testing.T) {
	m := &linkMTUs{uplink: 1400}
	pods := map[netip.Addr]uint32{podA6: largeMTU, podC6: smallMTU}
	m.pods.Store(&pods)
	for _, tc := range []struct {
		dst  netip.Addr
		want uint32
	}{{podA6, largeMTU}, {podC6, smallMTU}, {netip.MustParseAddr("2001:db8:ffff::1"), 1400}} {
		if got := m.mtuTo(tc.dst); got != tc.want {
			t.Errorf("mtuTo(%s) = %d, want %d", tc.dst, got, tc.want)
		}
	}
}

// BenchmarkFastPath forwards one UDP packet of each size from one
// large-MTU link to another through the fast path per iteration (the
// injection's copy into a fresh buffer included, as a link reader does):
//
//	go test -run '^$' -bench FastPath -benchmem ./pkg/router
func BenchmarkFastPath(b *testing.B) {
	for _, size := range []int{1500, largeMTU} {
		b.Run(fmt.Sprint(size), func(b *testing.B) {
			r, a, bl, _ := mtuLinks(b)
			sent := ipPacket(podA4, podB4, header.UDPProtocolNumber, patterned(size-header.IPv4MinimumSize-header.UDPMinimumSize))
			b.SetBytes(int64(size))
			b.ResetTimer()
			for range b.N {
				a.inject(macA, sent)
				pkt := bl.ch.Read()
				if pkt == nil {
					b.Fatal("not forwarded")
				}
				pkt.DecRef()
			}
			b.StopTimer()
			if st, _ := r.LinkStats("a"); st.FastRxPackets != uint64(b.N) {
				b.Fatalf("fast path took %d of %d packets", st.FastRxPackets, b.N)
			}
		})
	}
}
