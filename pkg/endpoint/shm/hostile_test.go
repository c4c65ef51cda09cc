package shm

import (
	"encoding/binary"
	"errors"
	"testing"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/shm-cni/shm-cni/pkg/endpoint/internal/frametest"
	"github.com/shm-cni/shm-cni/pkg/queue"
)

// hostileSizes are small so that fuzz inputs cover whole rings.
var hostileSizes = queue.Sizes{DataSize: 16 << 10, PipeSize: 4 << 10, BufferSize: 256}

// runHostile attaches a server to a dispatcher, lets a hostile client write
// txRing, postedRing and data into its shared pages (in chunks, waking the
// server between them) while the server also transmits, then closes it. It
// returns the server's violation count and the reason it stopped, if it did.
func runHostile(t testing.TB, txRing, postedRing, data []byte, expectViolation bool) (uint64, error) {
	return runHostileWith(t, txRing, postedRing, data, expectViolation, false)
}

// runHostileWith is runHostile; with offload, the server is the agent's
// kind: forwarding (segments joined, coalesce.go) and offered TCP
// segmentation offload (tso.go), so that the meta words count.
func runHostileWith(t testing.TB, txRing, postedRing, data []byte, expectViolation, offload bool) (uint64, error) {
	p, err := queue.NewPair(hostileSizes)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	reason := make(chan error, 1)
	srv, err := NewServer(Options{Pair: p, MTU: 1500, PeerFD: -1, Forwarding: offload, TxGSO: offload,
		OnClosed: func(err error) { reason <- err }})
	if err != nil {
		t.Fatal(err)
	}
	srv.Attach(discard{})
	txData, txPipe, _, _, unmapTX, err := queue.PeerView(p.TX)
	if err != nil {
		t.Fatal(err)
	}
	defer unmapTX()
	_, rxPosted, _, _, unmapRX, err := queue.PeerView(p.RX)
	if err != nil {
		t.Fatal(err)
	}
	defer unmapRX()
	copy(txData, data)
	txRing = txRing[:min(len(txRing), len(txPipe))]
	postedRing = postedRing[:min(len(postedRing), len(rxPosted))]
	one := []byte{1, 0, 0, 0, 0, 0, 0, 0}
	for off := 0; off < max(len(txRing), len(postedRing)); off += 512 {
		if off < len(txRing) {
			copy(txPipe[off:], txRing[off:min(off+512, len(txRing))])
		}
		if off < len(postedRing) {
			copy(rxPosted[off:], postedRing[off:min(off+512, len(postedRing))])
		}
		unix.Write(p.TX.Event, one)
		srv.WritePackets(testPackets(3, 200))
	}
	unix.Write(p.TX.Event, one)
	srv.WritePackets(testPackets(3, 1500))
	if expectViolation {
		waitFor(t, "the violation to be counted", func() bool { return srv.Stats().Violations.Load() > 0 })
	}
	srv.Close()
	srv.Wait()
	select {
	case err := <-reason:
		return srv.Stats().Violations.Load(), err
	default:
		return srv.Stats().Violations.Load(), nil
	}
}

// testPackets returns n IPv4-sized packets of size bytes.
func testPackets(n, size int) stack.PacketBufferList {
	var l stack.PacketBufferList
	for range n {
		l.PushBack(stack.NewPacketBuffer(stack.PacketBufferOptions{
			Payload: buffer.MakeWithData(make([]byte, size)),
		}))
	}
	return l
}

// FuzzHostileClient lets arbitrary bytes into a running server's rings and
// data region. The server must not crash or touch memory outside the pair
// (Go's bounds checks would panic), and a violation must be counted and must
// stop the link with a reason wrapping queue.ErrViolation.
func FuzzHostileClient(f *testing.F) {
	fuzzHostile(f, false)
}

// FuzzHostileOffloadClient is FuzzHostileClient against a server of the
// agent's kind (runHostileWith's offload).
func FuzzHostileOffloadClient(f *testing.F) {
	fuzzHostile(f, true)
}

