package router

import (
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/nested"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/shm-cni/shm-cni/pkg/linkspec"
)

// Per-pod bandwidth (the CNI bandwidth capability, Link.Bandwidth).
//
// A limited link's endpoint is wrapped in a bandwidthEndpoint, beneath the
// anti-spoofing filter: every IP packet the pod sends (egress) and every
// IP packet written to the pod (ingress: from other pods on either
// forwarding path, from the host and beyond, the router's own ICMP and
// NDP) meets the direction's shaper, which works as the tbf qdisc the
// reference bandwidth plugin installs: a token bucket that fills at the
// rate and holds the burst, and behind it a short queue.
//
//   - A packet the bucket covers passes at once.
//   - Otherwise it is held in the queue, in order, and sent (egress: handed
//     to the router; ingress: written to the pod) as soon as the bucket
//     covers it, by a goroutine of the shaper's own (started at the first
//     packet held, stopped by Close). TCP then meets the limit as added
//     delay, not loss, and runs close to the rate.
//   - A packet that would make the queue hold more than queueLimit bytes
//     is dropped and counted, as tbf drops beyond its limit.
//
// The queue holds what tbf's does, 25 ms at the rate (latency 25 ms in the
// reference plugin) plus the burst, but at least two of the largest
// packets and at most maxQueueBytes, so that a pod's limit costs the agent
// little memory however its burst is set (Kubernetes runtimes give every
// annotated pod a burst of 512 MiB or 4 GiB, which the bucket honours but
// no queue of the agent's should hold).
//
// Sizes are IP packet sizes (network header and payload, no link header).
// A TCP super-packet (a kernel pod's GSO frame, a sandbox's 64 KiB segment,
// the receive offload's joined segments) is one packet of its full size:
// it waits for tokens covering all of it and is never cut to fit. It
// counts its one set of headers, not those of the segments the receiving
// kernel or the host cuts it into: a bulk TCP stream's payload runs at
// about the rate (a tc limit on a veth counts every segment's headers, 3%
// at MTU 1500). So that
// the largest packet can always pass, the bucket holds at least
// minBucketBytes whatever the configured burst. ARP is neither charged nor
// held: it is tiny and the link needs it to work at all.

const (
	// minBucketBytes is the smallest bucket: the largest IP packet a link
	// carries, linkspec.MaxMTU (65535 bytes, 524280 bits).
	minBucketBytes = linkspec.MaxMTU
	// queueLatency is how long the queue holds at the rate: the reference
	// bandwidth plugin's tbf latency.
	queueLatency = 25 * time.Millisecond
	// minQueueBytes is the smallest queue: two of the largest packets
	// (2 * 65535 bytes), so that a super-packet can wait behind another.
	minQueueBytes = 2 * linkspec.MaxMTU
	// maxQueueBytes is the largest queue, 4 MiB per direction and pod:
	// 25 ms at 1.3 Gbit/s. Faster limits hold less than 25 ms.
	maxQueueBytes = 4 << 20
)

// queueLimit returns the queue of a direction limited to rateBits bit/s
// with a burst of burstBits: queueLatency at the rate plus the burst, as
// tbf's, within minQueueBytes..maxQueueBytes.
func queueLimit(rateBits, burstBits uint64) int {
	b := float64(rateBits)/8*queueLatency.Seconds() + float64(burstBits)/8
	return int(min(max(b, minQueueBytes), maxQueueBytes))
}

// ShaperSize returns the token bucket and the queue, in bytes, of a
// direction limited to rateBits bit/s with a burst of burstBits, as the
// router's shapers size them (above): the burst, but at least the largest
// packet; queueLatency at the rate plus the burst, within bounds. The
// agent sizes the tbf qdiscs of veth links by it, so that a limit means
// the same on every kind of link.
func ShaperSize(rateBits, burstBits uint64) (bucket, queue int) {
	return int(max(burstBits/8, minBucketBytes)), queueLimit(rateBits, burstBits)
}

// held is a packet in a shaper's queue.
type held struct {
	protocol tcpip.NetworkProtocolNumber
	pkt      *stack.PacketBuffer // one reference of the queue's
	size     int
}

