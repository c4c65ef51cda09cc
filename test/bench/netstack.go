package main

import (
	"context"
	"fmt"
	"net/netip"
	"time"

	"github.com/shm-cni/shm-cni/pkg/endpoint/shm"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
)

const nicID = 1

// netstackRTT attaches an in-process gVisor netstack to the shm link at
// socket (as the sandbox program does) and measures round trips to an
// echo server at to: a sandbox-to-sandbox latency with this process as the
// client sandbox.
func netstackRTT(ctx context.Context, socket string, to netip.AddrPort, count int) ([]time.Duration, error) {
	dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	ep, cfg, err := shm.Dial(dctx, socket, shm.DialOptions{})
	if err != nil {
		return nil, err
	}
	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol, arp.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol},
	})
	// As the sandbox program: SACK recovers a burst lost to a full queue.
	sack := tcpip.TCPSACKEnabled(true)
	s.SetTransportProtocolOption(tcp.ProtocolNumber, &sack)
	if err := s.CreateNIC(nicID, ep); err != nil {
		ep.Close()
		ep.Wait()
		s.Close()
		return nil, fmt.Errorf("create NIC: %s", err)
	}
	defer func() {
		s.RemoveNIC(nicID)
		ep.Wait()
		s.Close()
		s.Wait()
	}()
	if err := cfg.Configure(s, nicID); err != nil {
		return nil, err
	}
	c, err := gonet.DialContextTCP(dctx, s, tcpip.FullAddress{NIC: nicID, Addr: tcpip.AddrFromSlice(to.Addr().AsSlice()), Port: to.Port()}, ipv4.ProtocolNumber)
	if err != nil {
		return nil, fmt.Errorf("connect %s: %w", to, err)
	}
	defer c.Close()
	return roundTrips(ctx, c, count)
}
