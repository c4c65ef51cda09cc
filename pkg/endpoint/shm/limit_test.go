package shm

import (
	"encoding/binary"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/shm-cni/shm-cni/pkg/endpoint"
	"github.com/shm-cni/shm-cni/pkg/queue"
)

// TestNewServerRefusesBadLimit checks that NewServer validates its
// receive limit (endpoint.RxLimit.Validate).
func TestNewServerRefusesBadLimit(t *testing.T) {
	p, err := queue.NewPair(queue.DefaultSizes())
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if _, err := NewServer(Options{Pair: p, MTU: 1500, PeerFD: -1, RxLimit: endpoint.RxLimit{PacketsPerSecond: -5}}); err == nil {
		t.Error("NewServer took a negative limit")
	}
}

// ipPackets returns n minimal IPv4-looking packets of size bytes.
func ipPackets(n, size int) stack.PacketBufferList {
	var l stack.PacketBufferList
	for range n {
		b := make([]byte, size)
		b[0] = 0x45
		l.PushBack(stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(b)}))
	}
	return l
}

// limitedPair makes a queue pair and its endpoints, the server with lim,
// both stopped at the end of t.
func limitedPair(t *testing.T, lim endpoint.RxLimit) (*Server, *Client) {
	return pairWith(t, queue.DefaultSizes(), Options{MTU: 1500, RxLimit: lim})
}

// pairWith makes a queue pair of sizes, a server on it with srvOpts (its
// Pair and PeerFD set here) and a client of the server's MTU, both stopped
// at the end of t.
func pairWith(t *testing.T, sizes queue.Sizes, srvOpts Options) (*Server, *Client) {
	t.Helper()
	p, err := queue.NewPair(sizes)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	srvOpts.Pair, srvOpts.PeerFD = p, -1
	srv, err := NewServer(srvOpts)
	if err != nil {
		t.Fatal(err)
	}
	cli, err := NewClient(Options{Pair: p, MTU: srvOpts.MTU, BufferSize: sizes.BufferSize, PeerFD: -1})
	if err != nil {
		srv.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		srv.Close()
		cli.Close()
		srv.Wait()
		cli.Wait()
	})
	return srv, cli
}

// floodFor writes batches of frames of size bytes from cli until d after
// start and returns how many the client took.
func floodFor(cli *Client, size int, start time.Time, d time.Duration) int {
	sent := 0
	for time.Since(start) < d {
		pkts := ipPackets(rxBatch, size)
		n, _ := cli.WritePackets(pkts)
		pkts.Reset()
		sent += n
	}
	return sent
}

// TestRxLimitBoundsSandbox floods a server endpoint with a receive limit
// from its client and checks that the server took no more than the token
// bucket allows for the time that passed (an upper bound: a slow machine
// only delivers less), that it paused for the limit, and that the client
// met back-pressure instead of the server spending on every frame.
func TestRxLimitBoundsSandbox(t *testing.T) {
	const pps = 2000
	srv, cli := limitedPair(t, endpoint.RxLimit{PacketsPerSecond: pps})
	var got counter
	start := time.Now()
	srv.Attach(&got)
	cli.Attach(discard{})
	sent := floodFor(cli, 100, start, 500*time.Millisecond)
	// Whatever the server still takes after this is within the bound too.
	time.Sleep(100 * time.Millisecond)
	delivered := got.n.Load()
	elapsed := time.Since(start)
	// The bucket starts full (a burst: one batch here) and the receive
	// loop charges a batch after delivering it: at most one batch more.
	bound := int64(pps*elapsed.Seconds()) + 2*rxBatch
	st := srv.Stats().Snapshot()
	cst := cli.Stats().Snapshot()
	t.Logf("client wrote %d frames (%d waited for room, %d dropped on its side), server delivered %d in %v (bound %d), paused %d times",
		sent, cst.TxWaits, cst.TxDrops, delivered, elapsed.Round(time.Millisecond), bound, st.RxThrottled)
	if delivered == 0 {
		t.Fatal("nothing delivered")
	}
	if delivered > bound+bound/100+2 { // 1% and 2 frames for rounding
		t.Errorf("server delivered %d frames in %v, above the limit's %d", delivered, elapsed, bound)
	}
	if st.RxThrottled == 0 {
		t.Error("the server never paused for its limit")
	}
	// Back-pressure: the client's writer found its ring full and waited
	// (or, past its wait, dropped).
	if cst.TxWaits == 0 && cst.TxDrops == 0 {
		t.Error("the flooding client met no back-pressure")
	}
}