// shaper is one direction's limit (see above). Safe for concurrent use.
type shaper struct {
	lim   *rate.Limiter // immutable
	limit int           // most bytes queued; immutable
	// send passes a batch of packets on, in order: it runs on the
	// shaper's goroutine and keeps no reference. Immutable.
	send func([]held)

	// delayed counts the packets held, dropped those dropped because the
	// queue was full. (One field a line: checklocks numbers the fields
	// by line.)
	delayed atomic.Uint64
	dropped atomic.Uint64

	mu sync.Mutex
	// queue holds the packets waiting for tokens, oldest first; queued is
	// their size.
	// +checklocks:mu
	queue []held
	// +checklocks:mu
	queued int
	// busy is set while the queue has packets or the goroutine is sending
	// some: a new packet must then wait behind them.
	// +checklocks:mu
	busy bool
	// started says the goroutine runs; closed that Close ran.
	// +checklocks:mu
	started bool
	// +checklocks:mu
	closed bool

	wake chan struct{} // one token when busy was set; cap 1
	stop chan struct{} // closed by close
	done chan struct{} // closed when the goroutine returns
}

// newShaper returns the shaper of rateBits (bit/s) and burstBits (bits)
// that passes what it held to send, or nil when rateBits is 0 (unlimited).
func newShaper(rateBits, burstBits uint64, send func([]held)) *shaper {
	if rateBits == 0 {
		return nil
	}
	bucket, queue := ShaperSize(rateBits, burstBits)
	return &shaper{
		lim:   rate.NewLimiter(rate.Limit(float64(rateBits)/8), bucket),
		limit: queue,
		send:  send,
		wake:  make(chan struct{}, 1),
		stop:  make(chan struct{}),
		done:  make(chan struct{}),
	}
}

// admit takes a packet of size bytes at now and reports whether it passes
// at once. If not, it was held (with a reference of its own, to be sent by
// the shaper's goroutine) or dropped; both are counted. A nil shaper
// passes everything.
func (s *shaper) admit(now time.Time, protocol tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer, size int) bool {
	if s == nil {
		return true
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		s.dropped.Add(1)
		return false
	}
	if !s.busy && s.lim.AllowN(now, size) {
		return true
	}
	if s.queued+size > s.limit {
		s.dropped.Add(1)
		return false
	}
	pkt.IncRef()
	s.queue = append(s.queue, held{protocol: protocol, pkt: pkt, size: size})
	s.queued += size
	s.delayed.Add(1)
	if !s.busy {
		s.busy = true
		if !s.started {
			s.started = true
			go s.run()
		}
		select {
		case s.wake <- struct{}{}:
		default:
		}
	}
	return false
}

// run sends the held packets as the bucket covers them, until close.
func (s *shaper) run() {
	defer close(s.done)
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	for {
		select {
		case <-s.wake:
		case <-s.stop:
			return
		}
		for {
			s.mu.Lock()
			if len(s.queue) == 0 {
				s.busy = false
				s.mu.Unlock()
				break
			}
			// Only this goroutine takes packets out: the head stays.
			size := s.queue[0].size
			s.mu.Unlock()
			now := time.Now()
			if d := s.lim.ReserveN(now, size).DelayFrom(now); d > 0 {
				timer.Reset(d)
				select {
				case <-timer.C:
				case <-s.stop:
					timer.Stop()
					return
				}
			}
			// The head's tokens are taken; those that follow go along
			// while the bucket covers them.
			s.mu.Lock()
			n := 1
			for now = time.Now(); n < len(s.queue) && s.lim.AllowN(now, s.queue[n].size); n++ {
			}
			batch := make([]held, n)
			copy(batch, s.queue)
			s.queue = s.queue[n:]
			for _, h := range batch {
				s.queued -= h.size
			}
			s.mu.Unlock()
			s.send(batch)
			for _, h := range batch {
				h.pkt.DecRef()
			}
		}
	}
}

