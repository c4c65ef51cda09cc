package router

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net/netip"
	"testing"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/shm-cni/shm-cni/internal/tcpipx"
	"github.com/shm-cni/shm-cni/pkg/endpoint"
)

// gsoEndpoint makes a test link take TCP GSO as a kernel pod's TAP does.
type gsoEndpoint struct{ stack.LinkEndpoint }

func (gsoEndpoint) WritesTCPGSO() bool { return true }

var (
	macK  = tcpip.LinkAddress("\x02\x00\x00\x00\x00\x0d")
	podK4 = netip.MustParseAddr("10.244.1.40")
	podK6 = netip.MustParseAddr("2001:db8:0:1::40")
)

// kernelLink adds to r a link of smallMTU that takes TCP GSO, as a kernel
// pod's, for podK4 and podK6.
func kernelLink(t testing.TB, r *Router) chanLink {
	t.Helper()
	k := newChanLinkMTU(smallMTU)
	k.ep = gsoEndpoint{k.ep}
	if err := r.AddLink("k", k.ep, Link{Addrs: []netip.Addr{podK4, podK6}, PodMAC: macK}); err != nil {
		t.Fatal(err)
	}
	return k
}

// TestLargeSegmentsToKernelPod: a sandbox's TCP segment larger than a
// kernel pod's MTU reaches the kernel pod's link through the fast path as
// one super-packet: GSO with the MSS of the kernel pod's link, the checksum
// left partial (the pseudo-header sum of the whole segment), the bytes as
// sent. Other protocols still get ICMP.
func TestLargeSegmentsToKernelPod(t *testing.T) {
	r, a, _, _ := mtuLinks(t)
	k := kernelLink(t, r)
	for _, tc := range []struct{ src, dst netip.Addr }{{podA4, podK4}, {podA6, podK6}} {
		opts := []byte{1, 1, 8, 10, 1, 2, 3, 4, 5, 6, 7, 8} // timestamps
		seg := tcpSYN(tc.src, tc.dst, header.TCPFlagAck|header.TCPFlagPsh, opts)
		seg = append(seg, patterned(30000)...)
		t4 := header.TCP(seg)
		t4.SetChecksum(0)
		xsum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, tcpipx.Addr(tc.src), tcpipx.Addr(tc.dst), uint16(len(seg)))
		t4.SetChecksum(^checksumOf(seg, xsum))
		sent := ipPacket(tc.src, tc.dst, header.TCPProtocolNumber, seg)
		before, _ := r.LinkStats("a")
		a.inject(macA, sent)
		if a.read() != nil {
			t.Errorf("%s: the sender got a reply", tc.src)
		}
		pkt := k.ch.Read()
		if pkt == nil {
			t.Fatalf("%s -> %s: nothing on the kernel pod's link", tc.src, tc.dst)
		}
		g := pkt.GSOOptions
		got := pkt.ToView().AsSlice()[header.EthernetMinimumSize:]
		pkt.DecRef()
		l3 := header.IPv4MinimumSize
		wantType := stack.GSOTCPv4
		if tc.src.Is6() {
			l3, wantType = header.IPv6MinimumSize, stack.GSOTCPv6
		}
		l4 := header.TCPMinimumSize + len(opts)
		if g.Type != wantType || !g.NeedsCsum || g.CsumOffset != header.TCPChecksumOffset || int(g.MSS) != smallMTU-l3-l4 || int(g.L3HdrLen) != l3 {
			t.Errorf("%s: GSO options %+v, want %v, partial checksum, MSS %d", tc.src, g, wantType, smallMTU-l3-l4)
		}
		if len(got) != len(sent) || !bytes.Equal(got[l3+header.TCPChecksumOffset+2:], sent[l3+header.TCPChecksumOffset+2:]) {
			t.Fatalf("%s: %d bytes on the kernel pod's link, want the %d sent", tc.src, len(got), len(sent))
		}
		if sum := binary.BigEndian.Uint16(got[l3+header.TCPChecksumOffset:]); sum != xsum {
			t.Errorf("%s: TCP checksum field %#04x, want the pseudo-header sum %#04x", tc.src, sum, xsum)
		}
		if after, _ := r.LinkStats("a"); after.FastRxPackets != before.FastRxPackets+1 {
			t.Errorf("%s: did not take the fast path", tc.src)
		}
	}
	// UDP is not segmented: ICMP as before.
	a.inject(macA, ipPacket(podA6, podK6, header.UDPProtocolNumber, patterned(4000)))
	if k.read() != nil {
		t.Error("a large UDP datagram reached the kernel pod's link")
	}
	if a.read() == nil {
		t.Error("no ICMP error for a large UDP datagram")
	}
}

