package queue

import (
	"bytes"
	"math/rand"
	"testing"
)

// newTestPair creates a pair of small queues and maps all four roles.
func newTestPair(t testing.TB, s Sizes, maxFrame uint32) (*Sender, *Receiver, *Filler, *Poster) {
	t.Helper()
	p, err := NewPair(s)
	if err != nil {
		t.Fatalf("NewPair: %v", err)
	}
	t.Cleanup(func() { p.Close() })
	strict := MapOptions{RequireSeals: true}
	snd, err := NewSender(p.TX, s.BufferSize, MapOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(snd.Close)
	rcv, err := NewReceiver(p.TX, maxFrame, strict)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(rcv.Close)
	fil, err := NewFiller(p.RX, strict)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(fil.Close)
	pst, err := NewPoster(p.RX, s.BufferSize, maxFrame, MapOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pst.Close)
	return snd, rcv, fil, pst
}

func alloc(n int) []byte { return make([]byte, n) }

func smallSizes() Sizes { return Sizes{DataSize: 64 << 10, PipeSize: 8 << 10, BufferSize: 512} }

// TestFramesBothDirections sends frames of random sizes, some spanning
// several buffers, both ways, with every byte checked and exact lengths (no
// padding to the buffer size).
func TestFramesBothDirections(t *testing.T) {
	const maxFrame = 9000
	snd, rcv, fil, pst := newTestPair(t, smallSizes(), maxFrame)
	rng := rand.New(rand.NewSource(1))
	for i := range 5000 {
		n := 1 + rng.Intn(maxFrame)
		frame := make([]byte, n)
		rng.Read(frame)
		// Split into up to three parts, as a packet buffer would be.
		a, b := rng.Intn(n+1), rng.Intn(n+1)
		a, b = min(a, b), max(a, b)
		parts := [][]byte{frame[:a], frame[a:b], frame[b:]}

		ok, err := snd.Send(parts, n)
		if err != nil || !ok {
			t.Fatalf("frame %d: Send(%d bytes) = %v, %v", i, n, ok, err)
		}
		snd.Flush()
		got, err := rcv.Recv(alloc)
		if err != nil {
			t.Fatalf("frame %d: Recv: %v", i, err)
		}
		rcv.Flush()
		if !bytes.Equal(got, frame) {
			t.Fatalf("frame %d: client->server got %d bytes, want %d (equal prefix: %v)", i, len(got), n, bytes.HasPrefix(got, frame))
		}

		ok, err = fil.Send(parts, n)
		if err != nil || !ok {
			t.Fatalf("frame %d: Filler.Send(%d bytes) = %v, %v", i, n, ok, err)
		}
		fil.Flush()
		got, err = pst.Recv(alloc)
		if err != nil {
			t.Fatalf("frame %d: Poster.Recv: %v", i, err)
		}
		pst.Flush()
		if !bytes.Equal(got, frame) {
			t.Fatalf("frame %d: server->client got %d bytes, want %d", i, len(got), n)
		}
	}
}

// TestFullQueueDrops shows that a queue whose consumer is not draining
// refuses frames instead of blocking, and takes them again once drained.
func TestFullQueueDrops(t *testing.T) {
	snd, rcv, fil, pst := newTestPair(t, smallSizes(), 1500)
	frame := [][]byte{bytes.Repeat([]byte{7}, 1000)}
	sent := 0
	for {
		ok, err := snd.Send(frame, 1000)
		if err != nil {
			t.Fatal(err)
		}
		if !ok {
			break
		}
		sent++
	}
	snd.Flush()
	if want := int(smallSizes().Buffers() / 2); sent != want {
		t.Errorf("client sent %d 1000-byte frames into 128 512-byte buffers, want %d", sent, want)
	}
	for range sent {
		if f, err := rcv.Recv(alloc); err != nil || f == nil {
			t.Fatalf("Recv = %v, %v", f, err)
		}
	}
	rcv.Flush()
	if ok, err := snd.Send(frame, 1000); !ok || err != nil {
		t.Fatalf("Send after drain = %v, %v, want true", ok, err)
	}

	filled := 0
	for {
		ok, err := fil.Send(frame, 1000)
		if err != nil {
			t.Fatal(err)
		}
		if !ok {
			break
		}
		filled++
	}
	fil.Flush()
	if filled == 0 {
		t.Fatal("server filled no frame")
	}
	for range filled {
		if f, err := pst.Recv(alloc); err != nil || len(f) != 1000 {
			t.Fatalf("Poster.Recv = %d bytes, %v", len(f), err)
		}
	}
	pst.Flush()
	if ok, err := fil.Send(frame, 1000); !ok || err != nil {
		t.Fatalf("Filler.Send after drain = %v, %v, want true", ok, err)
	}
}

// TestSizesValidate checks that bad sizes are refused with the field named.
func TestSizesValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		s    Sizes
		want string // substring of the error; "" means valid
	}{
		{"default", DefaultSizes(), ""},
		{"small", smallSizes(), ""},
		{"zero", Sizes{}, "bufferSize"},
		{"odd buffer", Sizes{DataSize: 1 << 20, PipeSize: 64 << 10, BufferSize: 1500}, "bufferSize"},
		{"data not page aligned", Sizes{DataSize: 1<<20 + 8, PipeSize: 64 << 10, BufferSize: 2048}, "dataSize"},
		{"data not buffer multiple", Sizes{DataSize: 3 * 4096, PipeSize: 64 << 10, BufferSize: 8192}, "dataSize"},
		{"pipe too small for buffers", Sizes{DataSize: 64 << 20, PipeSize: 4096, BufferSize: 2048}, "pipeSize"},
		{"data too big", Sizes{DataSize: 2 << 30, PipeSize: 64 << 10, BufferSize: 2048}, "dataSize"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.s.Validate()
			switch {
			case tc.want == "" && err != nil:
				t.Errorf("Validate() = %v, want nil", err)
			case tc.want != "" && (err == nil || !bytes.Contains([]byte(err.Error()), []byte(tc.want))):
				t.Errorf("Validate() = %v, want an error naming %q", err, tc.want)
			}
		})
	}
}

