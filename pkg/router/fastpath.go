package router

import (
	"net/netip"
	"slices"
	"sync/atomic"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/shm-cni/shm-cni/pkg/endpoint"
)

// The pod-to-pod fast path.
//
// Most of what pods send each other is plain unicast IP from one pod link
// of this router to another. gVisor's forwarding does for each such packet
// a checksum check, a route lookup, a look for the destination among the
// stack's own addresses on every NIC, a deep copy and the nftables hooks:
// several microseconds a packet, the router's main cost for sandbox traffic
// at MTU 1500. The fast path does what is left of it once the anti-spoofing
// filter has passed the packet: it looks the destination up among the pod
// links (a map read through an atomic pointer, no lock), decrements the TTL
// or hop limit in a copy of the packet (of its IP header alone for large
// packets, whose payload is shared) and hands the packet to the destination link's endpoint with the
// pod's MAC, which the router knows (the links' static neighbor entries).
//
// A packet for an address of the node's pod CIDRs that no link has (nor the
// host: the node gateway) is dropped and counted as unrouted right there,
// as the blackhole NIC would after gVisor's forwarding: a pod flooding
// unassigned addresses costs the agent little.
//
// Only what needs nothing more takes it; everything else goes to gVisor as
// before: packets for the router itself, the host, other nodes; TTL or hop limit at most 1 (ICMP time
// exceeded; the pinned gVisor forwards IPv4 with TTL 1, as TTL 0), larger than the destination link's MTU (ICMP too big or
// fragmentation), IPv4 with options or a bad header checksum, IPv6 with a
// hop-by-hop header, lengths that disagree with the packet, and a kernel's
// TCP super-packet for a link that takes no GSO and that it does not fit
// (fastgso.go). The router rewrites no address, so transport checksums stay
// valid, as on the slow path.

// fastCopyMax is the largest packet the fast path copies whole; larger
// ones share their payload with the received packet (see forward).
const fastCopyMax = 2048

// fastLinks is the fast path's view of the router: the pod links by
// address, the node's pod CIDRs and their node gateways. An immutable
// snapshot, replaced under Router.mu whenever a link comes or goes.
type fastLinks struct {
	dsts map[netip.Addr]*fastDst
	// uplink is the uplink's destination (fastuplink.go), nil before Start.
	uplink   *fastDst
	podCIDRs []netip.Prefix
	nodeGWs  []netip.Addr
	// hosted are the addresses of the pods the host routes (hostlink.go),
	// which the uplink reaches.
	hosted   map[netip.Addr]struct{}
	unrouted *atomic.Uint64 // the blackhole's counter
}