// TestKernelPodSynMSSRaised: a kernel pod's SYN (and SYN-ACK) to a link of
// a larger MTU gets its MSS raised to what that link carries, with a valid
// checksum; toward a link of its own MTU, and from a link without GSO, it
// stays.
func TestKernelPodSynMSSRaised(t *testing.T) {
	r, a, _, c := mtuLinks(t)
	k := kernelLink(t, r)
	mss := func(v uint16) []byte { return []byte{header.TCPOptionMSS, 4, byte(v >> 8), byte(v)} }
	for _, tc := range []struct {
		name      string
		from      chanLink
		mac       tcpip.LinkAddress
		src, dst  netip.Addr
		to        chanLink
		flags     header.TCPFlags
		mss, want uint16
	}{
		{"syn to a sandbox", k, macK, podK4, podA4, a, header.TCPFlagSyn, 1460, largeMTU - 40},
		{"syn-ack to a sandbox, ipv6", k, macK, podK6, podA6, a, header.TCPFlagSyn | header.TCPFlagAck, 1440, largeMTU - 60},
		{"syn to a link of its MTU", k, macK, podK4, podC4, c, header.TCPFlagSyn, 1460, 1460},
		{"syn from a link without gso", c, macC, podC4, podA4, a, header.TCPFlagSyn, 1460, 1460},
	} {
		seg := tcpSYN(tc.src, tc.dst, tc.flags, mss(tc.mss))
		tc.from.inject(tc.mac, ipPacket(tc.src, tc.dst, header.TCPProtocolNumber, seg))
		frame := tc.to.read()
		if frame == nil {
			t.Fatalf("%s: not forwarded", tc.name)
		}
		ip := frame[header.EthernetMinimumSize:]
		_, _, _, got := ipFields(ip)
		opts := header.TCP(got).Options()
		i := mssOptionOffset(opts)
		if i < 0 || binary.BigEndian.Uint16(opts[i+2:]) != tc.want {
			t.Errorf("%s: options % x, want MSS %d", tc.name, opts, tc.want)
		}
		if !tcpChecksumValid(ip) {
			t.Errorf("%s: TCP checksum invalid", tc.name)
		}
	}
}

func checksumOf(b []byte, initial uint16) uint16 { return checksum.Checksum(b, initial) }

// injectSuper delivers, from link c (source MAC mac), a kernel pod's TCP
// super-packet as a Forwarding TAP endpoint does: the IP packet of a
// segment with data bytes of payload, its checksum partial (the
// pseudo-header sum of the whole segment), marked with the kernel's MSS.
// It returns the packet.
func (c chanLink) injectSuper(mac tcpip.LinkAddress, src, dst netip.Addr, data int, kernelMSS uint16) []byte {
	opts := []byte{1, 1, 8, 10, 1, 2, 3, 4, 5, 6, 7, 8} // timestamps
	seg := tcpSYN(src, dst, header.TCPFlagAck|header.TCPFlagPsh, opts)
	seg = append(seg, patterned(data)...)
	header.TCP(seg).SetChecksum(header.PseudoHeaderChecksum(header.TCPProtocolNumber, tcpipx.Addr(src), tcpipx.Addr(dst), uint16(len(seg))))
	ip := ipPacket(src, dst, header.TCPProtocolNumber, seg)
	proto := header.IPv4ProtocolNumber
	if src.Is6() {
		proto = header.IPv6ProtocolNumber
	}
	frame := make([]byte, header.EthernetMinimumSize+len(ip))
	header.Ethernet(frame).Encode(&header.EthernetFields{SrcAddr: mac, DstAddr: gwMAC, Type: proto})
	copy(frame[header.EthernetMinimumSize:], ip)
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(frame)})
	defer pkt.DecRef()
	endpoint.MarkForwardedGSO(pkt, kernelMSS)
	c.ch.InjectInbound(proto, pkt)
	return ip
}

