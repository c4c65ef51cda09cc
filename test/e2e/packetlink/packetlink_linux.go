// Package packetlink attaches a gVisor netstack to a kernel network
// interface through an AF_PACKET socket, the way runsc's network=sandbox
// does: what a sandbox has without shm-cni, and so the benchmark's
// reference for shm-cni's sandbox links. The sandbox program (--packet) and
// the benchmark's in-process client both use it.
package packetlink

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/shm-cni/shm-cni/pkg/endpoint/shm"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/link/fdbased"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// socketBuffer is the AF_PACKET socket's send and receive buffer, as runsc
// sets it (the default 208 KiB drops packets at high rates).
const socketBuffer = 4 << 20

// Link is a netstack NIC on a kernel interface.
type Link struct {
	// Endpoint is the NIC's link endpoint (gVisor's fdbased, recvmmsg
	// dispatch).
	Endpoint stack.LinkEndpoint
	// Config is what the netstack took from the kernel: the MAC, MTU,
	// addresses and routes (Gateways and GatewayMAC unset: the netstack
	// resolves its neighbours with ARP and NDP).
	Config shm.LinkConfig
	// GSOMaxSize is the largest segment the netstack may hand the socket;
	// 0 without GSO.
	GSOMaxSize uint32

	link   netlink.Link
	addrs  []netlink.Addr
	routes []netlink.Route
}

// Attach takes the kernel interface ifName of the calling thread's network
// namespace over for NIC nic of s, as runsc does: it reads the interface's
// addresses and routes, binds an AF_PACKET socket to it, removes the
// addresses from the kernel (which would otherwise answer the netstack's
// peers itself, with resets) and configures them and the routes in s.
// With gso, the socket carries virtio-net headers (PACKET_VNET_HDR) and the
// netstack sends TCP segments as large as the device takes, as runsc does
// where the device offers segmentation offload. Restore gives the kernel
// its addresses and routes back.
//
// closed, if not nil, is called if the socket fails (the NIC then carries
// nothing).
func Attach(s *stack.Stack, nic tcpip.NICID, ifName string, gso bool, closed func(error)) (*Link, error) {
	link, err := carrier(ifName)
	if err != nil {
		return nil, err
	}
	attrs := link.Attrs()
	l := &Link{link: link}
	l.Config.MAC = attrs.HardwareAddr.String()
	l.Config.MTU = uint32(attrs.MTU)
	addrs, err := netlink.AddrList(link, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("packet link %s: addresses: %w", ifName, err)
	}
	for _, a := range addrs {
		p, ok := prefixOf(a.IPNet)
		if !ok || a.Scope != unix.RT_SCOPE_UNIVERSE {
			continue
		}
		l.addrs = append(l.addrs, a)
		l.Config.Addresses = append(l.Config.Addresses, p)
	}
	if len(l.addrs) == 0 {
		return nil, fmt.Errorf("packet link %s has no global address to take", ifName)
	}
	routes, err := netlink.RouteList(link, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("packet link %s: routes: %w", ifName, err)
	}
	for _, r := range routes {
		lr, ok := linkRoute(r)
		if !ok {
			continue
		}
		l.routes = append(l.routes, r)
		l.Config.Routes = append(l.Config.Routes, lr)
	}

	fd, gsoMax, err := socket(attrs, gso)
	if err != nil {
		return nil, err
	}
	ep, err := fdbased.New(&fdbased.Options{
		FDs:                []int{fd},
		MTU:                l.Config.MTU,
		EthernetHeader:     true,
		Address:            tcpip.LinkAddress(attrs.HardwareAddr),
		PacketDispatchMode: fdbased.RecvMMsg,
		GSOMaxSize:         gsoMax,
		RXChecksumOffload:  true,
		ClosedFunc: func(err tcpip.Error) {
			if closed != nil && err != nil {
				closed(fmt.Errorf("packet link %s: %s", ifName, err))
			}
		},
	})
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("packet link %s: %w", ifName, err)
	}
	l.Endpoint, l.GSOMaxSize = ep, gsoMax
	// From here on the netstack answers for the addresses, not the kernel.
	for i := range l.addrs {
		if err := netlink.AddrDel(link, &l.addrs[i]); err != nil {
			ep.Close()
			return nil, errors.Join(fmt.Errorf("packet link %s: take %s off the kernel: %w", ifName, l.addrs[i].IPNet, err), l.Restore())
		}
	}
	if err := configure(s, nic, ep, &l.Config); err != nil {
		ep.Close()
		return nil, errors.Join(err, l.Restore())
	}
	return l, nil
}