// TestMaxMTU checks the largest MTU queue sizes carry: bounded by the
// buffers a frame may span, by the data region and by the largest IP packet.
func TestMaxMTU(t *testing.T) {
	for _, tc := range []struct {
		name string
		s    Sizes
		want uint32
	}{
		{"default", DefaultSizes(), 65535},
		{"512-byte buffers", Sizes{DataSize: 1 << 20, PipeSize: 128 << 10, BufferSize: 512}, 64*512 - 14},
		{"small data region", Sizes{DataSize: 8192, PipeSize: 4096, BufferSize: 2048}, 8192 - 14},
		{"minimal buffers", Sizes{DataSize: 4096, PipeSize: 4096, BufferSize: 64}, 4096 - 14},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.s.Validate(); err != nil {
				t.Fatalf("sizes invalid: %v", err)
			}
			if got := tc.s.MaxMTU(); got != tc.want {
				t.Errorf("MaxMTU() = %d, want %d", got, tc.want)
			}
			if err := tc.s.CheckMTU(tc.want); err != nil {
				t.Errorf("CheckMTU(%d) = %v, want nil", tc.want, err)
			}
			if tc.want < 65535 {
				if err := tc.s.CheckMTU(tc.want + 1); err == nil {
					t.Errorf("CheckMTU(%d) = nil, want an error", tc.want+1)
				}
			}
		})
	}
}

// TestLargestFrameBothDirections sends frames of exactly MaxFrame bytes of
// the default sizes (a 64 KiB IP packet with its Ethernet header spans 33
// buffers) both ways, byte for byte.
func TestLargestFrameBothDirections(t *testing.T) {
	s := DefaultSizes()
	n := int(s.MaxMTU()) + EthernetHeaderSize
	snd, rcv, fil, pst := newTestPair(t, s, uint32(n))
	rng := rand.New(rand.NewSource(2))
	for i := range 200 {
		frame := make([]byte, n)
		rng.Read(frame)
		parts := [][]byte{frame[:EthernetHeaderSize], frame[EthernetHeaderSize:]}
		if ok, err := snd.Send(parts, n); !ok || err != nil {
			t.Fatalf("frame %d: Send = %v, %v", i, ok, err)
		}
		snd.Flush()
		got, err := rcv.Recv(alloc)
		rcv.Flush()
		if err != nil || !bytes.Equal(got, frame) {
			t.Fatalf("frame %d: client->server: %d bytes, err %v; want %d equal bytes", i, len(got), err, n)
		}
		if ok, err := fil.Send(parts, n); !ok || err != nil {
			t.Fatalf("frame %d: Filler.Send = %v, %v", i, ok, err)
		}
		fil.Flush()
		got, err = pst.Recv(alloc)
		pst.Flush()
		if err != nil || !bytes.Equal(got, frame) {
			t.Fatalf("frame %d: server->client: %d bytes, err %v; want %d equal bytes", i, len(got), err, n)
		}
	}
}