// TestKernelSuperPacketsFastPath: a kernel pod's TCP super-packet (as its
// TAP link delivers it: checksum partial, marked with the kernel's MSS)
// takes the fast path. To a link without GSO whose MTU it fits (a
// sandbox's) it goes whole, as a plain segment with its checksum completed;
// to another kernel pod's link it stays a super-packet, cut at the kernel's
// MSS (at least 536 bytes, at most what fits the link), its checksum partial;
// to a link without GSO that it does not fit, in pieces that do (checkPieces).
func TestKernelSuperPacketsFastPath(t *testing.T) {
	r, a, _, c := mtuLinks(t)
	k := kernelLink(t, r)
	k2 := newChanLinkMTU(smallMTU)
	k2.ep = gsoEndpoint{k2.ep}
	macK2 := tcpip.LinkAddress("\x02\x00\x00\x00\x00\x0e")
	podK24, podK26 := netip.MustParseAddr("10.244.1.41"), netip.MustParseAddr("2001:db8:0:1::41")
	if err := r.AddLink("k2", k2.ep, Link{Addrs: []netip.Addr{podK24, podK26}, PodMAC: macK2}); err != nil {
		t.Fatal(err)
	}
	fast := func() uint64 { s, _ := r.LinkStats("k"); return s.FastRxPackets }
	for _, v6 := range []bool{false, true} {
		src, sandbox, kernel, small := podK4, podA4, podK24, podC4
		l3, typ := header.IPv4MinimumSize, stack.GSOTCPv4
		if v6 {
			src, sandbox, kernel, small = podK6, podA6, podK26, podC6
			l3, typ = header.IPv6MinimumSize, stack.GSOTCPv6
		}
		const l4 = header.TCPMinimumSize + 12

		// To a sandbox: whole, checksum complete, hop limit one less.
		before := fast()
		sent := k.injectSuper(macK, src, sandbox, 30001, 1448)
		frame := a.read()
		if frame == nil {
			t.Fatalf("v6=%v: nothing on the sandbox's link", v6)
		}
		got := []byte(frame[header.EthernetMinimumSize:])
		if len(got) != len(sent) || !bytes.Equal(got[l3+header.TCPChecksumOffset+2:], sent[l3+header.TCPChecksumOffset+2:]) {
			t.Errorf("v6=%v: %d bytes on the sandbox's link, want the %d sent", v6, len(got), len(sent))
		}
		if !tcpChecksumValid(got) {
			t.Errorf("v6=%v: TCP checksum of the super-packet to the sandbox not completed", v6)
		}
		if _, _, hops, _ := ipFields(got); hops != 63 {
			t.Errorf("v6=%v: hop limit %d, want 63", v6, hops)
		}
		if fast() != before+1 {
			t.Errorf("v6=%v: super-packet to the sandbox did not take the fast path", v6)
		}

		// To a kernel pod: a super-packet, at the kernel's MSS, or
		// what fits, or 536.
		for _, tc := range []struct{ kernelMSS, want uint16 }{{1000, 1000}, {9000, uint16(smallMTU - l3 - l4)}, {100, 536}} {
			before := fast()
			sent := k.injectSuper(macK, src, kernel, 30000, tc.kernelMSS)
			pkt := k2.ch.Read()
			if pkt == nil {
				t.Fatalf("v6=%v MSS %d: nothing on the kernel pod's link", v6, tc.kernelMSS)
			}
			g := pkt.GSOOptions
			got := pkt.ToView().AsSlice()[header.EthernetMinimumSize:]
			pkt.DecRef()
			if g.Type != typ || !g.NeedsCsum || g.CsumOffset != header.TCPChecksumOffset || g.MSS != tc.want || int(g.L3HdrLen) != l3 {
				t.Errorf("v6=%v MSS %d: GSO options %+v, want %v, partial checksum, MSS %d", v6, tc.kernelMSS, g, typ, tc.want)
			}
			if len(got) != len(sent) || !bytes.Equal(got[l3+header.TCPChecksumOffset:], sent[l3+header.TCPChecksumOffset:]) {
				t.Errorf("v6=%v MSS %d: the segment (partial checksum included) changed on the way", v6, tc.kernelMSS)
			}
			if fast() != before+1 {
				t.Errorf("v6=%v MSS %d: did not take the fast path", v6, tc.kernelMSS)
			}
		}

		// To a link without GSO that it does not fit: pieces of whole
		// segments that fit, the fewest (a sandbox's link, for a
		// super-packet of 64 KiB), or segments (a link of the kernel
		// pod's MTU), on the fast path.
		for _, tc := range []struct {
			name      string
			to        chanLink
			dst       netip.Addr
			data      int
			mtu       int
			kernelMSS uint16
		}{
			{"a sandbox's link", a, sandbox, 65000, largeMTU, 1448},
			{"a sandbox's link, MSS 1000", a, sandbox, 64990, largeMTU, 1000},
			{"a link of 1500", c, small, 30000, smallMTU, 1448},
		} {
			before := fast()
			sent := k.injectSuper(macK, src, tc.dst, tc.data, tc.kernelMSS)
			checkPieces(t, fmt.Sprintf("v6=%v %s", v6, tc.name), sent, tc.to, tc.mtu, tc.kernelMSS, false)
			if fast() != before+1 {
				t.Errorf("v6=%v %s: did not take the fast path", v6, tc.name)
			}
		}
	}
}