// close stops the goroutine and drops what is held. Later packets are
// dropped.
func (s *shaper) close() {
	if s == nil {
		return
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	s.closed = true
	started := s.started
	s.mu.Unlock()
	close(s.stop)
	if started {
		<-s.done
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, h := range s.queue {
		h.pkt.DecRef()
	}
	s.queue, s.queued = nil, 0
}

// counts returns the packets held and dropped; 0 for a nil shaper.
func (s *shaper) counts() (delayed, dropped uint64) {
	if s == nil {
		return 0, 0
	}
	return s.delayed.Load(), s.dropped.Load()
}

// ipSize returns the size a shaper charges for pkt of protocol, and false
// for what is never charged (ARP).
func ipSize(protocol tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) (int, bool) {
	if protocol != header.IPv4ProtocolNumber && protocol != header.IPv6ProtocolNumber {
		return 0, false
	}
	return pkt.Size() - len(pkt.LinkHeader().Slice()), true
}

// bandwidthEndpoint wraps a limited pod link's endpoint (see above).
// Everything but the limited packets, and Close, passes through.
type bandwidthEndpoint struct {
	nested.Endpoint
	// ingress limits what is written to the pod, egress what the pod
	// sends; nil: that direction is unlimited. Immutable.
	ingress, egress *shaper
}

var _ stack.LinkEndpoint = (*bandwidthEndpoint)(nil)
var _ stack.NetworkDispatcher = (*bandwidthEndpoint)(nil)

// newBandwidthEndpoint wraps ep with bw's limits, or returns nil when bw
// limits nothing.
func newBandwidthEndpoint(ep stack.LinkEndpoint, bw linkspec.Bandwidth) *bandwidthEndpoint {
	if bw.IsZero() {
		return nil
	}
	e := &bandwidthEndpoint{}
	e.ingress = newShaper(bw.IngressRate, bw.IngressBurst, func(hs []held) {
		var l stack.PacketBufferList
		for _, h := range hs {
			l.PushBack(h.pkt)
		}
		// Our endpoints take every packet (a full queue drops and
		// counts in the endpoint), as from either forwarding path.
		e.Endpoint.WritePackets(l)
	})
	e.egress = newShaper(bw.EgressRate, bw.EgressBurst, func(hs []held) {
		for _, h := range hs {
			e.Endpoint.DeliverNetworkPacket(h.protocol, h.pkt)
		}
	})
	e.Endpoint.Init(ep, e)
	return e
}

// addCounts sets st's bandwidth counters; a nil endpoint (an unlimited
// link) has none.
func (e *bandwidthEndpoint) addCounts(st *LinkStats) {
	if e == nil {
		return
	}
	st.BandwidthIngressDelayed, st.BandwidthIngressDrops = e.ingress.counts()
	st.BandwidthEgressDelayed, st.BandwidthEgressDrops = e.egress.counts()
}

// DeliverNetworkPacket implements stack.NetworkDispatcher: what the pod
// sends beyond its egress limit is held or dropped here.
func (e *bandwidthEndpoint) DeliverNetworkPacket(protocol tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) {
	if size, ok := ipSize(protocol, pkt); ok && !e.egress.admit(time.Now(), protocol, pkt, size) {
		return
	}
	e.Endpoint.DeliverNetworkPacket(protocol, pkt)
}

// WritePackets implements stack.LinkWriter.WritePackets: what is written
// to the pod beyond its ingress limit is held or dropped here. Held and
// dropped packets count as written, as a full queue's do in our
// endpoints, so that neither forwarding path takes them for an error.
func (e *bandwidthEndpoint) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	if e.ingress == nil {
		return e.Endpoint.WritePackets(pkts)
	}
	now := time.Now()
	var pass stack.PacketBufferList
	taken := 0
	for _, pkt := range pkts.AsSlice() {
		if size, ok := ipSize(pkt.NetworkProtocolNumber, pkt); ok && !e.ingress.admit(now, pkt.NetworkProtocolNumber, pkt, size) {
			taken++
			continue
		}
		pass.PushBack(pkt)
	}
	if pass.Len() == 0 {
		return taken, nil
	}
	n, err := e.Endpoint.WritePackets(pass)
	return n + taken, err
}

// Close implements stack.LinkEndpoint.Close: the shapers stop (what they
// hold is dropped) before the endpoint closes.
func (e *bandwidthEndpoint) Close() {
	e.ingress.close()
	e.egress.close()
	e.Endpoint.Close()
}