// TestFDOrder checks the wire order and its inverse.
func TestFDOrder(t *testing.T) {
	p := Pair{TX: QueueFDs{1, 2, 3, 4, 5}, RX: QueueFDs{6, 7, 8, 9, 10}}
	fds := p.FDs()
	for i, fd := range fds {
		if fd != i+1 {
			t.Fatalf("FDs() = %v, want 1..10", fds)
		}
	}
	back, err := PairFrom(fds)
	if err != nil || back != p {
		t.Fatalf("PairFrom(FDs()) = %v, %v, want %v", back, err, p)
	}
	if _, err := PairFrom(fds[:9]); err == nil {
		t.Fatal("PairFrom(9 fds) succeeded")
	}
}

// TestUnsealedRegionRefused shows a server refuses memory the peer could
// shrink under its mapping.
func TestUnsealedRegionRefused(t *testing.T) {
	p, err := NewPair(smallSizes())
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	fd, err := newUnsealed(int64(smallSizes().DataSize))
	if err != nil {
		t.Fatal(err)
	}
	q := p.TX
	q.Data = fd
	defer closeFD(fd)
	if _, err := NewReceiver(q, 1500, MapOptions{RequireSeals: true}); err == nil {
		t.Fatal("NewReceiver accepted an unsealed data region")
	}
	if r, err := NewReceiver(q, 1500, MapOptions{}); err != nil {
		t.Fatalf("NewReceiver without RequireSeals: %v", err)
	} else {
		r.Close()
	}
}

// TestMeta carries each frame's meta word to the receiving side, in the TX
// descriptor (client to server) and in the RX completion's reserved word
// (server to client), and zero for a frame sent without one (gVisor's
// format).
func TestMeta(t *testing.T) {
	snd, rcv, fill, post := newTestPair(t, smallSizes(), 2000)
	for _, dir := range []struct {
		name string
		send func(parts [][]byte, total int) (bool, error)
		meta func(parts [][]byte, total int, meta uint32) (bool, error)
		pub  func() bool
		recv func(func(int) []byte) ([]byte, error)
		got  func() uint32
		done func()
	}{
		{"TX", snd.Send, snd.SendMeta, snd.Flush, rcv.Recv, rcv.Meta, rcv.Flush},
		{"RX", fill.Send, fill.SendMeta, fill.Flush, post.Recv, post.Meta, post.Flush},
	} {
		for i, meta := range []uint32{0, 1, 0x8001_05a8, 0xffff_ffff, 0} {
			frame := bytes.Repeat([]byte{byte(i + 1)}, 300*(i+1))
			var ok bool
			var err error
			if meta == 0 && i == 0 {
				ok, err = dir.send([][]byte{frame}, len(frame))
			} else {
				ok, err = dir.meta([][]byte{frame}, len(frame), meta)
			}
			if !ok || err != nil {
				t.Fatalf("%s frame %d: send = %v, %v", dir.name, i, ok, err)
			}
			dir.pub()
			got, err := dir.recv(alloc)
			if err != nil || !bytes.Equal(got, frame) {
				t.Fatalf("%s frame %d: Recv = %d bytes, %v", dir.name, i, len(got), err)
			}
			if m := dir.got(); m != meta {
				t.Errorf("%s frame %d: meta %#x, want %#x", dir.name, i, m, meta)
			}
			dir.done()
		}
	}
}

// TestRecvHead holds frames in the client's buffers: the head copied out and
// the rest in place make the frame, across buffer boundaries; the buffers
// come back to the client only with Complete, in any order; frames hold
// declines are copied whole and completed at once.
func TestRecvHead(t *testing.T) {
	s := smallSizes() // 512-byte buffers, 128 of them
	snd, rcv, _, _ := newTestPair(t, s, 16<<10)
	frame := func(i, n int) []byte {
		f := make([]byte, n)
		for j := range f {
			f[j] = byte(i*7 + j*13)
		}
		return f
	}
	sizes := []int{100, 3000, 512, 513, 9000}
	for i, n := range sizes {
		if ok, err := snd.SendMeta([][]byte{frame(i, n)}, n, uint32(i+1)); !ok || err != nil {
			t.Fatalf("send %d: %v, %v", i, ok, err)
		}
	}
	snd.Flush()
	const head = 300
	hold := func(size, meta uint32) int {
		if meta%2 == 0 { // frames 1 and 3: whole
			return 0
		}
		return head
	}
	helds := make([]*Held, len(sizes))
	for i, n := range sizes {
		h := &Held{}
		got, held, err := rcv.RecvHead(alloc, hold, h)
		if err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}
		want := frame(i, n)
		if wantHeld := i%2 == 0 && n > head; held != wantHeld {
			t.Fatalf("frame %d of %d bytes: held %v, want %v", i, n, held, wantHeld)
		}
		if !held {
			if !bytes.Equal(got, want) {
				t.Fatalf("frame %d copied whole: differs", i)
			}
			continue
		}
		whole := append([]byte(nil), got...)
		for _, p := range h.Rest() {
			whole = append(whole, p...)
		}
		if len(got) != head || h.RestSize() != n-head || !bytes.Equal(whole, want) {
			t.Fatalf("frame %d: head %d + rest %d bytes, equal %v", i, len(got), h.RestSize(), bytes.Equal(whole, want))
		}
		helds[i] = h
	}
	rcv.Flush()
	// Only the frames copied whole are back (0, 1 and 3): frames 2 and 4
	// hold 1 + 18 buffers of 128.
	if err := snd.reclaim(); err != nil {
		t.Fatal(err)
	}
	if want := 128 - 1 - 18; snd.nFree != want {
		t.Fatalf("client has %d free buffers before Complete, want %d", snd.nFree, want)
	}
	for _, i := range []int{4, 2} {
		if err := rcv.Complete(helds[i]); err != nil {
			t.Fatal(err)
		}
	}
	rcv.Flush()
	if err := snd.reclaim(); err != nil {
		t.Fatal(err)
	}
	if snd.nFree != 128 {
		t.Fatalf("client has %d free buffers after Complete, want 128", snd.nFree)
	}
}

