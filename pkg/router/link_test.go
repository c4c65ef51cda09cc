package router

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/link/ethernet"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/shm-cni/shm-cni/internal/tcpipx"
	"github.com/shm-cni/shm-cni/internal/testutil"
)

// These tests drive a router that was never started (no uplink, no root
// needed) through gVisor channel endpoints: frames are injected and read
// back synchronously, so every assertion is deterministic.

var (
	macA  = tcpip.LinkAddress("\x02\x00\x00\x00\x00\x0a")
	macB  = tcpip.LinkAddress("\x02\x00\x00\x00\x00\x0b")
	gwMAC = tcpip.LinkAddress("\x02\x00\x00\x00\x00\x01")
)

// newUnstartedRouter returns a dual-stack router that is closed when t ends.
func newUnstartedRouter(t testing.TB) *Router {
	t.Helper()
	r, err := New(Config{PodCIDRs: []netip.Prefix{podCIDR4, podCIDR6}}, testutil.Logger(t))
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() {
		if err := r.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return r
}

// chanLink is an Ethernet pod link whose frames the test injects and reads.
type chanLink struct {
	ch *channel.Endpoint
	ep stack.LinkEndpoint
}

func newChanLink() chanLink {
	ch := channel.New(64, 1500, gwMAC)
	return chanLink{ch: ch, ep: ethernet.New(ch)}
}

// inject delivers an IP packet from the pod (source MAC podMAC).
func (c chanLink) inject(podMAC tcpip.LinkAddress, ip []byte) {
	proto := header.IPv4ProtocolNumber
	if header.IPVersion(ip) == header.IPv6Version {
		proto = header.IPv6ProtocolNumber
	}
	c.injectFrame(podMAC, proto, ip)
}

// read returns the next frame the router sent on the link, or nil.
func (c chanLink) read() header.Ethernet {
	pkt := c.ch.Read()
	if pkt == nil {
		return nil
	}
	defer pkt.DecRef()
	return header.Ethernet(pkt.ToView().AsSlice())
}

// ipPacket builds an IPv4 or IPv6 packet with hop limit 64.
func ipPacket(src, dst netip.Addr, proto tcpip.TransportProtocolNumber, payload []byte) []byte {
	return tcpipx.IPPacket(src, dst, proto, 64, payload)
}

// echoRequest builds an ICMP or ICMPv6 echo request from src to dst.
func echoRequest(src, dst netip.Addr) []byte {
	if src.Is4() {
		icmp := header.ICMPv4(make([]byte, header.ICMPv4MinimumSize+4))
		icmp.SetType(header.ICMPv4Echo)
		icmp.SetIdent(7)
		icmp.SetSequence(1)
		icmp.SetChecksum(header.ICMPv4Checksum(icmp, 0))
		return ipPacket(src, dst, header.ICMPv4ProtocolNumber, icmp)
	}
	icmp := header.ICMPv6(make([]byte, header.ICMPv6EchoMinimumSize+4))
	icmp.SetType(header.ICMPv6EchoRequest)
	icmp.SetIdent(7)
	icmp.SetSequence(1)
	icmp.SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{
		Header: icmp, Src: tcpipx.Addr(src), Dst: tcpipx.Addr(dst),
	}))
	return ipPacket(src, dst, header.ICMPv6ProtocolNumber, icmp)
}

// ipFields returns the source, destination and hop limit of an IP packet.
func ipFields(b []byte) (src, dst netip.Addr, hops uint8, payload []byte) {
	if header.IPVersion(b) == header.IPv4Version {
		ip := header.IPv4(b)
		src, _ = netip.AddrFromSlice(ip.SourceAddressSlice())
		dst, _ = netip.AddrFromSlice(ip.DestinationAddressSlice())
		return src, dst, ip.TTL(), ip.Payload()
	}
	ip := header.IPv6(b)
	src, _ = netip.AddrFromSlice(ip.SourceAddressSlice())
	dst, _ = netip.AddrFromSlice(ip.DestinationAddressSlice())
	return src, dst, ip.HopLimit(), ip.Payload()
}