// carrier returns the interface once it has a carrier: a veth whose peer
// was set up a moment ago may not have one yet, and a packet socket read
// then fails.
func carrier(ifName string) (netlink.Link, error) {
	deadline := time.Now().Add(10 * time.Second)
	for {
		link, err := netlink.LinkByName(ifName)
		if err != nil {
			return nil, fmt.Errorf("packet link %s: %w", ifName, err)
		}
		if link.Attrs().RawFlags&unix.IFF_RUNNING != 0 {
			return link, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("packet link %s: no carrier after 10 s (state %s)", ifName, link.Attrs().OperState)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Restore gives the kernel interface back the addresses and routes Attach
// took; the NIC must be gone.
func (l *Link) Restore() error {
	var errs []error
	for i := range l.addrs {
		a := l.addrs[i]
		if err := netlink.AddrReplace(l.link, &a); err != nil {
			errs = append(errs, fmt.Errorf("give back %s: %w", a.IPNet, err))
		}
	}
	for i := range l.routes {
		r := l.routes[i]
		if err := netlink.RouteReplace(&r); err != nil {
			errs = append(errs, fmt.Errorf("give back the route %s: %w", r, err))
		}
	}
	return errors.Join(errs...)
}

// linkRoute converts a kernel route of the interface, leaving out IPv6's
// link-local ones (the netstack has its own).
func linkRoute(r netlink.Route) (shm.LinkRoute, bool) {
	var lr shm.LinkRoute
	switch {
	case r.Dst == nil && r.Family == unix.AF_INET6:
		lr.Dst = netip.PrefixFrom(netip.IPv6Unspecified(), 0)
	case r.Dst == nil:
		lr.Dst = netip.PrefixFrom(netip.IPv4Unspecified(), 0)
	default:
		p, ok := prefixOf(r.Dst)
		if !ok {
			return lr, false
		}
		lr.Dst = p.Masked()
	}
	if lr.Dst.Addr().Is6() && lr.Dst.Addr().IsLinkLocalUnicast() {
		return lr, false
	}
	if gw, ok := netip.AddrFromSlice(r.Gw); ok {
		lr.GW = gw.Unmap()
	}
	return lr, true
}

// configure creates the NIC with the addresses and routes of c.
func configure(s *stack.Stack, nic tcpip.NICID, ep stack.LinkEndpoint, c *shm.LinkConfig) error {
	if err := s.CreateNIC(nic, ep); err != nil {
		return fmt.Errorf("create NIC: %s", err)
	}
	if err := shm.AddAddresses(s, nic, c.Addresses); err != nil {
		s.RemoveNIC(nic)
		return err
	}
	shm.AddRoutes(s, nic, c.Routes)
	return nil
}

// socket opens an AF_PACKET socket bound to the interface, with virtio-net
// headers when gso is asked for; it returns the socket and the largest
// segment the netstack may send (0: none larger than the MTU).
func socket(attrs *netlink.LinkAttrs, gso bool) (int, uint32, error) {
	// Protocol 0 at creation and ETH_P_ALL at bind, as runsc does: no
	// frame of another device is queued before the bind.
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, 0, fmt.Errorf("packet socket: %w", err)
	}
	fail := func(err error) (int, uint32, error) {
		unix.Close(fd)
		return -1, 0, fmt.Errorf("packet socket on %s: %w", attrs.Name, err)
	}
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: attrs.Index}); err != nil {
		return fail(err)
	}
	var gsoMax uint32
	if gso {
		if attrs.GSOMaxSize == 0 {
			return fail(errors.New("the device reports no GSO maximum size"))
		}
		if err := unix.SetsockoptInt(fd, unix.SOL_PACKET, unix.PACKET_VNET_HDR, 1); err != nil {
			return fail(fmt.Errorf("PACKET_VNET_HDR: %w", err))
		}
		gsoMax = attrs.GSOMaxSize
	}
	for _, opt := range []int{unix.SO_RCVBUFFORCE, unix.SO_SNDBUFFORCE} {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, opt, socketBuffer); err != nil {
			return fail(fmt.Errorf("socket buffer: %w", err))
		}
	}
	return fd, gsoMax, nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func prefixOf(n *net.IPNet) (netip.Prefix, bool) {
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones), true
}