// TestRxLimitByteRate checks the byte rate alone the same way.
func TestRxLimitByteRate(t *testing.T) {
	const bps = 2 << 20
	const size = 1400
	srv, cli := limitedPair(t, endpoint.RxLimit{BytesPerSecond: bps})
	var got counter
	start := time.Now()
	srv.Attach(&got)
	cli.Attach(discard{})
	floodFor(cli, size, start, 500*time.Millisecond)
	time.Sleep(100 * time.Millisecond)
	bytes := srv.Stats().RxBytes.Load()
	elapsed := time.Since(start)
	// Burst: max(20 ms of the rate, a batch of the largest frames), and
	// one batch more charged after delivery.
	burst := max(int64(bps*endpoint.DefaultRxBurst.Seconds()), int64(rxBatch*1500))
	bound := int64(bps*elapsed.Seconds()) + burst + rxBatch*size
	t.Logf("server received %d bytes in %v (bound %d)", bytes, elapsed.Round(time.Millisecond), bound)
	if bytes == 0 || uint64(bound+bound/100) < bytes { // 1% for rounding
		t.Errorf("server received %d bytes in %v, want 1..%d", bytes, elapsed, bound)
	}
}

// TestRxLimitStopWhilePaused checks that Close and Wait end a receive loop
// that a flood keeps pausing for its limit, and release the link.
func TestRxLimitStopWhilePaused(t *testing.T) {
	// The smallest rate and burst: after the first batch, every batch of
	// the flood puts the loop to sleep.
	srv, cli := limitedPair(t, endpoint.RxLimit{PacketsPerSecond: endpoint.MinRxPacketsPerSecond, Burst: time.Millisecond})
	var got counter
	srv.Attach(&got)
	cli.Attach(discard{})
	floodFor(cli, 100, time.Now(), 200*time.Millisecond)
	waitFor(t, "the server to pause", func() bool { return srv.Stats().RxThrottled.Load() > 0 })
	closeWithin(t, srv, "while the receive loop was paused")
}

// closeWithin closes srv and waits for it, failing if that hangs (a
// minute: a hang guard, not a timing).
func closeWithin(t *testing.T, srv *Server, what string) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		srv.Close()
		srv.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(time.Minute):
		t.Fatalf("Close and Wait did not return %s", what)
	}
}

// TestClientWaitsThenDrops writes from a client whose server never takes a
// frame (a stuck agent): once the TX ring is full, the writer waits for room
// (TxWaits) and, past its wait, drops (TxDrops) and returns instead of
// blocking the sandbox's stack.
func TestClientWaitsThenDrops(t *testing.T) {
	srv, cli := newLinkPair(t, 1500, queue.Sizes{DataSize: 64 << 10, PipeSize: 16 << 10, BufferSize: 2048})
	defer func() {
		srv.Close()
		cli.Close()
		srv.Wait()
		cli.Wait()
	}()
	cli.Attach(discard{})
	// The ring holds 32 buffers: 100 batches fill it many times over. The
	// bound is a hang guard, not a timing.
	sent := 0
	for i := 0; i < 100 && cli.Stats().TxDrops.Load() == 0; i++ {
		pkts := ipPackets(rxBatch, 1000)
		n, _ := cli.WritePackets(pkts)
		pkts.Reset()
		sent += n
	}
	st := cli.Stats().Snapshot()
	t.Logf("client took %d frames: %+v", sent, st)
	if st.TxPackets == 0 || st.TxPackets > 32 {
		t.Errorf("client put %d frames on a ring of 32 buffers that nobody completes", st.TxPackets)
	}
	if st.TxWaits == 0 {
		t.Error("the writer never waited for room on a full ring")
	}
	if st.TxDrops == 0 {
		t.Error("the writer never dropped on a ring that stays full")
	}
}

// serverClientPair is a pair whose server waits up to txWait, on a ring
// of 32 buffers of 2 KiB (the client posts them all at the start).
func serverClientPair(t *testing.T, txWait time.Duration) (*Server, *Client) {
	return pairWith(t, queue.Sizes{DataSize: 64 << 10, PipeSize: 16 << 10, BufferSize: 2048}, Options{MTU: 1500, TxWait: txWait})
}

