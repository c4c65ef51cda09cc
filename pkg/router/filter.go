package router

import (
	"encoding/binary"
	"net/netip"
	"sync/atomic"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/nested"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/shm-cni/shm-cni/pkg/policy"
)

// Anti-spoofing. A pod is untrusted: every packet it hands the router is
// checked before the stack sees it, and dropped (and counted by reason)
// unless:
//   - on an Ethernet link, its source MAC is the pod's MAC;
//   - it is IPv4 from one of the pod's IPv4 addresses, or IPv6 from one of
//     its IPv6 addresses; IPv6 from a link-local or the unspecified source
//     is accepted only towards link-local or multicast destinations (NDP,
//     MLD: never forwarded);
//   - it is not addressed to a loopback address (the host's loopback, where
//     the agent's metrics listen, is not reachable through the router);
//   - it is ARP whose sender is the pod (its MAC, and its IPv4 address or
//     0.0.0.0 for a probe): a pod cannot answer ARP for another address;
//   - it is not a router advertisement or redirect, not a fragmented
//     neighbor discovery message (RFC 6980), and a neighbor advertisement
//     only for the pod's own addresses or a link-local one other than the
//     gateway's: a pod cannot answer NDP for another address.
//
// Anything else (other EtherTypes, truncated headers) is dropped as well.
// The checks read only headers the stack would read anyway, from private
// memory: both of our endpoints copy frames out of the peer's reach before
// delivering them.

// DropReason says why the filter dropped a packet. It is a metric label.
type DropReason int

// Drop reasons.
const (
	// DropSourceMAC: the Ethernet source is not the pod's MAC.
	DropSourceMAC DropReason = iota
	// DropSourceAddress: the IP source is not one of the pod's addresses
	// (or is link-local towards a destination that would be forwarded).
	DropSourceAddress
	// DropDestination: the destination is a loopback address.
	DropDestination
	// DropARP: ARP not sent by the pod for its own address.
	DropARP
	// DropNDP: an NDP message a pod may not send.
	DropNDP
	// DropMalformed: too short to check, or of an unexpected IP version.
	DropMalformed
	// DropEtherType: neither IPv4, IPv6 nor ARP.
	DropEtherType

	numDropReasons
)

// String returns the reason's metric label.
func (d DropReason) String() string {
	switch d {
	case DropSourceMAC:
		return "source_mac"
	case DropSourceAddress:
		return "source_address"
	case DropDestination:
		return "destination"
	case DropARP:
		return "arp"
	case DropNDP:
		return "ndp"
	case DropMalformed:
		return "malformed"
	case DropEtherType:
		return "ethertype"
	}
	return "unknown"
}

// DropReasons lists every reason, in order.
func DropReasons() []DropReason {
	r := make([]DropReason, numDropReasons)
	for i := range r {
		r[i] = DropReason(i)
	}
	return r
}

// FilterDrops counts a link's dropped packets by reason, indexed by
// DropReason.
type FilterDrops [numDropReasons]uint64

// Total returns the sum over every reason.
func (f FilterDrops) Total() uint64 {
	var n uint64
	for _, v := range f {
		n += v
	}
	return n
}

// podIdentity is what a pod may send as. Immutable.
type podIdentity struct {
	// mac is the pod's MAC; empty on links without Ethernet headers.
	mac tcpip.LinkAddress
	// v4 and v6 are the pod's addresses.
	v4, v6 []netip.Addr
}

func newPodIdentity(l Link, ethernet bool) podIdentity {
	id := podIdentity{}
	if ethernet {
		id.mac = l.PodMAC
	}
	for _, a := range l.Addrs {
		if a.Is4() {
			id.v4 = append(id.v4, a)
		} else {
			id.v6 = append(id.v6, a)
		}
	}
	return id
}

func contains(set []netip.Addr, a netip.Addr) bool {
	for _, s := range set {
		if s == a {
			return true
		}
	}
	return false
}