// TestGatewayAnswersWithoutResolution checks that the router answers echo
// requests to the link-local gateway straight to the pod's MAC: the static
// neighbor entry makes ARP/NDP towards the pod unnecessary.
func TestGatewayAnswersWithoutResolution(t *testing.T) {
	r := newUnstartedRouter(t)
	a := newChanLink()
	if err := r.AddLink("a", a.ep, Link{Addrs: []netip.Addr{podA4, podA6}, PodMAC: macA, GatewayMAC: gwMAC}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ pod, gw netip.Addr }{{podA4, GatewayV4}, {podA6, GatewayV6}} {
		a.inject(macA, echoRequest(tc.pod, tc.gw))
		frame := a.read()
		if frame == nil {
			t.Fatalf("no answer to echo %s -> %s", tc.pod, tc.gw)
		}
		if got := frame.DestinationAddress(); got != macA {
			t.Errorf("answer to %s went to MAC %s, want the pod's %s", tc.gw, got, macA)
		}
		if got := frame.SourceAddress(); got != gwMAC {
			t.Errorf("answer from %s came from MAC %s, want the gateway MAC %s", tc.gw, got, gwMAC)
		}
		src, dst, _, payload := ipFields(frame[header.EthernetMinimumSize:])
		if src != tc.gw || dst != tc.pod {
			t.Errorf("answer %s -> %s, want %s -> %s", src, dst, tc.gw, tc.pod)
		}
		reply := map[bool]byte{true: byte(header.ICMPv4EchoReply), false: byte(header.ICMPv6EchoReply)}[tc.pod.Is4()]
		if len(payload) == 0 || payload[0] != reply {
			t.Errorf("answer to %s is not an echo reply: % x", tc.gw, payload)
		}
	}
}

// TestForwardsBetweenLinks checks pod-to-pod forwarding (TTL decremented,
// delivered to the right MAC, any transport protocol), and that once a link
// is removed its packets are dropped by the router, its routes are gone and
// its address is free again.
func TestForwardsBetweenLinks(t *testing.T) {
	r := newUnstartedRouter(t)
	a, b := newChanLink(), newChanLink()
	if err := r.AddLink("a", a.ep, Link{Addrs: []netip.Addr{podA4, podA6}, PodMAC: macA}); err != nil {
		t.Fatal(err)
	}
	if err := r.AddLink("b", b.ep, Link{Addrs: []netip.Addr{podB4, podB6}, PodMAC: macB}); err != nil {
		t.Fatal(err)
	}
	udp := make([]byte, header.UDPMinimumSize+8)
	header.UDP(udp).Encode(&header.UDPFields{SrcPort: 1000, DstPort: 2000, Length: uint16(len(udp))})
	for _, tc := range []struct{ src, dst netip.Addr }{{podA4, podB4}, {podA6, podB6}} {
		a.inject(macA, ipPacket(tc.src, tc.dst, header.UDPProtocolNumber, udp))
		frame := b.read()
		if frame == nil {
			t.Fatalf("%s -> %s not forwarded", tc.src, tc.dst)
		}
		if got := frame.DestinationAddress(); got != macB {
			t.Errorf("forwarded to MAC %s, want pod B's %s", got, macB)
		}
		src, dst, hops, _ := ipFields(frame[header.EthernetMinimumSize:])
		if src != tc.src || dst != tc.dst || hops != 63 {
			t.Errorf("forwarded %s -> %s hop limit %d, want %s -> %s hop limit 63", src, dst, hops, tc.src, tc.dst)
		}
	}
	st, err := r.LinkStats("b")
	if err != nil {
		t.Fatal(err)
	}
	if st.TxPackets != 2 {
		t.Errorf("link b TxPackets = %d, want 2", st.TxPackets)
	}
	if st, _ := r.LinkStats("a"); st.RxPackets != 2 {
		t.Errorf("link a RxPackets = %d, want 2", st.RxPackets)
	}

	bNIC := r.links["b"].nicID
	if err := r.RemoveLink("b"); err != nil {
		t.Fatal(err)
	}
	for _, route := range r.stack.GetRouteTable() {
		if route.NIC == bNIC {
			t.Errorf("route %v through removed link b remains", route)
		}
	}
	for _, tc := range []struct{ src, dst netip.Addr }{{podA4, podB4}, {podA6, podB6}} {
		drops := r.UnroutedDrops()
		a.inject(macA, ipPacket(tc.src, tc.dst, header.UDPProtocolNumber, udp))
		if got := r.UnroutedDrops(); got != drops+1 {
			t.Errorf("packet to removed pod %s: unrouted drops %d -> %d, want it dropped by the router", tc.dst, drops, got)
		}
	}
	if frame := b.read(); frame != nil {
		t.Errorf("removed link b still got a frame")
	}
	// B's addresses are free for a new link.
	c := newChanLink()
	if err := r.AddLink("c", c.ep, Link{Addrs: []netip.Addr{podB4}, PodMAC: macB}); err != nil {
		t.Errorf("reusing a removed link's address: %v", err)
	}
	if got, want := r.Links(), []string{"a", "c"}; !slices.Equal(got, want) {
		t.Errorf("Links() = %v, want %v", got, want)
	}
}

