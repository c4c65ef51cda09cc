package queue

import (
	"errors"
	"testing"
)

// peerView maps a queue as the peer sees it, so a test can write anything
// into the shared pages.
func peerView(t testing.TB, q QueueFDs) *mapping {
	t.Helper()
	m, err := mapQueue(q, MapOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.unmap)
	return m
}

// TestHostileDescriptors writes one malformed descriptor at a time into the
// TX ring behind a Receiver and checks each is reported as a violation,
// never a panic or a frame.
func TestHostileDescriptors(t *testing.T) {
	s := smallSizes()
	for _, tc := range []struct {
		name string
		desc func(b []byte) []byte // builds the payload from a valid one
	}{
		{"offset past data", func(b []byte) []byte { le.PutUint64(b[16:], s.DataSize); return b }},
		{"offset wraps", func(b []byte) []byte { le.PutUint64(b[16:], ^uint64(0)-10); return b }},
		{"size past data", func(b []byte) []byte { le.PutUint64(b[16:], 512); le.PutUint32(b[24:], uint32(s.DataSize)); return b }},
		{"frame larger than buffers", func(b []byte) []byte { le.PutUint32(b[8:], 1400); return b }},
		{"frame larger than maximum", func(b []byte) []byte { le.PutUint32(b[8:], 1<<31); return b }},
		{"zero frame", func(b []byte) []byte { le.PutUint32(b[8:], 0); return b }},
		{"no buffers", func(b []byte) []byte { return b[:16] }},
		{"ragged length", func(b []byte) []byte { return append(b, 1, 2, 3) }},
		{"short", func(b []byte) []byte { return b[:5] }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := NewPair(s)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { p.Close() })
			rcv, err := NewReceiver(p.TX, 9000, MapOptions{RequireSeals: true})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(rcv.Close)
			peer := peerView(t, p.TX)
			var w PipeWriter
			w.Init(peer.txPipe)
			valid := make([]byte, 28)
			encodeTxDesc(valid, 0, 100, 0, []BufferDesc{{Offset: 0, Size: 512}})
			d := tc.desc(valid)
			b := w.Push(uint64(len(d)))
			copy(b, d)
			w.Flush()
			f, err := rcv.Recv(alloc)
			if !errors.Is(err, ErrViolation) || f != nil {
				t.Fatalf("Recv = %d bytes, %v; want a violation", len(f), err)
			}
		})
	}
}

// TestHostileRingHeaders corrupts ring slot headers directly.
func TestHostileRingHeaders(t *testing.T) {
	for _, tc := range []struct {
		name   string
		header uint64
	}{
		{"huge slot", 0xffff_fff0},
		{"slot to ring end plus one", 8<<10 - 8 + 1},
		{"wrap not at start", 8<<10 - 16},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := NewPair(smallSizes())
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { p.Close() })
			rcv, err := NewReceiver(p.TX, 9000, MapOptions{RequireSeals: true})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(rcv.Close)
			peer := peerView(t, p.TX)
			var r ring
			r.init(peer.txPipe)
			r.store(0, tc.header)
			if f, err := rcv.Recv(alloc); !errors.Is(err, ErrViolation) {
				t.Fatalf("Recv = %d bytes, %v; want a violation", len(f), err)
			}
		})
	}
}

// TestHostilePostedBuffers makes a client post buffers outside its data
// region, empty ones and too small ones.
func TestHostilePostedBuffers(t *testing.T) {
	s := smallSizes()
	for _, tc := range []struct {
		name  string
		bufs  []BufferDesc
		frame int
	}{
		{"outside data", []BufferDesc{{Offset: s.DataSize - 100, Size: 512}}, 200},
		{"wrapping offset", []BufferDesc{{Offset: ^uint64(0) - 100, Size: 512}}, 200},
		{"empty buffer", []BufferDesc{{Offset: 0, Size: 0}}, 200},
		{"too many tiny buffers", tiny(MaxBuffersPerFrame + 1), 2000},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := NewPair(s)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { p.Close() })
			fil, err := NewFiller(p.RX, MapOptions{RequireSeals: true})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(fil.Close)
			peer := peerView(t, p.RX)
			var w PipeWriter
			w.Init(peer.txPipe)
			for _, b := range tc.bufs {
				encodePosted(w.Push(postedBufferSize), b)
			}
			w.Flush()
			frame := make([]byte, tc.frame)
			if ok, err := fil.Send([][]byte{frame}, len(frame)); !errors.Is(err, ErrViolation) {
				t.Fatalf("Filler.Send = %v, %v; want a violation", ok, err)
			}
		})
	}
}

func tiny(n int) []BufferDesc {
	out := make([]BufferDesc, n)
	for i := range out {
		out[i] = BufferDesc{Offset: uint64(i) * 16, Size: 16}
	}
	return out
}