// filterEndpoint wraps a pod link's endpoint and drops what the pod may not
// send (see above). Everything else passes through to the wrapped endpoint.
type filterEndpoint struct {
	nested.Endpoint
	// id is the pod's identity. Immutable.
	id podIdentity
	// fast and counters are the router's fast path and this link's
	// counters in it (fastpath.go). Immutable.
	fast     *fastPath
	counters *fastCounters
	// self is this link as the fast path writes to it (its MTU and
	// whether it takes TCP GSO). Set by AddLink before the link's NIC
	// exists, immutable from then on.
	self *fastDst
	// policy is the router's NetworkPolicy enforcer (policy.go), which
	// judges what passes the checks above. Immutable.
	policy *policy.Enforcer
	// drops are the counters, indexed by DropReason.
	drops [numDropReasons]atomic.Uint64
}

var _ stack.LinkEndpoint = (*filterEndpoint)(nil)
var _ stack.NetworkDispatcher = (*filterEndpoint)(nil)

// newFilterEndpoint wraps ep for a pod with identity id; what passes, and
// passes pol, goes to fast first, counted in counters, and to the stack
// when fast does not take it.
func newFilterEndpoint(ep stack.LinkEndpoint, id podIdentity, fast *fastPath, counters *fastCounters, pol *policy.Enforcer) *filterEndpoint {
	e := &filterEndpoint{id: id, fast: fast, counters: counters, policy: pol}
	e.Endpoint.Init(ep, e)
	return e
}

// Drops returns the counters.
func (e *filterEndpoint) Drops() FilterDrops {
	var d FilterDrops
	for i := range d {
		d[i] = e.drops[i].Load()
	}
	return d
}

// DeliverNetworkPacket implements stack.NetworkDispatcher. The caller keeps
// its reference to pkt either way.
func (e *filterEndpoint) DeliverNetworkPacket(protocol tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) {
	if reason, drop := e.id.check(protocol, pkt); drop {
		e.drops[reason].Add(1)
		return
	}
	if !policyAllows(e.policy, true, protocol, pkt) {
		return // counted by the enforcer, per pod and direction
	}
	if e.fast.hairpin.reply(protocol, pkt) {
		// A reply the host must see (hairpin.go).
		e.self.copyHeld(pkt)
		e.fast.toHost(e.self, protocol, pkt)
		return
	}
	if e.fast.forward(e.self, protocol, pkt) {
		return
	}
	e.self.copyHeld(pkt)
	e.Endpoint.DeliverNetworkPacket(protocol, pkt)
}

// check returns whether pkt must be dropped, and why.
func (id *podIdentity) check(protocol tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) (DropReason, bool) {
	if id.mac != "" {
		eth := pkt.LinkHeader().Slice()
		if len(eth) < header.EthernetMinimumSize {
			return DropMalformed, true
		}
		if header.Ethernet(eth).SourceAddress() != id.mac {
			return DropSourceMAC, true
		}
	}
	switch protocol {
	case header.IPv4ProtocolNumber:
		b, ok := pkt.Data().PullUp(header.IPv4MinimumSize)
		if !ok || header.IPVersion(b) != header.IPv4Version {
			return DropMalformed, true
		}
		return id.checkIPv4(b)
	case header.IPv6ProtocolNumber:
		b, ok := pkt.Data().PullUp(header.IPv6MinimumSize)
		if !ok || header.IPVersion(b) != header.IPv6Version {
			return DropMalformed, true
		}
		return id.checkIPv6(pkt, b)
	case header.ARPProtocolNumber:
		if id.mac == "" {
			return DropEtherType, true
		}
		b, ok := pkt.Data().PullUp(header.ARPSize)
		if !ok {
			return DropMalformed, true
		}
		return id.checkARP(header.ARP(b))
	}
	return DropEtherType, true
}

func (id *podIdentity) checkIPv4(b []byte) (DropReason, bool) {
	src := netip.AddrFrom4([4]byte(b[12:16]))
	dst := netip.AddrFrom4([4]byte(b[16:20]))
	if !contains(id.v4, src) {
		return DropSourceAddress, true
	}
	if dst.IsLoopback() {
		return DropDestination, true
	}
	return 0, false
}

