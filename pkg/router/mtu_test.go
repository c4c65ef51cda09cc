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
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/link/ethernet"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/shm-cni/shm-cni/internal/tcpipx"
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

// tcpSYN is a TCP segment from port 1000 to 2000 with flags, whose options
// are opts (a multiple of 4 bytes), and a valid checksum for src -> dst.
func tcpSYN(src, dst netip.Addr, flags header.TCPFlags, opts []byte) []byte {
	t := header.TCP(make([]byte, header.TCPMinimumSize+len(opts)))
	t.Encode(&header.TCPFields{SrcPort: 1000, DstPort: 2000, SeqNum: 1, DataOffset: uint8(len(t)), Flags: flags, WindowSize: 65535})
	copy(t[header.TCPMinimumSize:], opts)
	xsum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, tcpipx.Addr(src), tcpipx.Addr(dst), uint16(len(t)))
	t.SetChecksum(^checksum.Checksum(t, xsum))
	return t
}

// tcpChecksumValid reports whether the TCP segment of IP packet ip has a
// valid checksum.
func tcpChecksumValid(ip []byte) bool {
	src, dst, _, seg := ipFields(ip)
	xsum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, tcpipx.Addr(src), tcpipx.Addr(dst), uint16(len(seg)))
	return checksum.Checksum(seg, xsum) == 0xffff
}

// TestClampMSS: the MSS option of a TCP SYN or SYN-ACK the router forwards
// to or from the uplink is lowered to what the uplink carries (its MTU less
// the IP and TCP headers), wherever the option sits among the others, with
// the checksum updated (a bad one stays bad); SYNs between pod links,
// smaller MSSes, segments without SYN and packets without the option are
// left alone.
func TestClampMSS(t *testing.T) {
	const uplink, pod = tcpip.NICID(1), tcpip.NICID(2)
	m := &linkMTUs{uplink: 1500}
	m.uplinkNIC.Store(uint32(uplink))
	mss := func(v uint16) []byte { return []byte{header.TCPOptionMSS, 4, byte(v >> 8), byte(v)} }
	far4, far6 := netip.MustParseAddr("192.0.2.7"), netip.MustParseAddr("2001:db8:2::7")
	for _, tc := range []struct {
		name     string
		src, dst netip.Addr
		in, out  tcpip.NICID
		flags    header.TCPFlags
		opts     []byte
		want     uint16 // the MSS after; 0: the packet is unchanged
		badSum   bool   // the segment comes with a bad checksum
		parsed   bool   // the stack parsed the TCP header (transport header)
	}{
		{"syn to the uplink", podA4, far4, pod, uplink, header.TCPFlagSyn, mss(64960), 1460, false, false},
		{"syn-ack from the uplink", far4, podA4, uplink, pod, header.TCPFlagSyn | header.TCPFlagAck, mss(8960), 1460, false, true},
		{"ipv6 syn to the uplink", podA6, far6, pod, uplink, header.TCPFlagSyn, mss(64940), 1440, false, false},
		{"ipv6 syn-ack from the uplink", far6, podA6, uplink, pod, header.TCPFlagSyn | header.TCPFlagAck, mss(8940), 1440, false, true},
		{"mss at an odd offset", podA4, far4, pod, uplink, header.TCPFlagSyn, append(append([]byte{1}, mss(9000)...), 1, 1, 1), 1460, false, false},
		{"mss after window scale", podA4, far4, pod, uplink, header.TCPFlagSyn, append([]byte{3, 3, 7, 1}, mss(9000)...), 1460, false, true},
		{"bad checksum stays bad", podA4, far4, pod, uplink, header.TCPFlagSyn, mss(9000), 1460, true, false},
		{"between pods", podA4, podB4, pod, pod + 1, header.TCPFlagSyn, mss(64960), 0, false, false},
		{"smaller mss", podA4, far4, pod, uplink, header.TCPFlagSyn, mss(1400), 0, false, false},
		{"no syn", podA4, far4, pod, uplink, header.TCPFlagAck, mss(9000), 0, false, false},
		{"no mss option", podA4, far4, pod, uplink, header.TCPFlagSyn, []byte{1, 1, 1, 0}, 0, false, false},
		{"truncated option", podA4, far4, pod, uplink, header.TCPFlagSyn, []byte{1, 1, 2, 4}, 0, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			seg := tcpSYN(tc.src, tc.dst, tc.flags, tc.opts)
			if tc.badSum {
				header.TCP(seg).SetChecksum(header.TCP(seg).Checksum() + 1)
			}
			sent := ipPacket(tc.src, tc.dst, header.TCPProtocolNumber, seg)
			pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(sent)})
			defer pkt.DecRef()
			pkt.NetworkProtocolNumber = header.IPv4ProtocolNumber
			ipLen := header.IPv4MinimumSize
			if tc.src.Is6() {
				pkt.NetworkProtocolNumber, ipLen = header.IPv6ProtocolNumber, header.IPv6MinimumSize
			}
			pkt.NetworkHeader().Consume(ipLen)
			if tc.parsed {
				pkt.TransportHeader().Consume(len(seg))
				pkt.TransportProtocolNumber = header.TCPProtocolNumber
			}
			pkt.InputNICID = tc.in
			clamped := m.clampMSS(pkt, tc.out)
			got := pkt.ToView().AsSlice()
			if clamped != (tc.want != 0) {
				t.Fatalf("clampMSS = %t, want %t", clamped, tc.want != 0)
			}
			if tc.want == 0 {
				if !bytes.Equal(got, sent) {
					t.Error("the packet changed")
				}
				return
			}
			_, _, _, gotSeg := ipFields(got)
			opts := header.TCP(gotSeg).Options()
			i := mssOptionOffset(opts)
			if i < 0 || binary.BigEndian.Uint16(opts[i+2:]) != tc.want {
				t.Errorf("options % x, want the MSS %d", opts, tc.want)
			}
			if tcpChecksumValid(got) == tc.badSum {
				t.Errorf("checksum valid %t, want %t", tc.badSum, !tc.badSum)
			}
		})
	}
}

