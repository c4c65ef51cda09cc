package shm

import (
	"context"
	"fmt"
	"io"
	"net"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
)

// Addresses of the two ends of a test link (documentation range).
var (
	serverAddr = tcpip.AddrFrom4([4]byte{192, 0, 2, 1})
	clientAddr = tcpip.AddrFrom4([4]byte{192, 0, 2, 2})
)

const testPort = 7777

// hostStack is a gVisor stack with one NIC on ep holding addr/24, as a
// sandbox or a test peer would run it.
func hostStack(ep stack.LinkEndpoint, addr tcpip.Address) (*stack.Stack, error) {
	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol, arp.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol, icmp.NewProtocol4},
	})
	// SACK recovers a burst lost to a full queue without a timeout, as a
	// Linux peer would.
	sack := tcpip.TCPSACKEnabled(true)
	s.SetTransportProtocolOption(tcp.ProtocolNumber, &sack)
	if err := s.CreateNIC(1, ep); err != nil {
		return nil, fmt.Errorf("CreateNIC: %v", err)
	}
	if err := s.AddProtocolAddress(1, tcpip.ProtocolAddress{
		Protocol:          ipv4.ProtocolNumber,
		AddressWithPrefix: tcpip.AddressWithPrefix{Address: addr, PrefixLen: 24},
	}, stack.AddressProperties{}); err != nil {
		return nil, fmt.Errorf("AddProtocolAddress: %v", err)
	}
	s.SetRouteTable([]tcpip.Route{{Destination: header.IPv4EmptySubnet, NIC: 1}})
	return s, nil
}

// closeStack tears a stack down and waits for its endpoints. NICs go first:
// Stack.Wait waits for link endpoints while holding the stack's lock, which a
// link's receive goroutine may need to finish delivering a packet;
// RemoveNIC stops the link under the lock but closes it outside.
func closeStack(s *stack.Stack, ep stack.LinkEndpoint) {
	s.RemoveNIC(1)
	ep.Wait()
	s.Close()
	s.Wait()
}

// pattern is the verifiable byte stream of a transfer: 8-byte little-endian
// words of (offset ^ seed), so lost, duplicated or reordered bytes show.
func fillPattern(b []byte, off int64, seed uint64) {
	for i := range b {
		pos := off + int64(i)
		w := uint64(pos/8) ^ seed
		b[i] = byte(w >> (8 * uint(pos%8)))
	}
}

// sendPattern writes n bytes of the pattern of seed to w.
func sendPattern(w io.Writer, n int64, seed uint64) error {
	buf := make([]byte, 256<<10)
	for off := int64(0); off < n; {
		c := min(int64(len(buf)), n-off)
		fillPattern(buf[:c], off, seed)
		if _, err := w.Write(buf[:c]); err != nil {
			return fmt.Errorf("write at %d: %w", off, err)
		}
		off += c
	}
	return nil
}

// checkPattern reads exactly n bytes from r and checks them against the
// pattern of seed.
func checkPattern(r io.Reader, n int64, seed uint64) error {
	buf := make([]byte, 256<<10)
	want := make([]byte, len(buf))
	for off := int64(0); off < n; {
		c, err := r.Read(buf[:min(int64(len(buf)), n-off)])
		if c > 0 {
			fillPattern(want[:c], off, seed)
			for i := range c {
				if buf[i] != want[i] {
					return fmt.Errorf("byte %d: got %#x, want %#x", off+int64(i), buf[i], want[i])
				}
			}
			off += int64(c)
		}
		if err != nil {
			if off == n {
				return nil
			}
			return fmt.Errorf("read at %d of %d: %w", off, n, err)
		}
	}
	return nil
}

// exchange runs n verified bytes each way over conn: it sends the pattern of
// sendSeed and checks the pattern of recvSeed.
func exchange(conn net.Conn, n int64, sendSeed, recvSeed uint64) error {
	errc := make(chan error, 1)
	go func() { errc <- sendPattern(conn, n, sendSeed) }()
	rerr := checkPattern(conn, n, recvSeed)
	werr := <-errc
	if rerr != nil {
		return fmt.Errorf("receive: %w", rerr)
	}
	if werr != nil {
		return fmt.Errorf("send: %w", werr)
	}
	return nil
}

// dialStack connects from s to addr:testPort.
func dialStack(ctx context.Context, s *stack.Stack, addr tcpip.Address) (*gonet.TCPConn, error) {
	return gonet.DialContextTCP(ctx, s, tcpip.FullAddress{NIC: 1, Addr: addr, Port: testPort}, ipv4.ProtocolNumber)
}

// listenStack listens on s at addr:testPort.
func listenStack(s *stack.Stack, addr tcpip.Address) (*gonet.TCPListener, error) {
	return gonet.ListenTCP(s, tcpip.FullAddress{NIC: 1, Addr: addr, Port: testPort}, ipv4.ProtocolNumber)
}

// transferTimeout bounds a test transfer; it is a hang guard, not a timing.
const transferTimeout = 10 * time.Minute
