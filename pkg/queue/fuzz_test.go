package queue

import (
	"errors"
	"testing"
)

// fuzzSizes are small so that a fuzz input can cover whole rings.
var fuzzSizes = Sizes{DataSize: 16 << 10, PipeSize: 4 << 10, BufferSize: 256}

// FuzzServer lets a hostile client write arbitrary bytes into the rings and
// the data region of both queues while the server's Receiver and Filler run.
// The server must never panic or index outside the pair (Go's bounds checks
// would panic), and every error must be a reported violation, after which
// the server stops touching the queue.
//
// txRing and postedRing are copied over the rings the client writes; ops
// drives the server and further overwrites bytes of the rings.
func FuzzServer(f *testing.F) {
	for _, seed := range fuzzSeeds(f) {
		f.Add(seed.txRing, seed.postedRing, seed.ops)
	}
	f.Fuzz(func(t *testing.T, txRing, postedRing, ops []byte) {
		p, err := NewPair(fuzzSizes)
		if err != nil {
			t.Fatal(err)
		}
		defer p.Close()
		strict := MapOptions{RequireSeals: true}
		rcv, err := NewReceiver(p.TX, 1600, strict)
		if err != nil {
			t.Fatal(err)
		}
		defer rcv.Close()
		fil, err := NewFiller(p.RX, strict)
		if err != nil {
			t.Fatal(err)
		}
		defer fil.Close()
		txPeer, err := mapQueue(p.TX, MapOptions{})
		if err != nil {
			t.Fatal(err)
		}
		defer txPeer.unmap()
		rxPeer, err := mapQueue(p.RX, MapOptions{})
		if err != nil {
			t.Fatal(err)
		}
		defer rxPeer.unmap()
		copy(txPeer.txPipe, txRing)
		copy(rxPeer.txPipe, postedRing)

		frame := make([]byte, 1600)
		rxDead, txDead := false, false
		check := func(err error, dead *bool) {
			if err == nil {
				return
			}
			if !errors.Is(err, ErrViolation) {
				t.Fatalf("error is not a violation: %v", err)
			}
			*dead = true
		}
		for i := 0; i+2 < len(ops); i += 3 {
			op, a, b := ops[i], ops[i+1], ops[i+2]
			switch op % 6 {
			case 0:
				if !rxDead {
					_, err := rcv.Recv(alloc)
					check(err, &rxDead)
				}
			case 1:
				// A frame held in the client's buffers past its
				// first a bytes (what a router forwards in one copy).
				if !rxDead {
					var h Held
					head := int(a)
					f, held, err := rcv.RecvHead(alloc, func(size, meta uint32) int { return head }, &h)
					check(err, &rxDead)
					if held {
						n := 0
						for _, p := range h.Rest() {
							n += len(p)
						}
						if len(f) != head || n != h.RestSize() {
							t.Fatalf("held frame: head %d of %d, rest %d bytes of %d", len(f), head, n, h.RestSize())
						}
						check(rcv.Complete(&h), &rxDead)
					}
				}
			case 2:
				if !rxDead {
					rcv.Flush()
				}
			case 3:
				if !txDead {
					n := 1 + int(a)<<3 | int(b)&7
					_, err := fil.Send([][]byte{frame[:min(n, len(frame))]}, min(n, len(frame)))
					check(err, &txDead)
					fil.Flush()
				}
			case 4:
				// The client scribbles on its TX ring.
				off := (int(a)<<8 | int(b)) % len(txPeer.txPipe)
				txPeer.txPipe[off] ^= op
			case 5:
				// ... or on its posted-buffer ring.
				off := (int(a)<<8 | int(b)) % len(rxPeer.txPipe)
				rxPeer.txPipe[off] ^= op
			}
		}
	})
}

type fuzzSeed struct{ txRing, postedRing, ops []byte }

// fuzzSeeds builds ring images written by real clients: frames of the sizes
// the unit tests use, one and several buffers, with and without wrapping.
func fuzzSeeds(t testing.TB) []fuzzSeed {
	var seeds []fuzzSeed
	for _, sizes := range [][]int{{100}, {60, 1500, 300}, {1600, 1600, 1600, 1600}, {64, 64, 64, 64, 64, 64, 64, 64}} {
		p, err := NewPair(fuzzSizes)
		if err != nil {
			t.Fatal(err)
		}
		snd, err := NewSender(p.TX, fuzzSizes.BufferSize, MapOptions{})
		if err != nil {
			t.Fatal(err)
		}
		pst, err := NewPoster(p.RX, fuzzSizes.BufferSize, 1600, MapOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range sizes {
			snd.Send([][]byte{make([]byte, n)}, n)
		}
		snd.Flush()
		ops := []byte{0, 0, 0, 0, 0, 0, 2, 0, 0, 3, 1, 0, 3, 200, 7, 0, 0, 0, 2, 0, 0}
		seeds = append(seeds, fuzzSeed{
			txRing:     append([]byte(nil), snd.m.txPipe...),
			postedRing: append([]byte(nil), pst.m.txPipe...),
			ops:        ops,
		})
		snd.Close()
		pst.Close()
		p.Close()
	}
	return seeds
}
