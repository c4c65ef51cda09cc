package shm

import (
	"runtime"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/shm-cni/shm-cni/pkg/queue"
)

// stuckDispatcher delivers until it has seen one packet, then blocks the
// link's receive loop until released: a sandbox that stops consuming.
type stuckDispatcher struct {
	next    stack.NetworkDispatcher
	seen    chan struct{}
	release chan struct{}
}

func (d *stuckDispatcher) DeliverNetworkPacket(p tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) {
	select {
	case d.seen <- struct{}{}:
		<-d.release
	default:
	}
}

func (d *stuckDispatcher) DeliverLinkPacket(tcpip.NetworkProtocolNumber, *stack.PacketBuffer) {}

// TestForwardingFullRingDrops forwards a UDP flood through a gVisor IPv4
// router to a sandbox that stopped consuming. gVisor's own sharedmem
// endpoint returns ErrWouldBlock there, on which IPv4 forwarding panics; the
// server endpoint drops and counts instead, and the router keeps working.
func TestForwardingFullRingDrops(t *testing.T) {
	if raceEnabled {
		// gVisor's forwardPacketWithRoute reads the IPv4 TTL from the
		// incoming packet after DeepCopyForForwarding released its chunk;
		// the race detector reports it (pkg/router works around it). The
		// plain test run covers this test.
		t.Skip("skipped under the race detector: gVisor IPv4 forwarding use-after-release")
	}
	srvA, cliA := newLinkPair(t, 1500, queue.DefaultSizes())
	// B's queue is small (32 buffers) so that the flood fills it quickly.
	srvB, cliB := newLinkPair(t, 1500, queue.Sizes{DataSize: 64 << 10, PipeSize: 16 << 10, BufferSize: 2048})

	router := stack.New(stack.Options{NetworkProtocols: []stack.NetworkProtocolFactory{ipv4.NewProtocol}})
	defer closeStackNICs(router, srvA, srvB)
	if err := router.SetForwardingDefaultAndAllNICs(ipv4.ProtocolNumber, true); err != nil {
		t.Fatal(err)
	}
	subnet := func(c byte) tcpip.Subnet {
		s, _ := tcpip.NewSubnet(tcpip.AddrFrom4([4]byte{10, 0, c, 0}), tcpip.MaskFromBytes([]byte{255, 255, 255, 0}))
		return s
	}
	for i, ep := range []stack.LinkEndpoint{srvA, srvB} {
		nic := tcpip.NICID(i + 1)
		if err := router.CreateNIC(nic, ep); err != nil {
			t.Fatal(err)
		}
		router.AddProtocolAddress(nic, tcpip.ProtocolAddress{Protocol: ipv4.ProtocolNumber,
			AddressWithPrefix: tcpip.AddressWithPrefix{Address: tcpip.AddrFrom4([4]byte{10, 0, byte(i), 1}), PrefixLen: 24}}, stack.AddressProperties{})
		router.AddRoute(tcpip.Route{Destination: subnet(byte(i)), NIC: nic})
	}
	router.SetForwardingDefaultAndAllNICs(ipv4.ProtocolNumber, true)

	a, err := hostStack(cliA, tcpip.AddrFrom4([4]byte{10, 0, 0, 2}))
	if err != nil {
		t.Fatal(err)
	}
	defer closeStack(a, cliA)
	stuck := &stuckDispatcher{seen: make(chan struct{}), release: make(chan struct{})}
	cliB.Attach(stuck)
	defer cliB.Close()
	defer close(stuck.release)

	conn, err := gonet.DialUDP(a, nil, &tcpip.FullAddress{NIC: 1, Addr: tcpip.AddrFrom4([4]byte{10, 0, 1, 2}), Port: 9}, ipv4.ProtocolNumber)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	payload := make([]byte, 1000)
	// Flood until B's link drops (A's own queue may drop some writes when
	// the router lags: that is fine, the test needs B's drops), then a
	// little more. The bound is a hang guard.
	flooded := 0
	for srvB.Stats().TxDrops.Load() < 100 {
		if flooded++; flooded > 1_000_000 {
			t.Fatalf("no forwarded packet dropped after %d writes; B link %+v", flooded, srvB.Stats().Snapshot())
		}
		conn.Write(payload) // UDP: a full send path may refuse a datagram
		if flooded%64 == 0 {
			runtime.Gosched()
		}
	}
	st := srvB.Stats().Snapshot()
	t.Logf("sandbox B link: %+v", st)
	if st.TxPackets == 0 {
		t.Error("nothing reached B before its ring filled")
	}
	if got := router.Stats().IP.Forwarding.Errors.Value(); got != 0 {
		t.Errorf("router counted %d forwarding errors; a full link must drop silently", got)
	}
}

// closeStackNICs removes every NIC of s (numbered 1..len(eps)), waits for the
// endpoints and closes s.
func closeStackNICs(s *stack.Stack, eps ...stack.LinkEndpoint) {
	for i, ep := range eps {
		s.RemoveNIC(tcpip.NICID(i + 1))
		ep.Wait()
	}
	s.Close()
	s.Wait()
}
