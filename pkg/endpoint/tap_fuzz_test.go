package endpoint

import (
	"bytes"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// FuzzTAPFrame feeds arbitrary reads (virtio-net header + frame) to
// splitFrame, the parser of what the kernel, on behalf of an untrusted pod,
// hands the endpoint. It must never panic; a TCP super-packet that is
// accepted must come out as segments of at most headers+gso_size bytes with
// valid checksums and consecutive sequence numbers; anything else comes out
// as at most the one frame that went in; a rejected frame emits nothing.
func FuzzTAPFrame(f *testing.F) {
	for _, tc := range gsoCases {
		frame, hdrLen := tc.frame.build()
		f.Add(withVnet(virtioNetHdr{
			flags:      virtioNetHdrFNeedsCsum,
			gsoType:    tc.gsoType,
			gsoSize:    tc.gsoSize,
			csumStart:  uint16(hdrLen - header.TCPMinimumSize - tc.frame.tcpOpts),
			csumOffset: header.TCPChecksumOffset,
		}, frame), tc.frame.ethernet)
	}
	for _, tc := range rejectCases {
		f.Add(tc.in, tc.ethernet)
	}
	plain, hdrLen := tcpFrame{v6: true, flags: header.TCPFlagAck, payload: testPayload(16)}.build()
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
			if len(f) > gsoMaxHeaderLen+gsoSize {
				t.Fatalf("segment %d: %d bytes > %d header bytes + gso_size %d", i, len(f), gsoMaxHeaderLen, gsoSize)
			}
			seg, err := parseSegment(f, v6, ethernet)
			if err != nil {
				t.Fatalf("segment %d: %v", i, err)
			}
			if len(seg.payload) > gsoSize {
				t.Fatalf("segment %d: payload %d > gso_size %d", i, len(seg.payload), gsoSize)
			}
			if i == 0 {
				seq0 = seg.seq
			} else if want := seq0 + uint32(i*gsoSize); seg.seq != want {
				t.Fatalf("segment %d: seq %d, want %d", i, seg.seq, want)
			}
		}
	})
}