// TestAddLinkRejects checks that AddLink refuses bad links and leaves
// nothing behind.
func TestAddLinkRejects(t *testing.T) {
	r := newUnstartedRouter(t)
	if err := r.AddLink("a", newChanLink().ep, Link{Addrs: []netip.Addr{podA4, podA6}, PodMAC: macA}); err != nil {
		t.Fatal(err)
	}
	attached := newChanLink()
	attached.ep.Attach(&nopDispatcher{})
	other := netip.MustParseAddr("10.244.1.30")
	for _, tc := range []struct {
		name string
		id   string
		ep   stack.LinkEndpoint
		l    Link
		want string
	}{
		{"empty id", "", newChanLink().ep, Link{Addrs: []netip.Addr{other}, PodMAC: macB}, "empty link id"},
		{"nil endpoint", "x", nil, Link{Addrs: []netip.Addr{other}}, "nil endpoint"},
		{"attached endpoint", "x", attached.ep, Link{Addrs: []netip.Addr{other}, PodMAC: macB}, "already attached"},
		{"no address", "x", newChanLink().ep, Link{PodMAC: macB}, "no pod address"},
		{"outside pod CIDRs", "x", newChanLink().ep, Link{Addrs: []netip.Addr{netip.MustParseAddr("192.0.2.1")}, PodMAC: macB}, "outside the pod CIDRs"},
		{"node gateway", "x", newChanLink().ep, Link{Addrs: []netip.Addr{nodeGW4}, PodMAC: macB}, "node gateway"},
		{"listed twice", "x", newChanLink().ep, Link{Addrs: []netip.Addr{other, other}, PodMAC: macB}, "listed twice"},
		{"no pod MAC", "x", newChanLink().ep, Link{Addrs: []netip.Addr{other}}, "pod MAC"},
		{"multicast gateway MAC", "x", newChanLink().ep, Link{Addrs: []netip.Addr{other}, PodMAC: macB,
			GatewayMAC: tcpip.LinkAddress("\x01\x00\x5e\x00\x00\x01")}, "gateway MAC"},
		{"id exists", "a", newChanLink().ep, Link{Addrs: []netip.Addr{other}, PodMAC: macB}, "link exists"},
		{"address in use", "x", newChanLink().ep, Link{Addrs: []netip.Addr{podA6}, PodMAC: macB}, "in use by link a"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			nics := len(r.stack.NICInfo())
			err := r.AddLink(tc.id, tc.ep, tc.l)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("AddLink = %v, want an error with %q", err, tc.want)
			}
			if got := len(r.stack.NICInfo()); got != nics {
				t.Errorf("NICs %d -> %d after a refused AddLink", nics, got)
			}
			if got := r.Links(); !slices.Equal(got, []string{"a"}) {
				t.Errorf("Links() = %v, want [a]", got)
			}
		})
	}
	if err := r.RemoveLink("never-added"); err != nil {
		t.Errorf("RemoveLink of an unknown id: %v", err)
	}
	if _, err := r.LinkStats("never-added"); !errors.Is(err, ErrUnknownLink) {
		t.Errorf("LinkStats of an unknown id: err = %v, want ErrUnknownLink", err)
	}
}

// nopDispatcher is a dispatcher that drops everything.
type nopDispatcher struct{}

func (*nopDispatcher) DeliverNetworkPacket(tcpip.NetworkProtocolNumber, *stack.PacketBuffer) {}
func (*nopDispatcher) DeliverLinkPacket(tcpip.NetworkProtocolNumber, *stack.PacketBuffer)    {}
