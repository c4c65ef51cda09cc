package shm

import (
	"bytes"
	"testing"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// TestFramePayload: a frame becomes a packet payload of the same bytes;
// large ones keep their first headerSplit bytes in a view of their own, so
// that parsing the headers never clones the chunk holding the data.
func TestFramePayload(t *testing.T) {
	for _, n := range []int{1, 60, splitFrom - 1, splitFrom, 65014} {
		frame := make([]byte, n)
		for i := range frame {
			frame[i] = byte(i * 7)
		}
		v := buffer.NewViewWithData(frame)
		payload := framePayload(v)
		pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: payload})
		got := pkt.ToView().AsSlice()
		if !bytes.Equal(got, frame) {
			t.Errorf("%d bytes: payload differs from the frame", n)
		}
		views, _ := pkt.AsViewList()
		wantViews := 1
		if n >= splitFrom {
			wantViews = 2
			if first := views.Front().Size(); first != headerSplit {
				t.Errorf("%d bytes: first view of %d bytes, want %d", n, first, headerSplit)
			}
		}
		if views.Len() != wantViews {
			t.Errorf("%d bytes: %d views, want %d", n, views.Len(), wantViews)
		}
		if n >= splitFrom {
			// The stack's header parsing holds a view of the network
			// header and pulls it up again: the data's chunk stays unshared.
			pkt.LinkHeader().Consume(header.EthernetMinimumSize)
			pkt.NetworkHeader().Consume(header.IPv4MinimumSize)
			hv := pkt.NetworkHeader().View()
			_ = pkt.NetworkHeader().Slice()
			hv.Release()
			if !bytes.Equal(pkt.ToView().AsSlice(), frame) {
				t.Errorf("%d bytes: payload changed by header parsing", n)
			}
		}
		pkt.DecRef()
	}
}

// BenchmarkFramePayloadParse makes a packet of a 65014-byte frame, whole
// or split (framePayload), and parses its network header as gVisor's IPv4
// endpoint does (a view of it held, then pulled up again):
//
//	go test -run '^$' -bench FramePayloadParse -benchmem ./pkg/endpoint/shm
func BenchmarkFramePayloadParse(b *testing.B) {
	frame := make([]byte, 65014)
	for _, tc := range []struct {
		name string
		make func(*buffer.View) buffer.Buffer
	}{{"whole", buffer.MakeWithView}, {"split", framePayload}} {
		b.Run(tc.name, func(b *testing.B) {
			b.SetBytes(int64(len(frame)))
			for range b.N {
				pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: tc.make(buffer.NewViewWithData(frame))})
				pkt.LinkHeader().Consume(header.EthernetMinimumSize)
				pkt.NetworkHeader().Consume(header.IPv4MinimumSize)
				hv := pkt.NetworkHeader().View()
				_ = pkt.NetworkHeader().Slice()
				hv.Release()
				pkt.DecRef()
			}
		})
	}
}
