package router

import (
	"sync"
	"sync/atomic"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// blackhole is a link endpoint that drops and counts every packet written to
// it. The router routes its own pod CIDRs to it (less specific than every
// pod's host route), so that a packet for a pod address without a link is
// dropped here rather than sent to the uplink, which the host routes straight
// back to us (a loop until the TTL runs out).
type blackhole struct {
	// dropped counts packets written; updated atomically.
	dropped atomic.Uint64

	mu sync.Mutex
	// dispatcher is the attached dispatcher, only kept for IsAttached.
	// Guarded by mu.
	dispatcher stack.NetworkDispatcher
}

var _ stack.LinkEndpoint = (*blackhole)(nil)

// MTU implements stack.LinkEndpoint.MTU. The largest IP packet: the blackhole
// accepts everything, so nothing is ever fragmented or refused for size.
func (*blackhole) MTU() uint32 { return maxMTU }

// SetMTU implements stack.LinkEndpoint.SetMTU.
func (*blackhole) SetMTU(uint32) {}

// MaxHeaderLength implements stack.LinkEndpoint.MaxHeaderLength.
func (*blackhole) MaxHeaderLength() uint16 { return 0 }

// LinkAddress implements stack.LinkEndpoint.LinkAddress.
func (*blackhole) LinkAddress() tcpip.LinkAddress { return "" }

// SetLinkAddress implements stack.LinkEndpoint.SetLinkAddress.
func (*blackhole) SetLinkAddress(tcpip.LinkAddress) {}

// Capabilities implements stack.LinkEndpoint.Capabilities.
// Claiming checksum offload spares the stack a checksum of every packet it
// is about to drop here.
func (*blackhole) Capabilities() stack.LinkEndpointCapabilities {
	return stack.CapabilityTXChecksumOffload
}

// Attach implements stack.LinkEndpoint.Attach.
func (b *blackhole) Attach(d stack.NetworkDispatcher) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.dispatcher = d
}

// IsAttached implements stack.LinkEndpoint.IsAttached.
func (b *blackhole) IsAttached() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.dispatcher != nil
}

// Wait implements stack.LinkEndpoint.Wait. The blackhole has no goroutines.
func (*blackhole) Wait() {}

// ARPHardwareType implements stack.LinkEndpoint.ARPHardwareType.
func (*blackhole) ARPHardwareType() header.ARPHardwareType { return header.ARPHardwareNone }

// AddHeader implements stack.LinkEndpoint.AddHeader.
func (*blackhole) AddHeader(*stack.PacketBuffer) {}

// ParseHeader implements stack.LinkEndpoint.ParseHeader.
func (*blackhole) ParseHeader(*stack.PacketBuffer) bool { return true }

// Close implements stack.LinkEndpoint.Close.
func (*blackhole) Close() {}

// SetOnCloseAction implements stack.LinkEndpoint.SetOnCloseAction.
func (*blackhole) SetOnCloseAction(func()) {}

// WritePackets implements stack.LinkWriter.WritePackets. It counts and drops
// pkts; the caller keeps its references, as with every gVisor link writer.
func (b *blackhole) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	n := pkts.Len()
	b.dropped.Add(uint64(n))
	return n, nil
}