// partialEndpoint makes a test link take partial TCP checksums, as a
// sandbox's link that took checksum offload does.
type partialEndpoint struct{ stack.LinkEndpoint }

func (partialEndpoint) TakesPartialTCPChecksum() bool { return true }

// TestKernelSuperPacketSplitPartial: a kernel pod's super-packet too big
// for a sandbox's link that takes partial checksums reaches it in pieces
// that fit, each with its checksum partial (the pseudo-header sum of the
// piece) and GSO options.
func TestKernelSuperPacketSplitPartial(t *testing.T) {
	r, _, b, _ := mtuLinks(t)
	if err := r.RemoveLink("b"); err != nil {
		t.Fatal(err)
	}
	p := newChanLinkMTU(largeMTU)
	p.ep = partialEndpoint{p.ep}
	if err := r.AddLink("p", p.ep, Link{Addrs: []netip.Addr{podB4, podB6}, PodMAC: macB}); err != nil {
		t.Fatal(err)
	}
	_ = b
	k := kernelLink(t, r)
	for _, tc := range []struct{ src, dst netip.Addr }{{podK4, podB4}, {podK6, podB6}} {
		sent := k.injectSuper(macK, tc.src, tc.dst, 65000, 1448)
		checkPieces(t, tc.dst.String(), sent, p, largeMTU, 1448, true)
	}
}