// TestServerTxWaitStuckClient: with a client that takes nothing (its
// receive loop never runs), WritePackets fills the ring and drops without
// waiting (the router's slow path); WritePacketsWaiting waits once, drops,
// and then waits no more until the client frees room: a stuck sandbox costs
// the pods writing to it one wait, not one per frame.
func TestServerTxWaitStuckClient(t *testing.T) {
	srv, cli := serverClientPair(t, 5*time.Millisecond)
	write := func(f func(stack.PacketBufferList) (int, tcpip.Error), n int) {
		pkts := ipPackets(n, 1000)
		f(pkts)
		pkts.Reset()
	}
	write(srv.WritePackets, 40)
	st := srv.Stats().Snapshot()
	if st.TxPackets != 32 || st.TxDrops != 8 || st.TxWaits != 0 {
		t.Fatalf("WritePackets of 40 frames to a ring of 32 free buffers: %d sent, %d dropped, %d waited; want 32, 8, 0", st.TxPackets, st.TxDrops, st.TxWaits)
	}
	write(srv.WritePacketsWaiting, 1)
	write(srv.WritePacketsWaiting, 5)
	write(srv.WritePacketsWaiting, 1)
	st = srv.Stats().Snapshot()
	if st.TxPackets != 32 || st.TxDrops != 15 || st.TxWaits != 1 {
		t.Errorf("7 waiting writes to the full ring: %d sent, %d dropped, %d waited; want 32, 15, 1 (one wait, then none)", st.TxPackets, st.TxDrops, st.TxWaits)
	}
	// The client comes back: it takes its 32 frames and posts the
	// buffers again, and frames go once more.
	got := &counter{}
	cli.Attach(got)
	waitFor(t, "the client to receive 32 frames", func() bool { return got.n.Load() >= 32 })
	waitFor(t, "a frame to go once more", func() bool {
		write(srv.WritePacketsWaiting, 1)
		return srv.Stats().TxPackets.Load() > 32
	})
	if st := srv.Stats().Snapshot(); st.TxPackets != 33 {
		t.Errorf("after the client took its frames: %d sent, want 33", st.TxPackets)
	}
}

// TestServerTxWaitDrainingClient: WritePacketsWaiting of more frames than
// the ring holds, to a client that takes them, waits for room and drops
// nothing.
func TestServerTxWaitDrainingClient(t *testing.T) {
	// The wait is a hang guard, never reached: the client drains.
	srv, cli := serverClientPair(t, time.Minute)
	got := &counter{}
	cli.Attach(got)
	pkts := ipPackets(200, 1000)
	srv.WritePacketsWaiting(pkts)
	pkts.Reset()
	st := srv.Stats().Snapshot()
	if st.TxPackets != 200 || st.TxDrops != 0 || st.TxWaits == 0 {
		t.Errorf("200 frames through a ring of 32 buffers: %d sent, %d dropped, %d waited; want 200, 0 and some waits", st.TxPackets, st.TxDrops, st.TxWaits)
	}
	waitFor(t, "the client to receive 200 frames", func() bool { return got.n.Load() >= 200 })
	if n := got.n.Load(); n != 200 {
		t.Errorf("the client received %d frames, want 200", n)
	}
}

// waitingWriter starts a WritePacketsWaiting of one frame to srv, whose
// client's ring is full, and returns once it waits; the channel is closed
// when it returns.
func waitingWriter(t *testing.T, srv *Server) <-chan struct{} {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		pkts := ipPackets(1, 1000)
		srv.WritePacketsWaiting(pkts)
		pkts.Reset()
	}()
	waitFor(t, "the writer to wait", func() bool { return srv.Stats().TxWaits.Load() > 0 })
	return done
}

