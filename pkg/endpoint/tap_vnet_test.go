package endpoint

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

var (
	testSrcMAC = tcpip.LinkAddress("\x02\x00\x00\x00\x00\x01")
	testDstMAC = tcpip.LinkAddress("\x02\x00\x00\x00\x00\x02")
	testSrc4   = tcpip.AddrFrom4([4]byte{10, 0, 0, 1})
	testDst4   = tcpip.AddrFrom4([4]byte{10, 0, 0, 2})
	testSrc6   = tcpip.AddrFrom16([16]byte{0xfd, 0, 15: 1})
	testDst6   = tcpip.AddrFrom16([16]byte{0xfd, 0, 15: 2})
)

// tcpFrame describes a TCP packet for the tests to build, the way the
// kernel hands it over: a pseudo-header sum in the TCP checksum field
// (CHECKSUM_PARTIAL) unless fullCsum.
type tcpFrame struct {
	v6, ethernet bool
	ipOpts       int // IPv4 option bytes (NOPs), a multiple of 4
	tcpOpts      int // TCP option bytes (NOPs), a multiple of 4
	flags        header.TCPFlags
	seq          uint32
	id           uint16
	payload      []byte
	pad          int // bytes after the IP packet (Ethernet padding)
	fullCsum     bool
}

// build returns the frame and the length of its headers.
func (f tcpFrame) build() ([]byte, int) {
	l2 := 0
	if f.ethernet {
		l2 = header.EthernetMinimumSize
	}
	l3 := header.IPv4MinimumSize + f.ipOpts
	if f.v6 {
		l3 = header.IPv6MinimumSize
	}
	l4 := header.TCPMinimumSize + f.tcpOpts
	hdrLen := l2 + l3 + l4
	b := make([]byte, hdrLen+len(f.payload)+f.pad)
	copy(b[hdrLen:], f.payload)
	src, dst := testSrc4, testDst4
	proto := header.IPv4ProtocolNumber
	if f.v6 {
		src, dst = testSrc6, testDst6
		proto = header.IPv6ProtocolNumber
	}
	if f.ethernet {
		header.Ethernet(b).Encode(&header.EthernetFields{SrcAddr: testSrcMAC, DstAddr: testDstMAC, Type: proto})
	}
	tcpLen := l4 + len(f.payload)
	if f.v6 {
		header.IPv6(b[l2:]).Encode(&header.IPv6Fields{
			PayloadLength:     uint16(tcpLen),
			TransportProtocol: header.TCPProtocolNumber,
			HopLimit:          64,
			SrcAddr:           src,
			DstAddr:           dst,
		})
	} else {
		ip := header.IPv4(b[l2:])
		ip.Encode(&header.IPv4Fields{
			TotalLength: uint16(l3 + tcpLen),
			ID:          f.id,
			Flags:       header.IPv4FlagDontFragment,
			TTL:         64,
			Protocol:    uint8(header.TCPProtocolNumber),
			SrcAddr:     src,
			DstAddr:     dst,
		})
		ip[0] = byte(header.IPv4Version<<4 | l3/4)
		for i := header.IPv4MinimumSize; i < l3; i++ {
			ip[i] = 1 // NOP
		}
		ip.SetChecksum(^ip.CalculateChecksum())
	}
	tcp := header.TCP(b[l2+l3:])
	tcp.Encode(&header.TCPFields{
		SrcPort:    40000,
		DstPort:    5201,
		SeqNum:     f.seq,
		AckNum:     7,
		DataOffset: uint8(l4),
		Flags:      f.flags,
		WindowSize: 1000,
	})
	for i := header.TCPMinimumSize; i < l4; i++ {
		tcp[i] = 1 // NOP
	}
	xsum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, src, dst, uint16(tcpLen))
	if f.fullCsum {
		xsum = checksum.Checksum(f.payload, xsum)
		tcp.SetChecksum(^tcp.CalculateChecksum(xsum))
	} else {
		tcp.SetChecksum(xsum)
	}
	return b, hdrLen
}

// withVnet prefixes frame with the encoding of h.
func withVnet(h virtioNetHdr, frame []byte) []byte {
	var hb [virtioNetHdrLen]byte
	h.encode(&hb)
	return append(hb[:], frame...)
}

// tcpSegment is what parseSegment reads back from an emitted TCP frame.
type tcpSegment struct {
	seq     uint32
	flags   header.TCPFlags
	id      uint16
	payload []byte
}

