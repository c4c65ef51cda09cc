package router

import (
	"fmt"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// LinkStats are a link's counters, read from the stack's NIC statistics and
// the fast path's. Rx is what the pod sent to the router, Tx what the
// router sent to the pod.
type LinkStats struct {
	RxPackets, RxBytes uint64
	TxPackets, TxBytes uint64
	// FastRxPackets and FastTxPackets are the part of RxPackets and
	// TxPackets the fast path handled (fastpath.go): forwarded, or, for
	// received packets, dropped as unrouted.
	FastRxPackets, FastTxPackets uint64
	// RxDrops counts received packets the stack dropped: arriving while
	// the NIC was disabled, of an unknown network or transport protocol,
	// with a malformed transport header, or impossible to forward
	// (no route, TTL exhausted, too big, bad source...).
	RxDrops uint64
	// TxDrops counts packets dropped because the link had no buffer
	// space.
	TxDrops uint64
	// Filtered counts, by reason, what the pod sent that the router's
	// anti-spoofing filter dropped before the stack saw it (filter.go).
	Filtered FilterDrops
	// The link's bandwidth limit (bandwidth.go), to the pod (ingress) and
	// from it (egress): packets it held until its bucket covered them, and
	// packets it dropped because its queue was full. What it took to the
	// pod is part of TxPackets (handed to the link), what it took from the
	// pod part of RxPackets once sent on (dropped ones never are).
	BandwidthIngressDelayed, BandwidthIngressDrops uint64
	BandwidthEgressDelayed, BandwidthEgressDrops   uint64
}

// Add returns the sums of s's and o's counters (a link's sessions, say).
func (s LinkStats) Add(o LinkStats) LinkStats {
	out := LinkStats{
		RxPackets: s.RxPackets + o.RxPackets, RxBytes: s.RxBytes + o.RxBytes,
		TxPackets: s.TxPackets + o.TxPackets, TxBytes: s.TxBytes + o.TxBytes,
		FastRxPackets: s.FastRxPackets + o.FastRxPackets, FastTxPackets: s.FastTxPackets + o.FastTxPackets,
		RxDrops: s.RxDrops + o.RxDrops, TxDrops: s.TxDrops + o.TxDrops,
		BandwidthIngressDelayed: s.BandwidthIngressDelayed + o.BandwidthIngressDelayed,
		BandwidthIngressDrops:   s.BandwidthIngressDrops + o.BandwidthIngressDrops,
		BandwidthEgressDelayed:  s.BandwidthEgressDelayed + o.BandwidthEgressDelayed,
		BandwidthEgressDrops:    s.BandwidthEgressDrops + o.BandwidthEgressDrops,
	}
	for i := range out.Filtered {
		out.Filtered[i] = s.Filtered[i] + o.Filtered[i]
	}
	return out
}

// LinkStats returns the counters of link id.
func (r *Router) LinkStats(id string) (LinkStats, error) {
	r.mu.Lock()
	lk, ok := r.links[id]
	r.mu.Unlock()
	if !ok {
		return LinkStats{}, fmt.Errorf("link stats %s: %w", id, ErrUnknownLink)
	}
	info, ok := r.stack.SingleNICInfo(lk.nicID)
	if !ok {
		return LinkStats{}, fmt.Errorf("link stats %s: %w", id, ErrUnknownLink)
	}
	st := nicStats(info)
	st.Filtered = lk.filter.Drops()
	lk.bw.addCounts(&st)
	c := lk.fast.counters
	st.FastRxPackets, st.FastTxPackets = c.rxPackets.Load(), c.txPackets.Load()
	st.RxPackets += st.FastRxPackets
	st.RxBytes += c.rxBytes.Load()
	st.TxPackets += st.FastTxPackets
	st.TxBytes += c.txBytes.Load()
	return st, nil
}

// UplinkStats returns the uplink's counters; Rx is what the host sent to the
// router. It returns zero before Start.
func (r *Router) UplinkStats() LinkStats {
	r.mu.Lock()
	var id tcpip.NICID
	var fast *fastDst
	if r.up != nil {
		id, fast = r.up.nicID, r.up.fast
	}
	r.mu.Unlock()
	if id == 0 {
		return LinkStats{}
	}
	info, ok := r.stack.SingleNICInfo(id)
	if !ok {
		return LinkStats{}
	}
	st := nicStats(info)
	if fast != nil {
		// What the fast path wrote to the host, and took from it to
		// the pods (fastuplink.go).
		c := fast.counters
		st.FastRxPackets, st.FastTxPackets = c.rxPackets.Load(), c.txPackets.Load()
		st.RxPackets += st.FastRxPackets
		st.RxBytes += c.rxBytes.Load()
		st.TxPackets += st.FastTxPackets
		st.TxBytes += c.txBytes.Load()
	}
	return st
}

// nicStats flattens a NIC's statistics.
func nicStats(info *stack.NICInfo) LinkStats {
	s := info.Stats
	st := LinkStats{
		RxPackets: s.Rx.Packets.Value(),
		RxBytes:   s.Rx.Bytes.Value(),
		TxPackets: s.Tx.Packets.Value(),
		TxBytes:   s.Tx.Bytes.Value(),
		RxDrops: s.DisabledRx.Packets.Value() +
			s.MalformedL4RcvdPackets.Value() +
			sumCounterMap(s.UnknownL3ProtocolRcvdPacketCounts) +
			sumCounterMap(s.UnknownL4ProtocolRcvdPacketCounts),
		TxDrops: s.TxPacketsDroppedNoBufferSpace.Value(),
	}
	for _, nst := range info.NetworkStats {
		switch nst := nst.(type) {
		case *ipv4.Stats:
			st.RxDrops += nst.IP.Forwarding.Errors.Value()
		case *ipv6.Stats:
			st.RxDrops += nst.IP.Forwarding.Errors.Value()
		}
	}
	return st
}

// sumCounterMap adds up every counter of m.
func sumCounterMap(m *tcpip.IntegralStatCounterMap) uint64 {
	if m == nil {
		return 0
	}
	var n uint64
	for _, k := range m.Keys() {
		if c, ok := m.Get(k); ok {
			n += c.Value()
		}
	}
	return n
}