func (id *podIdentity) checkIPv6(pkt *stack.PacketBuffer, b []byte) (DropReason, bool) {
	src := netip.AddrFrom16([16]byte(b[8:24]))
	dst := netip.AddrFrom16([16]byte(b[24:40]))
	switch {
	case contains(id.v6, src):
	case src.IsLinkLocalUnicast() || src.IsUnspecified():
		// NDP and MLD: answered by the router itself, never forwarded.
		if !dst.IsLinkLocalUnicast() && !dst.IsMulticast() {
			return DropSourceAddress, true
		}
	default:
		return DropSourceAddress, true
	}
	if dst.IsLoopback() {
		return DropDestination, true
	}
	return id.checkNDP(pkt, header.IPv6(b).NextHeader())
}

// maxNDPWalk bounds how far into a packet checkNDP looks for the ICMPv6
// header: the IPv6 header, a few extension headers and the NDP message.
const maxNDPWalk = 512

// checkNDP walks the extension headers of an IPv6 packet to its ICMPv6
// header, if any, and refuses the NDP messages a pod may not send.
func (id *podIdentity) checkNDP(pkt *stack.PacketBuffer, next uint8) (DropReason, bool) {
	off := header.IPv6MinimumSize
	fragmented := false
	for {
		switch tcpip.TransportProtocolNumber(next) {
		case header.ICMPv6ProtocolNumber:
			return id.checkICMPv6(pkt, off, fragmented)
		case tcpip.TransportProtocolNumber(header.IPv6HopByHopOptionsExtHdrIdentifier),
			tcpip.TransportProtocolNumber(header.IPv6RoutingExtHdrIdentifier),
			tcpip.TransportProtocolNumber(header.IPv6DestinationOptionsExtHdrIdentifier):
			b, ok := pull(pkt, off+2)
			if !ok {
				return DropMalformed, true
			}
			next = b[off]
			off += (int(b[off+1]) + 1) * 8
		case tcpip.TransportProtocolNumber(header.IPv6FragmentExtHdrIdentifier):
			b, ok := pull(pkt, off+8)
			if !ok {
				return DropMalformed, true
			}
			if binary.BigEndian.Uint16(b[off+2:])&^7 != 0 {
				// A later fragment: its first fragment carried the
				// headers and was checked (or dropped).
				return 0, false
			}
			fragmented = true
			next = b[off]
			off += 8
		default:
			return 0, false
		}
		if off > maxNDPWalk {
			return DropMalformed, true
		}
	}
}

// pull returns the first n bytes of pkt's data, or false when it is shorter.
func pull(pkt *stack.PacketBuffer, n int) ([]byte, bool) {
	if n > pkt.Data().Size() {
		return nil, false
	}
	return pkt.Data().PullUp(n)
}

func (id *podIdentity) checkICMPv6(pkt *stack.PacketBuffer, off int, fragmented bool) (DropReason, bool) {
	b, ok := pull(pkt, off+header.ICMPv6MinimumSize)
	if !ok {
		return DropMalformed, true
	}
	typ := header.ICMPv6Type(b[off])
	switch typ {
	case header.ICMPv6RouterSolicit, header.ICMPv6NeighborSolicit, header.ICMPv6NeighborAdvert:
		if fragmented {
			return DropNDP, true
		}
	case header.ICMPv6RouterAdvert, header.ICMPv6RedirectMsg:
		return DropNDP, true
	default:
		return 0, false
	}
	if typ != header.ICMPv6NeighborAdvert {
		return 0, false
	}
	// The target follows the 4-byte flags word of the message body.
	const targetOff = header.ICMPv6HeaderSize + 4
	b, ok = pull(pkt, off+targetOff+16)
	if !ok {
		return DropMalformed, true
	}
	target := netip.AddrFrom16([16]byte(b[off+targetOff : off+targetOff+16]))
	if contains(id.v6, target) || (target.IsLinkLocalUnicast() && target != GatewayV6) {
		return 0, false
	}
	return DropNDP, true
}

func (id *podIdentity) checkARP(a header.ARP) (DropReason, bool) {
	if !a.IsValid() {
		return DropARP, true
	}
	if tcpip.LinkAddress(a.HardwareAddressSender()) != id.mac {
		return DropARP, true
	}
	sender := netip.AddrFrom4([4]byte(a.ProtocolAddressSender()))
	if sender.IsUnspecified() || contains(id.v4, sender) {
		return 0, false
	}
	return DropARP, true
}