func fuzzHostile(f *testing.F, offload bool) {
	for _, s := range hostileSeeds(f) {
		f.Add(s[0], s[1], s[2])
	}
	if offload {
		// A TCP super-packet at offset 0, flagged with MSS 500.
		frame, _ := frametest.TCPFrame{Flags: header.TCPFlagAck, Seq: 1, Payload: frametest.RandomBytes(1400)}.Build()
		ring := make([]byte, 64)
		binary.LittleEndian.PutUint64(ring[0:], 28) // slot header: 28 bytes, not free
		binary.LittleEndian.PutUint32(ring[16:], uint32(len(frame)))
		binary.LittleEndian.PutUint32(ring[20:], txOffloadTCP|500)
		binary.LittleEndian.PutUint32(ring[32:], uint32(len(frame)))
		binary.LittleEndian.PutUint64(ring[40:], 1<<63) // the next slot is free
		f.Add(ring, []byte(nil), frame)
	}
	f.Fuzz(func(t *testing.T, txRing, postedRing, data []byte) {
		v, reason := runHostileWith(t, txRing, postedRing, data, false, offload)
		// The receive loop and a writer may each catch one violation
		// at once; after that the link is cut off.
		if v > 2 {
			t.Fatalf("%d violations counted; a link is cut off at the first", v)
		}
		// A violation found while the test's own Close is under way
		// stops nothing: the link is already stopping, for no reason.
		if reason != nil && v == 0 {
			t.Fatalf("stopped for %v without a violation counted", reason)
		}
		if reason != nil && !errors.Is(reason, queue.ErrViolation) {
			t.Fatalf("stopped for %v, not a violation", reason)
		}
	})
}

// TestHostileClientCutOff writes a descriptor pointing outside the data
// region into a running server's ring: the server counts one violation,
// stops the link, reports it, and keeps its process alive.
func TestHostileClientCutOff(t *testing.T) {
	ring := make([]byte, 64)
	// Slot header: a 28-byte payload, not free.
	binary.LittleEndian.PutUint64(ring[0:], 28)
	// TX descriptor: id 0, 100 bytes, one buffer at offset 1 GiB.
	binary.LittleEndian.PutUint64(ring[8:], 0)
	binary.LittleEndian.PutUint32(ring[16:], 100)
	binary.LittleEndian.PutUint64(ring[24:], 1<<30)
	binary.LittleEndian.PutUint32(ring[32:], 256)
	binary.LittleEndian.PutUint64(ring[40:], 1<<63) // the next slot is free
	v, reason := runHostile(t, ring, nil, nil, true)
	if v != 1 || !errors.Is(reason, queue.ErrViolation) {
		t.Fatalf("violations %d, reason %v; want 1 and a violation", v, reason)
	}
}

// hostileSeeds are ring images written by a real client.
func hostileSeeds(t testing.TB) [][3][]byte {
	var seeds [][3][]byte
	for _, sizes := range [][]int{{100}, {60, 1500, 300}, {1514, 1514, 1514}} {
		p, err := queue.NewPair(hostileSizes)
		if err != nil {
			t.Fatal(err)
		}
		cli, err := NewClient(Options{Pair: p, MTU: 1500, BufferSize: hostileSizes.BufferSize, PeerFD: -1})
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range sizes {
			cli.WritePackets(testPackets(1, n))
		}
		data, txPipe, _, _, unmapTX, err := queue.PeerView(p.TX)
		if err != nil {
			t.Fatal(err)
		}
		_, posted, _, _, unmapRX, err := queue.PeerView(p.RX)
		if err != nil {
			t.Fatal(err)
		}
		seeds = append(seeds, [3][]byte{
			append([]byte(nil), txPipe...),
			append([]byte(nil), posted...),
			append([]byte(nil), data[:4096]...),
		})
		unmapTX()
		unmapRX()
		cli.Close()
		cli.Wait()
		p.Close()
	}
	return seeds
}