// checkPieces reads the pieces of the kernel's super-packet sent (IP
// packet, checksum partial, flags ACK and PSH, the kernel's MSS kernelMSS)
// from link to and checks them: as few as fit mtu in whole segments of the
// MSS it is cut at (the kernel's, or what fits), hop limit one less, the
// IP length, IPv4 ID and header checksum, sequence numbers and data of the
// pieces in order, PSH on the last only, TCP checksums complete (or,
// partial, the pseudo-header sums, with GSO options), and nothing else on
// the link.
func checkPieces(t *testing.T, name string, sent []byte, to chanLink, mtu int, kernelMSS uint16, partial bool) {
	t.Helper()
	_, _, _, sentSeg := ipFields(sent)
	sentTCP := header.TCP(sentSeg)
	l4 := int(sentTCP.DataOffset())
	data := sentSeg[l4:]
	v6 := header.IPVersion(sent) == header.IPv6Version
	fit := mtu - (len(sent) - len(sentSeg)) - l4
	mss := min(int(kernelMSS), fit)
	per := fit / mss * mss
	want := (len(data) + per - 1) / per
	if want < 2 {
		t.Fatalf("%s: %d bytes of data fit one piece of %d", name, len(data), per)
	}
	var got []byte
	for i := 0; i < want; i++ {
		pkt := to.ch.Read()
		if pkt == nil {
			t.Fatalf("%s: %d pieces on the link, want %d", name, i, want)
		}
		g := pkt.GSOOptions
		ip := append([]byte(nil), pkt.ToView().AsSlice()[header.EthernetMinimumSize:]...)
		pkt.DecRef()
		src, dst, hops, seg := ipFields(ip)
		if len(ip) > mtu {
			t.Errorf("%s: piece %d of %d bytes, over the MTU %d", name, i, len(ip), mtu)
		}
		if hops != 63 {
			t.Errorf("%s: piece %d: hop limit %d, want 63", name, i, hops)
		}
		if v6 {
			if h := header.IPv6(ip); int(h.PayloadLength()) != len(seg) {
				t.Errorf("%s: piece %d: payload length %d, want %d", name, i, h.PayloadLength(), len(seg))
			}
		} else {
			h := header.IPv4(ip)
			if int(h.TotalLength()) != len(ip) || !h.IsChecksumValid() {
				t.Errorf("%s: piece %d: IPv4 total length %d of %d bytes, header checksum valid %v", name, i, h.TotalLength(), len(ip), h.IsChecksumValid())
			}
			if wantID := header.IPv4(sent).ID() + uint16(len(got)/mss); h.ID() != wantID {
				t.Errorf("%s: piece %d: IPv4 ID %d, want %d", name, i, h.ID(), wantID)
			}
		}
		th := header.TCP(seg)
		if th.SequenceNumber() != sentTCP.SequenceNumber()+uint32(len(got)) {
			t.Errorf("%s: piece %d: sequence number %d, want %d", name, i, th.SequenceNumber(), sentTCP.SequenceNumber()+uint32(len(got)))
		}
		n := len(seg) - l4
		if i < want-1 && n != per {
			t.Errorf("%s: piece %d: %d bytes of data, want %d (segments of %d)", name, i, n, per, mss)
		}
		wantFlags := header.TCPFlagAck
		if i == want-1 {
			wantFlags |= header.TCPFlagPsh
		}
		if th.Flags() != wantFlags {
			t.Errorf("%s: piece %d: flags %v, want %v", name, i, th.Flags(), wantFlags)
		}
		if partial {
			xsum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, tcpipx.Addr(src), tcpipx.Addr(dst), uint16(len(seg)))
			if th.Checksum() != xsum || !g.NeedsCsum || g.CsumOffset != header.TCPChecksumOffset {
				t.Errorf("%s: piece %d: checksum %#04x, GSO %+v, want the partial %#04x", name, i, th.Checksum(), g, xsum)
			}
		} else if !tcpChecksumValid(ip) {
			t.Errorf("%s: piece %d: TCP checksum not complete", name, i)
		}
		got = append(got, seg[l4:]...)
	}
	if !bytes.Equal(got, data) {
		t.Errorf("%s: the pieces carry %d bytes, not the %d sent", name, len(got), len(data))
	}
	if extra := to.read(); extra != nil {
		t.Errorf("%s: more than %d pieces on the link", name, want)
	}
}