// FuzzClampMSS feeds clampMSS TCP segments of any bytes (what a pod or the
// world wrote) crossing the uplink: it must not panic, and what it changes
// must be an MSS option's value, lowered to the uplink's limit, and the
// checksum, whose validity stays as it came.
func FuzzClampMSS(f *testing.F) {
	mss := []byte{header.TCPOptionMSS, 4, 0xfd, 0xc0}
	f.Add(false, false, []byte(tcpSYN(podA4, podB4, header.TCPFlagSyn, mss)))
	f.Add(true, true, []byte(tcpSYN(podA6, podB6, header.TCPFlagSyn|header.TCPFlagAck, append([]byte{1}, append(mss, 1, 1, 1)...))))
	f.Add(false, true, []byte(tcpSYN(podA4, podB4, header.TCPFlagSyn, []byte{1, 1, 2, 4})))
	const uplink, pod = tcpip.NICID(1), tcpip.NICID(2)
	m := &linkMTUs{uplink: 1500}
	m.uplinkNIC.Store(uint32(uplink))
	f.Fuzz(func(t *testing.T, v6, parsed bool, seg []byte) {
		src, dst := podA4, netip.MustParseAddr("192.0.2.7")
		proto, ipLen := header.IPv4ProtocolNumber, header.IPv4MinimumSize
		if v6 {
			src, dst = podA6, netip.MustParseAddr("2001:db8:2::7")
			proto, ipLen = header.IPv6ProtocolNumber, header.IPv6MinimumSize
		}
		if len(seg) > 1<<12 {
			seg = seg[:1<<12]
		}
		sent := ipPacket(src, dst, header.TCPProtocolNumber, seg)
		pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(sent)})
		defer pkt.DecRef()
		pkt.NetworkProtocolNumber = proto
		pkt.NetworkHeader().Consume(ipLen)
		if parsed && len(seg) >= header.TCPMinimumSize {
			if n := int(header.TCP(seg).DataOffset()); n >= header.TCPMinimumSize && n <= len(seg) {
				pkt.TransportHeader().Consume(n)
			}
		}
		pkt.InputNICID = pod
		wasValid := tcpChecksumValid(sent)
		clamped := m.clampMSS(pkt, uplink)
		got := pkt.ToView().AsSlice()
		if len(got) != len(sent) {
			t.Fatalf("length %d, was %d", len(got), len(sent))
		}
		if !clamped {
			if !bytes.Equal(got, sent) {
				t.Fatal("changed without clamping")
			}
			return
		}
		_, _, _, gotSeg := ipFields(got)
		opts := header.TCP(gotSeg).Options()
		i := mssOptionOffset(opts)
		if i < 0 || binary.BigEndian.Uint16(opts[i+2:]) != uint16(1500-ipLen-header.TCPMinimumSize) {
			t.Fatalf("clamped, but options % x", opts)
		}
		for j := range got {
			k := j - ipLen // offset in the segment
			if got[j] != sent[j] && k != header.TCPChecksumOffset && k != header.TCPChecksumOffset+1 &&
				k != header.TCPMinimumSize+i+2 && k != header.TCPMinimumSize+i+3 {
				t.Fatalf("byte %d of the segment changed", k)
			}
		}
		if tcpChecksumValid(got) != wasValid {
			t.Fatalf("checksum valid %t, was %t", !wasValid, wasValid)
		}
	})
}