// parseSegment parses a frame emitted by splitFrame and checks that its
// lengths and IP and TCP checksums are valid.
func parseSegment(b []byte, v6, ethernet bool) (tcpSegment, error) {
	if ethernet {
		if len(b) < header.EthernetMinimumSize {
			return tcpSegment{}, errors.New("short ethernet frame")
		}
		b = b[header.EthernetMinimumSize:]
	}
	var src, dst tcpip.Address
	var tcpBytes []byte
	var id uint16
	if v6 {
		ip := header.IPv6(b)
		if !ip.IsValid(len(b)) || int(ip.PayloadLength())+header.IPv6MinimumSize != len(b) {
			return tcpSegment{}, fmt.Errorf("bad IPv6 header or length %d for %d bytes", ip.PayloadLength(), len(b))
		}
		src, dst = ip.SourceAddress(), ip.DestinationAddress()
		tcpBytes = ip.Payload()
	} else {
		ip := header.IPv4(b)
		if !ip.IsValid(len(b)) || int(ip.TotalLength()) != len(b) {
			return tcpSegment{}, fmt.Errorf("bad IPv4 header or total length for %d bytes", len(b))
		}
		if !ip.IsChecksumValid() {
			return tcpSegment{}, errors.New("bad IPv4 header checksum")
		}
		src, dst = ip.SourceAddress(), ip.DestinationAddress()
		tcpBytes = b[ip.HeaderLength():]
		id = ip.ID()
	}
	if len(tcpBytes) < header.TCPMinimumSize {
		return tcpSegment{}, errors.New("short TCP header")
	}
	tcp := header.TCP(tcpBytes)
	off := int(tcp.DataOffset())
	if off < header.TCPMinimumSize || off > len(tcpBytes) {
		return tcpSegment{}, errors.New("bad TCP data offset")
	}
	payload := tcpBytes[off:]
	if !tcp.IsChecksumValid(src, dst, checksum.Checksum(payload, 0), uint16(len(payload))) {
		return tcpSegment{}, errors.New("bad TCP checksum")
	}
	return tcpSegment{
		seq:     tcp.SequenceNumber(),
		flags:   tcp.Flags(),
		id:      id,
		payload: bytes.Clone(payload),
	}, nil
}

// testPayload returns n pseudo-random bytes from a fixed seed.
func testPayload(n int) []byte {
	b := make([]byte, n)
	rand.NewChaCha8([32]byte{1}).Read(b)
	return b
}

// collect runs splitFrame and copies what it emits.
func collect(b []byte, vnetHdr, ethernet bool) (rxKind, [][]byte, []bool, error) {
	var frames [][]byte
	var validated []bool
	kind, err := splitFrame(b, vnetHdr, ethernet, func(f []byte, v bool) {
		frames = append(frames, bytes.Clone(f))
		validated = append(validated, v)
	})
	return kind, frames, validated, err
}

// gsoCases are TCP super-packets and how they must be segmented. They also
// seed FuzzTAPFrame.
var gsoCases = []struct {
	name      string
	frame     tcpFrame
	gsoType   uint8
	gsoSize   uint16
	wantSizes []int // payload bytes per segment
}{
	{
		name:      "v4 ethernet FIN PSH on last only",
		frame:     tcpFrame{ethernet: true, flags: header.TCPFlagAck | header.TCPFlagPsh | header.TCPFlagFin, seq: 0xffffff00, id: 0xfffe, payload: testPayload(350)},
		gsoType:   virtioNetHdrGSOTCPv4,
		gsoSize:   100,
		wantSizes: []int{100, 100, 100, 50},
	},
	{
		name:      "v6 ethernet ECN CWR on first only",
		frame:     tcpFrame{v6: true, ethernet: true, flags: header.TCPFlagAck | header.TCPFlagCwr | header.TCPFlagEce, seq: 1, payload: testPayload(200)},
		gsoType:   virtioNetHdrGSOTCPv6 | virtioNetHdrGSOECN,
		gsoSize:   100,
		wantSizes: []int{100, 100},
	},
	{
		name:      "v4 tun with TCP and IP options, odd gso size",
		frame:     tcpFrame{ipOpts: 4, tcpOpts: 12, flags: header.TCPFlagAck | header.TCPFlagPsh, seq: 100, id: 9, payload: testPayload(299)},
		gsoType:   virtioNetHdrGSOTCPv4,
		gsoSize:   99,
		wantSizes: []int{99, 99, 99, 2},
	},
	{
		name:      "v6 tun one segment",
		frame:     tcpFrame{v6: true, tcpOpts: 12, flags: header.TCPFlagAck, seq: 5, payload: testPayload(144)},
		gsoType:   virtioNetHdrGSOTCPv6,
		gsoSize:   144,
		wantSizes: []int{144},
	},
	{
		name:      "v4 ethernet padding after the IP packet is ignored",
		frame:     tcpFrame{ethernet: true, flags: header.TCPFlagAck, payload: testPayload(30), pad: 16},
		gsoType:   virtioNetHdrGSOTCPv4,
		gsoSize:   20,
		wantSizes: []int{20, 10},
	},
	{
		name:      "v4 bare header",
		frame:     tcpFrame{flags: header.TCPFlagAck},
		gsoType:   virtioNetHdrGSOTCPv4,
		gsoSize:   1000,
		wantSizes: []int{0},
	},
}

