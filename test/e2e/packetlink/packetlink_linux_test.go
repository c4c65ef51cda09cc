package packetlink

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"

	"github.com/shm-cni/shm-cni/internal/tcpipx"
	"github.com/shm-cni/shm-cni/internal/testutil"
)

// TestAttach: a netstack takes over one end of a veth pair, a kernel
// socket at the other end talks to it (4 MiB each way, compared), and
// once the NIC is gone Restore gives the kernel its address and routes
// back. With and without GSO.
func TestAttach(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespaces)")
	}
	for _, gso := range []bool{false, true} {
		t.Run(map[bool]string{false: "plain", true: "gso"}[gso], func(t *testing.T) { testAttach(t, gso) })
	}
}

func testAttach(t *testing.T, gso bool) {
	sbx, kern := testutil.NewNS(t), testutil.NewNS(t)
	sbxAddr := netip.MustParsePrefix("10.79.0.2/24")
	kernAddr := netip.MustParsePrefix("10.79.0.1/24")
	err := sbx.Do(func(ns.NetNS) error {
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0", MTU: 1500}, PeerName: "k0"}); err != nil {
			return err
		}
		k0, err := netlink.LinkByName("k0")
		if err != nil {
			return err
		}
		if err := netlink.LinkSetNsFd(k0, int(kern.Fd())); err != nil {
			return err
		}
		return up("eth0", sbxAddr)
	})
	if err == nil {
		err = kern.Do(func(ns.NetNS) error { return up("k0", kernAddr) })
	}
	if err != nil {
		t.Fatal(err)
	}

	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol, arp.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol},
	})
	var l *Link
	closed := make(chan error, 1)
	if err := sbx.Do(func(ns.NetNS) error {
		var err error
		l, err = Attach(s, 1, "eth0", gso, func(err error) { closed <- err })
		return err
	}); err != nil {
		s.Close()
		t.Fatal(err)
	}
	if got := l.Config.Addresses; len(got) != 1 || got[0] != sbxAddr {
		t.Errorf("Config.Addresses = %v, want [%v]", got, sbxAddr)
	}
	if gso && l.GSOMaxSize == 0 || !gso && l.GSOMaxSize != 0 {
		t.Errorf("GSOMaxSize = %d with gso %v", l.GSOMaxSize, gso)
	}
	if got := kernelAddrs(t, sbx); len(got) != 0 {
		t.Errorf("the kernel still has %v on eth0 after Attach", got)
	}

	ln, err := gonet.ListenTCP(s, tcpip.FullAddress{NIC: 1, Addr: tcpipx.Addr(sbxAddr.Addr()), Port: 7000}, ipv4.ProtocolNumber)
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		io.Copy(c, c)
	}()
	want := make([]byte, 4<<20)
	rand.Read(want)
	var c net.Conn
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := kern.Do(func(ns.NetNS) error {
		var err error
		c, err = (&net.Dialer{}).DialContext(ctx, "tcp", netip.AddrPortFrom(sbxAddr.Addr(), 7000).String())
		return err
	}); err != nil {
		t.Fatalf("the kernel cannot reach the netstack: %v", err)
	}
	c.SetDeadline(time.Now().Add(30 * time.Second))
	go func() { c.Write(want); c.(*net.TCPConn).CloseWrite() }()
	got, err := io.ReadAll(c)
	c.Close()
	if err != nil || !bytes.Equal(got, want) {
		t.Errorf("echo through the netstack: %d bytes back of %d, equal %v, err %v", len(got), len(want), bytes.Equal(got, want), err)
	}
	ln.Close()

	s.RemoveNIC(1)
	l.Endpoint.Wait()
	s.Close()
	s.Wait()
	select {
	case err := <-closed:
		t.Errorf("the link reported a failure: %v", err)
	default:
	}
	if err := sbx.Do(func(ns.NetNS) error { return l.Restore() }); err != nil {
		t.Fatal(err)
	}
	if got := kernelAddrs(t, sbx); len(got) != 1 || got[0] != sbxAddr {
		t.Errorf("the kernel's eth0 has %v after Restore, want [%v]", got, sbxAddr)
	}
}

func up(name string, p netip.Prefix) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return err
	}
	if err := netlink.AddrAdd(l, &netlink.Addr{IPNet: &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), 32)}}); err != nil {
		return err
	}
	return netlink.LinkSetUp(l)
}

// kernelAddrs returns the kernel's IPv4 addresses on eth0 of n.
func kernelAddrs(t *testing.T, n ns.NetNS) []netip.Prefix {
	t.Helper()
	var out []netip.Prefix
	if err := n.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		as, err := netlink.AddrList(l, netlink.FAMILY_V4)
		if err != nil {
			return err
		}
		for _, a := range as {
			if p, ok := prefixOf(a.IPNet); ok {
				out = append(out, p)
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return out
}
