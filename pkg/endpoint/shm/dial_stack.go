package shm

import (
	"fmt"
	"net"
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/shm-cni/shm-cni/internal/tcpipx"
)

// Configure applies c to NIC nic of a sandbox's netstack s (the NIC of the
// endpoint Dial returned): it adds the addresses, a static neighbor entry
// gateway -> GatewayMAC for every gateway (so the sandbox never resolves
// them) and the routes. s must have the network protocols of c's addresses
// (ipv4, ipv6) registered.
func (c *LinkConfig) Configure(s *stack.Stack, nic tcpip.NICID) error {
	if err := c.Validate(); err != nil {
		return fmt.Errorf("configure NIC %d: %w", nic, err)
	}
	gwMAC, _ := net.ParseMAC(c.GatewayMAC) // checked by Validate
	if err := AddAddresses(s, nic, c.Addresses); err != nil {
		return err
	}
	for _, gw := range c.Gateways {
		if err := s.AddStaticNeighbor(nic, tcpipx.ProtocolOf(gw), tcpipx.Addr(gw), tcpip.LinkAddress(gwMAC)); err != nil {
			return fmt.Errorf("configure NIC %d: neighbor %s -> %s: %s", nic, gw, c.GatewayMAC, err)
		}
	}
	AddRoutes(s, nic, c.Routes)
	return nil
}

// AddAddresses adds addrs (IPv4 or IPv6 prefixes) to NIC nic of s.
func AddAddresses(s *stack.Stack, nic tcpip.NICID, addrs []netip.Prefix) error {
	for _, p := range addrs {
		pa := tcpip.ProtocolAddress{
			Protocol:          tcpipx.ProtocolOf(p.Addr()),
			AddressWithPrefix: tcpip.AddressWithPrefix{Address: tcpipx.Addr(p.Addr()), PrefixLen: p.Bits()},
		}
		if err := s.AddProtocolAddress(nic, pa, stack.AddressProperties{}); err != nil {
			return fmt.Errorf("configure NIC %d: add address %s: %s", nic, p, err)
		}
	}
	return nil
}

// AddRoutes adds routes through NIC nic to s.
func AddRoutes(s *stack.Stack, nic tcpip.NICID, routes []LinkRoute) {
	for _, r := range routes {
		rt := tcpip.Route{
			Destination: tcpip.AddressWithPrefix{Address: tcpipx.Addr(r.Dst.Addr()), PrefixLen: r.Dst.Bits()}.Subnet(),
			NIC:         nic,
		}
		if r.GW.IsValid() {
			rt.Gateway = tcpipx.Addr(r.GW)
		}
		s.AddRoute(rt)
	}
}