// TestSplitFrameSegmentsTCP checks that a TCP super-packet is cut into
// gso_size segments with the right lengths, ids, sequence numbers, flags and
// checksums, and that together they carry the original payload.
func TestSplitFrameSegmentsTCP(t *testing.T) {
	for _, tc := range gsoCases {
		t.Run(tc.name, func(t *testing.T) {
			frame, hdrLen := tc.frame.build()
			in := withVnet(virtioNetHdr{
				flags:      virtioNetHdrFNeedsCsum,
				gsoType:    tc.gsoType,
				hdrLen:     uint16(hdrLen),
				gsoSize:    tc.gsoSize,
				csumStart:  uint16(hdrLen - header.TCPMinimumSize - tc.frame.tcpOpts),
				csumOffset: header.TCPChecksumOffset,
			}, frame)
			kind, frames, validated, err := collect(in, true, tc.frame.ethernet)
			if err != nil || kind != rxSegmented {
				t.Fatalf("splitFrame: kind %d, err %v; want segmented", kind, err)
			}
			if got, want := len(frames), len(tc.wantSizes); got != want {
				t.Fatalf("got %d segments, want %d", got, want)
			}
			var payload []byte
			for i, f := range frames {
				if !validated[i] {
					t.Errorf("segment %d not marked validated", i)
				}
				if got, max := len(f), hdrLen+int(tc.gsoSize); got > max {
					t.Errorf("segment %d is %d bytes, more than headers+gso_size %d", i, got, max)
				}
				seg, err := parseSegment(f, tc.frame.v6, tc.frame.ethernet)
				if err != nil {
					t.Fatalf("segment %d: %v", i, err)
				}
				if got, want := len(seg.payload), tc.wantSizes[i]; got != want {
					t.Errorf("segment %d payload %d bytes, want %d", i, got, want)
				}
				if got, want := seg.seq, tc.frame.seq+uint32(i)*uint32(tc.gsoSize); got != want {
					t.Errorf("segment %d seq %d, want %d", i, got, want)
				}
				if !tc.frame.v6 {
					if got, want := seg.id, tc.frame.id+uint16(i); got != want {
						t.Errorf("segment %d IP id %d, want %d", i, got, want)
					}
				}
				want := tc.frame.flags
				if i != len(frames)-1 {
					want &^= header.TCPFlagFin | header.TCPFlagPsh
				}
				if i != 0 {
					want &^= header.TCPFlagCwr
				}
				if seg.flags != want {
					t.Errorf("segment %d flags %v, want %v", i, seg.flags, want)
				}
				if tc.frame.ethernet && !bytes.Equal(f[:header.EthernetMinimumSize], frame[:header.EthernetMinimumSize]) {
					t.Errorf("segment %d Ethernet header changed", i)
				}
				payload = append(payload, seg.payload...)
			}
			if !bytes.Equal(payload, tc.frame.payload) {
				t.Errorf("segments carry %d bytes that differ from the %d-byte payload", len(payload), len(tc.frame.payload))
			}
		})
	}
}

