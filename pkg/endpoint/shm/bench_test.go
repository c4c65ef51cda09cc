package shm

import (
	"io"
	"os"
	"runtime"
	"slices"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/link/sharedmem"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/shm-cni/shm-cni/pkg/queue"
)

// Benchmarks measure shm-cni's queue and endpoints beside gVisor's own
// sharedmem endpoint in the same run; compare the sub-benchmarks' metrics as
// ratios (the machine is shared, absolute numbers drift).

// BenchmarkQueuePPS pushes frames from a client to a server in one process
// and reports delivered frames per second:
//   - raw: our Sender and Receiver alone, the consumer polling;
//   - ours: our Client.WritePackets to our Server and a counting dispatcher;
//   - gvisor: gVisor's sharedmem client to its server endpoint, the same way.
func BenchmarkQueuePPS(b *testing.B) {
	for _, size := range []int{64, 1500} {
		b.Run(sizeName(size)+"/raw", func(b *testing.B) { benchRawPPS(b, size) })
		b.Run(sizeName(size)+"/ours", func(b *testing.B) { benchEndpointPPS(b, size, ours) })
		b.Run(sizeName(size)+"/gvisor", func(b *testing.B) { benchEndpointPPS(b, size, gvisor) })
	}
}

func sizeName(n int) string {
	if n == 64 {
		return "64B"
	}
	return "1500B"
}

func benchRawPPS(b *testing.B, size int) {
	p, err := queue.NewPair(queue.DefaultSizes())
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close()
	snd, err := queue.NewSender(p.TX, queue.DefaultBufferSize, queue.MapOptions{})
	if err != nil {
		b.Fatal(err)
	}
	defer snd.Close()
	rcv, err := queue.NewReceiver(p.TX, 1514, queue.MapOptions{RequireSeals: true})
	if err != nil {
		b.Fatal(err)
	}
	defer rcv.Close()
	frame := [][]byte{make([]byte, size)}
	var got atomic.Int64
	done := make(chan struct{})
	buf := make([]byte, 2048)
	alloc := func(int) []byte { return buf }
	go func() {
		defer close(done)
		n := int64(0)
		for n < int64(b.N) {
			f, err := rcv.Recv(alloc)
			if err != nil {
				panic(err)
			}
			if f == nil {
				rcv.Flush()
				runtime.Gosched()
				continue
			}
			n++
			if n%64 == 0 {
				rcv.Flush()
			}
		}
		rcv.Flush()
		got.Store(n)
	}()
	b.ResetTimer()
	start := time.Now()
	for i := 0; i < b.N; {
		ok, err := snd.Send(frame, size)
		if err != nil {
			b.Fatal(err)
		}
		if !ok {
			snd.Flush()
			runtime.Gosched()
			continue
		}
		i++
		if i%32 == 0 {
			snd.Flush()
		}
	}
	snd.Flush()
	<-done
	reportPPS(b, got.Load(), time.Since(start))
}

// counter is a dispatcher that counts packets.
type counter struct{ n atomic.Int64 }

func (c *counter) DeliverNetworkPacket(tcpip.NetworkProtocolNumber, *stack.PacketBuffer) { c.n.Add(1) }
func (c *counter) DeliverLinkPacket(tcpip.NetworkProtocolNumber, *stack.PacketBuffer)    {}

func benchEndpointPPS(b *testing.B, size int, impl string) {
	p, err := queue.NewPair(queue.DefaultSizes())
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close()
	var cli, srv stack.LinkEndpoint
	switch impl {
	case ours:
		s, err := NewServer(Options{Pair: p, MTU: 1500, PeerFD: -1})
		if err != nil {
			b.Fatal(err)
		}
		c, err := NewClient(Options{Pair: p, MTU: 1500, PeerFD: -1})
		if err != nil {
			b.Fatal(err)
		}
		srv, cli = s, c
		defer func() { s.Close(); s.Wait(); c.Close(); c.Wait() }()
	case gvisor:
		tx, _ := sharedmem.QueueConfigFromFDs(p.TX.FDs())
		rx, _ := sharedmem.QueueConfigFromFDs(p.RX.FDs())
		opts := sharedmem.Options{MTU: 1500, BufferSize: queue.DefaultBufferSize, TX: tx, RX: rx, PeerFD: -1}
		if srv, err = sharedmem.NewServerEndpoint(opts); err != nil {
			b.Fatal(err)
		}
		// gVisor's client keeps the descriptors it was given: dup them.
		d, err := p.Dup()
		if err != nil {
			b.Fatal(err)
		}
		opts.TX, _ = sharedmem.QueueConfigFromFDs(d.TX.FDs())
		opts.RX, _ = sharedmem.QueueConfigFromFDs(d.RX.FDs())
		if cli, err = sharedmem.New(opts); err != nil {
			b.Fatal(err)
		}
		// gVisor's server never returns from Wait: close, don't wait.
		defer func() { srv.Close(); cli.Close() }()
	}
	var c counter
	srv.Attach(&c)
	cli.Attach(&counter{})
	payload := make([]byte, size)
	payload[0] = 0x45 // an IPv4 version nibble: L3 links look at it
	const batch = 32
	b.ResetTimer()
	start := time.Now()
	sent := 0
	for sent < b.N {
		var l stack.PacketBufferList
		n := min(batch, b.N-sent)
		for range n {
			l.PushBack(stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(payload)}))
		}
		w, terr := cli.WritePackets(l)
		l.Reset()
		if terr != nil {
			w = 0 // gVisor's client: ring full
		}
		sent += w
		if w < n {
			runtime.Gosched()
		}
	}
	// Wait for what was sent to be delivered (ours may have dropped some
	// after waiting for room: count what arrived).
	deadline := time.Now().Add(10 * time.Second)
	for c.n.Load() < int64(b.N) && time.Now().Before(deadline) {
		last := c.n.Load()
		time.Sleep(time.Millisecond)
		if c.n.Load() == last && last > 0 && impl == ours {
			break
		}
	}
	reportPPS(b, c.n.Load(), time.Since(start))
}