// TestServerTxWaitLetsOthersThrough: while a pod's frame waits for room in
// a sandbox's full ring, the link's other writers (the uplink's, the
// router's slow path: WritePackets) are not held up behind it: they drop at
// once. The waiter then sends once the client frees room. (With the link's
// transmit lock held through the wait, the other writer would return only
// when the wait ran out, the waiter having dropped.)
func TestServerTxWaitLetsOthersThrough(t *testing.T) {
	// The wait is a hang guard: the test ends it by draining the client.
	srv, cli := serverClientPair(t, 10*time.Second)
	pkts := ipPackets(32, 1000)
	srv.WritePackets(pkts)
	pkts.Reset()
	done := waitingWriter(t, srv)
	for range 3 {
		pkts := ipPackets(2, 1000)
		srv.WritePackets(pkts)
		pkts.Reset()
	}
	select {
	case <-done:
		t.Fatal("the waiting writer returned before the other writer's frames went: it held the link through its wait")
	default:
	}
	if st := srv.Stats().Snapshot(); st.TxPackets != 32 || st.TxDrops != 6 {
		t.Fatalf("3 writes of 2 frames beside a waiting writer: %d sent, %d dropped; want 32, 6", st.TxPackets, st.TxDrops)
	}
	got := &counter{}
	cli.Attach(got)
	<-done
	if st := srv.Stats().Snapshot(); st.TxPackets != 33 || st.TxDrops != 6 || st.TxWaits != 1 {
		t.Errorf("after the client drained: %d sent, %d dropped, %d waited; want 33, 6, 1", st.TxPackets, st.TxDrops, st.TxWaits)
	}
	waitFor(t, "the client to receive 33 frames", func() bool { return got.n.Load() >= 33 })
	if n := got.n.Load(); n != 33 {
		t.Errorf("the client received %d frames, want 33", n)
	}
}

// TestServerTxWaitClosed: a link closed while a frame waits for room ends
// the wait: the frame is dropped, nothing is written to the released ring.
// (With the link's transmit lock held through the wait, closing it would
// block until the hour-long wait ran out.)
func TestServerTxWaitClosed(t *testing.T) {
	srv, _ := serverClientPair(t, time.Hour)
	pkts := ipPackets(32, 1000)
	srv.WritePackets(pkts)
	pkts.Reset()
	done := waitingWriter(t, srv)
	closeWithin(t, srv, "while a writer waited for room")
	select {
	case <-done:
	case <-time.After(time.Minute): // a hang guard
		t.Fatal("the waiting writer went on waiting on a closed link")
	}
	if st := srv.Stats().Snapshot(); st.TxPackets != 32 || st.TxDrops != 1 {
		t.Errorf("a waiting frame on a closed link: %d sent, %d dropped; want 32, 1", st.TxPackets, st.TxDrops)
	}
}

// TestTxWaitWakesPeerOnce: a writer waiting for room in a full ring wakes
// its peer once, not once per try: it publishes nothing more while it
// waits. The client here writes to a server that never reads (not even its
// eventfd), so the eventfd's counter is the number of wake-ups written:
// one for the frames that filled the ring, one when the next waited, one
// at the end of that write (the frame dropped). Writing the eventfd on
// every try of the 20 ms wait made it hundreds.
func TestTxWaitWakesPeerOnce(t *testing.T) {
	sizes := queue.Sizes{DataSize: 64 << 10, PipeSize: 16 << 10, BufferSize: 2048}
	p, err := queue.NewPair(sizes)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	// The server's receive eventfd, which the client's writes wake.
	efd, err := unix.Dup(p.TX.Event)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(efd)
	cli, err := NewClient(Options{Pair: p, MTU: 1500, BufferSize: sizes.BufferSize, PeerFD: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		cli.Close()
		cli.Wait()
	}()
	for _, n := range []int{32, 1} {
		pkts := ipPackets(n, 1000)
		cli.WritePackets(pkts)
		pkts.Reset()
	}
	st := cli.Stats().Snapshot()
	if st.TxPackets != 32 || st.TxDrops != 1 || st.TxWaits != 1 {
		t.Fatalf("33 frames to a ring of 32 buffers nobody reads: %d sent, %d dropped, %d waited; want 32, 1, 1", st.TxPackets, st.TxDrops, st.TxWaits)
	}
	var b [8]byte
	if _, err := unix.Read(efd, b[:]); err != nil {
		t.Fatalf("read the eventfd: %v", err)
	}
	if n := binary.NativeEndian.Uint64(b[:]); n != 3 {
		t.Errorf("the server's eventfd was written %d times, want 3 (the full ring, the wait, the write's end)", n)
	}
}