// TestSplitFrameCompletesChecksum checks that a NEEDS_CSUM packet gets the
// checksum the kernel would have computed.
func TestSplitFrameCompletesChecksum(t *testing.T) {
	udp4 := func() ([]byte, int) {
		payload := testPayload(33)
		b := make([]byte, header.IPv4MinimumSize+header.UDPMinimumSize+len(payload))
		ip := header.IPv4(b)
		ip.Encode(&header.IPv4Fields{
			TotalLength: uint16(len(b)), TTL: 64, Protocol: uint8(header.UDPProtocolNumber),
			SrcAddr: testSrc4, DstAddr: testDst4,
		})
		ip.SetChecksum(^ip.CalculateChecksum())
		u := header.UDP(b[header.IPv4MinimumSize:])
		u.Encode(&header.UDPFields{SrcPort: 1, DstPort: 2, Length: uint16(header.UDPMinimumSize + len(payload))})
		copy(u.Payload(), payload)
		u.SetChecksum(header.PseudoHeaderChecksum(header.UDPProtocolNumber, testSrc4, testDst4, u.Length()))
		return b, header.IPv4MinimumSize
	}
	tests := []struct {
		name     string
		build    func() ([]byte, int) // frame, csum_start
		csumOff  uint16
		ethernet bool
		verify   func([]byte) bool
	}{
		{
			name: "tcp v6 ethernet",
			build: func() ([]byte, int) {
				f, h := tcpFrame{v6: true, ethernet: true, flags: header.TCPFlagAck, payload: testPayload(77)}.build()
				return f, h - header.TCPMinimumSize
			},
			csumOff:  header.TCPChecksumOffset,
			ethernet: true,
			verify: func(b []byte) bool {
				_, err := parseSegment(b, true, true)
				return err == nil
			},
		},
		{
			name:    "udp v4 tun",
			build:   udp4,
			csumOff: 6, // udphdr.check
			verify: func(b []byte) bool {
				u := header.UDP(b[header.IPv4MinimumSize:])
				return u.IsChecksumValid(testSrc4, testDst4, checksum.Checksum(u.Payload(), 0))
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			frame, start := tc.build()
			in := withVnet(virtioNetHdr{flags: virtioNetHdrFNeedsCsum, csumStart: uint16(start), csumOffset: tc.csumOff}, frame)
			kind, frames, validated, err := collect(in, true, tc.ethernet)
			if err != nil || kind != rxCsumCompleted || len(frames) != 1 || validated[0] {
				t.Fatalf("splitFrame: kind %d, %d frames, validated %v, err %v; want one completed frame", kind, len(frames), validated, err)
			}
			if !tc.verify(frames[0]) {
				t.Errorf("checksum not valid after completion")
			}
		})
	}
}

// TestSplitFramePassesThrough checks that frames without offload metadata,
// or without a virtio-net header at all, are delivered byte for byte.
func TestSplitFramePassesThrough(t *testing.T) {
	frame, _ := tcpFrame{ethernet: true, flags: header.TCPFlagAck, payload: testPayload(100), fullCsum: true}.build()
	tests := []struct {
		name    string
		in      []byte
		vnetHdr bool
	}{
		{name: "no vnet header", in: frame},
		{name: "zero vnet header", in: withVnet(virtioNetHdr{}, frame), vnetHdr: true},
		{name: "data valid", in: withVnet(virtioNetHdr{flags: virtioNetHdrFDataValid}, frame), vnetHdr: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			kind, frames, validated, err := collect(tc.in, tc.vnetHdr, true)
			if err != nil || kind != rxPlain || len(frames) != 1 || validated[0] {
				t.Fatalf("splitFrame: kind %d, %d frames, err %v; want one plain frame", kind, len(frames), err)
			}
			if !bytes.Equal(frames[0], frame) {
				t.Errorf("frame changed")
			}
		})
	}
}