// FuzzLargeLinks sends what a sandbox on a large-MTU link may write into a
// router whose other links are large (b) and small (c): whatever the bytes,
// the router must not panic, must send nothing larger than a link's MTU,
// and what reaches b from a must be what a sent, hop limit aside.
func FuzzLargeLinks(f *testing.F) {
	big := patterned(9000)
	f.Add(uint16(header.IPv4ProtocolNumber), ipPacket(podA4, podB4, header.UDPProtocolNumber, big))
	f.Add(uint16(header.IPv6ProtocolNumber), ipPacket(podA6, podB6, header.UDPProtocolNumber, big))
	f.Add(uint16(header.IPv4ProtocolNumber), withDF(ipPacket(podA4, podC4, header.UDPProtocolNumber, big)))
	f.Add(uint16(header.IPv6ProtocolNumber), ipPacket(podA6, podC6, header.UDPProtocolNumber, big))
	f.Add(uint16(header.IPv4ProtocolNumber), ipPacket(podA4, podC4, header.UDPProtocolNumber, big))
	f.Add(uint16(header.IPv6ProtocolNumber), ipPacket(podA6, podC6, header.TCPProtocolNumber, tcpSYN(podA6, podC6, header.TCPFlagSyn, []byte{2, 4, 0xfd, 0xc0})))
	seg := append(tcpSYN(podA4, podK4, header.TCPFlagAck, nil), big...)
	f.Add(uint16(header.IPv4ProtocolNumber), ipPacket(podA4, podK4, header.TCPProtocolNumber, seg))
	r, a, b, c := mtuLinks(f)
	k := kernelLink(f, r)
	f.Fuzz(func(t *testing.T, proto uint16, pkt []byte) {
		if len(pkt) > largeMTU {
			pkt = pkt[:largeMTU]
		}
		a.injectFrame(macA, tcpip.NetworkProtocolNumber(proto), pkt)
		// The kernel pod's link takes TCP super-packets: each must fit
		// the largest IP packet and be cut at most to the link's MTU.
		for p := k.ch.Read(); p != nil; p = k.ch.Read() {
			n := p.Size() - header.EthernetMinimumSize
			g := p.GSOOptions
			p.DecRef()
			if g.Type == stack.GSONone && n > smallMTU || n > maxMTU {
				t.Fatalf("%d bytes (GSO %v) sent on a link of MTU %d", n, g.Type, smallMTU)
			}
			if g.Type != stack.GSONone && (g.MSS == 0 || int(g.L3HdrLen)+int(g.MSS) > smallMTU) {
				t.Fatalf("super-packet cut at MSS %d for a link of MTU %d", g.MSS, smallMTU)
			}
		}
		for _, l := range []struct {
			cl  chanLink
			mtu int
		}{{a, largeMTU}, {b, largeMTU}, {c, smallMTU}} {
			for frame := l.cl.read(); frame != nil; frame = l.cl.read() {
				ip := frame[header.EthernetMinimumSize:]
				if len(ip) > l.mtu {
					t.Fatalf("%d bytes sent on a link of MTU %d", len(ip), l.mtu)
				}
				if l.cl == b && len(ip) == len(pkt) {
					// Forwarded whole: past the IP header and the first 20
					// bytes of transport header (where gVisor's forwarding
					// may fill in a zero UDP checksum), the bytes are the
					// sender's, which the fast path shares.
					hdr := header.IPv6MinimumSize
					if header.IPVersion(ip) == header.IPv4Version {
						hdr = int(header.IPv4(ip).HeaderLength())
					}
					if skip := hdr + 20; len(ip) > skip && !bytes.Equal(ip[skip:], pkt[skip:]) {
						t.Fatal("forwarded payload differs from the sent one")
					}
				}
			}
		}
	})
}

// TestFillPacketTooBigOwnOnly: the router fills in the MTU of its own packet
// too big, never of one it forwards (a pod's, whatever it says).
func TestFillPacketTooBigOwnOnly(t *testing.T) {
	m := &linkMTUs{uplink: 1500}
	quoted := ipPacket(podA6, podC6, header.UDPProtocolNumber, patterned(100))
	for _, forwarded := range []bool{false, true} {
		icmp := header.ICMPv6(make([]byte, header.ICMPv6PacketTooBigMinimumSize))
		icmp.SetType(header.ICMPv6PacketTooBig)
		sent := ipPacket(GatewayV6, podA6, header.ICMPv6ProtocolNumber, append(icmp, quoted...))
		pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(sent), IsForwardedPacket: forwarded})
		pkt.NetworkProtocolNumber, pkt.TransportProtocolNumber = header.IPv6ProtocolNumber, header.ICMPv6ProtocolNumber
		pkt.NetworkHeader().Consume(header.IPv6MinimumSize)
		pkt.TransportHeader().Consume(header.ICMPv6PacketTooBigMinimumSize)
		filled := m.fillPacketTooBig(pkt)
		_, _, _, got := ipFields(pkt.ToView().AsSlice())
		pkt.DecRef()
		if filled == forwarded || (header.ICMPv6(got).MTU() == 1500) == forwarded {
			t.Errorf("forwarded %t: filled %t, MTU %d", forwarded, filled, header.ICMPv6(got).MTU())
		}
	}
}
