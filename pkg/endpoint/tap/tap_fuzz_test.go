package tap

import (
	"bytes"
	"testing"

	"github.com/shm-cni/shm-cni/pkg/endpoint"
	"github.com/shm-cni/shm-cni/pkg/endpoint/internal/frametest"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// FuzzTAPFrame feeds arbitrary reads (virtio-net header + frame) to
// splitFrame, the parser of what the kernel, on behalf of an untrusted pod,
// hands the endpoint. It must never panic; a TCP super-packet that is
// accepted must come out as segments of at most headers+gso_size bytes with
// valid checksums and consecutive sequence numbers; anything else comes out
// as at most the one frame that went in; a rejected frame emits nothing.
func FuzzTAPFrame(f *testing.F) {
	for _, tc := range gsoCases {
		frame, hdrLen := tc.frame.Build()
		f.Add(withVnet(virtioNetHdr{
			flags:      virtioNetHdrFNeedsCsum,
			gsoType:    tc.gsoType,
			gsoSize:    tc.gsoSize,
			csumStart:  uint16(hdrLen - header.TCPMinimumSize - tc.frame.TCPOpts),
			csumOffset: header.TCPChecksumOffset,
		}, frame), tc.frame.Ethernet)
	}
	for _, tc := range rejectCases {
		f.Add(tc.in, tc.ethernet)
	}
	plain, hdrLen := frametest.TCPFrame{V6: true, Flags: header.TCPFlagAck, Payload: frametest.RandomBytes(16)}.Build()
	f.Add(withVnet(virtioNetHdr{}, plain), false)
	f.Add(withVnet(virtioNetHdr{flags: virtioNetHdrFNeedsCsum, csumStart: uint16(hdrLen - header.TCPMinimumSize), csumOffset: header.TCPChecksumOffset}, plain), false)

	f.Fuzz(func(t *testing.T, in []byte, ethernet bool) {
		b := bytes.Clone(in)
		var h virtioNetHdr
		if len(b) >= virtioNetHdrLen {
			h.decode(b)
		}
		var frames [][]byte
		var validated []bool
		kind, err := splitFrame(b, true, ethernet, func(f []byte, v bool) {
			frames = append(frames, bytes.Clone(f))
			validated = append(validated, v)
		})
		if err != nil {
			if len(frames) != 0 {
				t.Fatalf("rejected (%v) after emitting %d frames", err, len(frames))
			}
			return
		}
		if kind != rxSegmented {
			if len(frames) != 1 || len(frames[0]) != len(in)-virtioNetHdrLen || validated[0] {
				t.Fatalf("kind %d: emitted %d frames, want the one %d-byte frame", kind, len(frames), len(in)-virtioNetHdrLen)
			}
			return
		}
		v6 := h.gsoType&^virtioNetHdrGSOECN == virtioNetHdrGSOTCPv6
		gsoSize := int(h.gsoSize)
		var seq0 uint32
		for i, f := range frames {
			if !validated[i] {
				t.Fatalf("segment %d not marked validated", i)
			}
			if len(f) > endpoint.MaxGSOHeaderLen+gsoSize {
				t.Fatalf("segment %d: %d bytes > %d header bytes + gso_size %d", i, len(f), endpoint.MaxGSOHeaderLen, gsoSize)
			}
			seg, err := frametest.ParseSegment(f, v6, ethernet)
			if err != nil {
				t.Fatalf("segment %d: %v", i, err)
			}
			if len(seg.Payload) > gsoSize {
				t.Fatalf("segment %d: payload %d > gso_size %d", i, len(seg.Payload), gsoSize)
			}
			if i == 0 {
				seq0 = seg.Seq
			} else if want := seq0 + uint32(i*gsoSize); seg.Seq != want {
				t.Fatalf("segment %d: seq %d, want %d", i, seg.Seq, want)
			}
		}
	})
}

// FuzzTAPPassGSO feeds arbitrary reads to the GSO pass-through path of a
// Forwarding endpoint: passGSORead, which decides whether a frame crosses
// the router whole, and SoftwareGSO, which a sandbox link applies to it at
// the egress. Neither may panic; a frame that is passed must come out of
// SoftwareGSO as frames of at most the link MTU with valid checksums and
// consecutive sequence numbers, carrying exactly the frame's payload.
func FuzzTAPPassGSO(f *testing.F) {
	for _, tc := range gsoCases {
		frame, hdrLen := tc.frame.Build()
		f.Add(withVnet(virtioNetHdr{
			flags:      virtioNetHdrFNeedsCsum,
			gsoType:    tc.gsoType,
			gsoSize:    tc.gsoSize,
			csumStart:  uint16(hdrLen - header.TCPMinimumSize - tc.frame.TCPOpts),
			csumOffset: header.TCPChecksumOffset,
		}, frame), tc.frame.Ethernet, uint16(1500))
	}
	for _, tc := range rejectCases {
		f.Add(tc.in, tc.ethernet, uint16(1500))
	}
	const minMTU = header.IPv6MinimumMTU
	f.Fuzz(func(t *testing.T, in []byte, ethernet bool, mtu uint16) {
		if len(in) < virtioNetHdrLen || mtu < minMTU {
			return
		}
		p, h, ok := passGSORead(bytes.Clone(in), ethernet)
		if !ok {
			return
		}
		v6 := p.V6
		want := bytes.Clone(p.Frame[p.HeaderLength():])
		typ := stack.GSOTCPv4
		if v6 {
			typ = stack.GSOTCPv6
		}
		gso := stack.GSO{Type: typ, NeedsCsum: true, CsumOffset: header.TCPChecksumOffset, MSS: h.gsoSize}
		var got []byte
		var seq0 uint32
		n := 0
		ok = endpoint.SoftwareGSO(p.Frame, ethernet, gso, uint32(mtu), func(fr []byte, _ bool) {
			if len(fr)-p.L2 > int(mtu) {
				t.Fatalf("frame %d: %d bytes of IP packet > MTU %d", n, len(fr)-p.L2, mtu)
			}
			seg, err := frametest.ParseSegment(fr, v6, ethernet)
			if err != nil {
				t.Fatalf("frame %d: %v", n, err)
			}
			if n == 0 {
				seq0 = seg.Seq
			} else if seg.Seq != seq0+uint32(len(got)) {
				t.Fatalf("frame %d: seq %d, want %d", n, seg.Seq, seq0+uint32(len(got)))
			}
			got = append(got, seg.Payload...)
			n++
		})
		if !ok {
			// Only when not even the headers fit the MTU.
			if p.L3+p.L4 < int(mtu) {
				t.Fatalf("endpoint.SoftwareGSO refused a passed frame (headers %d, MTU %d)", p.L3+p.L4, mtu)
			}
			return
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("payload of %d bytes came out as %d bytes, or changed", len(want), len(got))
		}
	})
}