// rejectCases are frames splitFrame must drop, with the reason. They also
// seed FuzzTAPFrame.
var rejectCases = func() []struct {
	name     string
	in       []byte
	ethernet bool
	want     error
} {
	v4, v4Hdr := tcpFrame{ethernet: true, flags: header.TCPFlagAck, payload: testPayload(300)}.build()
	v6, _ := tcpFrame{v6: true, ethernet: true, flags: header.TCPFlagAck, payload: testPayload(300)}.build()
	tun4, _ := tcpFrame{flags: header.TCPFlagAck, payload: testPayload(300)}.build()
	bare4, _ := tcpFrame{flags: header.TCPFlagAck}.build()
	gso4 := virtioNetHdr{flags: virtioNetHdrFNeedsCsum, gsoType: virtioNetHdrGSOTCPv4, gsoSize: 100, csumStart: 34, csumOffset: 16}
	gso6 := virtioNetHdr{flags: virtioNetHdrFNeedsCsum, gsoType: virtioNetHdrGSOTCPv6, gsoSize: 100, csumStart: 54, csumOffset: 16}
	mutate := func(b []byte, at int, v byte) []byte {
		b = bytes.Clone(b)
		b[at] = v
		return b
	}
	l2 := header.EthernetMinimumSize
	withGSO := func(h virtioNetHdr, f func(*virtioNetHdr)) virtioNetHdr {
		f(&h)
		return h
	}
	return []struct {
		name     string
		in       []byte
		ethernet bool
		want     error
	}{
		{name: "shorter than vnet header", in: []byte{0, 0, 0}, want: errShortVnetHdr},
		{name: "udp fragmentation offload", in: withVnet(withGSO(gso4, func(h *virtioNetHdr) { h.gsoType = virtioNetHdrGSOUDP }), v4), ethernet: true, want: errUnsupportedGSO},
		{name: "udp segmentation offload", in: withVnet(withGSO(gso4, func(h *virtioNetHdr) { h.gsoType = virtioNetHdrGSOUDPL4 }), v4), ethernet: true, want: errUnsupportedGSO},
		{name: "unknown gso type", in: withVnet(withGSO(gso4, func(h *virtioNetHdr) { h.gsoType = 0x7f }), v4), ethernet: true, want: errUnsupportedGSO},
		{name: "csum field past the end", in: withVnet(virtioNetHdr{flags: virtioNetHdrFNeedsCsum, csumStart: uint16(len(v4) - 1), csumOffset: 0}, v4), ethernet: true, want: errBadCsumOffsets},
		{name: "csum offset overflow", in: withVnet(virtioNetHdr{flags: virtioNetHdrFNeedsCsum, csumStart: 0xffff, csumOffset: 0xffff}, v4), ethernet: true, want: errBadCsumOffsets},
		{name: "gso size zero", in: withVnet(withGSO(gso4, func(h *virtioNetHdr) { h.gsoSize = 0 }), v4), ethernet: true, want: errBadGSOFrame},
		{name: "tcpv4 on an IPv6 frame", in: withVnet(gso4, v6), ethernet: true, want: errBadGSOFrame},
		{name: "tcpv6 on an IPv4 frame", in: withVnet(gso6, v4), ethernet: true, want: errBadGSOFrame},
		{name: "short ethernet", in: withVnet(gso4, v4[:10]), ethernet: true, want: errBadGSOFrame},
		{name: "short ip", in: withVnet(gso4, v4[:l2+10]), ethernet: true, want: errBadGSOFrame},
		{name: "ipv4 header length below 20", in: withVnet(gso4, mutate(v4, l2, 0x44)), ethernet: true, want: errBadGSOFrame},
		{name: "ipv4 total length beyond frame", in: withVnet(gso4, v4[:len(v4)-1]), ethernet: true, want: errBadGSOFrame},
		{name: "ipv4 fragment", in: withVnet(gso4, mutate(v4, l2+6, 0x20)), ethernet: true, want: errBadGSOFrame},
		{name: "ipv4 not tcp", in: withVnet(gso4, mutate(v4, l2+9, 17)), ethernet: true, want: errBadGSOFrame},
		{name: "ipv6 extension header", in: withVnet(gso6, mutate(v6, l2+6, 0)), ethernet: true, want: errBadGSOFrame},
		{name: "ipv6 payload beyond frame", in: withVnet(gso6, v6[:len(v6)-1]), ethernet: true, want: errBadGSOFrame},
		{name: "tcp data offset below 20", in: withVnet(gso4, mutate(v4, v4Hdr-8, 0x40)), ethernet: true, want: errBadGSOFrame},
		{name: "tcp data offset beyond packet", in: withVnet(gso4, mutate(bare4, header.IPv4MinimumSize+12, 0xf0)), want: errBadGSOFrame},
		{name: "tun frame with ipv6 version nibble", in: withVnet(gso4, mutate(tun4, 0, 0x65)), want: errBadGSOFrame},
	}
}()

// TestSplitFrameRejects checks that malformed or unsupported frames are
// dropped with the right reason and nothing is emitted.
func TestSplitFrameRejects(t *testing.T) {
	for _, tc := range rejectCases {
		t.Run(tc.name, func(t *testing.T) {
			_, frames, _, err := collect(bytes.Clone(tc.in), true, tc.ethernet)
			if !errors.Is(err, tc.want) {
				t.Errorf("err %v, want %v", err, tc.want)
			}
			if len(frames) != 0 {
				t.Errorf("emitted %d frames, want none", len(frames))
			}
		})
	}
}

// TestVirtioNetHdrLayout checks the little-endian wire layout of the
// header against linux/virtio_net.h.
func TestVirtioNetHdrLayout(t *testing.T) {
	h := virtioNetHdr{flags: 1, gsoType: 0x84, hdrLen: 0x0102, gsoSize: 0x0304, csumStart: 0x0506, csumOffset: 0x0708}
	var b [virtioNetHdrLen]byte
	h.encode(&b)
	want := [virtioNetHdrLen]byte{1, 0x84, 2, 1, 4, 3, 6, 5, 8, 7}
	if b != want {
		t.Errorf("encode: got % x, want % x", b, want)
	}
	var got virtioNetHdr
	got.decode(b[:])
	if got != h {
		t.Errorf("decode: got %+v, want %+v", got, h)
	}
}
