package queue

import (
	"bytes"
	"math/rand"
	"testing"
)

// TestNoBufferLossUnderDrops interleaves sends that fail for lack of room
// (aborting part-way through a multi-buffer frame) with partial draining, in
// both directions, and checks that no buffer is ever lost: once drained, each
// queue again takes as many frames as when it was new.
func TestNoBufferLossUnderDrops(t *testing.T) {
	s := smallSizes()
	snd, rcv, fil, pst := newTestPair(t, s, 9000)
	rng := rand.New(rand.NewSource(3))
	capacity := func(send func([][]byte, int) (bool, error), flush func()) int {
		frame := [][]byte{make([]byte, 100)}
		n := 0
		for {
			ok, err := send(frame, 100)
			if err != nil {
				t.Fatal(err)
			}
			if !ok {
				break
			}
			n++
		}
		flush()
		return n
	}
	drain := func(recv func(func(int) []byte) ([]byte, error), flush func()) int {
		n := 0
		for {
			f, err := recv(alloc)
			if err != nil {
				t.Fatal(err)
			}
			if f == nil {
				break
			}
			n++
		}
		flush()
		return n
	}
	sndFlush := func() { snd.Flush() }
	filFlush := func() { fil.Flush() }
	want := capacity(snd.Send, sndFlush)
	if got := drain(rcv.Recv, rcv.Flush); got != want {
		t.Fatalf("TX drained %d of %d", got, want)
	}
	wantRX := capacity(fil.Send, filFlush)
	if got := drain(pst.Recv, pst.Flush); got != wantRX {
		t.Fatalf("RX drained %d of %d", got, wantRX)
	}
	for round := range 300 {
		for range rng.Intn(200) {
			n := 1 + rng.Intn(9000)
			frame := bytes.Repeat([]byte{byte(n)}, n)
			if _, err := snd.Send([][]byte{frame}, n); err != nil {
				t.Fatal(err)
			}
			if _, err := fil.Send([][]byte{frame}, n); err != nil {
				t.Fatal(err)
			}
			if rng.Intn(4) == 0 {
				snd.Flush()
				fil.Flush()
			}
		}
		snd.Flush()
		fil.Flush()
		for range rng.Intn(100) {
			f, err := rcv.Recv(alloc)
			if err != nil {
				t.Fatal(err)
			}
			if f != nil && !bytes.Equal(f, bytes.Repeat([]byte{byte(len(f))}, len(f))) {
				t.Fatalf("round %d: TX frame of %d bytes corrupted", round, len(f))
			}
			g, err := pst.Recv(alloc)
			if err != nil {
				t.Fatal(err)
			}
			if g != nil && !bytes.Equal(g, bytes.Repeat([]byte{byte(len(g))}, len(g))) {
				t.Fatalf("round %d: RX frame of %d bytes corrupted", round, len(g))
			}
			if rng.Intn(3) == 0 {
				rcv.Flush()
				pst.Flush()
			}
		}
		rcv.Flush()
		pst.Flush()
	}
	drain(rcv.Recv, rcv.Flush)
	drain(pst.Recv, pst.Flush)
	if got := capacity(snd.Send, sndFlush); got != want {
		t.Errorf("TX takes %d frames after the stress, %d when new", got, want)
	}
	drain(rcv.Recv, rcv.Flush)
	if got := capacity(fil.Send, filFlush); got != wantRX {
		t.Errorf("RX takes %d frames after the stress, %d when new", got, wantRX)
	}
}