// unassigned reports whether a, not a link's address, is one of the node's
// pod addresses without a link: gVisor would route it to the blackhole.
func (t *fastLinks) unassigned(a netip.Addr) bool {
	if slices.Contains(t.nodeGWs, a) {
		return false
	}
	if _, ok := t.hosted[a]; ok {
		return false
	}
	for _, p := range t.podCIDRs {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// fastDst is where the fast path writes for one link. Immutable.
type fastDst struct {
	ep  stack.LinkEndpoint // the link's endpoint as the NIC has it
	mtu uint32
	// tcpGSO says the endpoint writes TCP super-packets whole to a kernel
	// that segments them (a TAP device with a virtio-net header): see
	// gsoSegment.
	tcpGSO bool
	// uplink marks the uplink's entry: what it brings for a pod takes the
	// fast path only as uplinkTransport allows (fastuplink.go).
	uplink bool
	// partial, when not nil, says whether the endpoint now writes TCP
	// packets with a partial checksum whole, leaving the checksum to its
	// peer (a sandbox's link with checksum offload): see gsoSegment.
	partial partialChecksumWriter
	// held, when not nil, delivers large frames held in the pod's memory,
	// and direct writes frames to the pod in one copy (direct.go).
	held   heldSource
	direct frameWriter
	// waiter, when not nil, writes packets from a pod's link to this one
	// waiting for room (direct.go); the uplink's go through ep.
	waiter   packetsWaiter
	gwMAC    tcpip.LinkAddress // the router's MAC on the link
	podMAC   tcpip.LinkAddress // empty on links without Ethernet headers
	counters *fastCounters     // the destination link's
}

// fastCounters count one link's fast-path traffic; LinkStats adds them to
// the NIC's.
type fastCounters struct {
	rxPackets, rxBytes atomic.Uint64 // from the pod, forwarded
	txPackets, txBytes atomic.Uint64 // to the pod
}

// fastPath is the router's switch and current table, shared by every link's
// filter.
type fastPath struct {
	links atomic.Pointer[fastLinks] // nil when disabled
	// hairpin holds the connections the host turned back, whose replies
	// go to the uplink (hairpin.go), with or without the fast path.
	// Immutable pointer.
	hairpin *hairpinTable
}

// rebuildFastLocked publishes the fast-path table of the current links, and
// their MTUs for the router's path MTU answers (pmtu.go).
//
// +checklocks:r.mu
func (r *Router) rebuildFastLocked() {
	mtus := make(map[netip.Addr]uint32, len(r.owners))
	for a, id := range r.owners {
		if lk := r.links[id]; lk != nil {
			mtus[a] = lk.fast.mtu
		}
	}
	r.mtus.pods.Store(&mtus)
	if r.cfg.NoFastPath {
		return
	}
	t := &fastLinks{dsts: make(map[netip.Addr]*fastDst, len(r.owners)), podCIDRs: r.cfg.PodCIDRs, unrouted: &r.hole.dropped}
	for _, p := range r.cfg.PodCIDRs {
		gw, _ := NodeGateway(p) // checked by Config.validate
		t.nodeGWs = append(t.nodeGWs, gw)
	}
	for a, id := range r.owners {
		if lk := r.links[id]; lk != nil {
			t.dsts[a] = lk.fast
		} else if _, ok := r.hostLinks[id]; ok {
			if t.hosted == nil {
				t.hosted = make(map[netip.Addr]struct{})
			}
			t.hosted[a] = struct{}{}
		}
	}
	if r.up != nil {
		t.uplink = r.up.fast
	}
	r.fast.links.Store(t)
}

// forward sends pkt, which the link of src received and its filter (for the
// uplink, its policy and hairpin checks) passed, straight to its destination
// link, and reports whether it did; false leaves pkt to the stack. The
// caller keeps its reference to pkt either way.
func (f *fastPath) forward(src *fastDst, protocol tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) bool {
	links := f.links.Load()
	if links == nil {
		return false
	}
	return f.route(src, links, nil, protocol, pkt)
}

// toHost sends pkt, which the link of src received, its filter passed and
// the hairpin table claimed, to the uplink, whatever its size (the host
// forwards it on: fragments it, or answers ICMP), or drops it when the
// router has no uplink or would not forward its headers as they are.
func (f *fastPath) toHost(src *fastDst, protocol tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) {
	t := f.hairpin
	if up := t.up.Load(); up != nil && f.route(src, nil, up, protocol, pkt) {
		t.diverted.Add(1)
		return
	}
	t.dropped.Add(1)
}

// decrementTTL takes one off the TTL of an IPv4 header (and updates its
// checksum) or the hop limit of an IPv6 header, in hb, a private copy.
func decrementTTL(protocol tcpip.NetworkProtocolNumber, hb []byte) {
	if protocol == header.IPv4ProtocolNumber {
		h := header.IPv4(hb)
		h.SetTTL(h.TTL() - 1)
		h.SetChecksum(0)
		h.SetChecksum(^h.CalculateChecksum())
		return
	}
	h := header.IPv6(hb)
	h.SetHopLimit(h.HopLimit() - 1)
}

// route is forward's work: to a pod link of links, or to the uplink for
// what the pod sends beyond the node; or, with to set, to that (the
// uplink, for a connection the host turned back: toHost), taking a TCP SYN's
// MSS down to what to carries.
func (f *fastPath) route(src *fastDst, links *fastLinks, to *fastDst, protocol tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) bool {
	self := src.counters
	if pkt.GSOOptions.Type != stack.GSONone {
		return false
	}
	// A kernel pod's TCP super-packet, its checksum partial (gso.go in
	// package endpoint): see fastgso.go.
	gsoMSS, super := endpoint.ForwardedGSO(pkt)
	if pkt.Mark != 0 && !super {
		return false
	}
	size := pkt.Data().Size()
	var dst netip.Addr
	switch protocol {
	case header.IPv4ProtocolNumber:
		b, ok := pkt.Data().PullUp(header.IPv4MinimumSize)
		if !ok {
			return false
		}
		h := header.IPv4(b)
		if h.HeaderLength() != header.IPv4MinimumSize || int(h.TotalLength()) != size || h.TTL() <= 1 || !h.IsChecksumValid() {
			return false
		}
		dst = netip.AddrFrom4(h.DestinationAddress().As4())
	case header.IPv6ProtocolNumber:
		b, ok := pkt.Data().PullUp(header.IPv6MinimumSize)
		if !ok {
			return false
		}
		h := header.IPv6(b)
		if header.IPv6MinimumSize+int(h.PayloadLength()) != size || h.HopLimit() <= 1 ||
			h.NextHeader() == uint8(header.IPv6HopByHopOptionsExtHdrIdentifier) {
			return false
		}
		dst = netip.AddrFrom16(h.DestinationAddress().As16())
	default:
		return false
	}
	d := to
	if d == nil {
		d = links.dsts[dst]
	}
	if d == nil {
		if links.unassigned(dst) {
			self.rxPackets.Add(1)
			self.rxBytes.Add(uint64(size))
			links.unrouted.Add(1)
			return true
		}
		// Beyond the node: see fastuplink.go.
		if d = links.toUplink(dst); d == nil || d == src || (!super && uint32(size) > d.mtu) || !uplinkTransport(protocol, pkt, size) {
			return false
		}
	} else if src.uplink && !uplinkTransport(protocol, pkt, size) {
		// From the uplink to a pod: see fastuplink.go.
		return false
	}
	if d.counters == self {
		return false
	}
	var seg tcpSegment
	var tcp *tcpSegment
	split := false
	switch {
	case super:
		// Whole to a link that takes TCP GSO; whole with its checksum
		// completed to one whose MTU it fits; to one it does not fit,
		// cut at the kernel's MSS into pieces that fit (splitSuper).
		if tcp = parseTCPSegment(&seg, protocol, pkt, size); tcp == nil || size > maxMTU {
			return false
		}
		if split = !d.tcpGSO && uint32(size) > d.mtu; split && tcp.l3+tcp.l4 >= int(d.mtu) {
			return false
		}
	case uint32(size) > d.mtu && to == nil:
		// Too big for the destination: a TCP segment is handed to a
		// link that takes TCP GSO as a super-packet; anything else goes
		// to gVisor (ICMP, fragments).
		if tcp = parseTCPSegment(&seg, protocol, pkt, size); tcp == nil || !d.tcpGSO || size > maxMTU {
			return false
		}
	case uint32(size) > d.mtu:
		// Too big for the uplink, toward the host: a TCP segment the
		// host's kernel segments (the uplink takes GSO), anything else
		// as it is.
		if tcp = parseTCPSegment(&seg, protocol, pkt, size); tcp != nil && (!d.tcpGSO || size > maxMTU) {
			tcp = nil
		}
	}

	if src.held != nil {
		// A held packet goes whole from one sandbox's memory to
		// another's, or has its data copied out (direct.go).
		if tcp != nil && to == nil && super && !split && writeDirect(src, d, protocol, pkt, tcp, tcp.mssFor(d.mtu, gsoMSS, super), size) {
			return true
		}
		src.held.CopyHeld(pkt)
	}

	// Small packets are copied whole into a fresh buffer (one view). A
	// larger one gets only its IP header copied, into a view of its own;
	// the rest is shared with pkt (reference counted, never written by
	// anyone: our endpoints hand every received frame to the stack in a
	// buffer of its own). A 64 KiB packet from a sandbox link then costs
	// its 20 or 40 header bytes here, not a copy of itself (35% less time
	// per packet in BenchmarkFastPath; for 1500-byte packets the whole
	// copy is 5% faster); the destination endpoint copies it once, into
	// its queue or the kernel.
	var payload buffer.Buffer
	var hb []byte
	if size <= fastCopyMax {
		v := pkt.Data().AsRange().ToView()
		hb = v.AsSlice()
		payload = buffer.MakeWithView(v)
	} else {
		hdrLen := header.IPv4MinimumSize
		if protocol == header.IPv6ProtocolNumber {
			hdrLen = header.IPv6MinimumSize
		}
		if tcp != nil {
			// The TCP header too: its checksum changes (gsoSegment).
			hdrLen = tcp.l3 + tcp.l4
		}
		h, _ := pkt.Data().PullUp(hdrLen) // pulled up above
		hv := buffer.NewViewWithData(h)
		hb = hv.AsSlice()
		payload = buffer.MakeWithView(hv)
		rest := pkt.Data().ToBuffer()
		rest.TrimFront(int64(hdrLen))
		payload.Merge(&rest)
	}
	decrementTTL(protocol, hb)
	if to != nil && tcp == nil && size <= fastCopyMax {
		// A SYN-ACK toward the host: the client's segments to it cross
		// the uplink (pmtu.go).
		setSynMSS(protocol, hb, d.mtu, false)
	} else if tcp == nil && src.tcpGSO && d.mtu > src.mtu && size <= fastCopyMax {
		// A SYN from a kernel pod to a link of a larger MTU (a sandbox):
		// raise its MSS so that the sandbox sends segments as large as
		// its link carries, which come back here as super-packets for
		// the kernel pod (gsoSegment).
		setSynMSS(protocol, hb, d.mtu, true)
	}
	mss := uint16(0)
	partial := false
	if tcp != nil {
		mss = tcp.mssFor(d.mtu, gsoMSS, super)
		partial = d.tcpGSO || (d.partial != nil && d.partial.TakesPartialTCPChecksum())
	}
	// A link without GSO gets plain segments, each with its checksum
	// completed: the super-packet whole where it fits (a sandbox's link),
	// else its pieces. One that takes partial checksums gets them as they
	// are (GSO options).
	var l stack.PacketBufferList
	defer func() { l.DecRef() }() // a value receiver: l as it is then
	emit := func(payload buffer.Buffer, hb []byte) {
		if tcp != nil && !partial {
			tcp.completeChecksum(hb, &payload)
		}
		out := stack.NewPacketBuffer(stack.PacketBufferOptions{
			ReserveHeaderBytes: int(d.ep.MaxHeaderLength()),
			Payload:            payload,
		})
		out.NetworkProtocolNumber = protocol
		if tcp != nil && partial {
			tcp.toGSO(out, mss)
		}
		out.EgressRoute.NetProto = protocol
		out.EgressRoute.LocalLinkAddress = d.gwMAC
		out.EgressRoute.RemoteLinkAddress = d.podMAC
		d.ep.AddHeader(out)
		l.PushBack(out)
	}
	txBytes := size
	if split {
		txBytes += (tcp.splitSuper(hb, payload, d.mtu, mss, emit) - 1) * (tcp.l3 + tcp.l4)
	} else {
		emit(payload, hb)
	}
	self.rxPackets.Add(1)
	self.rxBytes.Add(uint64(size))
	// Our endpoints take every packet (a full queue drops and counts in
	// the endpoint's own stats), as they do from the slow path; a pod's
	// packet to a sandbox whose ring is full first waits a little,
	// holding up its own link only.
	var n int
	var err tcpip.Error
	if d.waiter != nil && !src.uplink {
		n, err = d.waiter.WritePacketsWaiting(l)
	} else {
		n, err = d.ep.WritePackets(l)
	}
	if n == l.Len() && err == nil {
		d.counters.txPackets.Add(uint64(n))
		d.counters.txBytes.Add(uint64(txBytes))
	}
	return true
}
