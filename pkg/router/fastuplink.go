package router

import (
	"net/netip"
	"slices"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/nested"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// The fast path to the uplink.
//
// What a pod sends beyond the node (the host, other nodes, the world) leaves
// through the uplink TUN device, where the host routes it and, for the
// world, masquerades it: the router itself rewrites nothing. gVisor's
// forwarding did for each such packet what the fast path saves pod links
// (a route lookup, the nftables hooks, a deep copy of up to 64 KiB), and
// for a sandbox's stream to the world that was most of the agent's work.
// So the fast path also takes a pod's packet to an address off the node's
// pod CIDRs, a global unicast one, straight to the uplink, when gVisor would
// do nothing more than forward it; and a packet to a node gateway, the
// host's own address inside the pod CIDRs, where the host's connections to
// pods come from (kubelet's probes, the host's clients and servers): those
// went through gVisor's forwarding too, which copied every packet of a
// pod's stream to the host. It takes them when they are
//   - TCP other than a SYN (a SYN crossing the uplink gets its MSS clamped
//     to the uplink's MTU, pmtu.go), or UDP; unfragmented;
//   - no larger than the uplink's MTU, or a TCP super-packet (a kernel's,
//     or a sandbox's offload, gso.go in package endpoint) that the TUN
//     device's kernel segments at its MSS, at most what fits the uplink.
//
// Anything else (ICMP, a packet too big, which gets ICMP from gVisor, the
// router's own addresses, link-local, multicast and broadcast) takes the
// slow path as before.
//
// The way back takes it too. What the host sends to a pod (the replies and
// ACKs of the pods' connections beyond the node, the host's own traffic,
// kubelet's probes among it, and the Services' traffic it turns back) took
// gVisor's forwarding for every packet. So the uplink's packets for a pod
// link take the fast path as well, after the uplink's policy check and
// hairpin table (the nested endpoints below it), when they carry what the
// way out carries (uplinkTransport): TCP other than a SYN or SYN-ACK, whose
// MSS the slow path clamps (pmtu.go), and UDP; unfragmented; within the pod
// link's MTU, or a super-packet of the host's that the link takes whole.
// Anything else, and anything for the router itself or an address no pod
// link has, takes the slow path as before.

// toUplink returns the uplink's fast destination for a packet to dst that
// no pod link has, or nil: beyond the node, the host itself at a node
// gateway address, or a pod the host routes (hostlink.go).
func (t *fastLinks) toUplink(dst netip.Addr) *fastDst {
	if t.uplink == nil || !dst.IsGlobalUnicast() {
		return nil
	}
	if slices.Contains(t.nodeGWs, dst) {
		return t.uplink
	}
	if _, ok := t.hosted[dst]; ok {
		return t.uplink
	}
	for _, p := range t.podCIDRs {
		if p.Contains(dst) {
			return nil
		}
	}
	return t.uplink
}

// uplinkTransport reports whether pkt, an IP packet of size bytes that the
// fast path checked, carries what the fast path may take to the uplink: TCP
// other than a SYN, or UDP, unfragmented.
func uplinkTransport(protocol tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer, size int) bool {
	var l3 int
	var proto uint8
	switch protocol {
	case header.IPv4ProtocolNumber:
		b, _ := pkt.Data().PullUp(header.IPv4MinimumSize) // checked by forward
		h := header.IPv4(b)
		if h.More() || h.FragmentOffset() != 0 {
			return false
		}
		l3, proto = header.IPv4MinimumSize, h.Protocol()
	case header.IPv6ProtocolNumber:
		b, _ := pkt.Data().PullUp(header.IPv6MinimumSize) // checked by forward
		l3, proto = header.IPv6MinimumSize, header.IPv6(b).NextHeader()
	default:
		return false
	}
	switch proto {
	case uint8(header.UDPProtocolNumber):
		return size >= l3+header.UDPMinimumSize
	case uint8(header.TCPProtocolNumber):
		b, ok := pkt.Data().PullUp(l3 + header.TCPMinimumSize)
		return ok && header.TCP(b[l3:]).Flags()&header.TCPFlagSyn == 0
	}
	return false
}

// uplinkFastEndpoint wraps the uplink's endpoint: what it delivers for a
// pod link goes there on the fast path when it can (route, with the
// uplink's entry as the source), the rest to the stack.
type uplinkFastEndpoint struct {
	nested.Endpoint
	// fast is the router's fast path. Immutable.
	fast *fastPath
	// self is the uplink's fast-path entry, set before the endpoint is
	// attached to its NIC, and so before it delivers anything.
	self *fastDst
}

var _ stack.LinkEndpoint = (*uplinkFastEndpoint)(nil)
var _ stack.NetworkDispatcher = (*uplinkFastEndpoint)(nil)

func newUplinkFastEndpoint(ep stack.LinkEndpoint, fast *fastPath) *uplinkFastEndpoint {
	e := &uplinkFastEndpoint{fast: fast}
	e.Endpoint.Init(ep, e)
	return e
}

// DeliverNetworkPacket implements stack.NetworkDispatcher.
func (e *uplinkFastEndpoint) DeliverNetworkPacket(protocol tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) {
	if e.fast.forward(e.self, protocol, pkt) {
		return
	}
	e.Endpoint.DeliverNetworkPacket(protocol, pkt)
}