// fillUntilFull sends one-buffer frames from fil until the client's posted
// buffers run out and returns how many it sent.
func fillUntilFull(t *testing.T, fil *Filler) int {
	t.Helper()
	frame := [][]byte{make([]byte, 100)}
	for n := 0; ; n++ {
		ok, err := fil.Send(frame, 100)
		if err != nil {
			t.Fatal(err)
		}
		if !ok {
			fil.Flush()
			return n
		}
	}
}

// TestPosterWindow: a Poster posts the first postWindow buffers of its
// region, not all of it; a link that takes one frame at a time recycles
// those and never touches another buffer; one whose server fills the
// window between two of its Flushes doubles it, up to the whole region.
func TestPosterWindow(t *testing.T) {
	s := DefaultSizes() // 2048 buffers of 2 KiB
	_, _, fil, pst := newTestPair(t, s, 1514)
	highest := uint64(0)
	oneAtATime(t, 10*postWindow, 100, fil, pst, func() {
		for _, b := range pst.d.Buffers {
			highest = max(highest, b.ID)
		}
	})
	if highest != postWindow-1 {
		t.Errorf("%d frames one at a time used buffers up to %d, want up to %d (the window, recycled)", 10*postWindow, highest, postWindow-1)
	}
	// The server fills the window; the client takes it all: it doubles.
	want := postWindow
	for range 5 {
		if n := fillUntilFull(t, fil); n != want {
			t.Fatalf("the server filled %d buffers, want %d", n, want)
		}
		for {
			got, err := pst.Recv(alloc)
			if err != nil {
				t.Fatal(err)
			}
			if got == nil {
				break
			}
		}
		pst.Flush()
		want = min(2*want, int(s.Buffers()))
	}
}

// TestSenderReusesFreedBuffers checks that a client sending one frame at a
// time, each completed before the next, keeps to the buffers it freed last
// instead of cycling through the data region.
func TestSenderReusesFreedBuffers(t *testing.T) {
	s := DefaultSizes() // 2048 buffers of 2 KiB
	snd, rcv, _, _ := newTestPair(t, s, 9000)
	used := map[uint64]bool{}
	oneAtATime(t, 4*int(s.Buffers()), 5000, snd, rcv, func() { // three buffers a frame
		for _, b := range rcv.d.Buffers {
			used[b.Offset] = true
		}
	})
	// Frames take buffers until reclaimWindow are in use; then the
	// completed ones are freed and used again, the last freed first.
	if want := reclaimWindow + 3; len(used) > want {
		t.Errorf("%d frames of three buffers, each completed before the next, used %d buffers, want at most %d", 4*s.Buffers(), len(used), want)
	}
}

// frameSender and frameReceiver are the two ends of a queue, either one.
type frameSender interface {
	Send(parts [][]byte, total int) (bool, error)
	Flush() bool
}

type frameReceiver interface {
	Recv(alloc func(n int) []byte) ([]byte, error)
	Flush()
}

// oneAtATime passes n frames of size bytes from w to r, each received and
// flushed back before the next is sent, and calls seen after each receive.
func oneAtATime(t *testing.T, n, size int, w frameSender, r frameReceiver, seen func()) {
	t.Helper()
	frame := [][]byte{make([]byte, size)}
	for i := range n {
		if ok, err := w.Send(frame, size); err != nil || !ok {
			t.Fatalf("frame %d: Send = %v, %v", i, ok, err)
		}
		w.Flush()
		if got, err := r.Recv(alloc); err != nil || got == nil {
			t.Fatalf("frame %d: Recv = %v, %v", i, got, err)
		}
		seen()
		r.Flush()
	}
}
