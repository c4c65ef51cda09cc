package router

import (
	"sync"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/link/nested"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// Workaround for a use-after-free in the pinned gVisor's IPv4 forwarding.
//
// ipv4.(*endpoint).forwardPacketWithRoute takes h, a slice of the packet's
// network header, then calls pkt.DeepCopyForForwarding, whose PullUp of the
// (then shared) header chunk moves pkt to a fresh chunk and whose deferred
// payload.Release frees the old one to the chunk pool; only then does it
// read h.TTL(). Another goroutine (any link's reader) may already have taken
// that chunk from the pool and be writing it: the forwarded TTL is then
// garbage, and the race detector reports it on every forwarding test. IPv6
// reads the hop limit before the copy and is not affected.
//
// The fix from outside: the stack's nftables hook CheckForward runs after h
// is taken and before the copy. forwardHolds takes an extra reference to the
// packet there (a Clone shares its chunks), so the chunk h points into
// outlives the TTL read, and drops it when the link's delivery of the packet
// returns. Every NIC's endpoint is wrapped in a holdingEndpoint for that.
// TODO: remove once gVisor reads the TTL before DeepCopyForForwarding.
type forwardHolds struct {
	mu sync.Mutex
	// held maps each packet being delivered by a holdingEndpoint to the
	// clones taken while forwarding it. Guarded by mu.
	held map[*stack.PacketBuffer][]*stack.PacketBuffer
}

var _ stack.NFTablesInterface = (*forwardHolds)(nil)

func newForwardHolds() *forwardHolds {
	return &forwardHolds{held: make(map[*stack.PacketBuffer][]*stack.PacketBuffer)}
}

// begin starts holding for pkt, about to be delivered.
func (f *forwardHolds) begin(pkt *stack.PacketBuffer) {
	f.mu.Lock()
	f.held[pkt] = nil
	f.mu.Unlock()
}

// end releases what was held for pkt, whose delivery returned.
func (f *forwardHolds) end(pkt *stack.PacketBuffer) {
	f.mu.Lock()
	clones := f.held[pkt]
	delete(f.held, pkt)
	f.mu.Unlock()
	for _, c := range clones {
		c.DecRef()
	}
}

// CheckForward implements stack.NFTablesInterface.CheckForward. It accepts
// every packet, holding a reference to IPv4 packets a holdingEndpoint is
// delivering.
func (f *forwardHolds) CheckForward(pkt *stack.PacketBuffer, _ *stack.Route, af stack.AddressFamily) bool {
	if af != stack.IP {
		return true
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if clones, ok := f.held[pkt]; ok {
		f.held[pkt] = append(clones, pkt.Clone())
	}
	return true
}

// CheckPrerouting implements stack.NFTablesInterface; it accepts everything.
func (*forwardHolds) CheckPrerouting(*stack.PacketBuffer, *stack.Route, stack.AddressFamily) bool {
	return true
}

// CheckInput implements stack.NFTablesInterface; it accepts everything.
func (*forwardHolds) CheckInput(*stack.PacketBuffer, *stack.Route, stack.AddressFamily) bool {
	return true
}

// CheckOutput implements stack.NFTablesInterface; it accepts everything.
func (*forwardHolds) CheckOutput(*stack.PacketBuffer, *stack.Route, stack.AddressFamily) bool {
	return true
}

// CheckPostrouting implements stack.NFTablesInterface; it accepts everything.
func (*forwardHolds) CheckPostrouting(*stack.PacketBuffer, *stack.Route, stack.AddressFamily) bool {
	return true
}

// CheckIngress implements stack.NFTablesInterface; it accepts everything.
func (*forwardHolds) CheckIngress(*stack.PacketBuffer, *stack.Route, stack.AddressFamily) bool {
	return true
}

// CheckEgress implements stack.NFTablesInterface; it accepts everything.
func (*forwardHolds) CheckEgress(*stack.PacketBuffer, *stack.Route, stack.AddressFamily) bool {
	return true
}

// holdingEndpoint wraps a link endpoint so that forwardHolds knows which
// packets are being delivered. Everything else, including Attach(nil),
// Close, Wait and GSO, passes through to the wrapped endpoint.
type holdingEndpoint struct {
	nested.Endpoint
	holds *forwardHolds
}

var _ stack.LinkEndpoint = (*holdingEndpoint)(nil)
var _ stack.NetworkDispatcher = (*holdingEndpoint)(nil)

// newHoldingEndpoint wraps ep.
func newHoldingEndpoint(ep stack.LinkEndpoint, holds *forwardHolds) *holdingEndpoint {
	e := &holdingEndpoint{holds: holds}
	e.Endpoint.Init(ep, e)
	return e
}

// DeliverNetworkPacket implements stack.NetworkDispatcher.
func (e *holdingEndpoint) DeliverNetworkPacket(protocol tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) {
	e.holds.begin(pkt)
	e.Endpoint.DeliverNetworkPacket(protocol, pkt)
	e.holds.end(pkt)
}