// FuzzSplitSuper delivers, from a kernel pod's link, what may arrive marked
// as a TCP super-packet (a kernel's, or a sandbox's through its link's
// offload) with any bytes and MSS, toward links without GSO that it may
// not fit: whatever they hold, the router must not panic and must send
// nothing larger than a link's MTU (but what it asks the link to cut, with
// an MSS that fits); and a super-packet it cuts reaches the link with its
// data whole and in order.
func FuzzSplitSuper(f *testing.F) {
	seg := append(tcpSYN(podK4, podC4, header.TCPFlagAck|header.TCPFlagFin, nil), patterned(5000)...)
	f.Add(uint16(header.IPv4ProtocolNumber), ipPacket(podK4, podC4, header.TCPProtocolNumber, seg), uint16(1448))
	seg6 := append(tcpSYN(podK6, podA6, header.TCPFlagAck, []byte{1, 1, 8, 10, 1, 2, 3, 4, 5, 6, 7, 8}), patterned(65200)...)
	f.Add(uint16(header.IPv6ProtocolNumber), ipPacket(podK6, podA6, header.TCPProtocolNumber, seg6), uint16(1000))
	f.Add(uint16(header.IPv4ProtocolNumber), ipPacket(podK4, podC4, header.TCPProtocolNumber, seg), uint16(0))
	r, a, _, c := mtuLinks(f)
	k := kernelLink(f, r)
	f.Fuzz(func(t *testing.T, proto uint16, ip []byte, mss uint16) {
		if len(ip) > maxMTU {
			ip = ip[:maxMTU]
		}
		frame := make([]byte, header.EthernetMinimumSize+len(ip))
		header.Ethernet(frame).Encode(&header.EthernetFields{SrcAddr: macK, DstAddr: gwMAC, Type: tcpip.NetworkProtocolNumber(proto)})
		copy(frame[header.EthernetMinimumSize:], ip)
		pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(frame)})
		endpoint.MarkForwardedGSO(pkt, mss)
		k.ch.InjectInbound(tcpip.NetworkProtocolNumber(proto), pkt)
		pkt.DecRef()
		for _, l := range []struct {
			cl  chanLink
			mtu int
		}{{a, largeMTU}, {c, smallMTU}} {
			var data []byte
			whole := true
			for p := l.cl.ch.Read(); p != nil; p = l.cl.ch.Read() {
				g := p.GSOOptions
				out := append([]byte(nil), p.ToView().AsSlice()[header.EthernetMinimumSize:]...)
				p.DecRef()
				if g.Type != stack.GSONone {
					// gVisor's path (a packet the fast path does not
					// take, such as one with bytes past its IP
					// length): the link is asked to cut it, and its
					// software GSO bounds the MSS (package endpoint).
					if len(out) > maxMTU {
						t.Fatalf("%d bytes for a link of MTU %d, to be cut at MSS %d", len(out), l.mtu, g.MSS)
					}
					whole = false
					continue
				}
				if len(out) > l.mtu {
					t.Fatalf("%d bytes sent on a link of MTU %d", len(out), l.mtu)
				}
				if _, _, _, s := ipFields(out); unfragmentedTCP(out) && len(s) >= header.TCPMinimumSize && int(header.TCP(s).DataOffset()) <= len(s) {
					data = append(data, s[header.TCP(s).DataOffset():]...)
				} else {
					whole = false
				}
			}
			if !whole || data == nil || len(ip) <= l.mtu {
				continue
			}
			// Cut here (it did not fit): the pieces carry its data.
			if _, _, _, s := ipFields(ip); unfragmentedTCP(ip) && len(s) >= header.TCPMinimumSize && int(header.TCP(s).DataOffset()) <= len(s) && !bytes.Equal(data, s[header.TCP(s).DataOffset():]) {
				t.Fatalf("the pieces carry %d bytes, the super-packet %d", len(data), len(s)-int(header.TCP(s).DataOffset()))
			}
		}
	})
}

// unfragmentedTCP reports whether ip, an IPv4 or IPv6 packet, is TCP and
// not a fragment.
func unfragmentedTCP(ip []byte) bool {
	if len(ip) >= header.IPv4MinimumSize && header.IPVersion(ip) == header.IPv4Version {
		h := header.IPv4(ip)
		return h.Protocol() == uint8(header.TCPProtocolNumber) && !h.More() && h.FragmentOffset() == 0
	}
	return len(ip) >= header.IPv6MinimumSize && header.IPv6(ip).NextHeader() == uint8(header.TCPProtocolNumber)
}
