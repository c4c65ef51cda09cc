package router

import (
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
// NDP) takes its size from the direction's token bucket. The bucket fills
// at the rate and holds the burst.
//
// Excess is dropped and counted, as by a tc policer, not held: the router
// keeps no packet, timer or queue per pod, so a limited pod costs the agent
// nothing for what it sends beyond its limit and never delays another
// link's packets. TCP meets the limit through its loss recovery (the
// reference bandwidth plugin's tbf qdisc queues up to 25 ms of traffic
// before it drops; here the burst is the only slack, so a burst of at least
// the rate times the round trip keeps TCP near the rate).
//
// Sizes are IP packet sizes (network header and payload, no link header).
// A TCP super-packet (a kernel pod's GSO frame, a sandbox's 64 KiB segment,
// the receive offload's joined segments) is one packet of its full size:
// it passes or is dropped whole, and is never cut to fit the bucket. So
// that the largest packet can always pass, a bucket holds at least
// minBucketBytes whatever the configured burst. ARP is not charged: it is
// tiny and the link needs it to work at all.

// minBucketBytes is the smallest bucket: the largest IP packet a link
// carries, linkspec.MaxMTU (65535 bytes, 524280 bits).
const minBucketBytes = linkspec.MaxMTU

// bucket is one direction's token bucket. Safe for concurrent use.
type bucket struct {
	lim *rate.Limiter // immutable
	// drops counts the packets the bucket refused.
	drops atomic.Uint64
}

// newBucket returns the bucket of rateBits (bit/s) and burstBits (bits),
// or nil when rateBits is 0 (unlimited).
func newBucket(rateBits, burstBits uint64) *bucket {
	if rateBits == 0 {
		return nil
	}
	burst := max(burstBits/8, minBucketBytes)
	return &bucket{lim: rate.NewLimiter(rate.Limit(float64(rateBits)/8), int(burst))}
}

// allow charges size bytes at now and reports whether they fit; a packet
// that does not is counted as dropped. A nil bucket allows everything.
func (b *bucket) allow(now time.Time, size int) bool {
	if b == nil {
		return true
	}
	if b.lim.AllowN(now, size) {
		return true
	}
	b.drops.Add(1)
	return false
}

// dropped returns the count of refused packets; 0 for a nil bucket.
func (b *bucket) dropped() uint64 {
	if b == nil {
		return 0
	}
	return b.drops.Load()
}

// ipSize returns the size a bucket charges for pkt of protocol, and false
// for what is never charged (ARP).
func ipSize(protocol tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) (int, bool) {
	if protocol != header.IPv4ProtocolNumber && protocol != header.IPv6ProtocolNumber {
		return 0, false
	}
	return pkt.Size() - len(pkt.LinkHeader().Slice()), true
}

// bandwidthEndpoint wraps a limited pod link's endpoint (see above).
// Everything but the limited packets passes through.
type bandwidthEndpoint struct {
	nested.Endpoint
	// ingress limits what is written to the pod, egress what the pod
	// sends; nil: that direction is unlimited. Immutable.
	ingress, egress *bucket
}

var _ stack.LinkEndpoint = (*bandwidthEndpoint)(nil)
var _ stack.NetworkDispatcher = (*bandwidthEndpoint)(nil)

// newBandwidthEndpoint wraps ep with bw's limits, or returns nil when bw
// limits nothing.
func newBandwidthEndpoint(ep stack.LinkEndpoint, bw linkspec.Bandwidth) *bandwidthEndpoint {
	if bw.IsZero() {
		return nil
	}
	e := &bandwidthEndpoint{
		ingress: newBucket(bw.IngressRate, bw.IngressBurst),
		egress:  newBucket(bw.EgressRate, bw.EgressBurst),
	}
	e.Endpoint.Init(ep, e)
	return e
}

// drops returns the packets dropped by the limit, to the pod and from it.
// A nil endpoint (an unlimited link) has dropped none.
func (e *bandwidthEndpoint) drops() (ingress, egress uint64) {
	if e == nil {
		return 0, 0
	}
	return e.ingress.dropped(), e.egress.dropped()
}

// DeliverNetworkPacket implements stack.NetworkDispatcher: what the pod
// sends beyond its egress limit is dropped here.
func (e *bandwidthEndpoint) DeliverNetworkPacket(protocol tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) {
	if size, ok := ipSize(protocol, pkt); ok && !e.egress.allow(time.Now(), size) {
		return
	}
	e.Endpoint.DeliverNetworkPacket(protocol, pkt)
}

// WritePackets implements stack.LinkWriter.WritePackets: what is written
// to the pod beyond its ingress limit is dropped here. Dropped packets
// count as written, as a full queue's do in our endpoints, so that neither
// path to the link takes them for an error.
func (e *bandwidthEndpoint) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	if e.ingress == nil {
		return e.Endpoint.WritePackets(pkts)
	}
	now := time.Now()
	var pass stack.PacketBufferList
	dropped := 0
	for _, pkt := range pkts.AsSlice() {
		if size, ok := ipSize(pkt.NetworkProtocolNumber, pkt); ok && !e.ingress.allow(now, size) {
			dropped++
			continue
		}
		pass.PushBack(pkt)
	}
	if pass.Len() == 0 {
		return dropped, nil
	}
	n, err := e.Endpoint.WritePackets(pass)
	return n + dropped, err
}
