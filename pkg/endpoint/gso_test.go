package endpoint

import (
	"bytes"
	"testing"

	"github.com/shm-cni/shm-cni/pkg/endpoint/internal/frametest"
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

// TestSoftwareGSO checks the frames an egress without GSO makes of a
// forwarded super-packet: segments with valid checksums and contiguous
// sequence numbers carrying the whole payload, at most the link MTU and at
// least minSegmentMSS, as many whole MSS-sized pieces as fit, their IPv4
// IDs counting the segments before them (as the router's split numbers
// them); or the packet whole, checksum completed, when it fits.
func TestSoftwareGSO(t *testing.T) {
	tests := []struct {
		name     string
		frame    frametest.TCPFrame
		mss      uint16
		mtu      uint32
		wantSegs int
		wantSize int // payload bytes of every segment but the last
		wantMSS  int // the segments a piece holds, for its IPv4 ID
	}{
		{name: "v4 tap", frame: frametest.TCPFrame{Ethernet: true, Flags: header.TCPFlagAck | header.TCPFlagPsh, Payload: frametest.RandomBytes(5000)}, mss: 1460, mtu: 1500, wantSegs: 4, wantSize: 1460, wantMSS: 1460},
		{name: "v6 tun", frame: frametest.TCPFrame{V6: true, Flags: header.TCPFlagAck, Payload: frametest.RandomBytes(5000)}, mss: 1440, mtu: 1500, wantSegs: 4, wantSize: 1440, wantMSS: 1440},
		{name: "capped by mtu", frame: frametest.TCPFrame{Ethernet: true, Flags: header.TCPFlagAck, Payload: frametest.RandomBytes(5000)}, mss: 4000, mtu: 1500, wantSegs: 4, wantSize: 1460, wantMSS: 1460},
		{name: "tiny mss raised, joined up to the mtu", frame: frametest.TCPFrame{Flags: header.TCPFlagAck, Payload: frametest.RandomBytes(5000)}, mss: 1, mtu: 1500, wantSegs: 5, wantSize: 2 * minSegmentMSS, wantMSS: minSegmentMSS},
		{name: "joined for a large link", frame: frametest.TCPFrame{Ethernet: true, Flags: header.TCPFlagAck, Payload: frametest.RandomBytes(20000), ID: 65533}, mss: 1448, mtu: 9000, wantSegs: 3, wantSize: 6 * 1448, wantMSS: 1448},
		{name: "fits whole", frame: frametest.TCPFrame{Ethernet: true, Flags: header.TCPFlagAck, Payload: frametest.RandomBytes(5000)}, mss: 1460, mtu: 9000, wantSegs: 1, wantSize: 5000, wantMSS: 1460},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b, _ := tc.frame.Build()
			typ := stack.GSOTCPv4
			if tc.frame.V6 {
				typ = stack.GSOTCPv6
			}
			gso := stack.GSO{Type: typ, NeedsCsum: true, CsumOffset: header.TCPChecksumOffset, MSS: tc.mss}
			var segs []frametest.TCPSegment
			ok := SoftwareGSO(b, tc.frame.Ethernet, gso, tc.mtu, func(f []byte, _ bool) {
				s, err := frametest.ParseSegment(f, tc.frame.V6, tc.frame.Ethernet)
				if err != nil {
					t.Fatalf("segment %d: %v", len(segs), err)
				}
				segs = append(segs, s)
			})
			if !ok {
				t.Fatal("SoftwareGSO refused the frame")
			}
			if len(segs) != tc.wantSegs {
				t.Fatalf("%d frames, want %d", len(segs), tc.wantSegs)
			}
			var payload []byte
			for i, s := range segs {
				if s.Seq != tc.frame.Seq+uint32(len(payload)) {
					t.Errorf("segment %d: seq %d, want %d", i, s.Seq, tc.frame.Seq+uint32(len(payload)))
				}
				if want := tc.frame.ID + uint16(len(payload)/tc.wantMSS); !tc.frame.V6 && s.ID != want {
					t.Errorf("segment %d: IPv4 ID %d, want %d", i, s.ID, want)
				}
				if i < len(segs)-1 && len(s.Payload) != tc.wantSize {
					t.Errorf("segment %d: %d payload bytes, want %d", i, len(s.Payload), tc.wantSize)
				}
				payload = append(payload, s.Payload...)
			}
			if !bytes.Equal(payload, tc.frame.Payload) {
				t.Fatal("payload changed")
			}
		})
	}
}