func reportPPS(b *testing.B, n int64, d time.Duration) {
	b.StopTimer()
	b.ReportMetric(float64(n)/d.Seconds()/1e6, "Mpps")
	b.ReportMetric(0, "ns/op")
}

// BenchmarkTCPThroughput measures one TCP stream between gVisor stacks in
// two processes, sandbox to agent (up) and agent to sandbox (down), over our
// endpoints and over gVisor's, at MTU 1500 and 65000.
func BenchmarkTCPThroughput(b *testing.B) {
	for _, mtu := range []uint32{1500, 65000} {
		sizes := queue.DefaultSizes()
		if s := os.Getenv("SHM_DATA"); s != "" {
			sizes.DataSize, _ = strconv.ParseUint(s, 10, 64)
			sizes.PipeSize = sizes.DataSize / 16
		}
		if mtu > 9000 {
			sizes = largeSizes
		}
		for _, impl := range []string{ours, gvisor} {
			for _, dir := range []string{"up", "down"} {
				b.Run(mtuName(mtu)+"/"+dir+"/"+impl, func(b *testing.B) {
					benchThroughput(b, impl, dir, mtu, sizes)
				})
			}
		}
	}
}

func mtuName(m uint32) string {
	if m == 1500 {
		return "mtu1500"
	}
	return "mtu65000"
}

func benchThroughput(b *testing.B, impl, dir string, mtu uint32, sizes queue.Sizes) {
	const chunk = 1 << 20
	n := int64(b.N) * chunk
	mode := modeSink
	if dir == "up" {
		mode = modeSource
	}
	tp := startTwoProcess(b, impl, peerConfig{Impl: impl, Mode: mode, MTU: mtu, Bytes: n}, sizes)
	b.SetBytes(chunk)
	b.ResetTimer()
	start := time.Now()
	var err error
	if dir == "up" {
		err = checkPattern(tp.Conn, n, 2)
	} else {
		err = sendPattern(tp.Conn, n, 1)
		if err == nil {
			tp.Conn.(interface{ CloseWrite() error }).CloseWrite()
			_, err = io.Copy(io.Discard, tp.Conn) // until the child is done
		}
	}
	d := time.Since(start)
	b.StopTimer()
	if err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(n)*8/d.Seconds()/1e9, "Gbit/s")
	if s, ok := tp.Link.(*Server); ok {
		st := s.Stats().Snapshot()
		b.ReportMetric(float64(st.TxDrops), "txdrops")
	}
	if err := tp.wait(); err != nil {
		b.Fatalf("child: %v", err)
	}
}

// BenchmarkRTT measures 64-byte TCP request/response round trips between
// gVisor stacks in two processes over our endpoints and over gVisor's, and
// reports the median and 99th percentile.
func BenchmarkRTT(b *testing.B) {
	for _, impl := range []string{ours, gvisor} {
		b.Run(impl, func(b *testing.B) {
			tp := startTwoProcess(b, impl, peerConfig{Impl: impl, Mode: modeEcho, MTU: 1500}, queue.DefaultSizes())
			msg := make([]byte, 64)
			rtts := make([]time.Duration, 0, b.N)
			// Warm up the connection.
			for range 100 {
				tp.Conn.Write(msg)
				io.ReadFull(tp.Conn, msg)
			}
			b.ResetTimer()
			for range b.N {
				start := time.Now()
				if _, err := tp.Conn.Write(msg); err != nil {
					b.Fatal(err)
				}
				if _, err := io.ReadFull(tp.Conn, msg); err != nil {
					b.Fatal(err)
				}
				rtts = append(rtts, time.Since(start))
			}
			b.StopTimer()
			slices.Sort(rtts)
			b.ReportMetric(float64(rtts[len(rtts)/2].Microseconds()), "p50-us")
			b.ReportMetric(float64(rtts[len(rtts)*99/100].Microseconds()), "p99-us")
			tp.wait()
		})
	}
}
