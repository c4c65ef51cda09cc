package router

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"

	"github.com/shm-cni/shm-cni/internal/tcpipx"
	"github.com/shm-cni/shm-cni/pkg/endpoint/shm"
	"github.com/shm-cni/shm-cni/pkg/linkspec"
	"github.com/shm-cni/shm-cni/pkg/queue"
)

// sandboxMTU is a sandbox link's MTU, as the agent gives one by default
// (linkspec.DefaultShmMTU).
const sandboxMTU = 65000

// sandboxPod is a pod whose network stack is a netstack in the test
// process on a shared-memory link: the router drives the server end, as
// the agent attaches a sandbox, and the pod's stack the client end.
type sandboxPod struct {
	s     *stack.Stack
	srv   *shm.Server
	addrs []netip.Addr
}

// sandboxOpts vary a sandbox pod's link.
type sandboxOpts struct {
	// mac is the last byte of the pod's MAC.
	mac byte
	// rxGSO has the pod take checksum offload from the router (over a
	// peer socket, as the agent's links do).
	rxGSO bool
	// bandwidth limits the pod's link.
	bandwidth linkspec.Bandwidth
}

// newSandboxPod attaches a sandbox link with addrs to r as link id and
// brings up the pod's netstack on it, configured as the agent's link
// config says (addresses, default routes through the link-local gateways,
// the gateway MAC). Everything is removed when t ends.
func newSandboxPod(t testing.TB, r *Router, id string, addrs ...netip.Addr) *sandboxPod {
	t.Helper()
	return newSandboxPodWith(t, r, id, sandboxOpts{mac: 0x30}, addrs...)
}

// newSandboxPodWith is newSandboxPod with o.
func newSandboxPodWith(t testing.TB, r *Router, id string, o sandboxOpts, addrs ...netip.Addr) *sandboxPod {
	t.Helper()
	pair, err := queue.NewPair(queue.DefaultSizes())
	if err != nil {
		t.Fatal(err)
	}
	defer pair.Close() // the endpoints keep their own mappings and descriptors
	peer := [2]int{-1, -1}
	if o.rxGSO {
		if peer, err = unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0); err != nil {
			t.Fatal(err)
		}
		defer unix.Close(peer[0]) // the endpoints keep their own duplicates
		defer unix.Close(peer[1])
	}
	podMAC := tcpip.LinkAddress([]byte{2, 0, 0, 0, 0, o.mac})
	cli, err := shm.NewClient(shm.Options{Pair: pair, MTU: sandboxMTU, LinkAddress: podMAC, PeerFD: peer[1], TxGSO: true, RxGSO: o.rxGSO})
	if err != nil {
		t.Fatalf("shm client: %v", err)
	}
	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol, arp.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol},
	})
	if err := s.CreateNIC(1, cli); err != nil {
		cli.Close()
		cli.Wait()
		t.Fatalf("create NIC: %s", err)
	}
	// Registered before the link's removal, so it runs after it.
	t.Cleanup(func() {
		s.RemoveNIC(1) // closes the client endpoint
		cli.Wait()
		s.Close()
		s.Wait()
	})
	srv, err := shm.NewServer(shm.Options{Pair: pair, MTU: sandboxMTU, LinkAddress: gatewayMAC, PeerFD: peer[0],
		Forwarding: true, TxGSO: true, RxGSO: o.rxGSO})
	if err != nil {
		t.Fatalf("shm server: %v", err)
	}
	if err := r.AddLink(id, srv, Link{Addrs: addrs, PodMAC: podMAC, GatewayMAC: gatewayMAC, Bandwidth: o.bandwidth}); err != nil {
		srv.Close()
		srv.Wait()
		t.Fatalf("add link: %v", err)
	}
	t.Cleanup(func() {
		if err := r.RemoveLink(id); err != nil {
			t.Errorf("remove link %s: %v", id, err)
		}
	})
	cfg := shm.LinkConfig{
		Version: shm.LinkConfigVersion, MAC: net.HardwareAddr(podMAC).String(),
		GatewayMAC: net.HardwareAddr(gatewayMAC).String(), MTU: sandboxMTU,
		BufferSize: queue.DefaultSizes().BufferSize, TxGSO: true,
	}
	for _, a := range addrs {
		gw, dst := GatewayV6, netip.PrefixFrom(netip.IPv6Unspecified(), 0)
		if a.Is4() {
			gw, dst = GatewayV4, netip.PrefixFrom(netip.IPv4Unspecified(), 0)
		}
		cfg.Addresses = append(cfg.Addresses, netip.PrefixFrom(a, a.BitLen()))
		cfg.Routes = append(cfg.Routes, shm.LinkRoute{Dst: dst, GW: gw})
		cfg.Gateways = append(cfg.Gateways, gw)
	}
	if err := cfg.Configure(s, 1); err != nil {
		t.Fatal(err)
	}
	return &sandboxPod{s: s, srv: srv, addrs: addrs}
}

// fullAddress is addr:port on the sandbox's NIC.
func fullAddress(addr netip.Addr, port uint16) tcpip.FullAddress {
	return tcpip.FullAddress{NIC: 1, Addr: tcpipx.Addr(addr), Port: port}
}

// listen listens on addr:port in the sandbox until t ends.
func (p *sandboxPod) listen(t testing.TB, addr netip.Addr, port uint16) net.Listener {
	t.Helper()
	ln, err := gonet.ListenTCP(p.s, fullAddress(addr, port), tcpipx.ProtocolOf(addr))
	if err != nil {
		t.Fatalf("sandbox listen %s port %d: %v", addr, port, err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// dial connects from the sandbox to addr:port, giving up after wait.
func (p *sandboxPod) dial(addr netip.Addr, port uint16, wait time.Duration) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	return gonet.DialContextTCP(ctx, p.s, fullAddress(addr, port), tcpipx.ProtocolOf(addr))
}
