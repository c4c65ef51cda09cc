package tap

import (
	"bytes"
	"errors"
	"testing"

	"github.com/shm-cni/shm-cni/pkg/endpoint"
	"github.com/shm-cni/shm-cni/pkg/endpoint/internal/frametest"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// withVnet prefixes frame with the encoding of h.
func withVnet(h virtioNetHdr, frame []byte) []byte {
	var hb [virtioNetHdrLen]byte
	h.encode(&hb)
	return append(hb[:], frame...)
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
	frame     frametest.TCPFrame
	gsoType   uint8
	gsoSize   uint16
	wantSizes []int // payload bytes per segment
}{
	{
		name:      "v4 ethernet FIN PSH on last only",
		frame:     frametest.TCPFrame{Ethernet: true, Flags: header.TCPFlagAck | header.TCPFlagPsh | header.TCPFlagFin, Seq: 0xffffff00, ID: 0xfffe, Payload: frametest.RandomBytes(350)},
		gsoType:   virtioNetHdrGSOTCPv4,
		gsoSize:   100,
		wantSizes: []int{100, 100, 100, 50},
	},
	{
		name:      "v6 ethernet ECN CWR on first only",
		frame:     frametest.TCPFrame{V6: true, Ethernet: true, Flags: header.TCPFlagAck | header.TCPFlagCwr | header.TCPFlagEce, Seq: 1, Payload: frametest.RandomBytes(200)},
		gsoType:   virtioNetHdrGSOTCPv6 | virtioNetHdrGSOECN,
		gsoSize:   100,
		wantSizes: []int{100, 100},
	},
	{
		name:      "v4 tun with TCP and IP options, odd gso size",
		frame:     frametest.TCPFrame{IPOpts: 4, TCPOpts: 12, Flags: header.TCPFlagAck | header.TCPFlagPsh, Seq: 100, ID: 9, Payload: frametest.RandomBytes(299)},
		gsoType:   virtioNetHdrGSOTCPv4,
		gsoSize:   99,
		wantSizes: []int{99, 99, 99, 2},
	},
	{
		name:      "v6 tun one segment",
		frame:     frametest.TCPFrame{V6: true, TCPOpts: 12, Flags: header.TCPFlagAck, Seq: 5, Payload: frametest.RandomBytes(144)},
		gsoType:   virtioNetHdrGSOTCPv6,
		gsoSize:   144,
		wantSizes: []int{144},
	},
	{
		name:      "v4 ethernet padding after the IP packet is ignored",
		frame:     frametest.TCPFrame{Ethernet: true, Flags: header.TCPFlagAck, Payload: frametest.RandomBytes(30), Pad: 16},
		gsoType:   virtioNetHdrGSOTCPv4,
		gsoSize:   20,
		wantSizes: []int{20, 10},
	},
	{
		name:      "v4 bare header",
		frame:     frametest.TCPFrame{Flags: header.TCPFlagAck},
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
			frame, hdrLen := tc.frame.Build()
			in := withVnet(virtioNetHdr{
				flags:      virtioNetHdrFNeedsCsum,
				gsoType:    tc.gsoType,
				hdrLen:     uint16(hdrLen),
				gsoSize:    tc.gsoSize,
				csumStart:  uint16(hdrLen - header.TCPMinimumSize - tc.frame.TCPOpts),
				csumOffset: header.TCPChecksumOffset,
			}, frame)
			kind, frames, validated, err := collect(in, true, tc.frame.Ethernet)
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
				seg, err := frametest.ParseSegment(f, tc.frame.V6, tc.frame.Ethernet)
				if err != nil {
					t.Fatalf("segment %d: %v", i, err)
				}
				if got, want := len(seg.Payload), tc.wantSizes[i]; got != want {
					t.Errorf("segment %d payload %d bytes, want %d", i, got, want)
				}
				if got, want := seg.Seq, tc.frame.Seq+uint32(i)*uint32(tc.gsoSize); got != want {
					t.Errorf("segment %d seq %d, want %d", i, got, want)
				}
				if !tc.frame.V6 {
					if got, want := seg.ID, tc.frame.ID+uint16(i); got != want {
						t.Errorf("segment %d IP id %d, want %d", i, got, want)
					}
				}
				want := tc.frame.Flags
				if i != len(frames)-1 {
					want &^= header.TCPFlagFin | header.TCPFlagPsh
				}
				if i != 0 {
					want &^= header.TCPFlagCwr
				}
				if seg.Flags != want {
					t.Errorf("segment %d flags %v, want %v", i, seg.Flags, want)
				}
				if tc.frame.Ethernet && !bytes.Equal(f[:header.EthernetMinimumSize], frame[:header.EthernetMinimumSize]) {
					t.Errorf("segment %d Ethernet header changed", i)
				}
				payload = append(payload, seg.Payload...)
			}
			if !bytes.Equal(payload, tc.frame.Payload) {
				t.Errorf("segments carry %d bytes that differ from the %d-byte payload", len(payload), len(tc.frame.Payload))
			}
		})
	}
}

