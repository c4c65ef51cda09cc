package endpoint

import (
	"bytes"
	"testing"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// TestRestoreForwardedGSO checks that the mark a Forwarding TAP endpoint
// puts on a super-packet becomes the GSO options the egress needs, once,
// and that unmarked packets are left alone.
func TestRestoreForwardedGSO(t *testing.T) {
	tests := []struct {
		name    string
		proto   tcpip.NetworkProtocolNumber
		mark    uint32
		mss     uint16 // MarkForwardedGSO's argument when mark is 0
		want    bool
		wantGSO stack.GSO
	}{
		{name: "ipv4", proto: header.IPv4ProtocolNumber, mss: 1448, want: true,
			wantGSO: stack.GSO{Type: stack.GSOTCPv4, NeedsCsum: true, CsumOffset: 16, MSS: 1448, L3HdrLen: header.IPv4MinimumSize}},
		{name: "ipv6", proto: header.IPv6ProtocolNumber, mss: 1428, want: true,
			wantGSO: stack.GSO{Type: stack.GSOTCPv6, NeedsCsum: true, CsumOffset: 16, MSS: 1428, L3HdrLen: header.IPv6MinimumSize}},
		{name: "unmarked", proto: header.IPv4ProtocolNumber, mark: 7, want: false},
		{name: "not ip", proto: header.ARPProtocolNumber, mss: 1448, want: false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(make([]byte, 60))})
			defer pkt.DecRef()
			pkt.NetworkProtocolNumber = tc.proto
			switch pkt.NetworkProtocolNumber {
			case header.IPv4ProtocolNumber:
				pkt.NetworkHeader().Consume(header.IPv4MinimumSize)
			case header.IPv6ProtocolNumber:
				pkt.NetworkHeader().Consume(header.IPv6MinimumSize)
			}
			if tc.mark != 0 {
				pkt.Mark = tc.mark
			} else {
				MarkForwardedGSO(pkt, tc.mss)
			}
			if got := RestoreForwardedGSO(pkt); got != tc.want {
				t.Fatalf("RestoreForwardedGSO = %t, want %t", got, tc.want)
			}
			if !tc.want {
				if pkt.GSOOptions != (stack.GSO{}) {
					t.Fatalf("GSOOptions = %+v, want none", pkt.GSOOptions)
				}
				return
			}
			if pkt.GSOOptions != tc.wantGSO {
				t.Fatalf("GSOOptions = %+v, want %+v", pkt.GSOOptions, tc.wantGSO)
			}
			if pkt.Mark != 0 || RestoreForwardedGSO(pkt) {
				t.Fatalf("mark %#x left behind: restored twice", pkt.Mark)
			}
		})
	}
}

// TestPassGSOFrame checks which TCP GSO frames read from a device are
// delivered whole: only well-formed ones whose partial checksum sits in
// the TCP checksum field and that name a segment size.
func TestPassGSOFrame(t *testing.T) {
	eth4, _ := tcpFrame{ethernet: true, flags: header.TCPFlagAck, payload: testPayload(3000)}.build()
	tun6, _ := tcpFrame{v6: true, flags: header.TCPFlagAck, payload: testPayload(3000)}.build()
	padded, _ := tcpFrame{ethernet: true, flags: header.TCPFlagAck, payload: testPayload(3000), pad: 6}.build()
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
			if ok && len(f.frame) != tc.wantLen {
				t.Fatalf("frame of %d bytes, want %d", len(f.frame), tc.wantLen)
			}
		})
	}
}

// TestSoftwareGSO checks the frames an egress without GSO makes of a
// forwarded super-packet: segments with valid checksums and contiguous
// sequence numbers carrying the whole payload, at most the link MTU and at
// least minSegmentMSS, as many whole MSS-sized pieces as fit; or the packet
// whole, checksum completed, when it fits.
func TestSoftwareGSO(t *testing.T) {
	tests := []struct {
		name     string
		frame    tcpFrame
		mss      uint16
		mtu      uint32
		wantSegs int
		wantSize int // payload bytes of every segment but the last
	}{
		{name: "v4 tap", frame: tcpFrame{ethernet: true, flags: header.TCPFlagAck | header.TCPFlagPsh, payload: testPayload(5000)}, mss: 1460, mtu: 1500, wantSegs: 4, wantSize: 1460},
		{name: "v6 tun", frame: tcpFrame{v6: true, flags: header.TCPFlagAck, payload: testPayload(5000)}, mss: 1440, mtu: 1500, wantSegs: 4, wantSize: 1440},
		{name: "capped by mtu", frame: tcpFrame{ethernet: true, flags: header.TCPFlagAck, payload: testPayload(5000)}, mss: 4000, mtu: 1500, wantSegs: 4, wantSize: 1460},
		{name: "tiny mss raised, joined up to the mtu", frame: tcpFrame{flags: header.TCPFlagAck, payload: testPayload(5000)}, mss: 1, mtu: 1500, wantSegs: 5, wantSize: 2 * minSegmentMSS},
		{name: "joined for a large link", frame: tcpFrame{ethernet: true, flags: header.TCPFlagAck, payload: testPayload(20000)}, mss: 1448, mtu: 9000, wantSegs: 3, wantSize: 6 * 1448},
		{name: "fits whole", frame: tcpFrame{ethernet: true, flags: header.TCPFlagAck, payload: testPayload(5000)}, mss: 1460, mtu: 9000, wantSegs: 1, wantSize: 5000},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b, _ := tc.frame.build()
			typ := stack.GSOTCPv4
			if tc.frame.v6 {
				typ = stack.GSOTCPv6
			}
			gso := stack.GSO{Type: typ, NeedsCsum: true, CsumOffset: header.TCPChecksumOffset, MSS: tc.mss}
			var segs []tcpSegment
			ok := softwareGSO(b, tc.frame.ethernet, gso, tc.mtu, func(f []byte, _ bool) {
				s, err := parseSegment(f, tc.frame.v6, tc.frame.ethernet)
				if err != nil {
					t.Fatalf("segment %d: %v", len(segs), err)
				}
				segs = append(segs, s)
			})
			if !ok {
				t.Fatal("softwareGSO refused the frame")
			}
			if len(segs) != tc.wantSegs {
				t.Fatalf("%d frames, want %d", len(segs), tc.wantSegs)
			}
			var payload []byte
			for i, s := range segs {
				if s.seq != tc.frame.seq+uint32(len(payload)) {
					t.Errorf("segment %d: seq %d, want %d", i, s.seq, tc.frame.seq+uint32(len(payload)))
				}
				if i < len(segs)-1 && len(s.payload) != tc.wantSize {
					t.Errorf("segment %d: %d payload bytes, want %d", i, len(s.payload), tc.wantSize)
				}
				payload = append(payload, s.payload...)
			}
			if !bytes.Equal(payload, tc.frame.payload) {
				t.Fatal("payload changed")
			}
		})
	}
}