// TestSplitFrameCompletesChecksum checks that a NEEDS_CSUM packet gets the
// checksum the kernel would have computed.
func TestSplitFrameCompletesChecksum(t *testing.T) {
	udp4 := func() ([]byte, int) {
		payload := frametest.RandomBytes(33)
		b := make([]byte, header.IPv4MinimumSize+header.UDPMinimumSize+len(payload))
		ip := header.IPv4(b)
		ip.Encode(&header.IPv4Fields{
			TotalLength: uint16(len(b)), TTL: 64, Protocol: uint8(header.UDPProtocolNumber),
			SrcAddr: frametest.Src4, DstAddr: frametest.Dst4,
		})
		ip.SetChecksum(^ip.CalculateChecksum())
		u := header.UDP(b[header.IPv4MinimumSize:])
		u.Encode(&header.UDPFields{SrcPort: 1, DstPort: 2, Length: uint16(header.UDPMinimumSize + len(payload))})
		copy(u.Payload(), payload)
		u.SetChecksum(header.PseudoHeaderChecksum(header.UDPProtocolNumber, frametest.Src4, frametest.Dst4, u.Length()))
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
				f, h := frametest.TCPFrame{V6: true, Ethernet: true, Flags: header.TCPFlagAck, Payload: frametest.RandomBytes(77)}.Build()
				return f, h - header.TCPMinimumSize
			},
			csumOff:  header.TCPChecksumOffset,
			ethernet: true,
			verify: func(b []byte) bool {
				_, err := frametest.ParseSegment(b, true, true)
				return err == nil
			},
		},
		{
			name:    "udp v4 tun",
			build:   udp4,
			csumOff: 6, // udphdr.check
			verify: func(b []byte) bool {
				u := header.UDP(b[header.IPv4MinimumSize:])
				return u.IsChecksumValid(frametest.Src4, frametest.Dst4, checksum.Checksum(u.Payload(), 0))
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
	frame, _ := frametest.TCPFrame{Ethernet: true, Flags: header.TCPFlagAck, Payload: frametest.RandomBytes(100), FullCsum: true}.Build()
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
	v4, v4Hdr := frametest.TCPFrame{Ethernet: true, Flags: header.TCPFlagAck, Payload: frametest.RandomBytes(300)}.Build()
	v6, _ := frametest.TCPFrame{V6: true, Ethernet: true, Flags: header.TCPFlagAck, Payload: frametest.RandomBytes(300)}.Build()
	tun4, _ := frametest.TCPFrame{Flags: header.TCPFlagAck, Payload: frametest.RandomBytes(300)}.Build()
	bare4, _ := frametest.TCPFrame{Flags: header.TCPFlagAck}.Build()
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
		{name: "gso size zero", in: withVnet(withGSO(gso4, func(h *virtioNetHdr) { h.gsoSize = 0 }), v4), ethernet: true, want: endpoint.ErrBadGSOFrame},
		{name: "tcpv4 on an IPv6 frame", in: withVnet(gso4, v6), ethernet: true, want: endpoint.ErrBadGSOFrame},
		{name: "tcpv6 on an IPv4 frame", in: withVnet(gso6, v4), ethernet: true, want: endpoint.ErrBadGSOFrame},
		{name: "short ethernet", in: withVnet(gso4, v4[:10]), ethernet: true, want: endpoint.ErrBadGSOFrame},
		{name: "short ip", in: withVnet(gso4, v4[:l2+10]), ethernet: true, want: endpoint.ErrBadGSOFrame},
		{name: "ipv4 header length below 20", in: withVnet(gso4, mutate(v4, l2, 0x44)), ethernet: true, want: endpoint.ErrBadGSOFrame},
		{name: "ipv4 total length beyond frame", in: withVnet(gso4, v4[:len(v4)-1]), ethernet: true, want: endpoint.ErrBadGSOFrame},
		{name: "ipv4 fragment", in: withVnet(gso4, mutate(v4, l2+6, 0x20)), ethernet: true, want: endpoint.ErrBadGSOFrame},
		{name: "ipv4 not tcp", in: withVnet(gso4, mutate(v4, l2+9, 17)), ethernet: true, want: endpoint.ErrBadGSOFrame},
		{name: "ipv6 extension header", in: withVnet(gso6, mutate(v6, l2+6, 0)), ethernet: true, want: endpoint.ErrBadGSOFrame},
		{name: "ipv6 payload beyond frame", in: withVnet(gso6, v6[:len(v6)-1]), ethernet: true, want: endpoint.ErrBadGSOFrame},
		{name: "tcp data offset below 20", in: withVnet(gso4, mutate(v4, v4Hdr-8, 0x40)), ethernet: true, want: endpoint.ErrBadGSOFrame},
		{name: "tcp data offset beyond packet", in: withVnet(gso4, mutate(bare4, header.IPv4MinimumSize+12, 0xf0)), want: endpoint.ErrBadGSOFrame},
		{name: "tun frame with ipv6 version nibble", in: withVnet(gso4, mutate(tun4, 0, 0x65)), want: endpoint.ErrBadGSOFrame},
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

// TestPassGSOFrame checks which TCP GSO frames read from a device are
// delivered whole: only well-formed ones whose partial checksum sits in
// the TCP checksum field and that name a segment size.
func TestPassGSOFrame(t *testing.T) {
	eth4, _ := frametest.TCPFrame{Ethernet: true, Flags: header.TCPFlagAck, Payload: frametest.RandomBytes(3000)}.Build()
	tun6, _ := frametest.TCPFrame{V6: true, Flags: header.TCPFlagAck, Payload: frametest.RandomBytes(3000)}.Build()
	padded, _ := frametest.TCPFrame{Ethernet: true, Flags: header.TCPFlagAck, Payload: frametest.RandomBytes(3000), Pad: 6}.Build()
	good4 := virtioNetHdr{flags: virtioNetHdrFNeedsCsum, gsoType: virtioNetHdrGSOTCPv4, gsoSize: 1448, csumStart: 34, csumOffset: 16}
	good6 := virtioNetHdr{flags: virtioNetHdrFNeedsCsum, gsoType: virtioNetHdrGSOTCPv6, gsoSize: 1428, csumStart: 40, csumOffset: 16}
	with := func(h virtioNetHdr, f func(*virtioNetHdr)) virtioNetHdr { f(&h); return h }
	tests := []struct {
		name     string
		frame    []byte
		ethernet bool
		v6       bool
		h        virtioNetHdr
		want     bool
		wantLen  int
	}{
		{name: "tap ipv4", frame: eth4, ethernet: true, h: good4, want: true, wantLen: len(eth4)},
		{name: "tun ipv6", frame: tun6, v6: true, h: good6, want: true, wantLen: len(tun6)},
		{name: "padding trimmed", frame: padded, ethernet: true, h: good4, want: true, wantLen: len(padded) - 6},
		{name: "no partial checksum", frame: eth4, ethernet: true, h: with(good4, func(h *virtioNetHdr) { h.flags = 0 })},
		{name: "no segment size", frame: eth4, ethernet: true, h: with(good4, func(h *virtioNetHdr) { h.gsoSize = 0 })},
		{name: "checksum elsewhere", frame: eth4, ethernet: true, h: with(good4, func(h *virtioNetHdr) { h.csumOffset = 6 })},
		{name: "checksum start off", frame: eth4, ethernet: true, h: with(good4, func(h *virtioNetHdr) { h.csumStart = 30 })},
		{name: "family mismatch", frame: eth4, ethernet: true, v6: true, h: good4},
		{name: "truncated", frame: eth4[:40], ethernet: true, h: good4},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f, ok := passGSOFrame(tc.frame, tc.ethernet, tc.v6, &tc.h)
			if ok != tc.want {
				t.Fatalf("passGSOFrame = %t, want %t", ok, tc.want)
			}
			if ok && len(f.Frame) != tc.wantLen {
				t.Fatalf("frame of %d bytes, want %d", len(f.Frame), tc.wantLen)
			}
		})
	}
}
